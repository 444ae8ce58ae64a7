"""The paper's tables in miniature, on the demo tasks.

    scripts/mini_tables.sh [--quick] [--seeds 0,1,2] [--steps 100] [--out DIR] [--only M1,M2]
                           [--threads N] [key=value ...]

Every method of tables 3, 4, 5, 6 and 8 runs once per seed as its own
`python train.py --config configs/demo.yaml --config configs/methods/<method>.yaml`
process; table 7's methods (named `agent:<method>`) run on the agentic demo,
`configs/demo_agent.yaml` (the lookup tool, Avg@k and Best@k). All runs have
the same number of optimiser steps and are evaluated only before
and after training. Runs go one after the other into <out>/<method>_s<seed>/. A
run that already has its summary.json is reused, so an interrupted script
resumes where it stopped; a run that fails is reported and the others go on
(exit status 1 at the end). Then the tables are printed in the paper's layout
and written to <out>/mini_tables.md, the raw numbers to <out>/results.json.

`--quick` is the smoke version the tests run: one seed, 3 steps, a tiny pair
(20 supervised steps each) and a tiny evaluation. key=value arguments go to
every run after the script's own settings, so they win.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

import tip
from opd.config import ConfigError, load_config, to_dict
from opd.checkpoint import changed_keys
from scripts.paper.aggregate import read_metrics_lines
from scripts.paper.tables import method_sort_key

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
AGENT_CONFIG = ROOT / "configs" / "demo_agent.yaml"
AGENT = "agent:"  # table 7's methods: the same method configs, run on the agentic demo

TABLES = {
    3: ("Table 3: entropy sampling (p ∝ h) at 50% and 20% retention",
        ("all", "entropy_sample_50", "entropy_sample_20")),
    4: ("Table 4: Q3 (overconfident) tokens only vs all tokens", ("all", "q3_only_10", "q3_only_20")),
    5: ("Table 5: all tokens vs entropy top-k vs Soft-OR top-k",
        ("all", "entropy_topk_50", "entropy_topk_20", "soft_or_50", "soft_or_20")),
    6: ("Table 6: Soft-OR top 50% vs bottom 50%", ("all", "soft_or_50", "soft_or_bottom_50")),
    # The paper does not give the ratio of its "standard sampling" row; 50% is its headline
    # entropy-sampling setting (table 3), and the same choice as scripts/paper/tables.py.
    # adaptive_kl_50 (entropy sampling 50% + teacher-entropy loss weights) is our reading of the
    # paper's adaptive KL; teacher_entropy (all tokens, reweighted) is an ablation. The row of
    # adaptive_kl_50 appears once the tip registry has the adaptive_kl selector.
    7: ("Table 7 (agentic): all tokens vs entropy top-k vs Q3-only vs Soft-OR, multi-turn tool use (lookup demo)",
        tuple(AGENT + m for m in ("all", "entropy_topk_50", "entropy_topk_20", "q3_only_20", "soft_or_50",
                                  "soft_or_20"))),
    8: ("Table 8: adaptive KL (entropy sampling 50% + teacher-entropy loss weights) vs entropy sampling 50%",
        ("all", "entropy_sample_50", *(("adaptive_kl_50",) if "adaptive_kl" in tip.SELECTORS else ()),
         "teacher_entropy")),
}
# every table's first row is its reference: the "Δ vs all" column is measured from it


def sort_key(method: str) -> tuple:
    return (method.startswith(AGENT), method_sort_key(method.removeprefix(AGENT)))


def is_agentic(method: str) -> bool:
    return method.startswith(AGENT)


METHODS = sorted({m for _, methods in TABLES.values() for m in methods}, key=sort_key)

# Every run: evaluation before and after only, no pictures or token dumps (the tables do not read them).
RUN_SETTINGS = ("eval.every=0", "eval.at_start=true", "eval.at_end=true", "eval.teacher=true",
                "logging.progress_bar=false", "tip.plots=false", "tip.dump_tokens=0")
QUICK_SETTINGS = ("demo.teacher_steps=20", "demo.student_steps=20", "demo.eval_problems=32",
                  "agent_demo.teacher_max_steps=20", "agent_demo.student_max_steps=20", "agent_demo.eval_tasks=8",
                  "agent_demo.check_tasks=8", "agent_demo.eval_k=1", "agent.eval_tasks=8",
                  "eval.max_problems=16", "eval.k=1", "train.prompts_per_step=16", "train.micro_batch_size=16",
                  "train.save_final=false")
MANAGED_KEYS = {"train.seed": "--seeds", "train.steps": "--steps", "train.output_dir": "--out",
                "train.run_name": "--out", "train.num_threads": "--threads", "tip.selector": "--only",
                "tip.ratio": "--only"}
QUADRANTS = ("q1", "q2", "q3", "q4")
MISSING = "—"


class UsageError(Exception):
    """A bad command line; the message is the one line the user sees."""


# ----------------------------------------------------------------------------
# reading and aggregating runs


@dataclass
class RunStats:
    """One finished run: accuracies (%) from summary.json, per-step figures from metrics.jsonl."""

    after: float  # mean@k (accuracy) or, agentic, Avg@k (mean score), %
    before: float | None
    teacher: float | None
    steps: int
    wall_time_s: float | None
    k: int | None  # samples per problem of the accuracies (mean@k)
    problems: int | None  # held-out problems evaluated
    kept_share: float | None  # % of all response tokens that entered the loss, summed over the steps
    quadrants: dict[str, float] = field(default_factory=dict)  # "q1".."q4", "kept_q1"..: % averaged over steps
    peak_memory_gb: float | None = None  # max over the run
    memory_key: str | None = None
    step_times: list[float] = field(default_factory=list)  # timing/step_s of every step
    best: float | None = None  # agentic runs: Best@k after training, %


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def read_run(run_dir: Path) -> RunStats | None:
    """The run's numbers, or None when it has no summary.json (not run, or not finished)."""
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        return None
    summary = json.loads(summary_file.read_text())
    by_step = {}
    for record in read_metrics_lines(run_dir / "metrics.jsonl"):
        if "opd/num_tokens" in record:
            by_step[record.get("step")] = record  # a resumed run may log a step twice; the last one counts
    steps = list(by_step.values())

    def series(key: str) -> list[float]:
        return [float(r[key]) for r in steps if isinstance(r.get(key), (int, float))]

    tokens, kept = sum(series("opd/num_tokens")), sum(series("opd/num_kept"))
    quadrants = {}
    for q in QUADRANTS:
        for prefix in ("", "kept_"):
            value = _mean(series(f"tip/{prefix}{q}_share"))
            if value is not None:
                quadrants[prefix + q] = 100.0 * value
    peak, memory_key = None, None
    for key in ("perf/max_memory_allocated_gb", "perf/max_rss_gb"):  # GPU peak; CPU runs log process RSS
        if series(key):
            peak, memory_key = max(series(key)), key
            break
    final = next(iter((summary.get("benchmarks") or {}).get("final", {}).values()), {})  # the first benchmark
    config_file = run_dir / "config.yaml"
    k = (yaml.safe_load(config_file.read_text()) or {}).get("eval", {}).get("k") if config_file.is_file() else None
    return RunStats(
        after=summary["student_accuracy_after"], before=summary.get("student_accuracy_before"),
        teacher=summary.get("teacher_accuracy"), steps=summary.get("steps", len(steps)),
        wall_time_s=summary.get("wall_time_s"), k=k, problems=final.get("n_problems"),
        kept_share=100.0 * kept / tokens if tokens else None, quadrants=quadrants,
        peak_memory_gb=peak, memory_key=memory_key, step_times=series("timing/step_s"), best=final.get("best@k"),
    )


@dataclass
class MethodStats:
    """One table row: a method's runs over seeds taken together."""

    runs: int
    after_mean: float
    after_std: float | None  # sample std (n - 1) over seeds; None with one run
    kept_share: float | None  # mean over seeds
    quadrants: dict[str, float]  # mean over seeds of each run's mean over steps
    peak_memory_gb: float | None  # max over seeds
    step_time_s: float | None  # median over all steps of all seeds
    after: list[float]  # per seed, in seed order
    best: list[float] = field(default_factory=list)  # agentic: Best@k per seed


def aggregate(runs: list[RunStats]) -> MethodStats | None:
    if not runs:
        return None
    after = [r.after for r in runs]
    quadrants = {}
    for key in sorted({k for r in runs for k in r.quadrants}):
        quadrants[key] = _mean([r.quadrants[key] for r in runs if key in r.quadrants])
    peaks = [r.peak_memory_gb for r in runs if r.peak_memory_gb is not None]
    times = [t for r in runs for t in r.step_times]
    return MethodStats(
        runs=len(runs), after_mean=statistics.fmean(after),
        after_std=statistics.stdev(after) if len(after) > 1 else None,
        kept_share=_mean([r.kept_share for r in runs if r.kept_share is not None]),
        quadrants=quadrants, peak_memory_gb=max(peaks) if peaks else None,
        step_time_s=statistics.median(times) if times else None, after=after,
        best=[r.best for r in runs if r.best is not None],
    )


# ----------------------------------------------------------------------------
# rendering


def _num(value: float | None, digits: int = 1) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def _mean_std(values: list[float]) -> str:
    if not values:
        return MISSING
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def _quadrant_cell(stats: MethodStats, prefix: str) -> str:
    values = [stats.quadrants.get(prefix + q) for q in QUADRANTS]
    return MISSING if None in values else " / ".join(f"{v:.1f}" for v in values)


def render_table(number: int, rows: dict[str, MethodStats | None], runs: dict[str, list[RunStats]],
                 seeds: int) -> str:
    """One table as Markdown: a header line (before/teacher accuracy), then a row per method of `rows`."""
    title, methods = TABLES[number]
    methods = [m for m in methods if m in rows]  # --only leaves some out
    table_runs = [r for m in methods for r in runs.get(m, [])]
    k = next((r.k for r in table_runs if r.k), None)
    before = _mean_std([r.before for r in table_runs if r.before is not None])
    teacher = _mean_std([r.teacher for r in table_runs if r.teacher is not None])
    agentic = any(is_agentic(m) for m in methods)
    score = f"Avg@{k or 'k'} %" if agentic else f"mean@{k or 'k'} %"
    lines = [f"## {title}", "",
             f"Student before OPD: {before} · teacher: {teacher} ({score}, over the {len(table_runs)} "
             "runs of this table)", ""]
    header = ["Method", f"{'Score' if agentic else 'Accuracy'} after, {score} (mean ± std)",
              *([f"Best@{k or 'k'} % after"] if agentic else []), "Δ vs all (points)", "Kept %",
              "Q1 / Q2 / Q3 / Q4 of all tokens %", "Q1 / Q2 / Q3 / Q4 of kept tokens %", "Peak memory (GB)",
              "Step time (s, median)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    reference_method = TABLES[number][1][0]
    reference = rows.get(reference_method)
    for method in methods:
        stats = rows.get(method)
        if stats is None:
            lines.append("| " + " | ".join([method] + [MISSING] * (len(header) - 1)) + " |")
            continue
        accuracy = _mean_std(stats.after) + (f" (n={stats.runs})" if stats.runs < seeds else "")
        if method == reference_method:
            delta = "reference"
        else:
            delta = MISSING if reference is None else f"{stats.after_mean - reference.after_mean:+.1f}"
        lines.append("| " + " | ".join([
            method, accuracy, *([_mean_std(stats.best)] if agentic else []), delta, _num(stats.kept_share),
            _quadrant_cell(stats, ""), _quadrant_cell(stats, "kept_"), _num(stats.peak_memory_gb, 2),
            _num(stats.step_time_s, 3),
        ]) + " |")
    return "\n".join(lines) + "\n"


def render(rows: dict[str, MethodStats | None], runs: dict[str, list[RunStats]], settings: dict,
           failed: dict[str, str]) -> str:
    """All tables (those with at least one selected method), the settings line and the column notes."""
    all_runs = [r for rs in runs.values() for r in rs]
    memory = {r.memory_key for r in all_runs if r.memory_key}
    problems = next((r.problems for m, rs in runs.items() if not is_agentic(m) for r in rs if r.problems), None)
    tasks = next((r.problems for m, rs in runs.items() if is_agentic(m) for r in rs if r.problems), None)
    held = ([f"accuracy on {problems} held-out demo problems"] if problems else []) + (
        [f"table 7: Avg@k / Best@k on {tasks} held-out lookup tasks"] if tasks else [])
    parts = ["# The paper's tables in miniature (demo tasks)", "",
             f"{settings['steps']} optimiser steps per run, seeds {', '.join(map(str, settings['seeds']))}; "
             f"{'; '.join(held) or 'nothing evaluated'}, sampled at T=1.0. "
             f"Command: `{settings['command']}` ({settings['launched']} runs launched, {settings['reused']} reused, "
             f"{settings['wall_time_s']:.0f} s)", ""]
    parts += [render_table(n, rows, runs, len(settings["seeds"])) for n, (_, methods) in TABLES.items()
              if any(m in rows for m in methods)]
    memory_what = "peak process RSS (CPU)" if memory == {"perf/max_rss_gb"} else \
        "peak GPU memory allocated" if memory == {"perf/max_memory_allocated_gb"} else "peak memory (GPU or RSS)"
    notes = [
        "Accuracy: the student's mean@k on the held-out problems at the end of the run (table 7: Avg@k, the mean "
        "score of k conversations per held-out task, and Best@k, the mean of each task's best); mean ± sample std "
        "(n − 1) over seeds; (n=…) where fewer seeds finished. Δ: difference of the means from the all-token row.",
        "Kept %: tokens that entered the loss over all response tokens, summed over the steps, mean over seeds "
        "(teacher_entropy keeps every token and only reweights it).",
        *(["--quick: the pair is barely trained (20 supervised steps each) and the runs are 3 steps long, "
           "so accuracies near 0% are expected: this checks that every table is produced, not what it says."]
          if settings.get("quick") else []),
        "Quadrants: each step splits its response tokens by normalised student entropy h and reverse KL δ at "
        "the thresholds of tip.threshold_mode (default: that step's medians): Q1 high h high δ, Q2 high h low δ, "
        "Q3 low h high δ (overconfident), Q4 low h low δ. 'all tokens' = shares of every response token, "
        "'kept tokens' = shares of the kept ones; mean over steps, then over seeds. With median thresholds "
        "Q1+Q2 = Q1+Q3 = 50%, so the all-token split says how much h and δ agree, not how many tokens are high.",
        f"Peak memory: {memory_what}, max over the steps and seeds. Step time: median of timing/step_s "
        "(rollout, teacher pass, update) over all steps of all seeds.",
    ]
    notes += [f"{name}: failed ({reason})" for name, reason in failed.items()]
    parts += ["Notes:", ""] + [f"- {note}" for note in notes]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------
# running


@dataclass
class Plan:
    methods: list[str]
    seeds: list[int]
    steps: int
    out: Path
    threads: int
    overrides: list[str]  # settings of every run, the user's last

    def run_overrides(self, method: str, seed: int) -> list[str]:
        return [f"train.seed={seed}", f"train.steps={self.steps}", f"train.output_dir={self.out}",
                f"train.run_name={run_name(method, seed)}", f"train.num_threads={self.threads}", *self.overrides]

    def configs(self, method: str) -> list[str]:
        base = AGENT_CONFIG if is_agentic(method) else DEMO_CONFIG
        return [str(base), str(ROOT / "configs" / "methods" / f"{method.removeprefix(AGENT)}.yaml")]


def run_name(method: str, seed: int) -> str:
    return f"{method.replace(':', '_')}_s{seed}"


def stale_reason(plan: Plan, method: str, seed: int, cfg) -> str | None:
    """Why a finished run in the way cannot be reused for this plan (None: it can)."""
    run_dir = plan.out / run_name(method, seed)
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("steps") != plan.steps:
        return f"{run_dir} holds a {summary.get('steps')}-step run, not {plan.steps}; choose another --out"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    changed = changed_keys(saved, cfg) + [f"eval.{k}" for k, v in to_dict(cfg)["eval"].items()
                                          if saved.get("eval", {}).get(k) != v]
    if changed:
        return f"{run_dir} holds a run with other settings ({', '.join(changed[:5])}); choose another --out"
    return None


def launch(plan: Plan, method: str, seed: int) -> tuple[int, str]:
    """Run one train.py process, its output in <out>/logs/<run>.log; returns (exit status, last output line)."""
    log = plan.out / "logs" / f"{run_name(method, seed)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "train.py"]
    for path in plan.configs(method):
        command += ["--config", path]
    command += plan.run_overrides(method, seed)
    env = {**os.environ, "OMP_NUM_THREADS": str(plan.threads), "PYTHONPATH": str(ROOT)}
    with open(log, "w") as fh:
        fh.write(" ".join(command) + "\n\n")
        fh.flush()
        status = subprocess.run(command, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error")]
    return status, (errors or lines or [""])[-1][:300]


def prepare_pair(plan: Plan, cfg, agentic: bool) -> str | None:
    """Prepare (or find cached) the demo pair (agentic: the agent demo pair) in its own process; returns why it
    failed, or None.

    Left to the first run, the preparation would count in that run's peak memory and wall time.
    """
    settings = asdict(cfg.agent_demo if agentic else cfg.demo)  # the typed agent_demo: / demo: section
    cache = settings.pop("cache_dir")  # relative to the repository root, as the trainer reads it
    settings.pop("num_threads")  # --threads decides
    log = plan.out / "logs" / ("prepare_agent_pair.log" if agentic else "prepare_pair.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "demo.agent_prepare" if agentic else "demo.prepare", "--cache", str(cache),
               f"num_threads={plan.threads}", *(f"{k}={v}" for k, v in settings.items())]
    env = {**os.environ, "OMP_NUM_THREADS": str(plan.threads), "PYTHONPATH": str(ROOT)}
    with open(log, "w") as fh:
        status = subprocess.run(command, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return None if status == 0 else f"exit status {status}: {(lines or [''])[-1][:300]}; log {log}"


def execute(plan: Plan) -> tuple[dict[str, list[RunStats]], dict[str, str], dict]:
    """Every (method, seed) run in turn: reuse, or launch; returns the runs, the failures, and counts."""
    cells = [(m, s) for m in plan.methods for s in plan.seeds]
    configs = {}
    for method, seed in cells:  # every config is checked before the first run starts
        try:
            configs[method, seed] = load_config(plan.configs(method), plan.run_overrides(method, seed))
        except ConfigError as exc:
            raise UsageError(exc.problems[0]) from None
    runs: dict[str, list[RunStats]] = {m: [] for m in plan.methods}
    failed: dict[str, str] = {}
    counts = {"launched": 0, "reused": 0}
    for agentic, what in ((False, "demo pair"), (True, "agent demo pair")):
        todo = [(m, s) for m, s in cells if is_agentic(m) == agentic and read_run(plan.out / run_name(m, s)) is None]
        if todo:
            print(f"{what}: preparing, or reusing the cached one ...", flush=True)
            problem = prepare_pair(plan, configs[todo[0]], agentic)
            if problem:
                failed[what] = problem
                print(f"{what}: FAILED ({problem})", flush=True)
    for i, (method, seed) in enumerate(cells, 1):
        name = run_name(method, seed)
        prefix = f"[{i}/{len(cells)}] {name}:"
        stats = read_run(plan.out / name)
        if stats is not None:
            reason = stale_reason(plan, method, seed, configs[method, seed])
            if reason:
                failed[name] = reason
                print(f"{prefix} FAILED: {reason}", flush=True)
                continue
            counts["reused"] += 1
            print(f"{prefix} reused (after {stats.after:.1f}%)", flush=True)
        else:
            start = time.time()
            print(f"{prefix} running ...", flush=True)
            status, last = launch(plan, method, seed)
            counts["launched"] += 1
            stats = read_run(plan.out / name)
            if status != 0 or stats is None:
                failed[name] = f"exit status {status}: {last}; log {plan.out / 'logs' / (name + '.log')}"
                print(f"{prefix} FAILED ({failed[name]})", flush=True)
                continue
            print(f"{prefix} done in {time.time() - start:.0f} s (before {_num(stats.before)}%, "
                  f"after {stats.after:.1f}%)", flush=True)
        runs[method].append(stats)
    return runs, failed, counts


def results_json(runs: dict[str, list[RunStats]], rows: dict[str, MethodStats | None], settings: dict,
                 failed: dict[str, str]) -> dict:
    return {
        "settings": settings,
        "tables": {str(n): {"title": title, "methods": list(methods)} for n, (title, methods) in TABLES.items()},
        "methods": {m: None if s is None else asdict(s) for m, s in rows.items()},
        "runs": {m: [asdict(r) for r in rs] for m, rs in runs.items()},
        "failed": failed,
    }


def parse(argv: list[str]) -> tuple[Plan, argparse.Namespace]:
    ap = argparse.ArgumentParser(prog="scripts/mini_tables.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke version: 1 seed, 3 steps, tiny pair and evaluation")
    ap.add_argument("--seeds", default=None, help="comma-separated train.seed values (default 0,1,2; quick: 0)")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps of every run (default 100; quick: 3)")
    ap.add_argument("--out", default=None, help="run directory (default runs/mini_tables; quick: runs/mini_tables_quick)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(METHODS)}")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch/OpenMP threads per run (default: all cores)")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value", help="passed to every run")
    args = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds {args.seeds!r} is not a comma-separated list of integers") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {args.seeds!r} must name at least one seed, each once")
    steps = args.steps if args.steps is not None else (3 if args.quick else 100)
    if steps < 1:
        raise UsageError(f"--steps {steps} must be at least 1")
    if args.threads < 1:
        raise UsageError(f"--threads {args.threads} must be at least 1")
    methods = [m for m in args.only.split(",") if m] or METHODS
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"--only: unknown method {unknown[0]!r} (known: {', '.join(METHODS)})")
    for text in args.overrides:
        if "=" not in text:
            raise UsageError(f"`{text}` is not of the form section.key=value")
        key = text.split("=", 1)[0].strip()
        if key in MANAGED_KEYS:
            raise UsageError(f"{key} is set per run by the script (or the method's config); use {MANAGED_KEYS[key]}")
    out = Path(args.out or ("runs/mini_tables_quick" if args.quick else "runs/mini_tables")).expanduser()
    out = (out if out.is_absolute() else Path.cwd() / out).resolve()
    overrides = [*RUN_SETTINGS, *(QUICK_SETTINGS if args.quick else ()), *args.overrides]
    plan = Plan(sorted(set(methods), key=sort_key), seeds, steps, out, args.threads, overrides)
    return plan, args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    started = time.time()
    try:
        plan, args = parse(argv)
        if args.quick:
            print("--quick: a smoke run on a barely trained pair (20 supervised steps each) with 3-step runs; "
                  "accuracies near 0% are expected and say nothing about the methods", flush=True)
        runs, failed, counts = execute(plan)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to go on from the finished runs", file=sys.stderr)
        return 130
    rows = {m: aggregate(runs[m]) for m in plan.methods}
    settings = {"steps": plan.steps, "seeds": plan.seeds, "quick": args.quick, "threads": plan.threads,
                "overrides": plan.overrides, "out": str(plan.out), "command": " ".join(["scripts/mini_tables.sh", *argv]),
                **counts, "wall_time_s": round(time.time() - started, 1)}
    text = render(rows, runs, settings, failed)
    plan.out.mkdir(parents=True, exist_ok=True)
    print("\n" + text, end="")
    (plan.out / "mini_tables.md").write_text(text)
    (plan.out / "results.json").write_text(json.dumps(results_json(runs, rows, settings, failed), indent=1))
    print(f"\nwritten: {plan.out / 'mini_tables.md'}, {plan.out / 'results.json'}; "
          f"{counts['launched']} runs launched, {counts['reused']} reused, {len(failed)} failed, "
          f"{settings['wall_time_s']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
