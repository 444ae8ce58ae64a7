"""Run train.py with one fault injected at the operating-system boundary (for tests/reliability).

    python tests/reliability/with_fault.py FAULT=VALUE [train.py arguments ...]

Faults:
  disk_free=BYTES   shutil.disk_usage reports BYTES free (a nearly full disk, without filling one)
  stall_save=STEP   the fsync of checkpoint STEP's temporary files never returns: the process
                    hangs inside the checkpoint write (after printing `fault: stalled ...` to
                    stderr) until the test kills it

Everything else is the real CLI: the wrapper only patches these functions, then runs train.py
as its own __main__.
"""

from __future__ import annotations

import os
import runpy
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def fake_disk_free(free: int) -> None:
    real = shutil.disk_usage

    def disk_usage(path):
        total, used, _ = real(path)
        return type(real(path))(total, used, free)

    shutil.disk_usage = disk_usage


def stall_checkpoint_write(step: int) -> None:
    real = os.fsync
    marker = f".tmp-step_{step:06d}-"

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}") if isinstance(fd, int) else ""
        if marker in path:
            print(f"fault: stalled writing {path}", file=sys.stderr, flush=True)
            while True:
                time.sleep(1)
        return real(fd)

    os.fsync = fsync


FAULTS = {"disk_free": fake_disk_free, "stall_save": stall_checkpoint_write}

if __name__ == "__main__":
    name, value = sys.argv[1].split("=", 1)
    FAULTS[name](int(value))
    sys.argv = [str(REPO / "train.py"), *sys.argv[2:]]
    sys.path.insert(0, str(REPO))
    runpy.run_path(str(REPO / "train.py"), run_name="__main__")
