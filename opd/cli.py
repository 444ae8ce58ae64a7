"""Command line of train.py: parse, check everything that can be checked, then train.

Every user mistake ends with one line per problem on stderr and exit code 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from lm.typed import ConfigError
from demo import pairs as demo_pairs
from opd.checkpoint import latest_checkpoint, run_directory
from opd.config import load_config, to_yaml
from opd.data import DataError
from opd.errors import CAUSES, RunError, WriteError, cause
from opd.preflight import config_keys, preflight
from opd.trainer import train

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="train.py", description="On-policy distillation with token importance (TIP).",
        epilog="Overrides: section.key=value after the options, e.g. tip.selector=soft_or tip.ratio=0.5",
    )
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML config; repeat to compose (later files win). Default: configs/demo.yaml")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--check", action="store_true", help="check config, paths, data and models, then exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser.parse_args(argv)


def fail(lines) -> int:
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    return 2


def resumable(cfg, paths) -> str:
    return (f"last good checkpoint: {latest_checkpoint(run_directory(cfg, paths)) or 'none'}; "
            "rerun the same command to resume")


def quiet_libraries() -> None:
    """Silence library output that tells a train.py user nothing: transformers' per-file progress bars
    (loading and writing weights; setup prints what it loads), and DeepSpeed's warning, on a machine without
    CUDA, that it falls back to its CPU accelerator (naming that accelerator selects the same one, quietly)."""
    hf_logging.disable_progress_bar()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def prepare(cfg) -> dict[str, str]:
    """The one preparation step before a run (STYLE point 9: none hidden inside training): model paths that
    name a demo pair (`demo:student`, ...) -> its checkpoints, the pair trained on first use and cached."""
    log = print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a, **k: None)
    try:
        return demo_pairs.prepare([cfg.model.path, cfg.teacher.path], cfg.demo, cfg.agent_demo, cfg.real_demo,
                                  log=log)
    except ValueError as exc:
        raise RunError(f"model.path / teacher.path: {exc}") from None


def main(argv) -> int:
    args = parse_args(argv)
    quiet_libraries()
    paths = args.config or [str(DEFAULT_CONFIG)]
    try:
        cfg = load_config(paths, args.overrides)
    except ConfigError as exc:
        if exc.config is None or args.print_config:
            return fail(exc.problems)
        # the valid part of the config is checked too, so the user fixes everything in one round
        return fail(exc.problems + preflight(exc.config, paths, ignore=config_keys(exc.problems)))
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    notes: list[str] = []
    problems = preflight(cfg, paths, deep=args.check, notes=notes)
    if problems:
        return fail(problems)
    if args.check:
        for line in notes:
            print(line)
        print("check passed: config, paths, data, models and output directory look fine")
        return 0
    try:
        started = time.time()  # the printed wall time counts the preparation step and the loading too
        run_dir = train(cfg, paths, prepared=prepare(cfg), started=started)
    except WriteError as exc:
        return fail([f"{exc}; {resumable(cfg, paths)}"])
    except OSError as exc:
        if exc.errno not in CAUSES:  # not the environment refusing a write: a bug, with its traceback
            raise
        return fail([f"{exc.filename or 'a file of the run'}: {cause(exc)}; {resumable(cfg, paths)}"])
    except (RunError, DataError) as exc:
        return fail([str(exc)])
    except KeyboardInterrupt:  # a second Ctrl-C / SIGTERM: stop now; checkpoints are complete or absent
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    print(f"run directory: {run_dir}")
    return 0
