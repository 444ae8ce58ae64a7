"""The `agent:` settings section: multi-turn tool-using rollouts (SPEC §6). `agent.env` empty = single-turn OPD.

The caps' defaults are the reference agent script's (prompt 4,096 tokens is `data.max_prompt_length`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class AgentConfig:
    env: str = field(default="", metadata={"help": "environment by name (lookup, deepplanning_travel) or a user's module:Class; empty = single-turn OPD on data.train_path"})
    env_args: dict = field(default_factory=dict, metadata={"help": "keyword arguments of the environment's constructor (paths, language, ...)"})
    tool_format: Literal["hermes"] = field(default="hermes", metadata={"help": "the model's tool-call format (hermes: Qwen3 / Hermes <tool_call>{json}</tool_call>)"})
    max_turns: int = field(default=50, metadata={"help": "assistant turns per conversation at most", "min": 1})
    max_response_tokens: int = field(default=24576, metadata={"help": "tokens after the opening prompt at most (student turns, tool results and template glue)", "min": 1})
    max_tool_response_tokens: int = field(default=1024, metadata={"help": "a tool result is cut to this many tokens", "min": 1})
    tool_timeout_s: float = field(default=60.0, metadata={"help": "seconds one tool call may take; a call still running then is a tool error the model reads (counted in agent/tool_errors) and its thread is abandoned, not killed", "min_exclusive": 0.0, "max": 86400.0})
    heldout_ratio: float = field(default=0.2, metadata={"help": "share of the environment's tasks held out for evaluation (split by task id)", "min": 0.0, "max": 0.9})
    split_seed: int = field(default=0, metadata={"help": "seed of the train/held-out split (not train.seed: every method and seed sees the same split)"})
    eval_tasks: int = field(default=0, metadata={"help": "held-out tasks evaluated at most (the first ones of the split); 0 = all", "min": 0})
