"""Compare one of our runs with a run of the upstream OPD repository (verl-based).

    python -m scripts.paper.upstream_diff --upstream-log LOG --run RUN_DIR \\
        [--upstream-dumps DIR --bench math500=FILE ...] [--map SOURCE=BENCH ...] [--all-steps] [--out FILE]

Upstream side. verl's console logger prints one record per step,
`step:<n> - <key>:<value> - <key>:<value> ...` (values through `pprint.pformat`,
so `np.float64(0.71)` occurs; Ray may prefix the line with `(TaskRunner pid=…)`).
Validation keys are `val-core/<data_source>/acc/mean@16`, `val-aux/<source>/acc/std@16`,
`val-core/<source>/acc/best@16/mean` and `…/maj@16/mean`, as fractions in [0, 1].
The upstream data preparation names its sources `math` (MATH-500), `aime24`,
`aime25` and `math_dapo` (the DAPO held-out 20%); `--map` renames others.
`--upstream-dumps` reads verl's validation generation dumps (`<dir>/<step>.jsonl`,
one line per sample with `input` and `score`) and recomputes mean@k, std@k and
an exact pass@k per benchmark (verl's `best@k/mean` is a bootstrap estimate);
which benchmark a sample belongs to is found by looking for each problem
text of the `--bench NAME=FILE` JSONL files inside the sample's prompt.

Our side. `val/<benchmark>/<metric>` keys of <run>/metrics.jsonl, the eval
summaries <run>/eval/step_<n>/summary.json and <run>/eval/final/summary.json
(summaries win where both give a value), and the training metrics both
implementations name alike (`opd/loss`, `opd/entropy`, ...).

Accuracies are compared in percent. Rows: every step where both sides have
validation metrics (or every common step with --all-steps), then "final":
the last upstream validation against our final evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from scripts.paper.aggregate import read_metrics_lines

# Upstream validation data_source -> our benchmark name.
DEFAULT_SOURCE_MAP = {
    "math": "math500",
    "math500": "math500",
    "HuggingFaceH4/MATH-500": "math500",
    "aime24": "aime24",
    "aime25": "aime25",
    "math_dapo": "heldout",
}

# Training metrics both implementations log under the same name.
TRAIN_KEYS = (
    "opd/loss", "opd/entropy", "opd/grad_norm", "opd/num_tokens", "opd/accuracy",
    "perf/max_memory_allocated_gb", "timing/generate_s", "timing/train_s", "timing/step_s",
)

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RECORD = re.compile(r"(?:^|[\s)\]|])step:(\d+) - (.*)$")
_WRAPPED = re.compile(r"^(?:np\.\w+|numpy\.\w+|tensor)\((.*)\)$")
_VAL_KEY = re.compile(r"^val-(?:core|aux)/(?P<source>.+)/(?P<var>acc|reward|score)/(?P<metric>mean|std|best|maj)@(?P<n>\d+)(?P<tail>/mean)?$")
_VAR_RANK = {"acc": 0, "reward": 1, "score": 2}  # verl's core variable is acc when the reward reports one
_OUR_NAMES = {"mean": "mean", "std": "std", "best": "pass", "maj": "maj"}


def _parse_value(text: str) -> float | None:
    text = text.strip()
    wrapped = _WRAPPED.match(text)
    if wrapped:
        text = wrapped.group(1).split(",")[0]
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_console_log(text: str) -> dict[int, dict[str, float]]:
    """verl console output -> {step: {key: value}}; records of one step are merged."""
    steps: dict[int, dict[str, float]] = defaultdict(dict)
    for line in text.splitlines():
        match = _RECORD.search(_ANSI.sub("", line))
        if not match:
            continue
        values = steps[int(match.group(1))]
        for item in match.group(2).split(" - "):
            key, sep, raw = item.partition(":")
            value = _parse_value(raw) if sep else None
            if value is not None:
                values[key.strip()] = value
    return dict(steps)


def upstream_validation(metrics: dict[str, float], source_map: dict[str, str]) -> dict[str, float]:
    """verl validation keys of one step -> {"<bench>/<metric>@<n>": percent}.

    best@n/mean becomes pass@n: it is verl's bootstrap estimate of best-of-n,
    close to but not exactly our pass@n (use --upstream-dumps for an exact one).
    """
    out: dict[str, tuple[int, float]] = {}
    for key, value in metrics.items():
        match = _VAL_KEY.match(key)
        if not match:
            continue
        metric = match.group("metric")
        if (metric in ("best", "maj")) != bool(match.group("tail")):
            continue  # mean@n and std@n stand alone; best@n and maj@n are read from their /mean
        bench = source_map.get(match.group("source"), match.group("source"))
        name = f"{bench}/{_OUR_NAMES[metric]}@{match.group('n')}"
        rank = _VAR_RANK[match.group("var")]
        if name not in out or rank < out[name][0]:
            out[name] = (rank, 100.0 * value)
    return {name: value for name, (_, value) in out.items()}


def read_problems(spec: str) -> tuple[str, list[str]]:
    """`NAME=FILE` (JSONL with a `problem`, `question` or `prompt` field) -> (name, problem texts)."""
    name, sep, path = spec.partition("=")
    if not sep or not name:
        raise ValueError(f"--bench {spec}: expected NAME=FILE")
    problems = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        text = next((record[k] for k in ("problem", "question", "prompt") if isinstance(record.get(k), str)), None)
        if text is None:
            raise ValueError(f"{path}:{lineno}: no `problem`, `question` or `prompt` text field")
        problems.append(text.strip())
    return name, problems


def dump_metrics(dump_file: Path, benches: dict[str, list[str]]) -> dict[str, float]:
    """One verl generation dump -> {"<bench>/<metric>@<k>": percent}, per benchmark.

    mean@k: mean score of all samples; std@k: per-problem population std,
    averaged over problems (verl's definition); pass@k: per-problem best
    score, averaged (for 0/1 scores: share of problems solved at least once).
    Samples whose prompt matches no --bench problem count under "all".
    """
    by_input: dict[str, list[float]] = defaultdict(list)
    for line in dump_file.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        score = record.get("acc", record.get("score"))
        if isinstance(score, (int, float)) and not isinstance(score, bool):
            by_input[record.get("input", "")].append(float(score))
    by_bench: dict[str, list[list[float]]] = defaultdict(list)
    for prompt, scores in by_input.items():
        matches = [(len(p), name) for name, problems in benches.items() for p in problems if p and p in prompt]
        by_bench[max(matches)[1] if matches else "all"].append(scores)  # the longest problem text is the most specific
    out = {}
    for bench, groups in by_bench.items():
        k = Counter(len(g) for g in groups).most_common(1)[0][0]
        samples = [s for g in groups for s in g]
        out[f"{bench}/mean@{k}"] = 100.0 * sum(samples) / len(samples)
        out[f"{bench}/std@{k}"] = 100.0 * sum(_pstd(g) for g in groups) / len(groups)
        out[f"{bench}/pass@{k}"] = 100.0 * sum(max(g) for g in groups) / len(groups)
    return out


def _pstd(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def read_upstream(log: Path, dumps: Path | None, source_map: dict[str, str], benches: dict[str, list[str]]):
    """-> (validation {step: {name: %}}, training {step: {key: value}})."""
    records = parse_console_log(log.read_text(errors="replace"))
    val = {step: upstream_validation(m, source_map) for step, m in records.items()}
    if dumps is not None:
        for file in sorted(dumps.glob("*.jsonl")):
            if file.stem.isdigit():
                val.setdefault(int(file.stem), {}).update(dump_metrics(file, benches))
    val = {step: m for step, m in val.items() if m}
    train = {step: {k: v for k, v in m.items() if k in TRAIN_KEYS} for step, m in records.items()}
    return val, {step: m for step, m in train.items() if m}


def _summary_metrics(path: Path) -> dict[str, float]:
    summary = json.loads(path.read_text())
    k = summary.get("k")
    out = {}
    for bench, values in (summary.get("benchmarks") or {}).items():
        for which in ("mean", "std", "pass", "maj"):
            value = values.get(f"{which}@k", values.get(f"{which}@{k}"))
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{bench}/{which}@{k}"] = float(value)
    return out


def read_ours(run_dir: Path):
    """-> (validation {step: {name: %}}, training {step: {key: value}}, final {name: %})."""
    val: dict[int, dict[str, float]] = defaultdict(dict)
    train: dict[int, dict[str, float]] = defaultdict(dict)
    for record in read_metrics_lines(run_dir / "metrics.jsonl"):
        step = record.get("step")
        if not isinstance(step, int):
            continue
        for key, value in record.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue
            if key.startswith("val/"):
                val[step][key[len("val/"):]] = float(value)
            elif key in TRAIN_KEYS:
                train[step][key] = float(value)
    for path in sorted((run_dir / "eval").glob("step_*/summary.json")):
        number = path.parent.name.removeprefix("step_")
        if number.isdigit():
            val[int(number)].update(_summary_metrics(path))
    final_path = run_dir / "eval" / "final" / "summary.json"
    final = _summary_metrics(final_path) if final_path.is_file() else {}
    return dict(val), dict(train), final


def diff_rows(up_val, up_train, our_val, our_train, our_final, all_steps: bool = False) -> list[tuple[str, str, float, float]]:
    """(step label, metric, upstream, ours) for every metric both sides have."""
    steps = set(up_val) & set(our_val)
    if all_steps:
        steps |= set(up_train) & set(our_train)
    rows = []
    for step in sorted(steps):
        for source_up, source_ours in ((up_val, our_val), (up_train, our_train)):
            up, ours = source_up.get(step, {}), source_ours.get(step, {})
            rows += [(str(step), key, up[key], ours[key]) for key in sorted(set(up) & set(ours))]
    if up_val and our_final:
        last = max(up_val)
        up = up_val[last]
        rows += [(f"final (upstream step {last})", key, up[key], our_final[key]) for key in sorted(set(up) & set(our_final))]
    return rows


def render(rows: list[tuple[str, str, float, float]], log: Path, run_dir: Path) -> str:
    lines = ["## Upstream OPD vs ours", "", f"Upstream log: `{log}`  ", f"Our run: `{run_dir}`", "",
             "Accuracy metrics in %, upstream fractions multiplied by 100.", "",
             "| step | metric | upstream | ours | ours − upstream |", "|---|---|---|---|---|"]
    lines += [f"| {step} | {key} | {up:.4g} | {ours:.4g} | {ours - up:+.4g} |" for step, key, up, ours in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.paper.upstream_diff", description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream-log", required=True, help="console log of the upstream verl trainer")
    ap.add_argument("--upstream-dumps", default="", help="upstream validation dumps directory (<step>.jsonl files)")
    ap.add_argument("--bench", action="append", default=[], help="NAME=FILE problem set, to attribute dumped samples; repeatable")
    ap.add_argument("--run", required=True, help="our run directory")
    ap.add_argument("--map", action="append", default=[], help="upstream data_source=our benchmark name; repeatable")
    ap.add_argument("--all-steps", action="store_true", help="compare training metrics at every common step, not only at validations")
    ap.add_argument("--out", default="", help="also write the table as Markdown here")
    args = ap.parse_args(argv)

    log, run_dir = Path(args.upstream_log), Path(args.run)
    if not log.is_file():
        print(f"error: upstream log {log} not found", file=sys.stderr)
        return 2
    if not run_dir.is_dir():
        print(f"error: run directory {run_dir} not found", file=sys.stderr)
        return 2
    source_map = dict(DEFAULT_SOURCE_MAP)
    for item in args.map:
        source, sep, bench = item.partition("=")
        if not sep:
            print(f"error: --map {item}: expected SOURCE=BENCH", file=sys.stderr)
            return 2
        source_map[source] = bench
    try:
        benches = dict(read_problems(spec) for spec in args.bench)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dumps = Path(args.upstream_dumps) if args.upstream_dumps else None
    if dumps is not None and not dumps.is_dir():
        print(f"error: upstream dumps directory {dumps} not found", file=sys.stderr)
        return 2

    up_val, up_train = read_upstream(log, dumps, source_map, benches)
    our_val, our_train, our_final = read_ours(run_dir)
    rows = diff_rows(up_val, up_train, our_val, our_train, our_final, args.all_steps)
    if not rows:
        up_keys = sorted({k for m in up_val.values() for k in m} | {k for m in up_train.values() for k in m})
        our_keys = sorted({k for m in our_val.values() for k in m} | set(our_final) | {k for m in our_train.values() for k in m})
        print("no metric at a common step on both sides", file=sys.stderr)
        print(f"  upstream steps {sorted(set(up_val) | set(up_train))[:10]}..., metrics: {', '.join(up_keys) or 'none'}", file=sys.stderr)
        print(f"  ours steps {sorted(set(our_val) | set(our_train))[:10]}..., metrics: {', '.join(our_keys) or 'none'}", file=sys.stderr)
        return 1
    text = render(rows, log, run_dir)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
