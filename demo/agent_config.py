"""Settings of the agentic demo pair (demo/agent_prepare.py): a teacher and a student that use the `lookup` tool.

Typed like every other section (lm.typed): `python -m demo.agent_prepare teacher_max_steps=900` is
checked field by field, and a bad value is a ValueError that names its key.

The pair is trained on conversations of `LookupEnv(seed=env_seed)` and measured on those of
`LookupEnv(seed=eval_env_seed)`, the environment a distillation run uses: every task's values are
random per task and per seed, so nothing memorised carries over and a score there is tool use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class AgentDemoConfig:
    arch: Literal["llama", "qwen3", "qwen2"] = field(default="qwen3", metadata={"help": "transformers architecture of both models"})
    teacher_layers: int = field(default=2, metadata={"help": "teacher decoder layers", "min": 1})
    teacher_hidden: int = field(default=128, metadata={"help": "teacher hidden size", "min": 1})
    teacher_heads: int = field(default=8, metadata={"help": "teacher attention heads", "min": 1})
    teacher_max_steps: int = field(default=1100, metadata={"help": "teacher supervised optimiser steps at most (the cosine schedule's length)", "min": 0})
    teacher_lr: float = field(default=3e-3, metadata={"help": "teacher peak learning rate", "min": 0.0})
    teacher_target: float = field(default=0.96, metadata={"help": "the teacher stops once its validation score reaches this", "min": 0.0, "max": 1.0})
    mlp_ratio: int = field(default=2, metadata={"help": "MLP width as a multiple of the hidden size (both models)", "min": 1})
    student_layers: int = field(default=2, metadata={"help": "student decoder layers", "min": 1})
    student_hidden: int = field(default=64, metadata={"help": "student hidden size", "min": 1})
    student_heads: int = field(default=4, metadata={"help": "student attention heads", "min": 1})
    student_max_steps: int = field(default=800, metadata={"help": "student supervised optimiser steps at most (the cosine schedule's length)", "min": 0})
    student_lr: float = field(default=3e-3, metadata={"help": "student peak learning rate", "min": 0.0})
    student_target: float = field(default=0.2, metadata={"help": "the student stops early, once its validation score reaches this", "min": 0.0, "max": 1.0})
    batch_size: int = field(default=16, metadata={"help": "worked conversations per supervised step", "min": 1})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up steps before the cosine decay", "min": 0})
    teacher_check_every: int = field(default=150, metadata={"help": "teacher steps between validation checks (of the stopping rule)", "min": 1})
    student_check_every: int = field(default=25, metadata={"help": "student steps between validation checks (of the stopping rule)", "min": 1})
    check_tasks: int = field(default=64, metadata={"help": "validation tasks of the stopping rule: tasks of env_seed's environment never trained on, one sample each at T=1.0", "min": 1})
    train_tasks: int = field(default=20000, metadata={"help": "training tasks of env_seed's environment (cycled through in a seeded order)", "min": 1})
    env_seed: int = field(default=1, metadata={"help": "seed of the LookupEnv whose conversations train the pair (not the distillation run's)"})
    eval_env_seed: int = field(default=0, metadata={"help": "seed of the LookupEnv the scores in pair.json are measured on (the distillation run's)"})
    eval_tasks: int = field(default=200, metadata={"help": "tasks of eval_env_seed's environment the scores in pair.json average over", "min": 1})
    eval_k: int = field(default=2, metadata={"help": "conversations per evaluation task, sampled at T=1.0", "min": 1})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens per assistant turn at most (rollouts of the checks and the evaluation)", "min": 1})
    max_turns: int = field(default=4, metadata={"help": "assistant turns per conversation at most", "min": 1})
    max_response_tokens: int = field(default=400, metadata={"help": "tokens after the opening prompt at most", "min": 1})
    max_tool_response_tokens: int = field(default=16, metadata={"help": "a tool result is cut to this many tokens", "min": 1})
    seed: int = field(default=0, metadata={"help": "seed of weights, data order and sampled rollouts"})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads while preparing; 0 = leave as is (not part of the cache key); at most 4,096", "min": 0, "max": 4096})
    cache_dir: str = field(default=".cache/demo", metadata={"help": "where prepared pairs are kept (relative to the working directory; not part of the cache key)"})


AGENT_NOT_IN_KEY = ("num_threads", "cache_dir")
"""Settings that do not change the trained pair."""


def check_agent_demo(d: AgentDemoConfig, prefix: str = "") -> list[str]:
    """Cross-field checks the field ranges cannot express, one line each."""
    problems = []
    for side in ("teacher", "student"):
        hidden, heads = getattr(d, f"{side}_hidden"), getattr(d, f"{side}_heads")
        if hidden % heads:
            problems.append(f"`{prefix}{side}_hidden` = {hidden} must be a multiple of `{prefix}{side}_heads` = {heads}")
    if d.env_seed == d.eval_env_seed:
        problems.append(f"`{prefix}env_seed` = {d.env_seed} must differ from `{prefix}eval_env_seed`: "
                        "the pair must not train on the tasks it is measured on")
    return problems


def agent_pair_fields(d: AgentDemoConfig) -> dict:
    """The settings that define the pair (the cache key's content)."""
    return {k: v for k, v in dataclasses.asdict(d).items() if k not in AGENT_NOT_IN_KEY}
