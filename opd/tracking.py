"""Metric sinks: metrics.jsonl always; TensorBoard and W&B when asked for."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

from opd.config import LoggingConfig
from opd.errors import WriteError


@contextlib.contextmanager
def writing(path: Path, step: int | None = None):
    """A failing write of `path` (disk full, read-only, permissions) ends the run with one line naming it."""
    try:
        yield
    except OSError as exc:
        raise WriteError(path, exc, step) from None


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible as strings
    return value


class MetricsLog:
    """One JSON object per line in <run>/metrics.jsonl (only on the main process)."""

    def __init__(self, run_dir: Path, lc: LoggingConfig, config_dict: dict, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if lc.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if lc.wandb:
            import wandb  # optional: not a requirement

            self.wandb = wandb.init(project=lc.wandb_project, name=Path(run_dir).name, config=config_dict,
                                    dir=str(run_dir), resume="allow")

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (a resumed run rewrites them)."""
        if self.enabled:
            truncate_jsonl(self.path, step)

    def log(self, step: int, metrics: dict, replace: bool = False) -> None:
        """Append a line; `replace`: first drop an earlier line of `step` with the same keys (an evaluation run
        again after an interruption is logged once)."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        if replace and self.path.is_file():
            old = _records(self.path)
            keep = [r for r in old if r.keys() != record.keys() or r.get("step") != step]
            if len(keep) < len(old):
                with writing(self.path, step):
                    _rewrite(self.path, keep)
        with writing(self.path, step), open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # blank, or the last line of a run killed mid-write
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the records of a JSONL log with "step" <= `step`; lines cut short by a kill are dropped."""
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = [r for r in _records(path) if r.get("step", 0) <= step]
    if len(keep) == len(lines):  # nothing to drop: leave the file (and its mtime) alone
        return
    _rewrite(path, keep)


def _rewrite(path: Path, records: list[dict]) -> None:
    """Replace a JSONL file by `records` in one rename (a kill leaves the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return _records(path)
