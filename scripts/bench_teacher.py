"""The teacher in the process vs served by Ray, on the same pair, and the bytes a served step moves at paper shapes.

    python scripts/bench_teacher.py [--config configs/demo.yaml] [--steps 6] [--replicas 1,2] [key=value ...]

Part 1 trains the config (default: the toy demo's prepared pair, evaluation off) for --steps steps three ways:
teacher.placement=local, then ray with each replica count (a local Ray instance on this machine), each in its own
run directory under a temporary folder, and prints per placement: the set-up time (the replicas' start included),
the median step time and teacher wait (timing/teacher_wait_s: seconds the trainer waited for teacher sides; for
the local teacher its whole forward), the MiB of sides per step, and whether the served run's metrics equal the
local run's. Steps after the first only (the first warms caches). On a machine with fewer cores than trainer +
replicas, replicas compete with the trainer for the CPU: read the numbers as what this machine did.

Part 2 prints, for the paper's step (256 prompts, one rollout each, --mean-response tokens on average), the bytes a
served teacher would return per step: final hidden states (bf16, what placement: ray ships), full logits (float32
and bf16) and top-k log-probs (int32 ids + float32 values; what other trainers ship, and not the objective).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (hidden size d_T, vocabulary rows V_T) of the teacher, as published in each model's config.json
PAPER_TEACHERS = {
    "Qwen3-8B": (4096, 151936),
    "Qwen3-32B": (5120, 151936),
    "Qwen3-235B-A22B": (4096, 151936),
    "Llama-3.1-70B": (8192, 128256),
}


def train_once(config: str, placement: str, replicas: int, steps: int, out: Path, overrides: list[str]) -> dict:
    from opd.cli import prepare
    from opd.config import load_config
    from opd.trainer import train

    name = placement if placement == "local" else f"ray{replicas}"
    cfg = load_config([config], [f"train.steps={steps}", f"train.output_dir={out}", f"train.run_name={name}",
                                 "train.save_every=0", "train.save_final=false", "eval.every=0", "eval.at_end=false",
                                 "eval.at_start=false", "eval.teacher=false", "tip.dump_tokens=0", "tip.plots=false",
                                 "logging.progress_bar=false", f"teacher.placement={placement}",
                                 f"teacher.ray.num_replicas={replicas}", *overrides])
    prepared = prepare(cfg)
    start = time.perf_counter()
    run_dir = train(cfg, prepared=prepared)
    total = time.perf_counter() - start
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    later = metrics[1:] or metrics
    step_time = sum(m["timing/step_s"] for m in metrics)
    return {"name": name, "setup_s": total - step_time,
            "step_s": statistics.median(m["timing/step_s"] for m in later),
            "wait_s": statistics.median(m["timing/teacher_wait_s"] for m in later),
            "payload_mb": statistics.median(m["teacher/payload_mb"] for m in later),
            "metrics": [{k: v for k, v in m.items() if not k.startswith(("timing/", "perf/"))} for m in metrics]}


def paper_bytes(mean_response: int, prompts: int = 256, topk: int = 20) -> str:
    tokens = prompts * mean_response
    gib = lambda b: f"{b / 2**30:,.1f} GiB"  # noqa: E731
    lines = [f"Per step at the paper's shape: {prompts} prompts x {mean_response:,} response tokens on average = "
             f"{tokens:,} scored tokens", "",
             "| teacher | d_T | V_T | hidden bf16 (ray) | logits fp32 | logits bf16 | top-%d log-probs | logits / hidden |"
             % topk, "|---|---|---|---|---|---|---|---|"]
    for name, (d, v) in PAPER_TEACHERS.items():
        hidden, logits = tokens * d * 2, tokens * v * 4
        lines.append(f"| {name} | {d:,} | {v:,} | {gib(hidden)} | {gib(logits)} | {gib(logits / 2)} | "
                     f"{gib(tokens * topk * 8)} | {logits / hidden:.0f}x (fp32), {logits / 2 / hidden:.0f}x (bf16) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--replicas", default="1,2")
    p.add_argument("--mean-response", type=int, default=4096, help="paper-shape part: mean response tokens")
    p.add_argument("--skip-runs", action="store_true", help="print only the paper-shape bytes")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    if not args.skip_runs:
        try:
            import ray  # noqa: F401  (optional dependency: the served runs need it)
        except ImportError:
            print("error: the served runs need ray (pip install -r requirements-ray.txt); --skip-runs prints only "
                  "the paper-shape bytes", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory() as tmp:
            rows = [train_once(args.config, "local", 1, args.steps, Path(tmp), args.overrides)]
            for n in (int(r) for r in args.replicas.split(",")):
                rows.append(train_once(args.config, "ray", n, args.steps, Path(tmp), args.overrides))
        print(f"\n{args.steps} steps of {args.config} (medians over steps 2..{args.steps})\n")
        print("| teacher | set-up s | step s | teacher wait s | sides MiB/step | metrics = local |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            same = "yes" if r["metrics"] == rows[0]["metrics"] else "NO"
            print(f"| {r['name']} | {r['setup_s']:.1f} | {r['step_s']:.3f} | {r['wait_s']:.3f} | "
                  f"{r['payload_mb']:.3f} | {same} |")
        print()
    print(paper_bytes(args.mean_response))
    return 0


if __name__ == "__main__":
    sys.exit(main())
