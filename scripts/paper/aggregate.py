"""Collect a table's runs and render it in the paper's layout, published figures beside ours.

    python -m scripts.paper.aggregate --table N [--runs runs/tableN] [--pairs P1,P2] [--methods M1,M2] [--out FILE]

Each cell is the run <runs>/<pair>__<method>/: accuracy from its
eval/final/summary.json (mean@k ± std@k per benchmark, in %; table 7: the
held-out tasks' Avg@k ± std@k and Best@k, benchmark `heldout`), peak memory
(max of `perf/max_memory_allocated_gb` over the steps of metrics.jsonl) for
table 3, kept tokens (`tip/num_kept`, `tip/num_tokens`) for table 4. Where
the paper's text gives a figure for a cell it is shown with the difference
(ours − paper). A cell without results shows "—". Which cells a table has is
read from <runs>/plan.json (written by the launcher) or --pairs/--methods,
else from the run directories present. Prints Markdown and writes it to
<runs>/table<N>.md (or --out).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from scripts.paper.tables import (
    AGENT14, AGENT32, CARRIED_FROM, PAIR_LABELS, PUBLISHED, PUBLISHED_KEPT, PUBLISHED_STD, BENCHMARK_LABELS, STD_NOTE,
    TABLES, TableSpec, method_sort_key,
)

MISSING = "—"


@dataclass
class RunResult:
    """What one run directory holds that a table needs (None = not there)."""

    exists: bool = False
    summary: dict | None = None  # eval/final/summary.json
    latest_eval: str | None = None  # newest eval/step_* directory with a summary, for runs still going
    peak_memory_gb: float | None = None
    memory_key: str | None = None
    kept_per_step: float | None = None  # mean of tip/num_kept over logged steps
    kept_share: float | None = None  # sum of tip/num_kept / sum of tip/num_tokens, in %
    student: str | None = None  # model.path of the run's config.yaml
    teacher: str | None = None  # teacher.path of the run's config.yaml


def read_metrics_lines(path: Path) -> list[dict]:
    """metrics.jsonl records; a line cut short by a killed run is skipped, not fatal."""
    records = []
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def read_run(run_dir: Path) -> RunResult:
    run_dir = Path(run_dir)
    result = RunResult(exists=run_dir.is_dir())
    if not result.exists:
        return result
    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        try:
            saved = yaml.safe_load(config_file.read_text()) or {}
        except yaml.YAMLError:
            saved = {}
        if isinstance(saved, dict):
            result.student = (saved.get("model") or {}).get("path") or None
            result.teacher = (saved.get("teacher") or {}).get("path") or None
    final = run_dir / "eval" / "final" / "summary.json"
    if final.is_file():
        result.summary = json.loads(final.read_text())
    steps = sorted(p.parent.name for p in (run_dir / "eval").glob("step_*/summary.json"))
    result.latest_eval = steps[-1] if steps else None
    records = read_metrics_lines(run_dir / "metrics.jsonl")
    for key in ("perf/max_memory_allocated_gb", "perf/max_rss_gb"):  # GPU peak; CPU runs log RSS instead
        values = [v for v in (_number(r.get(key)) for r in records) if v is not None]
        if values:
            result.peak_memory_gb, result.memory_key = max(values), key
            break
    kept = [(_number(r.get("tip/num_kept")), _number(r.get("tip/num_tokens"))) for r in records]
    kept = [(k, n) for k, n in kept if k is not None]
    if kept:
        result.kept_per_step = sum(k for k, _ in kept) / len(kept)
        total = sum(n for _, n in kept if n is not None)
        if total > 0:
            result.kept_share = 100.0 * sum(k for k, n in kept if n is not None) / total
    return result


def benchmark_value(summary: dict | None, benchmark: str, which: str) -> float | None:
    """`which` in mean/std/pass/maj (avg/best for agent benchmarks) -> the summary's `<which>@k` for a benchmark
    (%), or None."""
    if not summary:
        return None
    bench = (summary.get("benchmarks") or {}).get(benchmark)
    if not isinstance(bench, dict):
        return None
    k = summary.get("k")
    for key in (f"{which}@k", f"{which}@{k}"):
        if key in bench:
            return _number(bench[key])
    return None


def table_grid(runs_dir: Path, pairs: list[str] | None = None, methods: list[str] | None = None) -> tuple[list[str], list[str]]:
    """The cells of a table: given, else <runs>/plan.json, else the run directories present."""
    plan_file = runs_dir / "plan.json"
    if (not pairs or not methods) and plan_file.is_file():
        saved = json.loads(plan_file.read_text())
        pairs, methods = pairs or saved.get("pairs"), methods or saved.get("methods")
    if not pairs or not methods:
        names = [p.name.split("__", 1) for p in sorted(runs_dir.iterdir()) if "__" in p.name and p.is_dir()] if runs_dir.is_dir() else []
        known = list(PAIR_LABELS)
        pairs = pairs or sorted({n[0] for n in names}, key=lambda p: (known.index(p) if p in known else len(known), p))
        methods = methods or sorted({n[1] for n in names}, key=method_sort_key)
    return list(pairs), list(methods)


def _model_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def pair_label(pair: str, res: RunResult) -> str:
    """`teacher → student` as the run resolved them (its config.yaml), else the pair's usual label."""
    if not (res.student and res.teacher):
        return PAIR_LABELS.get(pair, pair)
    label = f"{_model_name(res.teacher)} → {_model_name(res.student)}"
    return label + (" (agentic)" if pair in (AGENT14, AGENT32) else "")


def _vs_paper(ours: float, paper: float, std: float | None = None, source: str | None = None) -> str:
    shown = f"{paper:.1f}" if std is None else f"{paper:.1f} ± {std:.2f}"
    if source:
        shown += f", from {source}"
    return f" (paper {shown}, Δ {ours - paper:+.1f})"


def _accuracy_cells(spec: TableSpec, table: int, pair: str, method: str, res: RunResult) -> list[str]:
    published = PUBLISHED.get(table, {}).get((pair, method), {})
    cells = []
    for bench in spec.benchmarks:
        for which in spec.metrics:
            value = benchmark_value(res.summary, bench, which)
            if value is None:
                cells.append(MISSING)
                continue
            text = f"{value:.1f}"
            if which in ("mean", "avg"):
                std = benchmark_value(res.summary, bench, "std")
                text += f" ± {std:.2f}" if std is not None else ""
            paper = published.get((bench, which))
            if paper is not None:
                text += _vs_paper(value, paper, PUBLISHED_STD.get((pair, method)) if table == 7 and which == "avg" else None,
                                  CARRIED_FROM.get((table, pair, method)))
            cells.append(text)
    return cells


def render(table: int, runs_dir: Path, pairs: list[str], methods: list[str]) -> str:
    """The table as Markdown: one row per (pair, method)."""
    spec = TABLES[table]
    results = {(p, m): read_run(runs_dir / f"{p}__{m}") for p in pairs for m in methods}
    header = ["Pair", "Method"]
    for bench in spec.benchmarks:
        for which in spec.metrics:
            label = spec.metric_labels[which]
            header.append(f"{BENCHMARK_LABELS.get(bench, bench)} {label}" if len(spec.metrics) > 1 else BENCHMARK_LABELS.get(bench, bench))
    if spec.memory:
        header += ["Peak memory (GB)", "vs all"]
    if spec.kept_tokens:
        header += ["Kept tokens / step", "Kept share"]

    rows = []
    for pair in pairs:
        base = results.get((pair, "all"))
        for method in methods:
            res = results[(pair, method)]
            row = [pair_label(pair, res), method, *_accuracy_cells(spec, table, pair, method, res)]
            if spec.memory:
                peak = res.peak_memory_gb
                row.append(MISSING if peak is None else f"{peak:.1f}")
                if peak is not None and base is not None and base.peak_memory_gb and method != "all":
                    row.append(f"{100.0 * (peak / base.peak_memory_gb - 1.0):+.0f}%")
                else:
                    row.append(MISSING)
            if spec.kept_tokens:
                kept = MISSING if res.kept_per_step is None else f"{res.kept_per_step:,.0f}"
                published = PUBLISHED_KEPT.get((table, pair, method))
                if published is not None:
                    kept += f" (paper {published / 1000:.1f}K)"
                row.append(kept)
                row.append(MISSING if res.kept_share is None else f"{res.kept_share:.1f}%")
            rows.append(row)

    lines = [f"## {spec.title}", "", f"Runs: `{runs_dir}`", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    notes = list(spec.notes)
    if "mean" in spec.metrics:
        notes.append(STD_NOTE)
    carried = sorted({CARRIED_FROM[(table, p, m)] for p in pairs for m in methods if (table, p, m) in CARRIED_FROM
                      and PUBLISHED.get(table, {}).get((p, m))})
    if carried:
        notes.append(f"Published all-token figures marked 'from {', '.join(carried)}' are printed there once and carried "
                     "into this table (the same all-token runs).")
    if spec.memory:
        keys = {r.memory_key for r in results.values() if r.memory_key}
        if "perf/max_rss_gb" in keys:
            notes.append("Some runs ran on CPU: their memory column is peak process RSS, not GPU memory.")
    for (pair, method), res in results.items():
        if res.exists and res.summary is None:
            where = f"latest evaluation {res.latest_eval}" if res.latest_eval else "no evaluation yet"
            notes.append(f"{pair}__{method}: no eval/final/summary.json yet ({where}).")
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def write_table(table: int, runs_dir: Path, pairs: list[str] | None = None, methods: list[str] | None = None,
                out: Path | None = None) -> str:
    """Render, print, and write the Markdown; returns it."""
    runs_dir = Path(runs_dir)
    pairs, methods = table_grid(runs_dir, pairs, methods)
    text = render(table, runs_dir, pairs, methods)
    print(text, end="")
    out = Path(out) if out else runs_dir / f"table{table}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"\nwritten: {out}")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.paper.aggregate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", type=int, required=True, help=f"paper table ({', '.join(map(str, TABLES))})")
    ap.add_argument("--runs", default="", help="directory of the table's runs (default runs/table<N>)")
    ap.add_argument("--pairs", default="", help="comma-separated pairs (default: plan.json or the runs present)")
    ap.add_argument("--methods", default="", help="comma-separated methods (default: plan.json or the runs present)")
    ap.add_argument("--out", default="", help="Markdown file to write (default <runs>/table<N>.md)")
    args = ap.parse_args(argv)
    if args.table not in TABLES:
        print(f"error: unknown table {args.table} (known: {', '.join(map(str, TABLES))})", file=sys.stderr)
        return 2
    runs_dir = Path(args.runs or f"runs/table{args.table}")
    pairs = [p for p in args.pairs.split(",") if p]
    methods = [m for m in args.methods.split(",") if m]
    if not runs_dir.is_dir() and not (pairs and methods):
        print(f"error: {runs_dir} does not exist (run the table first, or name --pairs and --methods)", file=sys.stderr)
        return 2
    pairs, methods = table_grid(runs_dir, pairs, methods)
    if not pairs or not methods:
        print(f"error: no runs under {runs_dir} and no plan.json there; name --pairs and --methods", file=sys.stderr)
        return 2
    write_table(args.table, runs_dir, pairs, methods, Path(args.out) if args.out else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
