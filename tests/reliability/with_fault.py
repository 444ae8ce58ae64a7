"""Run train.py with one fault injected at the operating-system boundary (for tests/reliability).

    python tests/reliability/with_fault.py FAULT=VALUE [train.py arguments ...]

Faults:
  disk_free=BYTES   shutil.disk_usage reports BYTES free (a nearly full disk, without filling one)
  stall_save=STEP   the fsync of checkpoint STEP's temporary files never returns: the process
                    hangs inside the checkpoint write (after printing `fault: stalled ...` to
                    stderr) until the test kills it
  empty_rollouts=N1,N2,...
                    the first N1 rollouts of step 1 come back with zero response tokens (as
                    from a generate that stopped at once), the first N2 of step 2, ...

Everything else is the real CLI: the wrapper only patches these functions (the trainer's
`sample` for empty_rollouts), then runs train.py as its own __main__.
"""

from __future__ import annotations

import os
import runpy
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def fake_disk_free(value: str) -> None:
    free = int(value)
    real = shutil.disk_usage

    def disk_usage(path):
        total, used, _ = real(path)
        return type(real(path))(total, used, free)

    shutil.disk_usage = disk_usage


def stall_checkpoint_write(value: str) -> None:
    real = os.fsync
    marker = f".tmp-step_{int(value):06d}-"

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}") if isinstance(fd, int) else ""
        if marker in path:
            print(f"fault: stalled writing {path}", file=sys.stderr, flush=True)
            while True:
                time.sleep(1)
        return real(fd)

    os.fsync = fsync


def empty_rollouts(value: str) -> None:
    import lm.engines

    counts = iter(int(n) for n in value.split(","))
    real = lm.engines.sample

    def sample(*args, pad_token_id, **kwargs):
        rollouts = real(*args, pad_token_id=pad_token_id, **kwargs)
        n, start = next(counts, 0), rollouts.prompt_length
        rollouts.input_ids[:n, start:] = pad_token_id
        rollouts.attention_mask[:n, start:] = 0
        rollouts.response_mask[:n] = 0
        return rollouts

    lm.engines.sample = sample


FAULTS = {"disk_free": fake_disk_free, "stall_save": stall_checkpoint_write, "empty_rollouts": empty_rollouts}

if __name__ == "__main__":
    name, value = sys.argv[1].split("=", 1)
    sys.path.insert(0, str(REPO))
    FAULTS[name](value)
    sys.argv = [str(REPO / "train.py"), *sys.argv[2:]]
    runpy.run_path(str(REPO / "train.py"), run_name="__main__")
