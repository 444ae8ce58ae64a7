"""`evaluate`: sample k responses per problem, grade them, report and write the results.

The trainer calls `evaluate` every `eval.every` steps; `python -m eval` calls it
once. Output directory:
- summary.json: {"step", "k", "benchmarks": {name: {"mean@k", "std@k",
  "pass@k", "maj@k", "n_problems", "mean_length", "truncation_rate"}}}.
  Accuracies (mean@k, std@k, pass@k, maj@k) are percent (0-100);
  mean_length is generated tokens per response (EOS included when produced);
  truncation_rate is the fraction (0-1) of responses that hit max_new_tokens.
- samples.jsonl: one line per sample: benchmark, problem_id, sample (index
  0..k-1), response, extracted, correct, length, truncated, answer (gold).
Agent benchmarks (agent.evaluate) report avg@k, best@k, conversation shape and score_errors (conversations
whose score the environment got wrong, counted as 0); their samples carry score, parts, turns, tool calls and
errors, and score_error (why the score was refused, "" when it was not).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import zlib
from pathlib import Path

import torch.distributed as dist

from agent.evaluate import AgentBenchmark
from eval import metrics
from eval.benchmarks import Benchmark, PromptFormat, load_benchmark
from eval.grader import normalize_answer
from eval.config import EvalConfig
from lm.engines import HFEngine, Sampling
from lm.rollout import sample

SUMMARY_KEYS = ("mean@k", "std@k", "pass@k", "maj@k", "n_problems", "mean_length", "truncation_rate")


def evaluate(
    model,
    tokenizer,
    benchmarks: list[str | Benchmark],
    cfg: EvalConfig,
    out_dir,
    *,
    seed: int = 0,
    step: int | None = None,
    chat_template: bool = True,
    enable_thinking: bool = False,
    system_prompt: str = "",
    shard: tuple[int, int] = (0, 1),
    gather=None,
    title: str | None = None,
    engine=None,
) -> dict:
    """Evaluate `model` on each benchmark (a spec, see eval.benchmarks, or a loaded Benchmark) and return the summary.

    Every problem gets `cfg.k` samples at `cfg.temperature` / `cfg.top_p`, at
    most `cfg.max_new_tokens` tokens each, `cfg.batch_size` sequences per
    generate call; the draw is fixed by `seed`. `model` is the bare
    transformers model (unwrap DDP/accelerate wrappers first).

    Several processes: `shard=(rank, world)` makes this process evaluate
    problems rank, rank+world, ...; `gather(list) -> list of lists` (one list
    per process, on every process, like `accelerate.utils.gather_object` or
    `torch.distributed.all_gather_object`) combines the per-problem results
    before the metrics. Every process returns the summary; only rank 0
    writes `out_dir` and prints the table (headed `title`, default "step N"). Each process makes the same number
    of generate calls (short shards are padded), so ZeRO-3 style sharded
    models can generate in lockstep.

    `engine` (an lm.engines engine holding `model`'s weights, e.g. the trainer's vLLM engine) samples
    instead of `model.generate`; each sample is then seeded by (seed, benchmark, problem, sample index).
    """
    rank, world = shard
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
    if world > 1 and gather is None:
        raise ValueError(f"shard={shard} splits the problems over processes: pass `gather` to combine them")
    if not benchmarks:
        raise ValueError("no benchmarks to evaluate (eval.benchmarks is empty)")
    fmt = prompt_format(cfg)
    loaded = [spec if isinstance(spec, (Benchmark, AgentBenchmark)) else load_benchmark(spec, cfg.max_problems, fmt)
              for spec in benchmarks]
    loaded = [_first(b, cfg.max_problems) for b in loaded]
    names = [b.name for b in loaded]
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark names must be distinct, got {names}")

    summary: dict = {"step": step, "k": cfg.k, "benchmarks": {}}
    samples: list[dict] = []
    for bench in loaded:
        started = time.time()
        if isinstance(bench, AgentBenchmark):
            results = _run_agent(model, tokenizer, bench, cfg, seed, rank, world, gather, engine)
        else:
            results = _run_benchmark(
                model, tokenizer, bench, cfg, seed=seed, rank=rank, world=world, chat_template=chat_template,
                enable_thinking=enable_thinking, system_prompt=system_prompt, engine=engine,
            )
        if gather is not None:
            results = [r for part in gather(results) for r in part]
        results.sort(key=lambda r: r["index"])
        summary["benchmarks"][bench.name] = (agent_metrics if isinstance(bench, AgentBenchmark)
                                             else benchmark_metrics)(results)
        for r in results:
            for s in r["samples"]:
                samples.append({"benchmark": bench.name, "problem_id": r["id"], **s, "answer": r["answer"]})
        if rank == 0:
            print(f"eval {bench.name}: {len(results)} problems x {cfg.k} samples in {time.time() - started:.1f} s", flush=True)

    if rank == 0:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        _write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        print(format_table(summary, title), flush=True)
    return summary


def prompt_format(cfg: EvalConfig) -> PromptFormat:
    """The math benchmarks' prompt format of an `eval:` section (eval.instruction, eval.instruction_separator)."""
    return PromptFormat(cfg.instruction, cfg.instruction_separator)


def benchmark_metrics(results: list[dict]) -> dict:
    """Metrics of one benchmark from its per-problem results (each with k entries under "samples")."""
    correct = [[s["correct"] for s in r["samples"]] for r in results]
    keys = [[None if s["extracted"] is None else normalize_answer(s["extracted"]) for s in r["samples"]] for r in results]
    flat = [s for r in results for s in r["samples"]]
    return {
        "mean@k": metrics.mean_at_k(correct),
        "std@k": metrics.std_at_k(correct),
        "pass@k": metrics.pass_at_k(correct),
        "maj@k": metrics.maj_at_k(correct, keys),
        "n_problems": len(results),
        "mean_length": sum(s["length"] for s in flat) / len(flat),
        "truncation_rate": sum(bool(s["truncated"]) for s in flat) / len(flat),
    }


def agent_metrics(results: list[dict]) -> dict:
    """Metrics of an agent benchmark (fractional scores): Avg@k (also as mean@k, so tables and compare read it
    like accuracy), Best@k, their spread, conversation shape, and each sub-score's mean."""
    scores = [[s["score"] for s in r["samples"]] for r in results]
    flat = [s for r in results for s in r["samples"]]
    parts = sorted({name for s in flat for name in s["parts"]})
    return {
        "mean@k": metrics.avg_at_k(scores),
        "std@k": metrics.score_std_at_k(scores),
        "avg@k": metrics.avg_at_k(scores),
        "best@k": metrics.best_at_k(scores),
        "n_problems": len(results),
        "mean_length": sum(s["length"] for s in flat) / len(flat),
        "truncation_rate": sum(bool(s["truncated"]) for s in flat) / len(flat),
        "turns_mean": sum(s["turns"] for s in flat) / len(flat),
        "tool_calls_mean": sum(s["tool_calls"] for s in flat) / len(flat),
        "tool_errors_mean": sum(s["tool_errors"] for s in flat) / len(flat),
        "score_errors": sum(bool(s.get("score_error")) for s in flat),  # invalid scores, counted as 0 (agent/env.py)
        "parts": {name: sum(float(s["parts"].get(name, 0.0)) for s in flat) / len(flat) for name in parts},
    }


def flat_metrics(summary: dict) -> dict:
    """The trainer's metric names (spec §1): {"val/<name>/mean@<k>", "val/<name>/std@<k>", "val/<name>/pass@<k>"};
    agent benchmarks: avg@<k>, best@<k> and std@<k>, and val/<name>/score/<part> for each sub-score."""
    k = summary["k"]
    out = {}
    for name, m in summary["benchmarks"].items():
        for key in ("mean", "std", "pass", "avg", "best"):
            if f"{key}@k" in m:
                out[f"val/{name}/{key}@{k}"] = m[f"{key}@k"]
        for part, value in m.get("parts", {}).items():
            out[f"val/{name}/score/{part}"] = value
    return out


def format_table(summary: dict, title: str | None = None) -> str:
    """A fixed-width table of a summary, one row per benchmark, headed `title` (default: its step); agent
    benchmarks (fractional scores) in a table of their own: Avg@k ± std, Best@k and the conversations' shape."""
    k = summary["k"]
    if title is None:
        title = f"step {summary['step']}" if summary.get("step") is not None else "evaluation"
    lines = [title]
    plain = {n: m for n, m in summary["benchmarks"].items() if "best@k" not in m}
    agents = {n: m for n, m in summary["benchmarks"].items() if "best@k" in m}
    if plain:
        header = f"{'benchmark':<16} {'problems':>8} {f'mean@{k}':>15} {f'pass@{k}':>8} {f'maj@{k}':>8} {'length':>8} {'trunc%':>7}"
        lines += [header, "-" * len(header)]
        for name, m in plain.items():
            mean = f"{m['mean@k']:.1f} ± {m['std@k']:.1f}"
            lines.append(f"{name:<16} {m['n_problems']:>8} {mean:>15} {m['pass@k']:>8.1f} {m['maj@k']:>8.1f} "
                         f"{m['mean_length']:>8.1f} {100 * m['truncation_rate']:>7.1f}")
    if agents:
        header = (f"{'agent tasks':<16} {'tasks':>8} {f'Avg@{k}':>15} {f'Best@{k}':>8} {'turns':>6} {'calls':>6} "
                  f"{'errors':>6} {'length':>8} {'capped%':>7}")
        lines += [header, "-" * len(header)]
        for name, m in agents.items():
            mean = f"{m['avg@k']:.1f} ± {m['std@k']:.1f}"
            lines.append(f"{name:<16} {m['n_problems']:>8} {mean:>15} {m['best@k']:>8.1f} {m['turns_mean']:>6.1f} "
                         f"{m['tool_calls_mean']:>6.1f} {m['tool_errors_mean']:>6.1f} {m['mean_length']:>8.1f} "
                         f"{100 * m['truncation_rate']:>7.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# helpers


def build_prompt_ids(tokenizer, prompt: str, *, chat_template: bool, enable_thinking: bool, system_prompt: str) -> list[int]:
    """Token ids of one prompt: chat-templated (with an optional system message) or the raw text."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template: evaluate with chat_template=False")
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, enable_thinking=enable_thinking,
        )
        # The template already wrote BOS and friends; encoding must not add them again.
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = f"{system_prompt}\n\n{prompt}" if system_prompt else prompt
    return tokenizer(text)["input_ids"]


def _eos_ids(model, tokenizer) -> list[int]:
    # Chat models often stop on an end-of-turn token that only generation_config knows.
    ids: list[int] = []
    sources = (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id)
    for source in sources:
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation_config names an EOS token")
    return ids


def _chunk_seed(seed: int, name: str, rank: int, chunk: int) -> int:
    # Stable across processes and Python runs (unlike hash()).
    return zlib.crc32(f"{seed}/{name}/{rank}/{chunk}".encode()) & 0x7FFFFFFF


def _run_benchmark(model, tokenizer, bench: Benchmark, cfg: EvalConfig, *, seed: int, rank: int, world: int,
                   chat_template: bool, enable_thinking: bool, system_prompt: str, engine=None) -> list[dict]:
    """This process's share of a benchmark, sampled and graded: one dict per problem."""
    mine = list(range(rank, len(bench.problems), world))
    if world > 1:
        # Pad to the longest shard with a repeat whose results are dropped, so every
        # process makes the same generate calls.
        share = -(-len(bench.problems) // world)
        mine += [-1] * (share - len(mine))
    ids = {
        i: list(bench.problems[max(i, 0)].ids) if bench.problems[max(i, 0)].ids is not None else
        build_prompt_ids(tokenizer, bench.problems[max(i, 0)].prompt, chat_template=chat_template,
                         enable_thinking=enable_thinking, system_prompt=system_prompt)
        for i in mine
    }
    # Similar lengths share a batch (less padding); longest first, so memory trouble shows early.
    order = sorted(mine, key=lambda i: (-len(ids[i]), i))
    rows = [(i, j) for i in order for j in range(cfg.k)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_ids(model, tokenizer)[0]
    eos = _eos_ids(model, tokenizer)
    synced = world > 1 and dist.is_available() and dist.is_initialized()
    by_problem: dict[int, list] = {i: [None] * cfg.k for i in mine if i >= 0}
    for chunk_no, start in enumerate(range(0, len(rows), cfg.batch_size)):
        chunk = rows[start:start + cfg.batch_size]
        if engine is not None:
            sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens,
                                n=1, eos_ids=tuple(eos), pad_token_id=pad_id)
            seeds = [_chunk_seed(seed, bench.name, max(i, 0), j) for i, j in chunk]
            rollouts = engine.generate([ids[i] for i, _ in chunk], seeds, sampling)
        else:
            rollouts = sample(
                model, [ids[i] for i, _ in chunk], pad_token_id=pad_id, eos_token_id=eos,
                temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens,
                n=1, batch_size=0, seed=_chunk_seed(seed, bench.name, rank, chunk_no), synced_gpus=synced,
            )
        responses = rollouts.response_ids()
        for r, (row, resp) in enumerate(zip(rollouts.prompt_index.tolist(), responses)):
            i, j = chunk[row]
            if i < 0:
                continue
            text = tokenizer.decode(resp, skip_special_tokens=True)
            problem = bench.problems[i]
            by_problem[i][j] = {
                "sample": j,
                "response": text,
                "extracted": bench.extract(text),
                "correct": bool(bench.grade(text, problem.answer, cfg.grade_timeout_s)),
                "length": len(resp),
                "truncated": bool(rollouts.truncated[r]),
            }
    return [
        {"index": i, "id": bench.problems[i].id, "answer": bench.problems[i].answer, "samples": by_problem[i]}
        for i in sorted(by_problem)
    ]


def _first(bench, n: int):
    """The first `n` problems (tasks) of a benchmark; all when n = 0."""
    if not n:
        return bench
    if isinstance(bench, AgentBenchmark):
        return dataclasses.replace(bench, tasks=bench.tasks[:n])
    return dataclasses.replace(bench, problems=bench.problems[:n])


def _run_agent(model, tokenizer, bench: AgentBenchmark, cfg: EvalConfig, seed: int, rank: int, world: int, gather,
               engine) -> list[dict]:
    """This process's share of an agent benchmark: k conversations per task through `engine` (HF generate on
    `model` when None), one engine call per turn for all of them."""
    synced = world > 1 and dist.is_available() and dist.is_initialized()
    eos = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens,
                        n=1, eos_ids=tuple(eos), pad_token_id=pad_id)
    any_live = (lambda live: any(any(part) for part in gather([live]))) if world > 1 else None
    return bench.run(engine or HFEngine(model, synced_gpus=synced), cfg.k, sampling, seed, rank, world, any_live)


def _write_atomic(path: Path, text: str) -> None:
    # A reader (compare, a dashboard) never sees half a file, even if the run dies mid-write.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
