"""Every shipped YAML under configs/ resolves through the real schema; the paper configs say what the paper says."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

import tip
from eval.benchmarks import _DAPO_PREFIX, _DAPO_SUFFIX, load_benchmark
from eval.runner import prompt_format
from lm.config import ModelConfig
from lm.tokenizers import load_tokenizer
from opd.config import ConfigError, load_config
from opd.data import encode_prompt

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# configs/accelerate/*.yaml are accelerate's launcher files, not ours.
OUR_YAML = sorted(p for p in CONFIGS.rglob("*.yaml") if "accelerate" not in p.relative_to(CONFIGS).parts)
PAIRS = sorted((CONFIGS / "pairs").glob("*.yaml"))
METHODS = sorted((CONFIGS / "methods").glob("*.yaml"))
MATH_PAIRS = ["qwen3-8b_to_qwen3-4b", "llama3.3-70b_to_llama3.1-8b", "qwen2.5-14b_to_qwen2.5-1.5b"]
AGENTIC_PAIRS = ["qwen3-14b_to_qwen3-1.7b", "qwen3-32b_to_qwen3-1.7b"]
# SPEC section 3: the selector names the tip registry must provide.
SPEC_SELECTORS = {"all", "entropy_sample", "entropy_topk", "soft_or", "q3_only", "soft_or_bottom", "random", "adaptive_kl",
                  "teacher_entropy"}
# SPEC section 5: the reference implementation's training and evaluation sentence.
REFERENCE_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _only_missing_required(problems: list[str]) -> bool:
    """A fragment (method file, base) lacks only the fields a pair provides."""
    return all("is empty" in line for line in problems)


def test_the_paper_configs_are_shipped():
    assert {p.stem for p in PAIRS} >= set(MATH_PAIRS + AGENTIC_PAIRS)
    assert {p.stem for p in METHODS} >= {
        "all", "entropy_sample_50", "entropy_sample_20", "entropy_topk_50", "entropy_topk_20", "soft_or_50",
        "soft_or_20", "q3_only_10", "q3_only_20", "soft_or_bottom_50", "adaptive_kl_50", "teacher_entropy",
    }
    assert (CONFIGS / "base.yaml").is_file()


@pytest.mark.parametrize("path", OUR_YAML, ids=_rel)
def test_every_yaml_resolves(path):
    """Alone if complete; a fragment (it names no model or data) after a pair file."""
    try:
        load_config([path])
        return
    except ConfigError as exc:
        if not _only_missing_required(exc.problems):
            pytest.fail(f"{_rel(path)} does not resolve:\n" + "\n".join(exc.problems))
    load_config([PAIRS[0], path])


@pytest.mark.parametrize("pair,method", list(itertools.product(PAIRS, METHODS)), ids=lambda p: p.stem)
def test_every_pair_method_combination_resolves(pair, method):
    cfg = load_config([pair, method])
    method_data = yaml.safe_load(method.read_text())
    # the method decides the selection, nothing else
    assert cfg.tip.selector == method_data["tip"]["selector"]
    assert cfg.tip.ratio == pytest.approx(float(method_data["tip"]["ratio"]))


@pytest.mark.parametrize("method", METHODS, ids=lambda p: p.stem)
def test_method_files_hold_tip_keys_only_and_match_their_name(method):
    data = yaml.safe_load(method.read_text())
    assert set(data) == {"tip"}, f"{_rel(method)}: method files set tip.* only"
    selector, ratio = data["tip"]["selector"], float(data["tip"]["ratio"])
    assert selector in SPEC_SELECTORS
    stem = method.stem
    if stem[-2:].isdigit():  # entropy_sample_50 -> entropy_sample at 0.5
        assert stem[:-3] == selector
        assert ratio == pytest.approx(int(stem[-2:]) / 100)
    else:
        assert (stem, ratio) == (selector, 1.0)


@pytest.mark.parametrize("method", METHODS, ids=lambda p: p.stem)
def test_method_selectors_are_registered_in_tip(method):
    selector = yaml.safe_load(method.read_text())["tip"]["selector"]
    if selector == "adaptive_kl" and selector not in tip.SELECTORS:
        pytest.skip("the adaptive_kl selector (SPEC section 3) is not in this checkout's tip registry yet")
    assert selector in tip.SELECTORS, f"{_rel(method)}: selector {selector} is not registered in tip"


@pytest.mark.parametrize("pair", MATH_PAIRS + AGENTIC_PAIRS)
def test_pairs_carry_the_papers_hyperparameters(pair):
    cfg = load_config([CONFIGS / "pairs" / f"{pair}.yaml"])
    # SPEC section 5, reference-implementation defaults
    # the agentic pairs: 32 tasks per step, so 15 epochs are 15 passes over DeepPlanning's 96 training tasks
    assert cfg.train.prompts_per_step == (256 if pair in MATH_PAIRS else 32)
    assert cfg.train.mini_batch_size in (0, cfg.train.prompts_per_step)  # ONE optimiser update per step
    assert cfg.train.micro_batch_size == 4
    # SPEC section 6: the reference agent script's prompt cap is 4,096 tokens
    assert cfg.data.max_prompt_length == (2048 if pair in MATH_PAIRS else 4096)
    assert cfg.rollout.max_new_tokens == 8192
    assert cfg.rollout.n == 1
    assert (cfg.rollout.temperature, cfg.rollout.top_p) == (1.0, 1.0)
    assert cfg.rollout.engine == "vllm"  # the paper's runs generate with an inference engine (SGLang upstream)
    assert cfg.opd.loss_type == "reverse_kl"
    assert cfg.opd.chunk_size == 256
    assert cfg.optim.weight_decay == 0.1
    assert cfg.optim.warmup_steps == 0
    assert cfg.optim.schedule == "cosine"
    assert cfg.train.epochs == 15
    assert cfg.eval.every == 5
    assert cfg.train.save_every == 20
    assert (cfg.eval.k, cfg.eval.temperature) == (16, 1.0)
    assert cfg.model.dtype == cfg.teacher.dtype == "bfloat16"
    assert cfg.model.gradient_checkpointing
    expected_lr = 3e-7 if pair.startswith("llama") else 1e-6
    assert cfg.optim.lr == pytest.approx(expected_lr)
    if pair in MATH_PAIRS:
        assert cfg.eval.benchmarks == ["math500", "aime24", "aime25"]
        assert cfg.data.train_path == "hub:BytedTsinghua-SIA/DAPO-Math-17k"
        assert cfg.data.val_ratio == 0.2
        assert cfg.data.answer_key == "reward_model.ground_truth"
        assert cfg.data.enable_thinking is False
        # the deduplicated DAPO prompts, DAPO's own answer instruction stripped, a blank line, the reference sentence
        assert cfg.data.dedup is True
        assert cfg.data.prompt_format == "dapo"
        assert (cfg.data.instruction_separator, cfg.data.instruction) == ("\n\n", REFERENCE_INSTRUCTION)
        assert (cfg.eval.instruction_separator, cfg.eval.instruction) == ("\n\n", REFERENCE_INSTRUCTION)
    else:
        assert cfg.data.enable_thinking is True
        # SPEC section 6: DeepPlanning travel tasks, 80% train / 20% held out (evaluated as `heldout`),
        # the reference agent script's conversation caps
        assert cfg.agent.env == "deepplanning_travel" and cfg.data.train_path == ""
        assert cfg.agent.heldout_ratio == 0.2 and cfg.eval.heldout and cfg.eval.benchmarks == []
        assert (cfg.agent.max_response_tokens, cfg.agent.max_turns, cfg.agent.max_tool_response_tokens) == (24576, 50, 1024)


@pytest.mark.parametrize("pair", MATH_PAIRS)
def test_paper_prompts_are_the_reference_implementations(pair, tmp_path):
    """Training: DAPO's own answer instruction gone, question + blank line + the sentence. Evaluation: the same."""
    cfg = load_config([CONFIGS / "pairs" / f"{pair}.yaml"])
    tok = load_tokenizer(ModelConfig(tokenizer="chars"))  # a chat template without a download
    dapo_record = [{"role": "user", "content": _DAPO_PREFIX + "Find x if 2x = 4." + _DAPO_SUFFIX}]
    text = tok.decode(encode_prompt(tok, dapo_record, cfg.data))
    assert text == f"<|user|>Find x if 2x = 4.\n\n{REFERENCE_INSTRUCTION}<|end|><|assistant|>"
    bench = tmp_path / "b.jsonl"
    bench.write_text('{"id": "p0", "problem": "What is 1+1? ", "answer": "2"}\n')
    (problem,) = load_benchmark(f"b={bench}", 0, prompt_format(cfg.eval)).problems
    assert problem.prompt == f"What is 1+1?\n\n{REFERENCE_INSTRUCTION}"


def test_pair_model_ids():
    def paths(pair):
        cfg = load_config([CONFIGS / "pairs" / f"{pair}.yaml"])
        return cfg.model.path, cfg.teacher.path

    assert paths("llama3.3-70b_to_llama3.1-8b") == ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.3-70B-Instruct")
    assert paths("qwen2.5-14b_to_qwen2.5-1.5b") == ("Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-14B-Instruct")
    assert paths("qwen3-14b_to_qwen3-1.7b") == ("Qwen/Qwen3-1.7B", "Qwen/Qwen3-14B")
    assert paths("qwen3-32b_to_qwen3-1.7b") == ("Qwen/Qwen3-1.7B", "Qwen/Qwen3-32B")
    student, teacher = paths("qwen3-8b_to_qwen3-4b")
    assert student == "Qwen/Qwen3-4B"
    assert "grpo" in teacher  # a named placeholder for the GRPO-trained teacher, overridable
    cfg = load_config([CONFIGS / "pairs" / "qwen3-8b_to_qwen3-4b.yaml"], ["teacher.path=/ckpt/mine"])
    assert cfg.teacher.path == "/ckpt/mine"


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {CONFIGS / 'pairs' / 'qwen3-8b_to_qwen3-4b.yaml'}\ntrain:\n  prompts_per_stepp: 128\n")
    with pytest.raises(ConfigError) as info:
        load_config([bad])
    (line,) = info.value.problems
    assert "train.prompts_per_stepp" in line and str(bad) in line


def test_unknown_section_in_a_method_file_names_it(tmp_path):
    bad = tmp_path / "method.yaml"
    bad.write_text("tipp:\n  selector: soft_or\n")
    with pytest.raises(ConfigError) as info:
        load_config([PAIRS[0], bad])
    assert any("`tipp`" in line and str(bad) in line for line in info.value.problems)


def test_wrong_type_in_a_pair_override_is_reported(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config([CONFIGS / "pairs" / "qwen3-8b_to_qwen3-4b.yaml", CONFIGS / "methods" / "soft_or_50.yaml"],
                     ["tip.ratio=1.5", "optim.lr=fast"])
    text = "\n".join(info.value.problems)
    assert "tip.ratio" in text and "optim.lr" in text


def test_min_new_tokens_above_the_maximum_or_in_an_agentic_run_is_refused():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.train_path=x.jsonl", "model.arch=llama", "teacher.arch=llama",
                           "rollout.max_new_tokens=8", "rollout.min_new_tokens=9"])
    assert "rollout.min_new_tokens = 9 is more than rollout.max_new_tokens = 8" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["agent.env=deepplanning", "model.arch=llama", "teacher.arch=llama",
                           "rollout.min_new_tokens=4"])
    assert "rollout.min_new_tokens = 4: an agentic run's turns" in str(info.value)
    assert load_config(None, ["data.train_path=x.jsonl", "model.arch=llama", "teacher.arch=llama",
                              "rollout.max_new_tokens=8", "rollout.min_new_tokens=8"]).rollout.min_new_tokens == 8
