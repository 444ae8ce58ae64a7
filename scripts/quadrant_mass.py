"""Quadrant shares of tokens and of divergence mass (sum of δ per quadrant / total δ) from runs' tokens.jsonl.

    python scripts/quadrant_mass.py RUN_DIR [RUN_DIR ...] [--steps A-B]

The quadrants are the ones the run logged for each dumped token (SPEC §4: Q1 high h high δ, Q2 high h low δ,
Q3 low h high δ, Q4 low h low δ; thresholds the step's medians by default). The dump is `tip.dump_tokens` records
per step; where a step has more response tokens than that, these are shares of the dumped sample.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def shares(records: list[dict]) -> dict:
    """{"tokens": {q: share}, "delta": {q: share of Σδ}, "kept_delta": {...}, "n": count} over quadrants 1-4."""
    total_n, total_d = len(records), sum(r["divergence"] for r in records) or 1.0
    kept_d = sum(r["divergence"] for r in records if r["kept"]) or 1.0
    out = {"n": total_n, "tokens": {}, "delta": {}, "kept_of_quadrant": {}}
    for q in (1, 2, 3, 4):
        rows = [r for r in records if r["quadrant"] == q]
        out["tokens"][q] = len(rows) / max(1, total_n)
        out["delta"][q] = sum(r["divergence"] for r in rows) / total_d
        out["kept_of_quadrant"][q] = sum(r["kept"] for r in rows) / max(1, len(rows))
    out["kept_delta_share"] = kept_d / total_d if any(r["kept"] for r in records) else 0.0
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--steps", default="", help="only these steps, e.g. 1-5")
    args = parser.parse_args(argv)
    lo, _, hi = args.steps.partition("-")
    print(f"{'run':<40} {'tokens':>6}  {'share of tokens Q1/Q2/Q3/Q4':>30}  {'share of Σδ Q1/Q2/Q3/Q4':>28}  "
          f"{'kept share of Q3':>16}  {'Σδ kept':>7}")
    for run in args.runs:
        records = [json.loads(line) for line in (Path(run) / "tokens.jsonl").read_text().splitlines() if line.strip()]
        if args.steps:
            records = [r for r in records if int(lo) <= r["step"] <= int(hi or lo)]
        s = shares(records)
        fmt = lambda d: " ".join(f"{100 * d[q]:6.1f}" for q in (1, 2, 3, 4))  # noqa: E731
        print(f"{run[-40:]:<40} {s['n']:>6}  {fmt(s['tokens']):>30}  {fmt(s['delta']):>28}  "
              f"{100 * s['kept_of_quadrant'][3]:15.1f}%  {100 * s['kept_delta_share']:6.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
