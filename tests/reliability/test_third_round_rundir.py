"""The third fault-injection round (tracker issue 26): run directories, evaluations and signals.

Two runs in one directory, benchmarks that fail late, `python -m eval` writing into a training run,
malformed summaries, SIGTERM before the first step, files that are not UTF-8. The rule is the one of
the earlier rounds: one `error:` line naming the problem (and the file or key), exit code 2, nothing
already written changed. The issue's item number is in each test's comment.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, read_metrics, run_cli, tiny_config, write_config
from test_faults import run_with_fault, tree_digest, wait_for_text
from test_second_round import one_error

WITH_FAULT = Path(__file__).with_name("with_fault.py")


def start_with_fault(fault: str, args: list[str], log: Path) -> subprocess.Popen:
    """train.py with one fault of with_fault.py, in the background (stdout+stderr to `log`)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(WITH_FAULT), fault, *args], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, cwd=REPO, env=env)


def config_file(tmp_path: Path, **sections) -> Path:
    return write_config(tmp_path / "c.yaml", tiny_config(tmp_path, **sections))


# ----------------------------------------------------------------------------
# 1: one run per run directory


@pytest.mark.slow  # several runs of the CLI: over a minute, measured on a loaded 2-core machine
def test_a_live_run_owns_its_directory_and_a_requeued_job_resumes(tmp_path):
    # 1: a second start resumed from the live run's checkpoint, rewrote metrics.jsonl under it and
    # deleted its temporary checkpoint folder
    cfg = config_file(tmp_path, train={"steps": 3, "save_every": 1, "keep_last": 3})
    args = ["--config", str(cfg)]
    run = tmp_path / "runs" / "run"
    log = tmp_path / "first.log"
    first = start_with_fault("stall_save=2", args, log)  # hangs inside the write of checkpoint 2
    try:
        wait_for_text(log, "fault: stalled writing", first)
        before = tree_digest(run)
        line = one_error(run_cli(args))
        assert line.startswith(f"error: train.run_name: run directory {run} is in use by another run "
                               f"(pid {first.pid} on host {socket.gethostname()} since "), line
        assert tree_digest(run) == before  # the live run's temporary checkpoint folder included
        assert list((run / "checkpoints").glob(".tmp-step_000002-*"))
    finally:
        first.kill()  # a crash: the kernel drops its lock
        first.wait(timeout=60)
    # the requeued job (the same command) resumes
    out = run_cli(args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_000001'} (step 1)" in out.stdout
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]


def test_only_the_main_process_of_a_launch_takes_the_lock(tmp_path, monkeypatch):
    # 1: the processes of one distributed run share the directory; a second run does not
    from opd.lock import RunLock

    run = tmp_path / "run"
    monkeypatch.setenv("RANK", "1")
    with RunLock(run) as lock:
        assert lock.problem is None and not run.exists()
    monkeypatch.setenv("RANK", "0")
    with RunLock(run) as mine:
        assert mine.problem is None
        with RunLock(run) as other:  # another open of the lock file: another run, even in this process
            assert other.problem.startswith(f"train.run_name: run directory {run} is in use by another run "
                                            f"(pid {os.getpid()} on host "), other.problem
    with RunLock(run) as again:  # released on exit
        assert again.problem is None


# ----------------------------------------------------------------------------
# 2: benchmarks read at start, evaluations that fail late

TINY_EVAL = {"benchmarks": ["demo"], "max_problems": 2, "k": 1, "max_new_tokens": 4, "batch_size": 2}


@pytest.mark.slow  # several runs of the CLI: over a minute, measured on a loaded 2-core machine
def test_every_benchmark_is_read_at_check_and_at_start(tmp_path):
    # 2: a garbled benchmark file and a hub benchmark while offline passed --check, trained, then died
    # with a traceback at the first evaluation
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"id": "a", "problem": "1+1=", "answer": "2"}) + "\n{\"id\": \"b\", \"problem\n")
    cfg = config_file(tmp_path, eval={**TINY_EVAL, "benchmarks": [str(bench)], "at_end": True})
    for check in (["--check"], []):
        line = one_error(run_cli(["--config", str(cfg), *check]))
        assert line.startswith(f"error: eval.benchmarks: {bench}:2: not valid JSON"), line
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    line = one_error(run_cli(["--config", str(cfg), "eval.benchmarks=[math500]"], env=offline))
    assert line.startswith("error: eval.benchmarks: could not load benchmark 'math500' from the hub"), line
    assert not (tmp_path / "runs").exists()


def test_a_final_evaluation_that_fails_keeps_the_training_and_a_rerun_evaluates_again(tmp_path):
    # 2: with save_every 0 the final evaluation ran before the final save: its failure lost the whole run
    cfg = config_file(tmp_path, train={"save_every": 0}, eval={**TINY_EVAL, "at_end": True})
    run = tmp_path / "runs" / "run"
    final = run / "checkpoints" / "step_000003"
    line = one_error(run_with_fault("fail_eval=final", ["--config", str(cfg)]))
    assert line.startswith("error: evaluation final failed (RuntimeError: fault: evaluation final fails); "), line
    assert line.endswith(f"the training is kept: last good checkpoint: {final}; "
                         "rerun the same command to evaluate it again"), line
    assert (final / "trainer_state.json").is_file() and not (run / "summary.json").exists()
    weights = tree_digest(final)
    out = run_cli(["--config", str(cfg)])
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {final} (step 3)" in out.stdout and "student after training, step 3" in out.stdout
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 3]  # trained once, evaluated once
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert tree_digest(final) == weights  # not written again


@pytest.mark.slow  # several runs of the CLI: over a minute, measured on a loaded 2-core machine
def test_an_evaluation_that_fails_mid_run_costs_only_the_evaluation(tmp_path):
    # 2: a failing evaluation at step 2 (save_every 0) ended the run with a traceback and no checkpoint
    cfg = config_file(tmp_path, train={"save_every": 0}, eval={**TINY_EVAL, "every": 2})
    run = tmp_path / "runs" / "run"
    ckpt = run / "checkpoints" / "step_000002"
    line = one_error(run_with_fault("fail_eval=step_000002", ["--config", str(cfg)]))
    assert line.startswith("error: evaluation step_000002 failed (RuntimeError: "), line
    assert line.endswith(f"last good checkpoint: {ckpt}; rerun the same command to resume"), line
    assert [m["step"] for m in read_metrics(run)] == [1, 2]  # the step's own metrics are kept
    out = run_cli(["--config", str(cfg)])
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {ckpt} (step 2)" in out.stdout
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]


# ----------------------------------------------------------------------------
# 3, 4: a finished run's own files


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 3-step run evaluated at the end (tiny demo benchmark)."""
    tmp = tmp_path_factory.mktemp("finished")
    cfg = write_config(tmp / "c.yaml", tiny_config(tmp, eval={**TINY_EVAL, "at_end": True}))
    out = run_cli(["--config", str(cfg)])
    assert out.returncode == 0, out.stderr[-3000:]
    return cfg, tmp / "runs" / "run"


def run_module(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow  # several runs of the CLI: over a minute, measured on a loaded 2-core machine
def test_eval_never_writes_over_a_training_run_or_an_existing_file(finished, tmp_path):
    # 3: `--out RUN_DIR` overwrote the run's summary.json (its rerun then crashed with KeyError);
    # `--out FILE` evaluated everything, then died with FileExistsError
    _, run = finished
    before = tree_digest(run)
    model = ["eval", "--model", str(run / "checkpoints" / "step_000003"), "--benchmarks", "demo", "--k", "1",
             "--max-problems", "2", "--max-new-tokens", "4"]
    out = run_module(*model, "--out", str(run))
    line = one_error(out)
    assert line.startswith(f"error: --out {run} is a training run directory"), line
    out = run_module(*model, "--out", str(run / "eval" / "final"))
    line = one_error(out)
    assert line.startswith(f"error: --out {run / 'eval' / 'final'} holds an evaluation of training run {run}"), line
    assert tree_digest(run) == before
    taken = tmp_path / "result.txt"
    taken.write_text("mine\n")
    out = run_module(*model, "--out", str(taken))
    line = one_error(out)
    assert line == f"error: --out {taken} is a file; give a directory (new, or one an evaluation wrote)", line
    assert "eval demo" not in out.stdout  # refused before evaluating
    assert taken.read_text() == "mine\n"


def test_a_malformed_summary_of_a_finished_run_is_one_line_and_a_rerun_rewrites_it(finished, tmp_path):
    # 4: a finished run whose summary.json is `[]` made the rerun crash (TypeError)
    cfg, done = finished
    run = tmp_path / "runs" / "run"
    shutil.copytree(done, run)
    (run / "summary.json").write_text("[]")
    args = ["--config", str(cfg), f"train.output_dir={tmp_path / 'runs'}"]
    before = tree_digest(run)
    line = one_error(run_cli(args))
    assert line == (f"error: {run / 'summary.json'} is not a summary written by train.py (a JSON list); move it "
                    "aside and rerun the same command to write it again"), line
    assert tree_digest(run) == before
    (run / "summary.json").unlink()
    out = run_cli(args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 3]  # the final evaluation's line once


def test_compare_names_a_malformed_summary(finished, tmp_path):
    # 4: `python -m eval.compare` on a malformed summary
    _, run = finished
    bad = tmp_path / "bad" / "summary.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps({"k": 1, "benchmarks": {"demo": [1, 2]}}))
    line = one_error(run_module("eval.compare", str(run), str(bad)))
    assert line.startswith(f"error: {bad}: not an evaluation summary"), line


# ----------------------------------------------------------------------------
# 9: SIGTERM before the first step


def stopped_cleanly(proc: subprocess.Popen, log: Path) -> str:
    rc = proc.wait(timeout=180)
    text = log.read_text()
    assert rc == 0 and "Traceback" not in text, (rc, text[-3000:])
    return text


def test_sigterm_during_the_step_0_evaluation_stops_cleanly_and_step_0_is_logged_once(tmp_path):
    # 9: exit 143 without a word, and the rerun logged the step-0 teacher line twice
    cfg = config_file(tmp_path, eval={**TINY_EVAL, "at_start": True, "teacher": True})
    args = ["--config", str(cfg)]
    run = tmp_path / "runs" / "run"
    log = tmp_path / "term.log"
    proc = start_with_fault("pause_eval=step_000000", args, log)  # the teacher's evaluation is logged by then
    wait_for_text(log, "fault: pausing before evaluation step_000000", proc)
    proc.send_signal(signal.SIGTERM)
    text = stopped_cleanly(proc, log)
    assert "stopped by signal at step 0; nothing trained yet, no checkpoint written; rerun the same command" in text
    assert not (run / "checkpoints").exists()
    out = run_cli(args)
    assert out.returncode == 0, out.stderr[-3000:]
    records = read_metrics(run)
    assert [r["step"] for r in records] == [0, 0, 1, 2, 3], records
    assert sum(any(k.startswith("val_teacher/") for k in r) for r in records) == 1


def test_sigterm_during_set_up_stops_cleanly(tmp_path):
    # 9: a signal while the models load ended the run with 143 and no message
    cfg = config_file(tmp_path)
    log = tmp_path / "term.log"
    proc = start_with_fault("pause_load=4", ["--config", str(cfg)], log)
    wait_for_text(log, "fault: pausing before loading the models", proc)
    proc.send_signal(signal.SIGTERM)
    text = stopped_cleanly(proc, log)
    assert "stopped by signal at step 0; nothing trained yet, no checkpoint written; rerun the same command" in text
    assert not (tmp_path / "runs" / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------
# 16: files that are not what they claim name themselves


def test_a_latin1_benchmark_and_a_binary_compare_argument_are_named(tmp_path, capsys):
    # 16: a latin-1 benchmark file and a binary `eval.compare` argument: errors without the file's name
    from eval import cli, compare

    bench = tmp_path / "latin.jsonl"
    record = json.dumps({"id": "a", "problem": "caf\u00e9: 1+1=", "answer": "2"}, ensure_ascii=False)
    bench.write_bytes(record.encode("latin-1") + b"\n")
    cfg = config_file(tmp_path, eval={**TINY_EVAL, "benchmarks": [str(bench)]})
    line = one_error(run_cli(["--config", str(cfg), "--check"]))
    assert line.startswith(f"error: eval.benchmarks: {bench}:1: not UTF-8 text"), line
    assert cli.main(["--model", str(tmp_path), "--benchmarks", str(bench)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bench}:1: not UTF-8 text"), err
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"k": 1, "benchmarks": {"demo": {"mean@k": 1.0, "std@k": 0.0}}}))
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00" * 20)
    assert compare.main([str(good), str(binary)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {binary}: not a readable JSON file ("), err
