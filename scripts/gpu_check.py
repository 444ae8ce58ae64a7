"""Everything that needs a GPU, in one command and at most 10 minutes, ending in one table.

    scripts/gpu_check.sh               # on a machine with one CUDA GPU
    scripts/gpu_check.sh --dry-run     # anywhere: print the plan (steps, time limits, commands) and stop

Steps, each under its own time limit (the limits add up to 10 minutes):
  gpu tests     pytest -m gpu tests/gpu (the bf16 default path on CUDA)
  memory        scripts/bench_memory.py on the Qwen3-4B shape (reference@100%, fused@100/50/20%)
  rollout       scripts/bench_rollout.py --preset qwen3-4b: HF vs vLLM with one weight sync timed
                (vLLM only where it imports; otherwise HF alone, said so in the table)
  train         a few optimiser steps of train.py with Qwen3-1.7B-shaped random student and teacher
Without a visible GPU it says so in one line and exits 2. Every step's full output goes to
<out>/<step>.log; the table at the end has one row per step: status, seconds, and what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 600


@dataclass
class Step:
    name: str
    limit_s: int
    argv: list[str]
    summary: str  # which summarise_* reads the step's JSON


def plan(out: Path, python: str, with_vllm: bool) -> list[Step]:
    """The four steps, their time limits (summing to at most BUDGET_S) and commands, writing under `out`."""
    train_cfg = out / "train.yaml"
    return [
        Step("gpu tests", 120, [python, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu",
                                f"--junitxml={out / 'gpu_tests.xml'}"], "pytest"),
        Step("memory", 200, [python, "scripts/bench_memory.py", "--preset", "qwen3-4b", "--batch", "1",
                             "--seq", "4096", "--response", "3072", "--device", "cuda",
                             "--variants", "reference:1.0,fused:1.0,fused:0.5,fused:0.2",
                             "--json", str(out / "memory.json")], "memory"),
        Step("rollout", 160, [python, "scripts/bench_rollout.py", "--preset", "qwen3-4b", "--prompts", "32",
                              "--max-new-tokens", "512", "--engines", "hf,vllm" if with_vllm else "hf",
                              "--json", str(out / "rollout.json")], "rollout"),
        Step("train", 120, [python, "train.py", "--config", str(train_cfg)], "train"),
    ]


def train_config(out: Path) -> dict:
    """A few steps on Qwen3-1.7B-shaped random models (real vocabulary), bf16, fused loss, Soft-OR 50%."""
    shape = {"arch": "qwen3", "hidden_size": 2048, "num_layers": 28, "num_heads": 16, "num_kv_heads": 8,
             "intermediate_size": 6144, "vocab_size": 151936, "tokenizer": "chars", "tie_word_embeddings": True}
    return {
        "model": shape,
        "teacher": {**shape, "init_seed": 1},
        "data": {"train_path": str(out / "prompts.jsonl"), "max_prompt_length": 64, "answer_key": ""},
        "rollout": {"max_new_tokens": 256},
        "train": {"steps": 3, "prompts_per_step": 16, "micro_batch_size": 8, "output_dir": str(out / "runs"),
                  "run_name": "gpu_check", "save_every": 0},
        "eval": {"every": 0, "at_end": False},
        "logging": {"progress_bar": False},
        "tip": {"selector": "soft_or", "ratio": 0.5, "plots": False},
    }


def write_inputs(out: Path) -> None:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "prompts.jsonl", "w") as fh:
        for i in range(64):
            fh.write(json.dumps({"prompt": f"{i * 37 % 100}+{i * 11 % 100}=", "answer": ""}) + "\n")
    (out / "train.yaml").write_text(yaml.safe_dump(train_config(out)))


def summarise(step: Step, out: Path, log: str) -> str:
    """One line of what a finished step measured, from its JSON (or its log's last line)."""
    try:
        if step.summary == "memory":
            rows = json.loads((out / "memory.json").read_text())["rows"]
            return "; ".join(f"{r['impl']}@{r['ratio']:.0%} {r['extra_gib']:.1f} GiB ({r['memory_ratio']:.2f}) "
                             f"{r['step_s']:.1f} s, score+select {r['score_select_share']:.0%}" for r in rows)
        if step.summary == "rollout":
            rows = json.loads((out / "rollout.json").read_text())
            return "; ".join(f"{r['engine']} {r['tok_s']:.0f} tok/s" + (f", sync {r['sync_s']:.2f} s" if "sync_s" in r
                                                                         else "") for r in rows)
        if step.summary == "train":
            lines = (out / "runs" / "gpu_check" / "metrics.jsonl").read_text().splitlines()
            metrics = [json.loads(x) for x in lines if x.strip()]
            steps = [m for m in metrics if "opd/loss" in m]
            times = [m["timing/step_s"] for m in steps if "timing/step_s" in m]
            return f"{len(steps)} steps, loss {steps[-1]['opd/loss']:.4f}" + (f", {times[-1]:.1f} s/step" if times else "")
    except (OSError, KeyError, ValueError, IndexError):
        pass
    tail = [x for x in log.strip().splitlines() if x.strip()]
    return tail[-1][:160] if tail else ""


def table(results: list[dict]) -> str:
    """The closing table: one row per step (name, status, seconds, limit, what it measured)."""
    lines = ["| step | status | seconds | limit | result |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | {r['limit_s']} | {r['result']} |")
    total = sum(r["seconds"] for r in results)
    lines.append(f"| total | {'ok' if all(r['status'] == 'ok' for r in results) else 'FAILED'} | {total:.0f} | "
                 f"{sum(r['limit_s'] for r in results)} | |")
    return "\n".join(lines)


def gpu_name(python: str) -> str:
    """The visible CUDA device's name, or '' where torch sees none."""
    probe = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=REPO)
    return out.stdout.strip() if out.returncode == 0 else ""


def has_vllm(python: str) -> bool:
    return subprocess.run([python, "-c", "import vllm"], capture_output=True, cwd=REPO).returncode == 0


def run(steps: list[Step], out: Path) -> list[dict]:
    results = []
    for step in steps:
        started = time.perf_counter()
        try:
            done = subprocess.run(step.argv, capture_output=True, text=True, cwd=REPO, timeout=step.limit_s,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
            log, status = done.stdout + done.stderr, "ok" if done.returncode == 0 else f"failed (rc {done.returncode})"
        except subprocess.TimeoutExpired as e:
            log = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
            status = f"timed out ({step.limit_s} s)"
        (out / f"{step.name.replace(' ', '_')}.log").write_text(log)
        results.append({"name": step.name, "status": status, "seconds": time.perf_counter() - started,
                        "limit_s": step.limit_s, "result": summarise(step, out, log)})
        print(f"  {step.name}: {status}, {results[-1]['seconds']:.0f} s", flush=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop (no GPU needed)")
    p.add_argument("--out", default="runs/gpu_check", help="folder for logs, JSON and the train run")
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args(argv)
    out = (REPO / args.out).resolve()
    if args.dry_run:
        steps = plan(out, args.python, with_vllm=True)
        print(f"gpu_check plan ({len(steps)} steps, at most {sum(s.limit_s for s in steps)} s of {BUDGET_S}), "
              f"output under {out}:")
        for s in steps:
            print(f"  {s.name:<10} limit {s.limit_s:>4} s  {shlex.join(s.argv)}")
        print("  (rollout runs vLLM only where `import vllm` works; otherwise HF alone)")
        return 0
    name = gpu_name(args.python)
    if not name:
        print("gpu_check: no CUDA GPU visible to torch on this machine; nothing run (try --dry-run for the plan)")
        return 2
    vllm = has_vllm(args.python)
    steps = plan(out, args.python, with_vllm=vllm)
    write_inputs(out)
    print(f"gpu_check on {name}: {len(steps)} steps, at most {sum(s.limit_s for s in steps)} s"
          f"{'' if vllm else '; vLLM not importable: rollout runs HF alone'}", flush=True)
    results = run(steps, out)
    print("\n" + table(results))
    (out / "gpu_check.json").write_text(json.dumps({"gpu": name, "vllm": vllm, "steps": results}, indent=1))
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
