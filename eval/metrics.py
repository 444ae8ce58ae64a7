"""Benchmark numbers from per-sample results.

Input is a correctness matrix `correct` of shape (P, k): P problems, k samples
each, `correct[p][j]` True when sample j of problem p is right. Accuracies are
returned in percent (0-100), as the paper's tables print them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _check(correct: Sequence[Sequence[bool]]) -> tuple[int, int]:
    if len(correct) == 0:
        raise ValueError("no problems: the correctness matrix is empty")
    k = len(correct[0])
    if k == 0 or any(len(row) != k for row in correct):
        raise ValueError("every problem needs the same number (>= 1) of samples")
    return len(correct), k


def mean_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """mean@k: accuracy over all P*k samples, percent."""
    p, k = _check(correct)
    return 100.0 * sum(sum(bool(c) for c in row) for row in correct) / (p * k)


def std_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Spread of mean@k across the k sample sets, percent.

    Sample set j is sample j of every problem; its accuracy is a_j =
    mean_p correct[p][j]. Returns the population standard deviation (divide
    by k) of a_0..a_{k-1}, so k = 1 gives 0 rather than undefined.
    """
    p, k = _check(correct)
    acc = [100.0 * sum(bool(row[j]) for row in correct) / p for j in range(k)]
    mean = sum(acc) / k
    return math.sqrt(sum((a - mean) ** 2 for a in acc) / k)


def pass_at_k_one(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which avoids huge binomials.
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k(correct: Sequence[Sequence[bool]], k: int | None = None) -> float:
    """Mean over problems of the unbiased pass@k, percent; k defaults to the samples per problem.

    With k equal to the number of samples this is the share of problems
    solved at least once.
    """
    p, n = _check(correct)
    k = n if k is None else k
    return 100.0 * sum(pass_at_k_one(n, sum(bool(c) for c in row), k) for row in correct) / p


def majority_vote(keys: Sequence[str | None]) -> int | None:
    """Index of the sample whose answer key wins the vote; None when no sample has an answer.

    Samples without an answer (None) do not vote. Ties go to the answer that
    appears first, so the result depends only on the order of the samples.
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for j, key in enumerate(keys):
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, j)
    if not counts:
        return None
    best = max(counts, key=lambda key: (counts[key], -first[key]))
    return first[best]


def maj_at_k(correct: Sequence[Sequence[bool]], keys: Sequence[Sequence[str | None]]) -> float:
    """maj@k: share of problems whose majority-vote answer is correct, percent.

    `keys` (P, k) are the answers' vote keys (equal keys = same answer; None =
    no answer). The winning answer is judged by the correctness of the first
    sample that gave it; a problem with no answer at all counts as wrong.
    """
    p, k = _check(correct)
    if len(keys) != p or any(len(row) != k for row in keys):
        raise ValueError("keys must have the same (problems, samples) shape as correct")
    wins = 0
    for row_correct, row_keys in zip(correct, keys):
        j = majority_vote(row_keys)
        wins += j is not None and bool(row_correct[j])
    return 100.0 * wins / p


def avg_at_k(scores: Sequence[Sequence[float]]) -> float:
    """Avg@k of fractional scores in [0, 1], percent: the mean score over every sample of every task."""
    p, k = _check(scores)
    return 100.0 * sum(sum(map(float, row)) for row in scores) / (p * k)


def best_at_k(scores: Sequence[Sequence[float]]) -> float:
    """Best@k, percent: the mean over tasks of the best of the task's k scores."""
    p, _ = _check(scores)
    return 100.0 * sum(max(map(float, row)) for row in scores) / p


def score_std_at_k(scores: Sequence[Sequence[float]]) -> float:
    """Spread of Avg@k across the k sample sets (sample j of every task), percent, population std."""
    p, k = _check(scores)
    sets = [100.0 * sum(float(row[j]) for row in scores) / p for j in range(k)]
    mean = sum(sets) / k
    return math.sqrt(sum((a - mean) ** 2 for a in sets) / k)
