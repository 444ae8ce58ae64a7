"""`python -m eval.compare A B [C ...]`: evaluation results side by side, paper style.

Each argument is a summary.json, an evaluation directory holding one, or a
training run directory (its own summary.json is the run's, not an evaluation's),
whose latest evaluation is used: among RUN/eval/*/summary.json,
`final` wins, then the highest `step_<N>`, then (other names) the newest file.
Rows are benchmarks, columns are runs, cells are mean@k ± std (agent benchmarks: Avg@k ± std and Best@k); columns after
the first also show the difference of mean@k to the first. An `average` row
(mean over benchmarks) appears when every run has every benchmark.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def find_summary(path: str | Path) -> Path:
    """The summary.json that `path` (file, evaluation directory or run directory) stands for."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise ValueError(f"{p}: no such file or directory")
    # a training run directory holds its own summary.json (the run's, not an evaluation's) beside eval/
    if (p / "summary.json").is_file() and not (p / "eval").is_dir():
        return p / "summary.json"
    found = [d / "summary.json" for d in (p / "eval").glob("*") if (d / "summary.json").is_file()]
    if not found:
        if (p / "summary.json").is_file():
            return p / "summary.json"
        raise ValueError(f"{p}: neither summary.json nor eval/*/summary.json inside")
    return max(found, key=_recency)


def _recency(summary: Path) -> tuple:
    name = summary.parent.name
    step = re.fullmatch(r"step_(\d+)", name)
    if name == "final":
        return (2, 0, summary.stat().st_mtime)
    if step:
        return (1, int(step.group(1)), summary.stat().st_mtime)
    return (0, 0, summary.stat().st_mtime)


def load_summary(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8 text (a binary file)
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict) or "k" not in data or not isinstance(data.get("benchmarks"), dict):
        raise ValueError(f"{path}: not an evaluation summary (needs keys k and benchmarks)")
    for name, m in data["benchmarks"].items():
        numbers = ("mean@k", "std@k") + (("best@k",) if isinstance(m, dict) and "best@k" in m else ())
        if not (isinstance(m, dict) and all(isinstance(m.get(key), (int, float)) for key in numbers)):
            raise ValueError(f"{path}: not an evaluation summary (benchmark {name!r} needs the numbers "
                             f"{' and '.join(numbers)})")
    return data


def format_comparison(summaries: list[dict], labels: list[str]) -> str:
    """The side-by-side table (a string); `labels` name the columns."""
    names: list[str] = []
    for s in summaries:
        names += [n for n in s["benchmarks"] if n not in names]

    def cell(s: dict, name: str, base: dict | None) -> str:
        m = s["benchmarks"].get(name)
        if m is None:
            return "-"
        text = f"{m['mean@k']:.1f} ± {m['std@k']:.1f}"
        if "best@k" in m:  # an agent benchmark: mean@k is Avg@k; Best@k beside it
            text += f" best {m['best@k']:.1f}"
        if base is not None and name in base["benchmarks"]:
            text += f" ({m['mean@k'] - base['benchmarks'][name]['mean@k']:+.1f})"
        return text

    rows = [[name] + [cell(s, name, None if c == 0 else summaries[0]) for c, s in enumerate(summaries)] for name in names]
    if all(name in s["benchmarks"] for s in summaries for name in names) and len(names) > 1:
        means = [sum(s["benchmarks"][n]["mean@k"] for n in names) / len(names) for s in summaries]
        rows.append(["average"] + [f"{m:.1f}" + ("" if c == 0 else f" ({m - means[0]:+.1f})") for c, m in enumerate(means)])
    header = ["benchmark"] + [f"{label} (mean@{s['k']})" for label, s in zip(labels, summaries)]
    widths = [max(len(r[c]) for r in rows + [header]) for c in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(text.ljust(widths[c]) if c == 0 else text.rjust(widths[c]) for c, text in enumerate(row))

    return "\n".join([fmt(header), "-" * len(fmt(header))] + [fmt(r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="summary.json files, evaluation directories or run directories")
    args = p.parse_args(argv)
    try:
        paths = [find_summary(r) for r in args.runs]
        summaries = [load_summary(path) for path in paths]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Short column names keep the table narrow; the legend below says which run each is.
    labels = [chr(ord("A") + i) if i < 26 else f"R{i}" for i in range(len(paths))]
    print(format_comparison(summaries, labels))
    for label, path, summary in zip(labels, paths, summaries):
        step = summary.get("step")
        print(f"{label}: {path}" + (f" (step {step})" if step is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
