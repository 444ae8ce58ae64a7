"""Taxonomy: quadrant labels, shares, and the per-step diagnostics."""

import math

import pytest
import torch

import tip
from tip.stats import TokenStats


def make_stats(h, d, teacher=None) -> TokenStats:
    h = torch.tensor(h, dtype=torch.float32)
    n = h.shape[0]
    return TokenStats(h, torch.tensor(d, dtype=torch.float32), torch.tensor(d, dtype=torch.float32) * 2,
                      torch.zeros(n) if teacher is None else torch.tensor(teacher, dtype=torch.float32),
                      torch.zeros(n, dtype=torch.long))


# 10 hand-placed tokens: (h, delta) -> quadrant under absolute thresholds h >= 0.5, delta >= 1.0
TOKENS = [
    (0.9, 3.0, 1), (0.6, 1.0, 1),             # Q1 (the second sits exactly on both thresholds: high)
    (0.7, 0.1, 2), (0.5, 0.0, 2), (0.8, 0.9, 2),  # Q2
    (0.1, 2.0, 3),                            # Q3
    (0.2, 0.2, 4), (0.0, 0.0, 4), (0.3, 0.5, 4), (0.49, 0.99, 4),  # Q4
]


def test_absolute_quadrants_on_a_hand_made_example():
    stats = make_stats([t[0] for t in TOKENS], [t[1] for t in TOKENS])
    quad = tip.quadrants(stats, mode="absolute", entropy_threshold=0.5, divergence_threshold=1.0)
    assert quad.dtype == torch.long
    assert quad.tolist() == [t[2] for t in TOKENS]


def test_quantile_quadrants_use_the_medians():
    h = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    d = [5.0, 0.1, 4.0, 0.2, 3.0, 0.3, 2.0, 0.4]
    stats = make_stats(h, d)
    # median h = 0.45, median delta = 1.2
    assert tip.thresholds(stats) == (pytest.approx(0.45), pytest.approx(1.2))
    assert tip.quadrants(stats).tolist() == [3, 4, 3, 4, 1, 2, 1, 2]
    # quantile 0.75 of h (linear interpolation) = 0.625: only the top two h are high
    assert tip.quadrants(stats, entropy_threshold=0.75).tolist() == [3, 4, 3, 4, 3, 4, 1, 2]


def test_diagnostics_shares_and_moments():
    stats = make_stats([t[0] for t in TOKENS], [t[1] for t in TOKENS], teacher=[0.1] * 5 + [0.3] * 5)
    mask = torch.tensor([True, False, True, False, False, True, False, False, False, True])
    selection = tip.Selection(mask, mask.float())
    out = tip.diagnostics(stats, selection, mode="absolute", entropy_threshold=0.5, divergence_threshold=1.0)
    assert [out[f"tip/q{q}_share"] for q in range(1, 5)] == pytest.approx([0.2, 0.3, 0.1, 0.4])
    assert [out[f"tip/kept_q{q}_share"] for q in range(1, 5)] == pytest.approx([0.25, 0.25, 0.25, 0.25])
    assert out["tip/kept_fraction"] == pytest.approx(0.4)
    assert out["tip/num_tokens"] == 10 and out["tip/num_kept"] == 4
    h = [t[0] for t in TOKENS]
    mean = sum(h) / 10
    assert out["tip/entropy_mean"] == pytest.approx(mean)
    assert out["tip/entropy_std"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in h) / 10))
    assert out["tip/forward_divergence_mean"] == pytest.approx(2 * out["tip/divergence_mean"])
    assert out["tip/teacher_entropy_mean"] == pytest.approx(0.2)
    assert out["tip/teacher_entropy_std"] == pytest.approx(0.1)
    assert out["tip/entropy_threshold"] == 0.5 and out["tip/divergence_threshold"] == 1.0
    assert all(k.startswith("tip/") for k in out)
    # no selection: everything counts as kept
    assert tip.diagnostics(stats, None)["tip/kept_fraction"] == 1.0


def test_diagnostics_with_no_tokens_is_all_zero():
    empty = make_stats([], [])
    selection = tip.Selection(torch.zeros(0, dtype=torch.bool), torch.zeros(0))
    for mode in ("quantile", "absolute"):
        out = tip.diagnostics(empty, selection, mode=mode)
        assert len(out) > 15 and all(v == 0.0 for k, v in out.items() if k not in ("tip/entropy_threshold", "tip/divergence_threshold"))
        assert not any(math.isnan(v) for v in out.values())
    one = tip.diagnostics(make_stats([0.3], [0.2]), tip.Selection(torch.tensor([True]), torch.ones(1)))
    assert not any(math.isnan(v) for v in one.values()) and one["tip/q1_share"] == 1.0


def test_bad_mode_and_quantile_are_errors():
    stats = make_stats([0.1, 0.2], [0.1, 0.2])
    with pytest.raises(ValueError, match="unknown taxonomy mode"):
        tip.quadrants(stats, mode="median")
    with pytest.raises(ValueError, match="quantile"):
        tip.quadrants(stats, mode="quantile", divergence_threshold=2.0)
    with pytest.raises(ValueError, match="selection has 3 tokens"):
        tip.diagnostics(stats, tip.Selection(torch.ones(3, dtype=torch.bool), torch.ones(3)))
