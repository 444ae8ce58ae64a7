"""Evaluation during training and the run's summary (summary.json and the printed table)."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from eval.runner import evaluate, flat_metrics
from opd.checkpoint import latest_checkpoint, load_trainer_state, save
from opd.distributed import gather_fn
from opd.errors import RunError, first_line
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
    """Step 0: the teacher (eval.teacher, logged as val_teacher/...) and the student before training (eval.at_start).
    Their lines replace those of a start that was stopped before its first step (each is logged once)."""
    if run.cfg.eval.teacher:
        with keeping_training(run, "teacher"):
            teacher_metrics = run_eval(run, "teacher", model=run.teacher.model)
        run.log.log(0, {k.replace("val/", "val_teacher/"): v for k, v in teacher_metrics.items()}, replace=True)
    if run.cfg.eval.at_start:
        with keeping_training(run, "step_000000"):
            student_metrics = run_eval(run, "step_000000")
        run.log.log(0, student_metrics, replace=True)


@contextlib.contextmanager
def keeping_training(run, name: str, unlogged: dict | None = None):
    """Evaluation `name` inside: its failure (a grader, a generate, a file) costs the evaluation, never the
    training. The step's metrics (`unlogged`, when its line is still to be written) are logged and the step is
    checkpointed, then the run ends with one line naming the checkpoint: rerunning resumes, or after the
    final evaluation evaluates again."""
    try:
        yield
    except RunError:  # already one line (a write that failed, ...)
        raise
    except Exception as exc:
        if unlogged is not None:
            run.log.log(run.step, unlogged)
        latest = latest_checkpoint(run.run_dir)
        if run.step > 0 and (latest is None or load_trainer_state(latest).get("step") != run.step):
            save(run)
            latest = latest_checkpoint(run.run_dir)
        failed = f"evaluation {name} failed ({type(exc).__name__}: {first_line(exc)}); "
        if run.step == 0:
            raise RunError(failed + "nothing trained yet; rerun the same command to start again") from None
        then = "evaluate it again" if name == "final" else "resume"
        raise RunError(failed + f"the training is kept: last good checkpoint: {latest}; "
                       f"rerun the same command to {then}") from None


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


ROW_KEYS = ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after")


def read_summary(run_dir: Path) -> dict:
    """A finished run's summary.json (its result table, printed again when it is rerun); RunError (one line
    naming the file) when it is not one train.py wrote."""
    file = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        why = first_line(exc)
    else:
        shape = (isinstance(summary, dict) and isinstance(summary.get("wall_time_s"), (int, float))
                 and all(isinstance(summary.get(k), (int, float, type(None))) for k in ROW_KEYS))
        if shape:
            return summary
        kinds = {dict: "object", list: "list", str: "string", bool: "true/false", int: "number", float: "number"}
        why = f"a JSON {kinds.get(type(summary), 'null')}"
        if isinstance(summary, dict):
            why += f" without {', '.join(ROW_KEYS)} and wall_time_s as numbers"
    raise RunError(f"{file} is not a summary written by train.py ({why}); move it aside and rerun the same "
                   "command to write it again")


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
