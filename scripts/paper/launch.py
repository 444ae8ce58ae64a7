"""Run the cells of one paper table: one `accelerate launch train.py` per (pair, method).

    python -m scripts.paper.launch --table 3 --pairs P1,P2 --methods M1,M2 \\
        [--pair P1] [--dry-run] [--runs DIR] [--student PATH] [--teacher PATH] [key=value ...]

A cell composes configs/pairs/<pair>.yaml with configs/methods/<method>.yaml
and runs in <runs>/<pair>__<method>/ (default runs: runs/table<N>). Cells whose
run already has results (eval/final/summary.json) are skipped; a finished run
of another table with the same resolved config is linked instead of rerun
(the all-token baselines recur in tables 3, 4, 5 and 8). `--dry-run` resolves
every cell's config with `opd.config.load_config` (no model is loaded) and
prints the plan. After launching, the table is aggregated.

Relative paths (--runs, configs) are relative to the repository root, where
the table scripts run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import tip
from opd.config import Config, ConfigError, drop_unused, load_config, to_dict
from scripts.paper import aggregate
from scripts.paper.tables import LLAMA

ROOT = Path(__file__).resolve().parents[2]

# configs/accelerate/<name>.yaml per pair, for one node of 8x80 GB GPUs. ZeRO-3
# shards student and teacher over the GPUs; the 70B teacher (140 GB in bf16)
# additionally needs parameters and optimizer state offloaded to CPU.
ACCELERATE = {LLAMA: "zero3_offload"}
DEFAULT_ACCELERATE = "zero3"

# Keys the table sets per cell; a reused run may differ only in these.
_CELL_KEYS = ("output_dir", "run_name")


@dataclass
class Cell:
    """One run of a table."""

    pair: str
    method: str
    run_dir: Path  # absolute
    command: list[str]
    config: Config | None = None
    problems: list[str] = field(default_factory=list)  # the config does not resolve
    blockers: list[str] = field(default_factory=list)  # resolves, but cannot start on this checkout
    reuse: Path | None = None  # a finished run with the same resolved config

    @property
    def name(self) -> str:
        return run_name(self.pair, self.method)

    @property
    def status(self) -> str:
        if self.problems:
            return "config error"
        if has_results(self.run_dir):
            return "done"
        if self.reuse is not None:
            return f"reuse {_show(self.reuse)}"
        if self.blockers:
            return "blocked"
        return "todo"


def run_name(pair: str, method: str) -> str:
    return f"{pair}__{method}"


def has_results(run_dir: Path) -> bool:
    return (Path(run_dir) / "eval" / "final" / "summary.json").is_file()


def _show(path: Path) -> str:
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return str(path)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def model_path_overrides(values: list[str], pairs: list[str], key: str, flag: str) -> dict[str, list[str]]:
    """`--student PATH` (one pair) or `--student PAIR=PATH` -> {pair: ["model.path=PATH"]}."""
    out: dict[str, list[str]] = {}
    for value in values:
        pair, sep, path = value.partition("=")
        if sep and pair in pairs:
            out.setdefault(pair, []).append(f"{key}={path}")
        elif len(pairs) == 1:
            out.setdefault(pairs[0], []).append(f"{key}={value}")
        else:
            raise ValueError(f"{flag} {value}: this run covers {len(pairs)} pairs; choose one with --pair or write {flag} PAIR=PATH")
    return out


def plan(
    pairs: list[str],
    methods: list[str],
    runs: str,
    overrides: list[str] = (),
    pair_overrides: dict[str, list[str]] | None = None,
    num_processes: int = 0,
    reuse: bool = True,
) -> list[Cell]:
    """Resolve every (pair, method) cell; no model is loaded."""
    pair_overrides = pair_overrides or {}
    runs_dir = ROOT / runs
    cells = []
    for pair in pairs:
        for method in methods:
            pair_file, method_file = f"configs/pairs/{pair}.yaml", f"configs/methods/{method}.yaml"
            cell_overrides = [f"train.output_dir={runs}", f"train.run_name={run_name(pair, method)}",
                              *pair_overrides.get(pair, []), *overrides]
            command = ["accelerate", "launch", "--config_file", f"configs/accelerate/{ACCELERATE.get(pair, DEFAULT_ACCELERATE)}.yaml"]
            if num_processes:
                command += ["--num_processes", str(num_processes)]
            command += ["train.py", "--config", pair_file, "--config", method_file, *cell_overrides]
            cell = Cell(pair, method, runs_dir / run_name(pair, method), command)
            try:
                cell.config = load_config([ROOT / pair_file, ROOT / method_file], cell_overrides)
            except ConfigError as exc:
                cell.problems = exc.problems
                cells.append(cell)
                continue
            cell.blockers = blockers(cell.config, pair)
            if reuse and not has_results(cell.run_dir):
                cell.reuse = find_reusable(cell.config, cell.run_dir)
            cells.append(cell)
    return cells


def _local_missing(path: str) -> bool:
    """A path written as local (./x, ../x, /x) that does not exist; hub ids are never flagged."""
    return path.startswith(("./", "../", "/")) and not (ROOT / path).exists()


def blockers(cfg: Config, pair: str) -> list[str]:
    """Why a resolved cell cannot start on this checkout (placeholder paths, a selector the registry lacks)."""
    out = []
    for side, flag in (("model", "--student"), ("teacher", "--teacher")):
        path = getattr(cfg, side).path
        if _local_missing(path):
            out.append(f"{side}.path = {path} does not exist (a placeholder in configs/pairs/{pair}.yaml); "
                       f"pass {flag} PATH or {side}.path=PATH")
    if _local_missing(cfg.data.train_path):
        out.append(f"data.train_path = {cfg.data.train_path} does not exist; prepare it or pass data.train_path=PATH")
    for bench in cfg.eval.benchmarks:
        name, sep, path = bench.partition("=")
        if sep and _local_missing(path):
            out.append(f"eval benchmark {name} = {path} does not exist")
    for key, value in cfg.agent.env_args.items():  # an agentic pair's benchmark files (task file, databases)
        if isinstance(value, str) and _local_missing(value):
            out.append(f"agent.env_args.{key} = {value} does not exist (a placeholder in configs/pairs/{pair}.yaml); "
                       f"pass agent.env_args.{key}=PATH (docs/reproducing.md)")
    if cfg.tip.selector not in tip.SELECTORS:
        out.append(f"tip.selector = {cfg.tip.selector} is not in this checkout's tip registry")
    return out


def _comparable(config: dict) -> dict:
    config = json.loads(json.dumps(drop_unused(config)))  # a deep copy of plain data
    for key in _CELL_KEYS:
        config.get("train", {}).pop(key, None)
    return config


def find_reusable(cfg: Config, run_dir: Path) -> Path | None:
    """A finished run in a sibling table directory whose resolved config equals this cell's."""
    want = _comparable(to_dict(cfg))
    for other in sorted(run_dir.parent.parent.glob(f"*/{run_dir.name}")):
        if other.resolve() == run_dir.resolve() or not has_results(other) or not (other / "config.yaml").is_file():
            continue
        try:
            saved = yaml.safe_load((other / "config.yaml").read_text())
        except yaml.YAMLError:
            continue
        if isinstance(saved, dict) and _comparable(saved) == want:
            return other
    return None


def describe(cell: Cell) -> str:
    """One line naming the cell's settings, as the dry run prints it."""
    if cell.config is None:
        return f"pair={cell.pair} method={cell.method}"
    c = cell.config
    env = f" env={c.agent.env}" if c.agent.env else ""
    return (f"pair={cell.pair} method={cell.method} selector={c.tip.selector} ratio={c.tip.ratio:g} "
            f"lr={c.optim.lr:g} student={c.model.path} teacher={c.teacher.path}{env}")


def print_plan(table: int, cells: list[Cell], runs: str) -> None:
    pairs = sorted({c.pair for c in cells}, key=[c.pair for c in cells].index)
    methods = sorted({c.method for c in cells}, key=[c.method for c in cells].index)
    print(f"table {table}: {len(pairs)} pair(s) x {len(methods)} method(s) = {len(cells)} runs under {runs}")
    for i, cell in enumerate(cells, 1):
        print(f"[{i}/{len(cells)}] {cell.name}: {cell.status}")
        print(f"  {describe(cell)}")
        print(f"  $ {shlex.join(cell.command)}")
        for line in cell.problems:
            print(f"  config error: {line}")
        for line in cell.blockers:
            print(f"  note: {line}")


def write_plan_file(runs_dir: Path, table: int, pairs: list[str], methods: list[str]) -> None:
    """The table's grid, so that `aggregate` knows which cells are missing."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / "plan.json").write_text(json.dumps({"table": table, "pairs": pairs, "methods": methods}, indent=1) + "\n")


def execute(cells: list[Cell]) -> list[str]:
    """Run the cells that need running, one after the other. Returns failure lines."""
    failures = []
    for i, cell in enumerate(cells, 1):
        head = f"[{i}/{len(cells)}] {cell.name}"
        if has_results(cell.run_dir):
            print(f"{head}: has results, skipped")
            continue
        if cell.reuse is not None:
            cell.run_dir.parent.mkdir(parents=True, exist_ok=True)
            if cell.run_dir.is_symlink():
                cell.run_dir.unlink()
            if cell.run_dir.exists():
                failures.append(f"{cell.name}: {_show(cell.run_dir)} exists without results; cannot link {_show(cell.reuse)}")
                continue
            cell.run_dir.symlink_to(os.path.relpath(cell.reuse, cell.run_dir.parent))
            print(f"{head}: same resolved config as {_show(cell.reuse)}, linked")
            continue
        if cell.blockers:
            failures.extend(f"{cell.name}: {line}" for line in cell.blockers)
            print(f"{head}: not started ({cell.blockers[0]})")
            continue
        print(f"{head}: $ {shlex.join(cell.command)}", flush=True)
        try:
            rc = subprocess.run(cell.command, cwd=ROOT).returncode
        except FileNotFoundError:
            failures.append(f"{cell.name}: `{cell.command[0]}` is not installed or not on PATH")
            continue
        if rc != 0:
            failures.append(f"{cell.name}: exited with status {rc}")
        elif not has_results(cell.run_dir):
            failures.append(f"{cell.name}: finished without {_show(cell.run_dir / 'eval/final/summary.json')}")
    return failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.paper.launch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", type=int, required=True, help="paper table number (names the default run directory)")
    ap.add_argument("--pairs", required=True, help="comma-separated pair names (configs/pairs/<name>.yaml)")
    ap.add_argument("--methods", required=True, help="comma-separated method names (configs/methods/<name>.yaml)")
    ap.add_argument("--pair", default="", help="run only this pair of the table")
    ap.add_argument("--runs", default="", help="parent of the run directories (default runs/table<N>)")
    ap.add_argument("--dry-run", action="store_true", help="resolve every config and print the plan; run nothing")
    ap.add_argument("--student", action="append", default=[], help="student path: PATH (one pair) or PAIR=PATH; repeatable")
    ap.add_argument("--teacher", action="append", default=[], help="teacher path: PATH (one pair) or PAIR=PATH; repeatable")
    ap.add_argument("--num-processes", type=int, default=0, help="override the accelerate config's process count")
    ap.add_argument("--no-reuse", action="store_true", help="never link finished runs of other tables")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides for every cell")
    args = ap.parse_intermixed_args(argv)

    table_pairs, methods = _split(args.pairs), _split(args.methods)
    for kind, names in (("pairs", table_pairs), ("methods", methods)):
        unknown = [n for n in names if not (ROOT / "configs" / kind / f"{n}.yaml").is_file()]
        if unknown:
            known = ", ".join(sorted(p.stem for p in (ROOT / "configs" / kind).glob("*.yaml")))
            print(f"error: unknown {kind[:-1]} {', '.join(unknown)}: no configs/{kind}/<name>.yaml (known: {known})", file=sys.stderr)
            return 2
    pairs = table_pairs
    if args.pair:
        if args.pair not in table_pairs:
            print(f"error: pair {args.pair} is not in table {args.table} (its pairs: {', '.join(table_pairs)})", file=sys.stderr)
            return 2
        pairs = [args.pair]
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        print(f"error: `{bad[0]}` is not of the form section.key=value", file=sys.stderr)
        return 2
    runs = args.runs or f"runs/table{args.table}"
    pair_overrides: dict[str, list[str]] = {}
    for values, key, flag in ((args.student, "model.path", "--student"), (args.teacher, "teacher.path", "--teacher")):
        try:
            for pair, extra in model_path_overrides(values, pairs, key, flag).items():
                pair_overrides.setdefault(pair, []).extend(extra)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    cells = plan(pairs, methods, runs, args.overrides, pair_overrides, args.num_processes, reuse=not args.no_reuse)
    if args.dry_run:
        print_plan(args.table, cells, runs)
        return 2 if any(c.problems for c in cells) else 0
    broken = [c for c in cells if c.problems]
    if broken:
        for cell in broken:
            for line in cell.problems:
                print(f"{cell.name}: {line}", file=sys.stderr)
        return 2
    write_plan_file(ROOT / runs, args.table, table_pairs, methods)
    failures = execute(cells)
    print()
    aggregate.write_table(args.table, ROOT / runs, table_pairs, methods)
    if failures:
        print(f"\n{len(failures)} problem(s):", file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
