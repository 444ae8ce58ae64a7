"""The `eval:` settings section: how a model is evaluated (here, in training and by `python -m eval`)."""

from __future__ import annotations

from dataclasses import dataclass, field

# The default question-answer sentence of math benchmarks. The paper configs use the reference
# implementation's sentence instead (configs/base.yaml sets eval.instruction).
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class EvalConfig:
    every: int = field(default=5, metadata={"help": "evaluate every N steps; 0 = only before/after", "min": 0})
    at_start: bool = field(default=False, metadata={"help": "evaluate before the first step"})
    at_end: bool = field(default=True, metadata={"help": "evaluate after the last step"})
    teacher: bool = field(default=False, metadata={"help": "also evaluate the teacher once at the start (the upper bound)"})
    benchmarks: list[str] = field(default_factory=list, metadata={"help": "benchmark names or paths (see eval.benchmarks)"})
    heldout: bool = field(default=True, metadata={"help": "in training, also evaluate the held-out training prompts (data.val_ratio / data.val_path) as val/heldout/..., graded by opd.reward"})
    instruction: str = field(default=BOXED_INSTRUCTION, metadata={"help": "math benchmarks: the sentence asked after each problem (\"\" = none)"})
    instruction_separator: str = field(default="\n", metadata={"help": "math benchmarks: text between the problem and `instruction`"})
    k: int = field(default=16, metadata={"help": "samples per problem", "min": 1})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature", "min": 0.0})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling", "min": 0.0, "max": 1.0})
    max_new_tokens: int = field(default=8192, metadata={"help": "response tokens at most", "min": 1})
    max_problems: int = field(default=0, metadata={"help": "evaluate at most this many problems per benchmark; 0 = all", "min": 0})
    batch_size: int = field(default=64, metadata={"help": "sequences per generate call", "min": 1})
    grade_timeout_s: float = field(default=5.0, metadata={"help": "per-answer grading time limit", "min": 0.1})
