"""mean@k, std@k, pass@k and maj@k against hand computations and naive references."""

import itertools
import math
import random

import pytest

from eval import metrics

# 3 problems x 4 samples, worked by hand:
#   problem 0: 1 1 0 1   (3 correct)
#   problem 1: 0 0 0 0   (0 correct)
#   problem 2: 0 1 0 0   (1 correct)
# mean@4 = 4 / 12 = 33.33%
# sample-set accuracies (columns): 1/3, 2/3, 0, 1/3 -> 33.33, 66.67, 0, 33.33 (mean 33.33)
#   deviations 0, 33.33, -33.33, 0 -> variance (0 + 1111.1 + 1111.1 + 0) / 4 = 555.56 -> std 23.57
# pass@4 (n = k = 4): solved at least once: problems 0 and 2 -> 66.67%
# pass@2: p0: 1 - C(1,2)/C(4,2) = 1; p1: 0; p2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5 -> (1 + 0 + 0.5) / 3 = 50%
CORRECT = [[1, 1, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0]]


def test_mean_at_k_by_hand():
    assert metrics.mean_at_k(CORRECT) == pytest.approx(100 * 4 / 12)


def test_std_at_k_by_hand():
    assert metrics.std_at_k(CORRECT) == pytest.approx(math.sqrt((2 * (100 / 3) ** 2) / 4))
    assert metrics.std_at_k(CORRECT) == pytest.approx(23.5702, abs=1e-4)


def test_std_is_zero_when_every_sample_set_scores_the_same():
    assert metrics.std_at_k([[1, 0], [0, 1]]) == 0.0
    assert metrics.std_at_k([[1], [0], [1]]) == 0.0  # k = 1: no spread, not NaN


def test_pass_at_k_by_hand():
    assert metrics.pass_at_k(CORRECT) == pytest.approx(200 / 3)
    assert metrics.pass_at_k(CORRECT, k=2) == pytest.approx(50.0)
    assert metrics.pass_at_k(CORRECT, k=1) == pytest.approx(metrics.mean_at_k(CORRECT))  # pass@1 = mean accuracy


def test_pass_at_k_one_matches_the_binomial_formula():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                naive = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert metrics.pass_at_k_one(n, c, k) == pytest.approx(naive, abs=1e-12), (n, c, k)


def test_pass_at_k_one_is_the_chance_a_random_k_subset_has_a_correct_sample():
    # Enumerate every k-subset of a concrete sample list: the estimator's definition.
    samples = [1, 0, 0, 1, 0, 0]
    for k in range(1, len(samples) + 1):
        subsets = list(itertools.combinations(samples, k))
        share = sum(any(s) for s in subsets) / len(subsets)
        assert metrics.pass_at_k_one(len(samples), sum(samples), k) == pytest.approx(share)


def test_pass_at_k_refuses_impossible_counts():
    with pytest.raises(ValueError, match="pass@k"):
        metrics.pass_at_k_one(4, 5, 2)
    with pytest.raises(ValueError, match="pass@k"):
        metrics.pass_at_k_one(4, 1, 5)


def test_majority_vote_and_ties():
    assert metrics.majority_vote(["7", "5", "5", "7", "5"]) == 1  # "5" has 3 votes, first at index 1
    assert metrics.majority_vote(["7", "5", "5", "7"]) == 0  # 2-2 tie: the answer seen first wins
    assert metrics.majority_vote(["5", "7", "7", "5"]) == 0
    assert metrics.majority_vote([None, None, "3"]) == 2  # missing answers do not vote
    assert metrics.majority_vote([None, None]) is None


def test_maj_at_k_by_hand():
    correct = [
        [1, 0, 1, 0],  # votes 5, 7, 5, 9 -> "5" wins, correct
        [0, 0, 1, 1],  # votes 2, 2, 3, 3 -> tie, "2" seen first, wrong
        [0, 0, 0, 1],  # votes -, -, -, 4 -> "4", correct
        [0, 0, 0, 0],  # no answers at all -> wrong
    ]
    keys = [["5", "7", "5", "9"], ["2", "2", "3", "3"], [None, None, None, "4"], [None] * 4]
    assert metrics.maj_at_k(correct, keys) == pytest.approx(50.0)


def test_metrics_against_naive_references_on_random_matrices():
    rng = random.Random(0)
    for _ in range(20):
        p, k = rng.randint(1, 7), rng.randint(1, 6)
        correct = [[rng.random() < 0.4 for _ in range(k)] for _ in range(p)]
        keys = [[rng.choice(["a", "b", None]) for _ in range(k)] for _ in range(p)]
        cols = [100 * sum(row[j] for row in correct) / p for j in range(k)]
        mean = sum(cols) / k
        assert metrics.mean_at_k(correct) == pytest.approx(mean)
        assert metrics.std_at_k(correct) == pytest.approx(math.sqrt(sum((c - mean) ** 2 for c in cols) / k))
        assert metrics.pass_at_k(correct) == pytest.approx(100 * sum(any(row) for row in correct) / p)
        wins = 0
        for row_c, row_k in zip(correct, keys):
            votes = [key for key in row_k if key is not None]
            if votes:
                top = max(votes.count(v) for v in votes)
                winner = next(v for v in row_k if v is not None and row_k.count(v) == top)
                wins += row_c[row_k.index(winner)]
        assert metrics.maj_at_k(correct, keys) == pytest.approx(100 * wins / p)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="empty"):
        metrics.mean_at_k([])
    with pytest.raises(ValueError, match="same number"):
        metrics.mean_at_k([[1, 0], [1]])
    with pytest.raises(ValueError, match="shape"):
        metrics.maj_at_k([[1, 0]], [["a"]])
