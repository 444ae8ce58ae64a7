"""Compare one of our runs with a run of the upstream OPD repository (verl-based), like with like.

    python -m scripts.paper.upstream_diff --upstream-log LOG_OR_CSV [--upstream-log ...] --run RUN_DIR \\
        [--upstream-dumps DIR --bench math500=FILE ...] [--regrade] [--upstream-world-size N]
        [--map SOURCE=BENCH ...] [--all-steps] [--out FILE]

Upstream side: one or more files, each verl's console log or a CSV export (the format is detected;
records of one step are merged across files). Each file read is said in one line on stderr (its format,
its metrics and what they are compared as, its steps); a file that is empty, binary, in neither format,
or holds a step that is no whole number is one `error:` line (exit 2) naming it.

verl's console logger prints one record per step,
`step:<n> - <key>:<value> - <key>:<value> ...` (values through `pprint.pformat`,
so `np.float64(0.71)` occurs; Ray may prefix the line with `(TaskRunner pid=…)`).
Validation keys are `val-core/<data_source>/acc/mean@16`, `val-aux/<source>/acc/std@16`,
`val-core/<source>/acc/best@16/mean` and `…/maj@16/mean`, as fractions in [0, 1].
The upstream data preparation names its sources `math` (MATH-500), `aime24`,
`aime25` and `math_dapo` (the DAPO held-out 20%); `--map` renames others.
A CSV export (as third parties publish the reference's results, e.g. `training_metrics.csv`,
`eval_curve.csv`) has a `step` column (or `global_step`, `training/global_step`) and one column per
metric under verl's names (`opd/loss`, `opd/entropy`, `timing/step_s`, ...). Evaluation columns are
verl's keys or the short forms `<source>/mean@16`, `<source>/acc/mean@16` (also std@n, best@n/mean), as
fractions in [0, 1] (a value above 1 is refused: percent is not guessed); `--map` renames their sources.
Empty and `nan` cells are no value.
`--upstream-dumps` reads verl's validation generation dumps (`<dir>/<step>.jsonl`,
one line per sample with `input`, `output`, `score` and, in newer versions, `gts`);
which benchmark a sample belongs to is found by looking for each problem text of
the `--bench NAME=FILE` JSONL files inside the sample's prompt.

Our side. `val/<benchmark>/mean@k` of <run>/metrics.jsonl, the eval summaries and
per-sample files <run>/eval/step_<n>/ and <run>/eval/final/ (summaries win where
both give a value), and the training metrics both implementations name alike.

The same statistic under the same name, never two under one:
- `mean@k`: mean score over all samples. Each side grades with its own grader
  (upstream: the reference's normalised exact string match; ours: math-verify),
  which the "graded by" column says. `--regrade` adds `mean@k [math-verify]`
  (the upstream dumps regraded with our grader, needs --upstream-dumps and the
  gold answers: `gts` in the dumps or `answer` in the --bench files) and
  `mean@k [string match]` (our samples regraded with eval.grader.grade_string_match,
  against upstream's own score), so a gap can be put on the grader or on the model.
- `std_per_problem@k`: verl's `std@k`, the population std of each problem's k
  scores averaged over problems; ours is computed from our samples. Our own
  `std@k` (the spread of the k sample-set accuracies, ~30× smaller on
  MATH-500-like data) is a different statistic and is not compared.
- `best@k_bootstrap`: verl's `best@k/mean` draws k of the k samples with
  replacement 1000 times and averages the best score, an estimate biased low
  against pass@k (≈6 points on AIME-like data). Ours is the exact expectation
  of that draw, 1 − (1 − c/k)^k per problem with c correct.
- `pass@k`: the share of problems solved at least once, exact: upstream only
  from the dumps, never from the log.
- verl's `maj@k/mean` is left out: the reference reward returns no predicted
  answer, so every vote ties and the value is in effect mean@k.
- Training: `opd/entropy`, `opd/grad_norm`, `opd/accuracy`, `perf/*` and
  `timing/*` compare as they are. `opd/num_tokens` is per rank upstream and
  global here: it is compared only with `--upstream-world-size N` (upstream × N).
  `opd/loss` is not compared: upstream logs the mean of its micro-batch means,
  ours divides the summed loss by the global kept-token count; the two agree
  only when every micro-batch holds as many tokens, and neither log holds what
  would convert one into the other.

Accuracies are compared in percent. Rows: every step where both sides have
validation metrics (or every common step with --all-steps), then "final":
the last upstream validation against our final evaluation.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from eval.grader import grade, grade_string_match
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

# Training metrics both implementations log under the same name and normalisation.
TRAIN_KEYS = (
    "opd/entropy", "opd/grad_norm", "opd/accuracy",
    "perf/max_memory_allocated_gb", "timing/generate_s", "timing/train_s", "timing/step_s",
)
NUM_TOKENS = "opd/num_tokens"  # per rank upstream, global here: compared only given --upstream-world-size
MATH_VERIFY, STRING_MATCH = " [math-verify]", " [string match]"

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RECORD = re.compile(r"(?:^|[\s)\]|])step:(\d+) - (.*)$")
_WRAPPED = re.compile(r"^(?:np\.\w+|numpy\.\w+|tensor)\((.*)\)$")
_VAL_KEY = re.compile(r"^val-(?:core|aux)/(?P<source>.+)/(?P<var>acc|reward|score)/(?P<metric>mean|std|best|maj)@(?P<n>\d+)(?P<tail>/mean)?$")
_VAR_RANK = {"acc": 0, "reward": 1, "score": 2}  # verl's core variable is acc when the reward reports one
_UPSTREAM_NAMES = {"mean": "mean", "std": "std_per_problem", "best": "best"}  # maj@k is left out (module docstring)


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


class UpstreamError(ValueError):
    """An upstream file that cannot be read; str() is why, main() names the file and what it accepts."""


ACCEPTED = "accepted: verl's console log (`step:N - key:value` lines) or a CSV export (a `step` column, verl's metric names)"
_STEP_COLUMNS = ("step", "global_step", "training/global_step")
_SHORT_VAL = re.compile(r"^(?:val(?:-core|-aux)?/)?(?P<source>[^/].*?)(?:/(?P<var>acc|reward|score))?/"
                        r"(?P<metric>mean|std|best|maj)@(?P<n>\d+)(?P<tail>/mean)?$")


def _csv_key(column: str) -> str:
    """A CSV column -> verl's key: verl's own keys stay; `<source>/mean@16` (or `<source>/acc/mean@16`,
    `val/<source>/mean@16`) becomes `val-core/<source>/acc/mean@16`."""
    column = column.strip()
    if _VAL_KEY.match(column) or column.startswith(("opd/", "tip/", "timing/", "perf/", "training/", "actor/")):
        return column
    short = _SHORT_VAL.match(column)
    if not short:
        return column
    return (f"val-core/{short.group('source')}/{short.group('var') or 'acc'}/{short.group('metric')}@{short.group('n')}"
            f"{short.group('tail') or ''}")


def parse_csv_export(text: str) -> tuple[dict[int, dict[str, float]], dict[str, str]]:
    """A CSV export -> ({step: {verl key: value}}, {verl key: the column it came from}); UpstreamError when it has
    no step column, a step that is no whole number, or an evaluation value outside [0, 1]."""
    rows = csv.reader(io.StringIO(text))
    header = next((row for row in rows if any(cell.strip() for cell in row)), [])
    names = [cell.strip() for cell in header]
    at = next((i for i, name in enumerate(names) if name.lower() in _STEP_COLUMNS), None)
    if at is None:
        raise UpstreamError(f"unknown format: a CSV without a step column (columns: {', '.join(names)})")
    keys = {i: _csv_key(name) for i, name in enumerate(names) if i != at and name}
    steps: dict[int, dict[str, float]] = defaultdict(dict)
    for row in rows:
        if not any(cell.strip() for cell in row) or at >= len(row) or not row[at].strip():
            continue
        try:
            step = float(row[at])
        except ValueError:
            step = math.nan
        if not math.isfinite(step) or step != int(step):
            raise UpstreamError(f"line {rows.line_num}: step {row[at].strip()!r} is not a whole number")
        for i, key in keys.items():
            value = _parse_value(row[i]) if i < len(row) else None
            if value is None:
                continue
            if _VAL_KEY.match(key) and not 0.0 <= value <= 1.0 and "/std@" not in key:
                raise UpstreamError(f"column {names[i]} holds {value:g} at step {int(step)}: evaluation columns are "
                                    "fractions in [0, 1] (verl's), not percent")
            steps[int(step)][key] = value
    return dict(steps), {key: names[i] for i, key in keys.items()}


def read_upstream_file(path: Path) -> tuple[dict[int, dict[str, float]], dict[str, str], str]:
    """One upstream file, its format detected -> (records {step: {verl key: value}}, {key: as the file names it},
    the format's name). UpstreamError: empty, binary, neither format."""
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace").removeprefix("\ufeff")
    head = text[:65536]
    odd = sum(c == "\ufffd" or (c < " " and c not in "\t\n\r\x1b") or c == "\x7f" for c in head)
    if "\x00" in head or odd > 0.05 * len(head):  # a few bad bytes in a console log are kept, replaced
        raise UpstreamError("binary file")
    if not text.strip():
        raise UpstreamError("empty file")
    records = parse_console_log(text)
    if records:
        return records, {}, "verl console log"
    first = next(line for line in text.splitlines() if line.strip())
    if "," in first:
        records, names = parse_csv_export(text)
        return records, names, "CSV export"
    raise UpstreamError("unknown format: no `step:N - key:value` record and no CSV header")


def describe(path: Path, records: dict[int, dict[str, float]], names: dict[str, str], fmt: str,
             source_map: dict[str, str], shown: int = 12) -> str:
    """One line: what `path` gave (its format, metrics and what they are compared as, its steps)."""
    items = []
    for key in sorted({k for m in records.values() for k in m}, key=lambda k: names.get(k, k)):
        as_ours = list(upstream_validation({key: 0.5}, source_map))
        own = names.get(key, key)
        items.append(f"{own} as {as_ours[0]}" if as_ours and as_ours[0] != own else own)
    listed = ", ".join(items[:shown]) + (f", ... {len(items) - shown} more" if len(items) > shown else "")
    return (f"upstream {path}: {fmt}, {_count(len(items), 'metric')} ({listed or 'none'}), "
            f"{_count(len(records), 'step')} {_span(records)}")


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _span(steps) -> str:
    steps = sorted(steps)
    if not steps:
        return "(none)"
    return f"({steps[0]})" if len(steps) == 1 else f"({steps[0]}-{steps[-1]})"


def upstream_validation(metrics: dict[str, float], source_map: dict[str, str]) -> dict[str, float]:
    """verl validation keys of one step -> {"<bench>/<metric>@<n>": percent}.

    mean@n stays mean@n; std@n becomes std_per_problem@n (verl's definition);
    best@n/mean becomes best@n_bootstrap (verl's estimate, biased low: not pass@n);
    maj@n is dropped (every vote ties upstream).
    """
    out: dict[str, tuple[int, float]] = {}
    for key, value in metrics.items():
        match = _VAL_KEY.match(key)
        if not match:
            continue
        metric = match.group("metric")
        if metric == "maj" or (metric == "best") != bool(match.group("tail")):
            continue  # mean@n and std@n stand alone; best@n is read from its /mean
        bench = source_map.get(match.group("source"), match.group("source"))
        n = match.group("n")
        name = f"{bench}/{_UPSTREAM_NAMES[metric]}@{n}" + ("_bootstrap" if metric == "best" else "")
        rank = _VAR_RANK[match.group("var")]
        if name not in out or rank < out[name][0]:
            out[name] = (rank, 100.0 * value)
    return {name: value for name, (_, value) in out.items()}


def read_problems(spec: str) -> tuple[str, dict[str, str | None]]:
    """`NAME=FILE` (JSONL with a `problem`, `question` or `prompt` field, and `answer`) -> (name, {problem text: answer})."""
    name, sep, path = spec.partition("=")
    if not sep or not name:
        raise ValueError(f"--bench {spec}: expected NAME=FILE")
    problems: dict[str, str | None] = {}
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        text = next((record[k] for k in ("problem", "question", "prompt") if isinstance(record.get(k), str)), None)
        if text is None:
            raise ValueError(f"{path}:{lineno}: no `problem`, `question` or `prompt` text field")
        answer = record.get("answer")
        problems[text.strip()] = None if answer is None else str(answer)
    return name, problems


def group_stats(bench: str, groups: list[list[float]]) -> dict[str, float]:
    """Per-problem score lists (k each) -> mean@k, std_per_problem@k, best@k_bootstrap, pass@k in percent.

    std_per_problem: the population std of each problem's scores, averaged (verl's std@k).
    best@k_bootstrap: the expectation of verl's estimate (the best of k draws with
    replacement from the k scores), exactly: Σ_v P(max ≤ v) steps, for any scores.
    pass@k: the best of the k scores, averaged (0/1 scores: share solved at least once).
    """
    k = Counter(len(g) for g in groups).most_common(1)[0][0]
    samples = [s for g in groups for s in g]
    return {
        f"{bench}/mean@{k}": 100.0 * sum(samples) / len(samples),
        f"{bench}/std_per_problem@{k}": 100.0 * sum(_pstd(g) for g in groups) / len(groups),
        f"{bench}/best@{k}_bootstrap": 100.0 * sum(_bootstrap_best(g) for g in groups) / len(groups),
        f"{bench}/pass@{k}": 100.0 * sum(max(g) for g in groups) / len(groups),
    }


def _pstd(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _bootstrap_best(values: list[float]) -> float:
    """E[max of n draws with replacement from the n values] = Σ_j v_j (F(v_j)^n − F(v_{j-1})^n), F the empirical CDF."""
    n, ordered = len(values), sorted(set(values))
    cdf = [sum(v <= x for v in values) / n for x in ordered]
    return sum(x * (c ** n - (cdf[j - 1] ** n if j else 0.0)) for j, (x, c) in enumerate(zip(ordered, cdf)))


def dump_metrics(dump_file: Path, benches: dict[str, dict[str, str | None]], regrade: bool = False) -> dict[str, float]:
    """One verl generation dump -> {"<bench>/<metric>@<k>": percent}, per benchmark (see group_stats).

    Samples whose prompt matches no --bench problem count under "all". With
    `regrade`, `<bench>/mean@k [math-verify]`: every output regraded by
    eval.grader.grade against `gts` or the matched problem's answer.
    """
    by_input: dict[str, list[tuple[float, str, str | None]]] = defaultdict(list)
    for line in dump_file.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        score = record.get("acc", record.get("score"))
        if isinstance(score, (int, float)) and not isinstance(score, bool):
            gold = record.get("gts")
            by_input[record.get("input", "")].append((float(score), str(record.get("output", "")),
                                                      None if gold is None else str(gold)))
    by_bench: dict[str, list[tuple[str | None, list]]] = defaultdict(list)
    for prompt, samples in by_input.items():
        # the longest problem text is the most specific
        matches = [(len(p), name, p) for name, problems in benches.items() for p in problems if p and p in prompt]
        best = max(matches) if matches else None
        answer = benches[best[1]][best[2]] if best else None
        by_bench[best[1] if best else "all"].append((answer, samples))
    out = {}
    for bench, groups in by_bench.items():
        out.update(group_stats(bench, [[score for score, _, _ in samples] for _, samples in groups]))
        if regrade:
            graded = [float(grade(text, gold if gold is not None else answer)) for answer, samples in groups
                      for _, text, gold in samples if (gold if gold is not None else answer) is not None]
            total = sum(len(samples) for _, samples in groups)
            if graded and len(graded) == total:  # every sample has a gold answer: the mean is over the same samples
                k = Counter(len(samples) for _, samples in groups).most_common(1)[0][0]
                out[f"{bench}/mean@{k}{MATH_VERIFY}"] = 100.0 * sum(graded) / total
    return out


def read_upstream(records: dict[int, dict[str, float]], dumps: Path | None, source_map: dict[str, str],
                  benches: dict[str, dict], regrade: bool = False, world_size: int = 0):
    """Upstream records (read_upstream_file, merged) and dumps -> (validation {step: {name: %}}, training
    {step: {key: value}}).

    With `world_size`, opd/num_tokens (per rank upstream) is multiplied by it; without, it is left out.
    """
    val = {step: upstream_validation(m, source_map) for step, m in records.items()}
    if dumps is not None:
        for file in sorted(dumps.glob("*.jsonl")):
            if file.stem.isdigit():
                val.setdefault(int(file.stem), {}).update(dump_metrics(file, benches, regrade))
    val = {step: m for step, m in val.items() if m}
    train = {}
    for step, m in records.items():
        values = {k: v for k, v in m.items() if k in TRAIN_KEYS}
        if world_size and NUM_TOKENS in m:
            values[NUM_TOKENS] = m[NUM_TOKENS] * world_size
        if values:
            train[step] = values
    return val, train


def _summary_metrics(path: Path) -> dict[str, float]:
    """mean@k and pass@k of an evaluation summary (its std@k is another statistic than verl's; not compared)."""
    summary = json.loads(path.read_text())
    k = summary.get("k")
    out = {}
    for bench, values in (summary.get("benchmarks") or {}).items():
        for which in ("mean", "pass"):
            value = values.get(f"{which}@k", values.get(f"{which}@{k}"))
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{bench}/{which}@{k}"] = float(value)
    return out


def sample_metrics(path: Path, regrade: bool = False) -> dict[str, float]:
    """From our samples.jsonl: std_per_problem@k and best@k_bootstrap (verl's statistics, see group_stats);
    with `regrade`, `mean@k [string match]` (eval.grader.grade_string_match on every response)."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            groups[record["benchmark"], record["problem_id"]].append(record)
    by_bench: dict[str, list[list[dict]]] = defaultdict(list)
    for (bench, _), samples in groups.items():
        by_bench[bench].append(samples)
    out = {}
    for bench, problems in by_bench.items():
        stats = group_stats(bench, [[float(s["correct"]) for s in samples] for samples in problems])
        out.update({name: v for name, v in stats.items() if "std_per_problem@" in name or name.endswith("_bootstrap")})
        if regrade:
            k = Counter(len(samples) for samples in problems).most_common(1)[0][0]
            matched = [grade_string_match(s["response"], s["answer"]) for samples in problems for s in samples]
            out[f"{bench}/mean@{k}{STRING_MATCH}"] = 100.0 * sum(matched) / len(matched)
    return out


def _eval_metrics(eval_dir: Path, regrade: bool) -> dict[str, float]:
    out = {}
    if (eval_dir / "samples.jsonl").is_file():
        out.update(sample_metrics(eval_dir / "samples.jsonl", regrade))
    if (eval_dir / "summary.json").is_file():
        out.update(_summary_metrics(eval_dir / "summary.json"))
    return out


def read_ours(run_dir: Path, regrade: bool = False):
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
            if key.startswith("val/") and ("/mean@" in key or "/pass@" in key):  # our std@k is not verl's std@k
                val[step][key[len("val/"):]] = float(value)
            elif key in TRAIN_KEYS or key == NUM_TOKENS:
                train[step][key] = float(value)
    for path in sorted((run_dir / "eval").glob("step_*")):
        number = path.name.removeprefix("step_")
        if number.isdigit():
            val[int(number)].update(_eval_metrics(path, regrade))
    final = _eval_metrics(run_dir / "eval" / "final", regrade)
    return {s: m for s, m in val.items() if m}, dict(train), final


def cross_graded(val: dict[int, dict[str, float]], suffix: str) -> None:
    """Copy each `<bench>/mean@k` (graded by this side's own grader) to `<bench>/mean@k<suffix>`, in place:
    upstream's own grader is a string match and ours is math-verify, so these are the other side's regrade rows."""
    for metrics in val.values():
        for name in [n for n in metrics if re.fullmatch(r"[^ ]+/mean@\d+", n)]:
            metrics[name + suffix] = metrics[name]


def graded_by(metric: str) -> str:
    """Which grader produced each side of a row (upstream / ours)."""
    if metric.endswith(MATH_VERIFY):
        return "math-verify (regraded) / math-verify"
    if metric.endswith(STRING_MATCH):
        return "reference string match / string match (regraded)"
    if "@" in metric and not metric.startswith(("opd/", "perf/", "timing/")):
        return "reference string match / math-verify"
    return ""


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


NOTES = (
    "mean@k: each side's own grader unless the metric says otherwise (graded by: upstream / ours); "
    "--regrade adds [math-verify] and [string match] rows so a gap can be put on the grader or on the model.",
    "std_per_problem@k: verl's std@k (per-problem std of the k scores, averaged); ours from our samples. "
    "Our summaries' std@k (spread of the k sample-set accuracies) is another statistic and is not compared.",
    "best@k_bootstrap: verl's best@k/mean, a bootstrap (k draws with replacement) biased low against pass@k; "
    "ours is the exact expectation of the same draw. pass@k (exact) needs the upstream dumps.",
    "maj@k is not compared: the reference reward returns no predicted answer, so its votes all tie (in effect mean@k).",
    "opd/loss is not compared: upstream logs the mean of micro-batch means, ours the global token mean. "
    "opd/num_tokens is compared only with --upstream-world-size (upstream logs it per rank).",
    "heldout: both sides hold out 20% of DAPO, drawn with different random generators: different prompts.",
)


def render(rows: list[tuple[str, str, float, float]], logs: list[Path], run_dir: Path) -> str:
    upstream = ", ".join(f"`{log}`" for log in logs)
    lines = ["## Upstream OPD vs ours", "", f"Upstream: {upstream}  ", f"Our run: `{run_dir}`", "",
             "Accuracy metrics in %, upstream fractions multiplied by 100.", "",
             "| step | metric | upstream | ours | ours − upstream | graded by (upstream / ours) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {step} | {key} | {up:.4g} | {ours:.4g} | {ours - up:+.4g} | {graded_by(key)} |"
              for step, key, up, ours in rows]
    lines += ["", "Notes:", ""] + [f"- {note}" for note in NOTES]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.paper.upstream_diff", description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream-log", action="append", required=True,
                    help="the upstream verl trainer's console log, or a CSV export of its metrics (a `step` column, "
                         "verl's metric names; evaluation columns as fractions); repeatable, the format is detected")
    ap.add_argument("--upstream-dumps", default="", help="upstream validation dumps directory (<step>.jsonl files)")
    ap.add_argument("--bench", action="append", default=[], help="NAME=FILE problem set, to attribute dumped samples; repeatable")
    ap.add_argument("--run", required=True, help="our run directory")
    ap.add_argument("--map", action="append", default=[], help="upstream data_source=our benchmark name; repeatable")
    ap.add_argument("--regrade", action="store_true",
                    help="regrade the upstream dumps with math-verify and our samples with a string match (rows marked [math-verify], [string match])")
    ap.add_argument("--upstream-world-size", type=int, default=0,
                    help="processes of the upstream run: its per-rank opd/num_tokens times this is compared with ours (0 = not compared)")
    ap.add_argument("--all-steps", action="store_true", help="compare training metrics at every common step, not only at validations")
    ap.add_argument("--out", default="", help="also write the table as Markdown here")
    args = ap.parse_args(argv)

    logs, run_dir = [Path(p) for p in args.upstream_log], Path(args.run)
    for log in logs:
        if not log.is_file():
            print(f"error: upstream log {log} {'is a directory' if log.is_dir() else 'not found'}", file=sys.stderr)
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

    if args.regrade and dumps is None:
        print("error: --regrade needs --upstream-dumps (the upstream outputs to regrade)", file=sys.stderr)
        return 2
    if args.upstream_world_size < 0:
        print(f"error: --upstream-world-size {args.upstream_world_size} must be >= 0", file=sys.stderr)
        return 2
    records: dict[int, dict[str, float]] = defaultdict(dict)
    said = []
    for log in logs:
        try:
            found, names, fmt = read_upstream_file(log)
        except (UpstreamError, OSError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            print(f"error: upstream {log}: {why}; {ACCEPTED}", file=sys.stderr)
            return 2
        said.append(describe(log, found, names, fmt, source_map))
        for step, values in found.items():
            records[step].update(values)
    for line in said:
        print(line, file=sys.stderr)
    up_val, up_train = read_upstream(dict(records), dumps, source_map, benches, args.regrade, args.upstream_world_size)
    our_val, our_train, our_final = read_ours(run_dir, args.regrade)
    if args.regrade:
        cross_graded(up_val, STRING_MATCH)
        cross_graded(our_val, MATH_VERIFY)
        cross_graded({0: our_final}, MATH_VERIFY)
    rows = diff_rows(up_val, up_train, our_val, our_train, our_final, args.all_steps)
    if not rows:
        up_keys = sorted({k for m in up_val.values() for k in m} | {k for m in up_train.values() for k in m})
        our_keys = sorted({k for m in our_val.values() for k in m} | set(our_final) | {k for m in our_train.values() for k in m})
        up_steps, our_steps = set(up_val) | set(up_train), set(our_val) | set(our_train)
        common = up_steps & our_steps
        where = (f"upstream steps {_span(up_steps)[1:-1] or 'none'} ({len(up_steps)}), "
                 f"ours {_span(our_steps)[1:-1] or 'none'} ({len(our_steps)})")
        final = (f"; the last upstream evaluation (step {max(up_val)}) and our final one share no metric"
                 if up_val and our_final else "")
        if common:
            print(f"no metric in common at the {_count(len(common), 'common step')} ({where}){final}", file=sys.stderr)
        else:
            print(f"no common step: {where}{final}", file=sys.stderr)
        print(f"  upstream steps {sorted(set(up_val) | set(up_train))[:10]}..., metrics: {', '.join(up_keys) or 'none'}", file=sys.stderr)
        print(f"  ours steps {sorted(set(our_val) | set(our_train))[:10]}..., metrics: {', '.join(our_keys) or 'none'}", file=sys.stderr)
        return 1
    text = render(rows, logs, run_dir)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
