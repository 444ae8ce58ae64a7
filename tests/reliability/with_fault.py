"""Run train.py with one fault injected at the operating-system boundary (for tests/reliability).

    python tests/reliability/with_fault.py FAULT=VALUE [train.py arguments ...]

Faults:
  disk_free=BYTES   shutil.disk_usage reports BYTES free (a nearly full disk, without filling one)
  stall_save=STEP   the fsync of checkpoint STEP's temporary files never returns: the process
                    hangs inside the checkpoint write (after printing `fault: stalled ...` to
                    stderr) until the test kills it
  fail_write=NAME@N:ERRNO
                    the Nth opening of a file called NAME for appending fails with ERRNO (a name
                    from the errno module): ENOSPC lets half of the first write land, then raises, as
                    a disk that fills mid-line does; any other code (EROFS, EPERM, ...) raises at the open
  fail_eval=NAME     the evaluation written to <run>/eval/NAME (teacher, step_000000, step_000020, final)
                    raises RuntimeError (a grader, a generate or a file that fails late)
  pause_eval=NAME   the evaluation NAME first prints `fault: pausing before evaluation NAME` and sleeps 5 s
  pause_load=S      set-up prints `fault: pausing before loading the models` and sleeps S seconds there
  empty_rollouts=N1,N2,...
                    the first N1 rollouts of step 1 come back with zero response tokens (as
                    from a generate that stopped at once), the first N2 of step 2, ...

Everything else is the real CLI: the wrapper only patches these functions (the trainer's
`sample` for empty_rollouts), then runs train.py as its own __main__.
"""

from __future__ import annotations

import builtins
import errno
import io
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


class HalfWriter:
    """A file whose first write lands half-way and then fails with `code` (a disk filling up)."""

    def __init__(self, fh, code: int):
        self.fh, self.code = fh, code

    def write(self, text):
        self.fh.write(text[: len(text) // 2])
        self.fh.flush()
        raise OSError(self.code, os.strerror(self.code))

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def fail_write(value: str) -> None:
    name, rest = value.split("@")
    nth, code = int(rest.split(":")[0]), getattr(errno, rest.split(":")[1])
    real_open = io.open
    opened = 0

    def open_(file, mode="r", *args, **kwargs):
        nonlocal opened
        if isinstance(file, (str, os.PathLike)) and os.path.basename(os.fspath(file)) == name and "a" in mode:
            opened += 1
            if opened == nth:
                print(f"fault: opening {os.fspath(file)} #{nth} fails with {errno.errorcode[code]}", file=sys.stderr)
                if code != errno.ENOSPC:
                    raise OSError(code, os.strerror(code), os.fspath(file))
                return HalfWriter(real_open(file, mode, *args, **kwargs), code)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = open_  # pathlib's Path.open calls io.open


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


def around_eval(value: str, before) -> None:
    import opd.evaluation

    real = opd.evaluation.evaluate

    def evaluate(*args, **kwargs):
        if Path(args[4]).name == value:
            before()
        return real(*args, **kwargs)

    opd.evaluation.evaluate = evaluate


def fail_eval(value: str) -> None:
    def fail():
        raise RuntimeError(f"fault: evaluation {value} fails")

    around_eval(value, fail)


def pause_eval(value: str) -> None:
    def pause():
        print(f"fault: pausing before evaluation {value}", file=sys.stderr, flush=True)
        time.sleep(5)

    around_eval(value, pause)


def pause_load(value: str) -> None:
    import opd.setup

    real = opd.setup.load_pair

    def load_pair(*args, **kwargs):
        print("fault: pausing before loading the models", file=sys.stderr, flush=True)
        time.sleep(float(value))
        return real(*args, **kwargs)

    opd.setup.load_pair = load_pair


FAULTS = {"disk_free": fake_disk_free, "stall_save": stall_checkpoint_write, "empty_rollouts": empty_rollouts,
          "fail_write": fail_write, "fail_eval": fail_eval, "pause_eval": pause_eval, "pause_load": pause_load}

if __name__ == "__main__":
    name, value = sys.argv[1].split("=", 1)
    sys.path.insert(0, str(REPO))
    FAULTS[name](value)
    sys.argv = [str(REPO / "train.py"), *sys.argv[2:]]
    runpy.run_path(str(REPO / "train.py"), run_name="__main__")
