"""`evaluate` end to end: a tiny random model, and scripted models whose answers we control."""

import json
import math
from collections import defaultdict

import pytest
import torch

from eval import grader
from eval.runner import SUMMARY_KEYS, build_prompt_ids, evaluate, flat_metrics
from eval.config import EvalConfig
from lm.config import ModelConfig
from lm.tokenizers import char_tokenizer
from lm.models import load_model


SAMPLE_KEYS = {"benchmark", "problem_id", "sample", "response", "extracted", "correct", "length", "truncated", "answer"}


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


class ScriptedModel(torch.nn.Module):
    """Stands in for a causal LM: `respond(prompt_ids) -> text` decides each response.

    Draws made inside `respond` with torch's global RNG are fixed by the seed
    `lm.rollout.sample` sets, like real sampling. `calls` records the rows of
    every generate call.
    """

    def __init__(self, tokenizer, respond):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # sample() reads the device off a parameter
        self.tok = tokenizer
        self.respond = respond
        self.calls = []

    def generate(self, input_ids, attention_mask, generation_config, synced_gpus=False):
        self.calls.append(input_ids.shape[0])
        width = input_ids.shape[1]
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = tuple(t for t, m in zip(ids, mask) if m)
            resp = self.tok(self.respond(prompt), add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            rows.append(resp[:generation_config.max_new_tokens])
        out = torch.full((len(rows), width + max(map(len, rows))), self.tok.pad_token_id, dtype=torch.long)
        out[:, :width] = input_ids
        for r, resp in enumerate(rows):
            out[r, width:width + len(resp)] = torch.tensor(resp)
        return out


def answers_by_prompt(tokenizer, path, n):
    """prompt token ids -> gold answer, for the first n problems of a local benchmark file."""
    from eval.benchmarks import load_benchmark

    bench = load_benchmark(str(path), n)
    return {
        tuple(build_prompt_ids(tokenizer, p.prompt, chat_template=True, enable_thinking=False, system_prompt="")): p.answer
        for p in bench.problems
    }


def read_samples(out_dir):
    return [json.loads(line) for line in (out_dir / "samples.jsonl").open()]


# ----------------------------------------------------------------------------


def test_tiny_random_model_writes_the_pinned_schema(tokenizer, shared_eval, tmp_path):
    model = load_model(
        ModelConfig(arch="qwen3", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64),
        tokenizer, torch.device("cpu"), trainable=False,
    )
    cfg = EvalConfig(k=3, max_new_tokens=12, max_problems=2, batch_size=4)
    specs = [f"aime24={shared_eval / 'aime24.jsonl'}", str(shared_eval / "math500.jsonl")]
    summary = evaluate(model, tokenizer, specs, cfg, tmp_path / "ev", seed=3, step=7)

    assert set(summary) == {"step", "k", "benchmarks"}
    assert summary["step"] == 7 and summary["k"] == 3
    assert list(summary["benchmarks"]) == ["aime24", "math500"]
    for m in summary["benchmarks"].values():
        assert set(m) == set(SUMMARY_KEYS)
        assert m["n_problems"] == 2
        for key in ("mean@k", "std@k", "pass@k", "maj@k"):
            assert isinstance(m[key], float) and 0.0 <= m[key] <= 100.0
        assert 1.0 <= m["mean_length"] <= 12.0
        assert 0.0 <= m["truncation_rate"] <= 1.0
    assert json.loads((tmp_path / "ev" / "summary.json").read_text()) == summary

    samples = read_samples(tmp_path / "ev")
    assert len(samples) == 2 * 2 * 3
    assert all(set(s) == SAMPLE_KEYS for s in samples)
    per_problem = defaultdict(list)
    for s in samples:
        per_problem[(s["benchmark"], s["problem_id"])].append(s["sample"])
        assert 1 <= s["length"] <= 12
        assert s["length"] == 12 or not s["truncated"]  # truncated means it ran out of tokens
        assert s["correct"] == grader.grade(s["response"], s["answer"])
    assert sorted(per_problem) == [("aime24", "aime24-000"), ("aime24", "aime24-001"),
                                   ("math500", "math500-000"), ("math500", "math500-001")]
    assert all(sorted(v) == [0, 1, 2] for v in per_problem.values())
    for name, m in summary["benchmarks"].items():
        mine = [s for s in samples if s["benchmark"] == name]
        assert m["truncation_rate"] == pytest.approx(sum(s["truncated"] for s in mine) / len(mine))
        assert m["mean_length"] == pytest.approx(sum(s["length"] for s in mine) / len(mine))

    assert flat_metrics(summary) == {
        f"val/{name}/{key}@3": summary["benchmarks"][name][f"{key}@k"]
        for name in ("aime24", "math500") for key in ("mean", "std", "pass")
    }


def test_scripted_model_metrics_match_a_naive_recount(tokenizer, shared_eval, tmp_path):
    path = shared_eval / "aime25.jsonl"
    gold = answers_by_prompt(tokenizer, path, 6)

    def respond(prompt):
        u = torch.rand(()).item()
        answer = gold[prompt]
        if u < 0.45:
            return f"so the answer is \\boxed{{{answer}}}"
        if u < 0.75:
            return f"maybe \\boxed{{{int(answer) + 1}}}"
        if u < 0.9:
            return "I give up"
        return "x" * 100  # runs out of tokens

    model = ScriptedModel(tokenizer, respond)
    cfg = EvalConfig(k=5, max_new_tokens=40, max_problems=6, batch_size=7)
    summary = evaluate(model, tokenizer, [str(path)], cfg, tmp_path, seed=11)
    m = summary["benchmarks"]["aime25"]
    samples = read_samples(tmp_path)
    assert len(samples) == 30

    # Every generate call holds at most batch_size sequences and all 30 are generated.
    assert sum(model.calls) == 30 and max(model.calls) <= 7 and len(model.calls) == math.ceil(30 / 7)

    grid = defaultdict(dict)
    for s in samples:
        grid[s["problem_id"]][s["sample"]] = s
    correct = [[grid[p][j]["correct"] for j in range(5)] for p in sorted(grid)]
    assert any(any(row) for row in correct) and not all(all(row) for row in correct)  # a real mix
    cols = [100 * sum(row[j] for row in correct) / 6 for j in range(5)]
    assert m["mean@k"] == pytest.approx(sum(cols) / 5)
    assert m["std@k"] == pytest.approx(math.sqrt(sum((c - sum(cols) / 5) ** 2 for c in cols) / 5))
    assert m["pass@k"] == pytest.approx(100 * sum(any(row) for row in correct) / 6)
    maj = 0
    for p in sorted(grid):
        answers = [grid[p][j]["extracted"] for j in range(5)]
        votes = [a for a in answers if a is not None]
        if votes:
            top = max(votes.count(a) for a in votes)
            winner = next(a for a in answers if a is not None and answers.count(a) == top)
            maj += grid[p][answers.index(winner)]["correct"]
    assert m["maj@k"] == pytest.approx(100 * maj / 6)
    truncated = [s for s in samples if s["truncated"]]
    assert truncated and all(s["length"] == 40 for s in truncated)
    assert m["truncation_rate"] == pytest.approx(len(truncated) / 30)
    for s in samples:
        assert s["extracted"] == grader.extract_answer(s["response"])
        assert s["correct"] == (s["extracted"] == s["answer"])


def test_an_oracle_scores_100_and_samples_are_reproducible(tokenizer, shared_eval, tmp_path):
    path = shared_eval / "aime24.jsonl"
    gold = answers_by_prompt(tokenizer, path, 4)
    oracle = ScriptedModel(tokenizer, lambda prompt: f"\\boxed{{{gold[prompt]}}}")
    cfg = EvalConfig(k=2, max_new_tokens=20, max_problems=4, batch_size=3)
    m = evaluate(oracle, tokenizer, [str(path)], cfg, tmp_path / "o")["benchmarks"]["aime24"]
    assert (m["mean@k"], m["std@k"], m["pass@k"], m["maj@k"]) == (100.0, 0.0, 100.0, 100.0)

    noisy = ScriptedModel(tokenizer, lambda prompt: f"\\boxed{{{torch.randint(0, 1000, ()).item()}}}")
    evaluate(noisy, tokenizer, [str(path)], cfg, tmp_path / "a", seed=5)
    evaluate(noisy, tokenizer, [str(path)], cfg, tmp_path / "b", seed=5)
    evaluate(noisy, tokenizer, [str(path)], cfg, tmp_path / "c", seed=6)
    assert read_samples(tmp_path / "a") == read_samples(tmp_path / "b")
    assert read_samples(tmp_path / "a") != read_samples(tmp_path / "c")


def test_sharded_results_gather_into_the_single_process_summary(tokenizer, shared_eval, tmp_path):
    path = shared_eval / "aime24.jsonl"
    gold = answers_by_prompt(tokenizer, path, 5)
    # Deterministic per prompt, so the split over processes cannot change the outcome.
    model = ScriptedModel(tokenizer, lambda p: f"\\boxed{{{gold[p]}}}" if int(gold[p]) % 2 else "\\boxed{0}")
    cfg = EvalConfig(k=2, max_new_tokens=20, max_problems=5, batch_size=4)
    single = evaluate(model, tokenizer, [str(path)], cfg, tmp_path / "single")

    # Two "processes" run one after the other; rank 1 goes first and rank 0's gather hands its part over.
    parts = {}

    def gather_on_rank1(mine):
        parts["r1"] = mine
        return [[], mine]

    evaluate(model, tokenizer, [str(path)], cfg, tmp_path / "r1", shard=(1, 2), gather=gather_on_rank1)
    assert not (tmp_path / "r1").exists()  # only rank 0 writes
    assert len(parts["r1"]) == 2  # problems 1 and 3; its padding row is dropped
    sharded = evaluate(model, tokenizer, [str(path)], cfg, tmp_path / "r0", shard=(0, 2),
                       gather=lambda mine: [mine, parts["r1"]])
    assert sharded == single
    assert sharded["benchmarks"]["aime24"]["mean@k"] == pytest.approx(100 * 3 / 5)  # 3 odd answers of 5
    assert read_samples(tmp_path / "r0") == read_samples(tmp_path / "single")


def test_bad_calls_are_refused(tokenizer, shared_eval, tmp_path):
    model = ScriptedModel(tokenizer, lambda p: "")
    cfg = EvalConfig(k=1, max_new_tokens=4, max_problems=1)
    path = str(shared_eval / "aime24.jsonl")
    with pytest.raises(ValueError, match="gather"):
        evaluate(model, tokenizer, [path], cfg, tmp_path, shard=(0, 2))
    with pytest.raises(ValueError, match="rank"):
        evaluate(model, tokenizer, [path], cfg, tmp_path, shard=(2, 2), gather=lambda x: [x])
    with pytest.raises(ValueError, match="no benchmarks"):
        evaluate(model, tokenizer, [], cfg, tmp_path)
    with pytest.raises(ValueError, match="distinct"):
        evaluate(model, tokenizer, [path, f"aime24={path}"], cfg, tmp_path)


def test_prompt_building(tokenizer):
    ids = build_prompt_ids(tokenizer, "1+1?", chat_template=True, enable_thinking=False, system_prompt="Be brief.")
    assert tokenizer.decode(ids) == "<|system|>Be brief.<|end|><|user|>1+1?<|end|><|assistant|>"
    ids = build_prompt_ids(tokenizer, "1+1?", chat_template=True, enable_thinking=True, system_prompt="")
    assert tokenizer.decode(ids) == "<|user|>1+1?<|end|><|assistant|>"
    ids = build_prompt_ids(tokenizer, "1+1?", chat_template=False, enable_thinking=False, system_prompt="")
    assert tokenizer.decode(ids) == "1+1?"
    bare = char_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="chat_template=False"):
        build_prompt_ids(bare, "1+1?", chat_template=True, enable_thinking=False, system_prompt="")
