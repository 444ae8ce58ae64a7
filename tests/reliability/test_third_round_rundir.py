"""The third fault-injection round (tracker issue 26): run directories, evaluations and signals.

Two runs in one directory, benchmarks that fail late, `python -m eval` writing into a training run,
malformed summaries, SIGTERM before the first step, files that are not UTF-8. The rule is the one of
the earlier rounds: one `error:` line naming the problem (and the file or key), exit code 2, nothing
already written changed. The issue's item number is in each test's comment.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, read_metrics, run_cli, tiny_config, write_config
from test_faults import error_lines, tree_digest, wait_for_text
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

