"""Evaluation during training and the run's summary (summary.json and the printed table)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from eval.runner import evaluate, flat_metrics
from opd.distributed import gather_fn
from opd.step import render_pictures


def eval_title(name: str, step: int) -> str:
    """The heading of an evaluation's printed table: whose, and when."""
    if name == "teacher":
        return "teacher (the upper bound), step 0"
    if name == "step_000000":
        return "student before training, step 0"
    return f"student after training, step {step}" if name == "final" else f"student, step {step}"


def run_eval(run, name: str, model=None) -> dict:
    """Evaluate the student (or `model`) on eval.benchmarks and the held-out prompts into <run>/eval/<name>/;
    returns the val/... metrics."""
    cfg, acc = run.cfg, run.accelerator
    heldout = run.source.heldout
    benchmarks = cfg.eval.benchmarks + ([heldout] if heldout is not None else [])
    if not benchmarks:
        return {}
    with tqdm.external_write_mode():  # the progress bar steps aside while the evaluation prints
        summary = evaluate(
            model if model is not None else run.policy.lm, run.tokenizer, benchmarks, cfg.eval,
            run.run_dir / "eval" / name, seed=cfg.train.seed, step=run.step, chat_template=cfg.data.chat_template,
            enable_thinking=cfg.data.enable_thinking, system_prompt=cfg.data.system_prompt,
            shard=(acc.process_index, acc.num_processes), gather=gather_fn(acc), title=eval_title(name, run.step),
            # the student through the rollout engine when it has its own (vLLM): the same engine, freshly synced
            engine=run.engine if model is None and cfg.rollout.engine == "vllm" else None,
        )
    run.evals[name] = summary
    return flat_metrics(summary)


def run_initial_evals(run) -> None:
    """Step 0: the teacher (eval.teacher, logged as val_teacher/...) and the student before training (eval.at_start)."""
    if run.cfg.eval.teacher:
        teacher_metrics = run_eval(run, "teacher", model=run.teacher.model)
        run.log.log(0, {k.replace("val/", "val_teacher/"): v for k, v in teacher_metrics.items()})
    if run.cfg.eval.at_start:
        run.log.log(0, run_eval(run, "step_000000"))


def finish(run) -> None:
    """The end of a finished run: summary.json, the result table, the tip pictures."""
    acc = run.accelerator
    if run.bar is not None:
        run.bar.close()
    if acc.is_main_process:
        summary = build_summary(run)
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        print_summary(summary)
        if run.cfg.tip.plots:
            try:
                render_pictures(run.run_dir)
            except Exception as exc:  # pictures are a convenience; never lose a finished run to them
                acc.print(f"tip plots not written: {exc}")
    run.log.close()


def _first_mean(summary: dict | None, key: str = "mean@k") -> float | None:
    """`key` of the first benchmark of an evaluation summary (None without one)."""
    if not summary or not summary.get("benchmarks"):
        return None
    return next(iter(summary["benchmarks"].values())).get(key)


def build_summary(run) -> dict:
    evals = run.evals
    before = evals.get("step_000000")
    k = run.cfg.eval.k
    agentic = run.source.best_of_k  # an environment's fractional scores
    return {
        "metric": f"Avg@{k} (agent score, %)" if agentic else "accuracy (mean@k, %)",
        "teacher_accuracy": _first_mean(evals.get("teacher")),
        "student_accuracy_before": _first_mean(before),
        "student_accuracy_after": _first_mean(evals.get("final")),
        # agentic runs: Best@k beside Avg@k (the mean over tasks of each task's best score)
        **({"best_metric": f"Best@{k}", "teacher_best": _first_mean(evals.get("teacher"), "best@k"),
            "student_best_before": _first_mean(before, "best@k"),
            "student_best_after": _first_mean(evals.get("final"), "best@k")} if agentic else {}),
        "wall_time_s": time.time() - run.started,
        "steps": run.step,
        "benchmarks": {name: s.get("benchmarks", {}) for name, s in evals.items()},
    }


def print_finished(run_dir: Path) -> None:
    """A finished run's result table again (rerunning a finished run trains nothing)."""
    summary_file = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, ValueError):
        print(f"({summary_file} cannot be read; the evaluations are under {Path(run_dir) / 'eval'})")
        return
    print_summary(summary, when="when it ran")


def print_summary(summary: dict, when: str = "this train.py") -> None:
    rows = [("teacher", summary["teacher_accuracy"]), ("student before", summary["student_accuracy_before"]),
            ("student after", summary["student_accuracy_after"])]
    if all(v is None for _, v in rows):
        return
    best = [summary.get(key) for key in ("teacher_best", "student_best_before", "student_best_after")]
    extra = f"   {summary['best_metric']}" if "best_metric" in summary else ""
    print(f"\n  model            {summary.get('metric', 'accuracy (mean@k, %)')}{extra}")
    for (name, value), b in zip(rows, best):
        cell = "—" if value is None else f"{value:6.1f}"
        print(f"  {name:<16} {cell}" + (f"{'':>20}{'—' if b is None else f'{b:6.1f}'}" if extra else ""))
    print(f"  wall time {summary['wall_time_s']:.0f} s ({when}: preparation, loading, training, evaluation)\n")
