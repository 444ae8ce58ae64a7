"""Benchmarks by name or path: the problems, their prompt format and their judge.

A benchmark spec (what `eval.benchmarks` in a config or `--benchmarks` holds) is
- a registered name: `math500`, `aime24`, `aime25`, `dapo` (hub data sets) or
  `demo` (the project's toy task, imported lazily from `demo.task`);
- `NAME=PATH`: a local JSONL file with fields id, problem, answer, reported
  as NAME (e.g. `math500=/data/eval/math500.jsonl`);
- a bare path to such a file, reported under the file's stem.

Hub sources (loaded with `datasets.load_dataset`):
- math500: HuggingFaceH4/MATH-500, split test, fields problem / answer;
- aime24: HuggingFaceH4/aime_2024, split train (its only split), fields problem / answer;
- aime25: math-ai/aime25, split test, fields problem / answer (AIME 2025 I and II, 30 problems);
- dapo: BytedTsinghua-SIA/DAPO-Math-17k, split train; the problem is the
  user prompt with DAPO's "Answer:" instructions removed, the answer is
  reward_model.ground_truth; the hub copy repeats prompts, kept once each.

Math problems are asked as the problem, a separator and an instruction
(`eval.instruction`, `eval.instruction_separator`; by default a newline and
BOXED_INSTRUCTION) and judged by `eval.grader.grade`. Problem ids of hub sets are `<name>-<index>` (index in
file order, three digits), the same ids as the project's local copies, so runs
on either can be compared problem by problem.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from demo import task as demo_task
from eval import grader
from eval.config import BOXED_INSTRUCTION

# The demo task generates its problems; these fix which ones form "the" demo benchmark.
DEMO_PROBLEMS = 200  # used when EvalConfig.max_problems is 0 (the task has no natural size)
DEMO_SEED = 0

_DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
_DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


class BenchmarkError(ValueError):
    """A benchmark spec that cannot be used; the message is one line meant for the user."""


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str  # the user message, instruction included
    answer: str  # gold answer, as the judge expects it
    ids: tuple[int, ...] | None = None  # the prompt already formatted and tokenized (e.g. held-out training prompts)


@dataclass(frozen=True)
class Benchmark:
    """A loaded benchmark.

    grade(response_text, answer, timeout_s) -> bool judges one response;
    extract(response_text) -> str | None is the answer shown in samples.jsonl
    and voted on by maj@k.
    """

    name: str
    problems: tuple[Problem, ...]
    grade: Callable[[str, str, float], bool]
    extract: Callable[[str], str | None]


_REGISTRY: dict[str, Callable[[str, int, "PromptFormat"], Benchmark]] = {}


@dataclass(frozen=True)
class PromptFormat:
    """How a math problem becomes its user message: problem + separator + instruction (no instruction: the problem)."""

    instruction: str = BOXED_INSTRUCTION
    separator: str = "\n"

    def __call__(self, problem: str) -> str:
        return problem.strip() + (self.separator + self.instruction if self.instruction else "")


def register(name: str):
    """Add a loader `fn(name, max_problems, fmt: PromptFormat) -> Benchmark` under `name`."""

    def add(fn):
        if name in _REGISTRY:
            raise ValueError(f"benchmark {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return add


def known_benchmarks() -> list[str]:
    return sorted(_REGISTRY)


def _unknown(spec: str) -> BenchmarkError:
    return BenchmarkError(
        f"unknown benchmark {spec!r} (known: {', '.join(known_benchmarks())}; "
        "or a JSONL file with id/problem/answer given as PATH or NAME=PATH)"
    )


def check_specs(specs: list[str], max_problems: int = 0, fmt: "PromptFormat | None" = None) -> list[str]:
    """Benchmark names and files (eval.benchmarks), one line each: a typo, a garbled file or a hub set that
    cannot be reached must not surface at the first evaluation, hours in. Every benchmark is loaded as the
    evaluation will load it (`max_problems`, `fmt`), so that evaluation finds it in load_benchmark's cache."""
    problems = []
    for spec in specs:
        try:
            load_benchmark(spec, max_problems, fmt or PromptFormat())
        except BenchmarkError as exc:
            problems.append(f"eval.benchmarks: {exc}")
    return problems


def parse_spec(spec: str) -> tuple[str, str | Path]:
    """`spec` -> (reported name, registered name or local Path). Checks names and that files exist; loads nothing."""
    spec = spec.strip()
    if not spec:
        raise BenchmarkError("empty benchmark name")
    if "=" in spec:
        name, path = (part.strip() for part in spec.split("=", 1))
        source: str | Path = Path(path).expanduser()
    elif spec in _REGISTRY:
        return spec, spec
    elif spec.endswith(".jsonl") or os.sep in spec or Path(spec).exists():
        source = Path(spec).expanduser()
        name = source.stem
    else:
        raise _unknown(spec)
    if not _NAME.fullmatch(name):
        raise BenchmarkError(f"benchmark name {name!r} (from {spec!r}) may only use letters, digits, '_', '.', '-'")
    if not source.is_file():
        raise BenchmarkError(f"benchmark file not found: {source} (from {spec!r})")
    return name, source


@functools.lru_cache(maxsize=32)
def load_benchmark(spec: str, max_problems: int = 0, fmt: PromptFormat = PromptFormat()) -> Benchmark:
    """Load the benchmark `spec` names; at most `max_problems` problems (the first ones), 0 = all.

    `fmt` turns a math problem into its prompt (the demo task has its own format).
    Cached per (spec, max_problems, fmt): the trainer evaluates every few steps.
    """
    if max_problems < 0:
        raise BenchmarkError(f"max_problems must be >= 0, got {max_problems}")
    name, source = parse_spec(spec)
    if isinstance(source, Path):
        return _math_benchmark(name, _read_jsonl(source, name), max_problems, fmt)
    return _REGISTRY[source](name, max_problems, fmt)


# ----------------------------------------------------------------------------
# math benchmarks


def _grade_math(response_text: str, answer: str, timeout_s: float) -> bool:
    return grader.grade(response_text, answer, timeout_s=timeout_s)


def _math_benchmark(name: str, rows: list[tuple[str, str, str]], max_problems: int, fmt: PromptFormat) -> Benchmark:
    """rows: (id, problem, answer) in file order."""
    if max_problems:
        rows = rows[:max_problems]
    problems = tuple(Problem(pid, fmt(problem), answer) for pid, problem, answer in rows)
    return Benchmark(name, problems, grade=_grade_math, extract=grader.extract_answer)


def _read_jsonl(path: Path, name: str) -> list[tuple[str, str, str]]:
    rows = []
    seen: set[str] = set()
    try:
        raw_lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise BenchmarkError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    for lineno, raw in enumerate(raw_lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:  # latin-1 and other legacy encodings; named with the place
            raise BenchmarkError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                 f"{exc.start + 1}); save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchmarkError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or "problem" not in record or "answer" not in record:
            raise BenchmarkError(f"{path}:{lineno}: a record needs the fields problem and answer (and id)")
        pid = str(record.get("id", f"{name}-{len(rows):03d}"))
        if pid in seen:
            raise BenchmarkError(f"{path}:{lineno}: problem id {pid!r} appears twice")
        seen.add(pid)
        rows.append((pid, str(record["problem"]), str(record["answer"])))
    if not rows:
        raise BenchmarkError(f"{path}: no problems in the file")
    return rows


def _hub(name: str, hub_id: str, split: str):
    try:
        import datasets  # here, not at the top: half a second of every start, for hub ids only

        return datasets.load_dataset(hub_id, split=split)
    except Exception as exc:  # offline, renamed, gated: the user needs the one-line reason
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BenchmarkError(
            f"could not load benchmark {name!r} from the hub ({hub_id}, split {split}): {reason}; "
            f"offline? pass a local copy as {name}=PATH.jsonl"
        ) from None


def _hub_math(name: str, key: str, hub_id: str, split: str, max_problems: int, fmt: PromptFormat) -> Benchmark:
    data = _hub(name, hub_id, split)
    if max_problems:
        data = data.select(range(min(max_problems, len(data))))
    rows = [(f"{key}-{i:03d}", str(r["problem"]), str(r["answer"])) for i, r in enumerate(data)]
    return _math_benchmark(name, rows, max_problems, fmt)


@register("math500")
def _math500(name: str, max_problems: int, fmt: PromptFormat) -> Benchmark:
    return _hub_math(name, "math500", "HuggingFaceH4/MATH-500", "test", max_problems, fmt)


@register("aime24")
def _aime24(name: str, max_problems: int, fmt: PromptFormat) -> Benchmark:
    return _hub_math(name, "aime24", "HuggingFaceH4/aime_2024", "train", max_problems, fmt)


@register("aime25")
def _aime25(name: str, max_problems: int, fmt: PromptFormat) -> Benchmark:
    return _hub_math(name, "aime25", "math-ai/aime25", "test", max_problems, fmt)


def dapo_problem(prompt_text: str) -> str:
    """The bare problem inside a DAPO-Math-17k user prompt: its "Answer:" instructions (prefix and suffix) removed.

    The one implementation of the stripping: the `dapo` benchmark and training
    prompts with `data.prompt_format: dapo` both use it. Text without DAPO's
    wording is returned stripped of surrounding whitespace, otherwise unchanged.
    """
    return prompt_text.removeprefix(_DAPO_PREFIX).removesuffix(_DAPO_SUFFIX).strip()


@register("dapo")
def _dapo(name: str, max_problems: int, fmt: PromptFormat) -> Benchmark:
    data = _hub(name, "BytedTsinghua-SIA/DAPO-Math-17k", "train")
    rows, seen = [], set()
    for record in data:
        problem = dapo_problem(record["prompt"][0]["content"])
        if problem in seen:
            continue
        seen.add(problem)
        index = (record.get("extra_info") or {}).get("index", len(rows))
        rows.append((f"dapo-{index}", problem, str(record["reward_model"]["ground_truth"])))
        if max_problems and len(rows) >= max_problems:
            break
    return _math_benchmark(name, rows, max_problems, fmt)


# ----------------------------------------------------------------------------
# the demo task


@register("demo")
def _demo(name: str, max_problems: int, fmt: PromptFormat) -> Benchmark:
    # fmt is not used: the task's prompts carry their own format
    records = demo_task.eval_problems(max_problems or DEMO_PROBLEMS, DEMO_SEED)
    problems = tuple(Problem(str(r["id"]), str(r["prompt"]), str(r["answer"])) for r in records)

    def grade(response_text: str, answer: str, timeout_s: float) -> bool:
        return bool(demo_task.grade(response_text, answer))

    return Benchmark(name, problems, grade=grade, extract=demo_task.extract_answer)
