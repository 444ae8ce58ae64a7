"""Table 3 in miniature on the real pair: all tokens vs entropy top-k vs Soft-OR vs Q3-only, a few seeds.

    python scripts/real_selectors.py [--seeds 0,1] [--steps 10] [--out runs/real_selectors]
                                     [--only all:1.0,soft_or:0.5] [key=value ...]

Every setting (selector:retention) trains the real demo's student (configs/demo_real.yaml) once per seed as its own
`python train.py` process into <out>/<selector>_<ratio>_s<seed>/; a run that already has its final checkpoint is
reused, so an interrupted script resumes. Then every final student, and the untrained one, samples one answer per
held-out prompt with the same sampling seed and the held-out KL(student || teacher) per token is measured over the
whole vocabulary (scripts/heldout_kl.py's `measure`). Printed and written to <out>/real_selectors.md, the raw
numbers to <out>/results.json. key=value arguments go to every run (e.g. optim.lr=1e-4).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = ("all:1.0", "entropy_topk:0.5", "entropy_topk:0.2", "soft_or:0.5", "soft_or:0.2", "q3_only:0.2")


def run_name(setting: str, seed: int) -> str:
    sel, _, ratio = setting.partition(":")
    return f"{sel}_{ratio}_s{seed}"


def final_checkpoint(run_dir: Path, steps: int) -> Path:
    return run_dir / "checkpoints" / f"step_{steps:06d}"


def train(setting: str, seed: int, steps: int, out: Path, extra: list[str]) -> tuple[bool, float | None]:
    sel, _, ratio = setting.partition(":")
    name = run_name(setting, seed)
    if (final_checkpoint(out / name, steps) / "config.json").is_file():
        print(f"[real_selectors] {name}: reusing its final checkpoint", flush=True)
        return True, None
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "demo_real.yaml"),
           f"tip.selector={sel}", f"tip.ratio={ratio}", f"train.seed={seed}", f"train.steps={steps}",
           f"train.output_dir={out}", f"train.run_name={name}", *extra]
    print(f"[real_selectors] {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    done = subprocess.run(cmd, cwd=ROOT).returncode == 0
    return done, time.time() - start


def table(results: dict, settings: list[str], seeds: list[int]) -> str:
    head = "| setting | " + " | ".join(f"KL seed {s}" for s in seeds) + " | mean | h (mean) |"
    lines = [head, "|" + "---|" * (len(seeds) + 3)]
    before = results.get("before")
    if before:
        lines.append("| untrained student | " + " | ".join(f"{before['kl_per_token']:.3f}" for _ in seeds)
                     + f" | {before['kl_per_token']:.3f} | {before['entropy']:.3f} |")
    for setting in settings:
        runs = [results.get(run_name(setting, s)) for s in seeds]
        kls = [r["kl_per_token"] for r in runs if r]
        hs = [r["entropy"] for r in runs if r]
        cells = [f"{r['kl_per_token']:.3f}" if r else "failed" for r in runs]
        mean = f"{statistics.mean(kls):.3f}" if kls else "-"
        if len(kls) > 1:
            mean += f" ± {statistics.stdev(kls):.3f}"
        lines.append(f"| {setting} | " + " | ".join(cells) + f" | {mean} | "
                     + (f"{statistics.mean(hs):.3f}" if hs else "-") + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="runs/real_selectors")
    p.add_argument("--only", default="", help="comma-separated selector:ratio settings (default: all six)")
    p.add_argument("--eval-seed", type=int, default=1, help="the held-out sampling seed, the same for every student")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        print(f"error: --seeds must be comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    settings = args.only.split(",") if args.only else list(SETTINGS)
    bad = [s for s in settings if ":" not in s]
    if bad:
        print(f"error: --only takes selector:ratio settings, got {bad}", file=sys.stderr)
        return 2
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    failed, seconds = [], {}
    for seed in seeds:
        for setting in settings:
            ok, secs = train(setting, seed, args.steps, out, args.overrides)
            seconds[run_name(setting, seed)] = None if secs is None else round(secs, 1)  # None: reused
            if not ok:
                failed.append(run_name(setting, seed))

    from demo.real_prepare import prepare_real_pair
    from scripts.heldout_kl import evaluate

    teacher_dir, student_dir = prepare_real_pair(None)
    students = {"before": student_dir}
    for seed in seeds:
        for setting in settings:
            name = run_name(setting, seed)
            if name not in failed:
                students[name] = final_checkpoint(out / name, args.steps)
    results, prompts = evaluate(teacher_dir, students, "demo:instructions_heldout", 40, args.eval_seed)
    text = table(results, settings, seeds)
    print(text)
    (out / "real_selectors.md").write_text(
        f"Held-out KL(student || teacher) per token, {len(prompts)} held-out prompts, {args.steps} steps per run\n\n"
        + text + "\n")
    (out / "results.json").write_text(json.dumps(
        {"steps": args.steps, "seeds": seeds, "settings": settings, "overrides": args.overrides,
         "train_seconds": seconds, "failed": failed, "heldout": results}, indent=1) + "\n")
    if failed:
        print(f"[real_selectors] failed runs: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
