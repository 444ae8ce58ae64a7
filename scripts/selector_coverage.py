"""What each selector would keep on a run's dumped tokens: share of the divergence mass and of Q3 tokens covered.

    python scripts/selector_coverage.py RUN_DIR [RUN_DIR ...]

No training: every step's tokens in tokens.jsonl (h, δ, δ_fwd as the run measured them) form one scope, and the
tip selectors (tip.select, min-max per scope, as in training) choose from it at the paper's retentions. Printed
per selector and ratio, pooled over steps: the kept share of Σδ (reverse KL mass) and the share of the Q3 tokens
(low h, high δ: the entropy blind spot) that are kept. The scope is the dumped sample of each step
(`tip.dump_tokens` records), the whole step when the dump holds every token.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tip  # noqa: E402

CHOICES = (("all", 1.0), ("random", 0.5), ("entropy_topk", 0.5), ("soft_or", 0.5), ("random", 0.2),
           ("entropy_topk", 0.2), ("soft_or", 0.2), ("q3_only", 0.2))
OPTIONS = {"normalize": "minmax", "momentum": 0.9, "importance_weighting": False}


def coverage(records: list[dict]) -> dict[tuple[str, float], tuple[float, float]]:
    """(selector, ratio) -> (kept share of Σδ, kept share of Q3 tokens), pooled over the steps of `records`."""
    by_step = defaultdict(list)
    for r in records:
        by_step[r["step"]].append(r)
    sums = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])  # kept δ, all δ, kept Q3, Q3
    for step, rows in sorted(by_step.items()):
        col = lambda key: torch.tensor([r[key] for r in rows], dtype=torch.float32)  # noqa: E731
        stats = tip.TokenStats(col("entropy"), col("divergence"), col("forward_divergence"), col("teacher_entropy"),
                               torch.tensor([r["rollout"] for r in rows]))
        q3 = torch.tensor([r["quadrant"] == 3 for r in rows])
        for name, ratio in CHOICES:
            sel = tip.select(name, stats, ratio, scope="microbatch", generator=torch.Generator().manual_seed(step),
                             **OPTIONS)
            acc = sums[(name, ratio)]
            acc[0] += stats.divergence[sel.mask].sum().item()
            acc[1] += stats.divergence.sum().item()
            acc[2] += (sel.mask & q3).sum().item()
            acc[3] += q3.sum().item()
    return {key: (a / max(b, 1e-12), c / max(d, 1)) for key, (a, b, c, d) in sums.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args(argv)
    for run in args.runs:
        records = [json.loads(line) for line in (Path(run) / "tokens.jsonl").read_text().splitlines() if line.strip()]
        print(f"{run}: {len(records)} tokens, {len({r['step'] for r in records})} steps")
        print(f"  {'selector':<14} {'ratio':>5}  {'kept Σδ':>8}  {'kept Q3':>8}")
        for (name, ratio), (mass, q3) in coverage(records).items():
            print(f"  {name:<14} {ratio:5.1f}  {100 * mass:7.1f}%  {100 * q3:7.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
