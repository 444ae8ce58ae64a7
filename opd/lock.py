"""One run per run directory: an OS lock on <output_dir>/.<run_name>.lock, held from set-up to the end of the run.

A flock(2) lock belongs to the open file, so the kernel drops it when the holding process ends, however
it ends (kill -9, a crash, a lost node): a crashed run never leaves its directory locked, and a requeued
job (the same command again) resumes. The file says who holds it (pid, host, start time) for the line that
refuses a second start. It lies beside the run directory, not in it: the run's own files stay as the run
wrote them (a no-op rerun of a finished run changes none), and a run directory moved elsewhere takes no lock
along. Only the main process of a multi-process launch (RANK 0) takes it: the other processes of the same
run share the directory by design. Linux maps flock onto NFS byte-range locks, so a
directory on NFSv4 is covered too.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

_HELD: set[Path] = set()  # run directories this process holds (its own start checks them again)


def lock_file(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name}.lock"


def main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def in_use(run_dir: Path, who: str) -> str:
    return (f"train.run_name: run directory {run_dir} is in use by another run ({who}); wait for it to end, "
            "or choose another train.run_name")


def _who(fd: int) -> str:
    text = os.pread(fd, 500, 0).decode("utf-8", "replace").strip()
    return text.splitlines()[0] if text else "a process that has not written its name yet"


def holder(run_dir: Path) -> str | None:
    """Why `run_dir` cannot be started into now (one line naming the holder), or None. Reads only: the
    probe takes a shared lock for an instant, which fails while a run holds the exclusive one."""
    path = lock_file(run_dir)
    if Path(run_dir).resolve() in _HELD:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file (no run yet), or one this user cannot read: the start reports that
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return in_use(run_dir, _who(fd))
    finally:
        os.close(fd)  # releases the probe's lock too
    return None


class RunLock:
    """`with RunLock(run_dir) as lock:` holds the run directory's lock inside the block (on the main
    process; the folder above it is made if missing). Taking it never raises: `lock.problem` is the one-line
    reason it is held by another run (None when this process holds it, or is not the main process), so
    every process of a launch can be told (opd.setup.prepare_run_dir)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.fd: int | None = None
        self.problem: str | None = None

    def __enter__(self) -> "RunLock":
        if not main_process() or (self.run_dir.exists() and not self.run_dir.is_dir()):
            return self  # not a directory: the run-directory check says so
        try:
            self.run_dir.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_file(self.run_dir), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # not writable: the start fails at its first write, with the line saying why
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.problem = in_use(self.run_dir, _who(fd))
            os.close(fd)
            return self
        self.fd = fd
        _HELD.add(self.run_dir.resolve())
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since {since}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            _HELD.discard(self.run_dir.resolve())
            os.close(self.fd)
            self.fd = None
