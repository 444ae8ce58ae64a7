"""The `demo:` settings section: how the demo pair is prepared (demo/prepare.py).

A typed section like every other, validated by the same system (lm.typed);
`python train.py demo.teacher_steps=800` and `python -m demo.prepare teacher_steps=800`
read the same fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DemoConfig:
    arch: Literal["llama", "qwen3", "qwen2"] = field(default="llama", metadata={"help": "transformers architecture of both models"})
    teacher_layers: int = field(default=2, metadata={"help": "teacher decoder layers", "min": 1})
    teacher_hidden: int = field(default=128, metadata={"help": "teacher hidden size (MLP is 4x)", "min": 1})
    teacher_heads: int = field(default=4, metadata={"help": "teacher attention heads", "min": 1})
    teacher_steps: int = field(default=600, metadata={"help": "teacher supervised optimiser steps", "min": 0})
    teacher_lr: float = field(default=3e-3, metadata={"help": "teacher peak learning rate", "min": 0.0})
    student_layers: int = field(default=2, metadata={"help": "student decoder layers", "min": 1})
    student_hidden: int = field(default=64, metadata={"help": "student hidden size (MLP is 4x)", "min": 1})
    student_heads: int = field(default=4, metadata={"help": "student attention heads", "min": 1})
    student_steps: int = field(default=280, metadata={"help": "student supervised optimiser steps (stopped early on purpose)", "min": 0})
    student_lr: float = field(default=3e-3, metadata={"help": "student peak learning rate", "min": 0.0})
    batch_size: int = field(default=64, metadata={"help": "worked solutions per supervised step", "min": 1})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps before the cosine decay", "min": 0})
    eval_problems: int = field(default=512, metadata={"help": "held-out problems for the accuracies in pair.json", "min": 1})
    seed: int = field(default=0, metadata={"help": "seed of weights, data order and evaluation samples"})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads while preparing; 0 = leave as is (not part of the cache key); at most 4,096", "min": 0, "max": 4096})
    cache_dir: str = field(default=".cache/demo", metadata={"help": "where prepared pairs are kept (relative to the working directory; not part of the cache key)"})


NOT_IN_KEY = ("num_threads", "cache_dir")
"""Settings that do not change the trained pair."""


def check_demo(d: DemoConfig, prefix: str = "demo.") -> list[str]:
    """Cross-field checks the field ranges cannot express, one line each."""
    problems = []
    for side in ("teacher", "student"):
        hidden, heads = getattr(d, f"{side}_hidden"), getattr(d, f"{side}_heads")
        if hidden % heads:
            problems.append(f"`{prefix}{side}_hidden` = {hidden} must be a multiple of `{prefix}{side}_heads` = {heads}")
    return problems


def pair_fields(d: DemoConfig) -> dict:
    """The settings that define the pair (the cache key's content)."""
    return {k: v for k, v in dataclasses.asdict(d).items() if k not in NOT_IN_KEY}
