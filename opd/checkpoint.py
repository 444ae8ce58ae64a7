"""Checkpoints that are either complete or absent.

Layout: <run>/checkpoints/step_000020/ holding the student as an ordinary HF
checkpoint (safetensors + tokenizer), `optimizer.pt`, `scheduler.pt` and
`trainer_state.json`. A checkpoint is written into a hidden temporary
directory and renamed into place in one step, so an interruption (even
kill -9) during a save leaves the previous checkpoints untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

PREFIX = "step_"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporaries start with '.' and are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = {}
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit() and (p / "trainer_state.json").is_file():
            found[int(p.name[len(PREFIX):])] = p
    # Re-saving a step moves the old copy aside (.old-step_N-pid) before renaming the new one in; a kill
    # between the two renames leaves the old copy as the only complete checkpoint of that step.
    for p in root.glob(f".old-{PREFIX}*"):
        step = p.name.split("-")[1][len(PREFIX):]
        if step.isdigit() and (p / "trainer_state.json").is_file():
            found.setdefault(int(step), p)
    return [found[s] for s in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def save_checkpoint(run_dir: Path, step: int, write_model, optimizer_state: dict | None, scheduler_state: dict | None,
                    trainer_state: dict, keep_last: int) -> Path:
    """Write checkpoint `step` atomically and prune to the newest `keep_last`.

    `write_model(dir)` writes the model and tokenizer (save_pretrained).
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_model(tmp)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        if scheduler_state is not None:
            torch.save(scheduler_state, tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        _fsync_tree(tmp)
    except BaseException:  # disk full, Ctrl-C: leave no half checkpoint behind, the previous ones are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # re-saving the same step (e.g. final == last periodic): replace whole
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    kept = list_checkpoints(run_dir)
    for stale in kept[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    for leftover in [*root.glob(".tmp-*"), *root.glob(".old-*")]:  # debris of interrupted saves
        if leftover not in kept[-keep_last:]:
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def load_trainer_state(path: Path) -> dict:
    return json.loads((Path(path) / "trainer_state.json").read_text())


def load_torch_state(path: Path, name: str):
    file = Path(path) / name
    return torch.load(file, map_location="cpu", weights_only=True) if file.is_file() else None
