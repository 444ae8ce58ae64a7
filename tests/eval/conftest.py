"""Shared fixtures of the eval tests (no downloads: local JSONL files and tiny models only)."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# `pytest` (unlike `python -m pytest`) does not put the repository root on sys.path.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHARED_EVAL = (REPO / "../shared/data/eval").resolve()


@pytest.fixture
def shared_eval() -> Path:
    """/work/shared/data/eval (beside the repository): math500/aime24/aime25.jsonl."""
    if not all((SHARED_EVAL / f"{n}.jsonl").is_file() for n in ("math500", "aime24", "aime25")):
        pytest.skip(f"shared evaluation data not found at {SHARED_EVAL}")
    return SHARED_EVAL


@pytest.fixture(autouse=True)
def _fresh_benchmark_cache():
    # load_benchmark caches per spec; tests that write their own files must not see stale ones.
    from eval.benchmarks import load_benchmark

    load_benchmark.cache_clear()
    yield
    load_benchmark.cache_clear()
