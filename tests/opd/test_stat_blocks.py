"""The statistics' row blocks (opd.losses.chunk_stats: block_sums, stats_from_sums, reverse_kl_grad_) against
the log-probability form (log_probs_, row_stats, the registry's reverse_kl) and float64: the fast algebra must give
the same statistics, the same reverse-KL value and the same gradient, on extreme rows too."""

import math

import pytest
import torch

import opd.losses as losses
from opd.losses import (DIVERGENCES, ChunkBuffers, chunk_stats, divergence_kernel, log_probs_, reverse_kl,
                        row_stats, stats_pass)


def stats64(s, t):
    """(H(P_S), H(P_T), KL(P_S||P_T), KL(P_T||P_S)) in float64, 0 log 0 = 0 (columns -inf on a side)."""
    ls, lt = s.double().log_softmax(-1), t.double().log_softmax(-1)
    p, q = ls.exp(), lt.exp()
    xlogy = lambda w, x: torch.where(w > 0, w * x, torch.zeros_like(w))  # noqa: E731
    return (-xlogy(p, ls).sum(-1), -xlogy(q, lt).sum(-1), xlogy(p, ls - lt).sum(-1), xlogy(q, lt - ls).sum(-1))


def extreme_rows(v=4000, seed=0):
    """Rows that stress the sums: huge logits (1e4 offsets, 60-nat spreads), a one-hot-like row, a flat row,
    close and far teachers, and -inf columns on one side or both."""
    g = torch.Generator().manual_seed(seed)
    s = 3.0 * torch.randn(10, v, generator=g)
    t = s + 0.2 * torch.randn(10, v, generator=g)
    s[0] += 1e4  # a large common offset on the student: shifts must cancel it exactly
    t[1] -= 5e3
    s[2] *= 20.0  # 60-nat spreads: one-hot in float32
    t[2] = s[2] + torch.randn(v, generator=g)
    s[3, 7] += 80.0  # a confident student
    s[4] = 1e-3 * torch.randn(v, generator=g)  # nearly uniform
    t[5] = 3.0 * torch.randn(v, generator=g)  # far from the student
    s[6, [1, 2]] = t[6, [1, 2]] = -math.inf  # both sides rule ids out
    s[7, 9] = -math.inf  # only the student: KL(P_T||P_S) infinite
    t[8, 4] = -math.inf  # only the teacher: KL(P_S||P_T) infinite
    return s, t


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_block_statistics_match_float64_on_extreme_rows(autocast):
    s, t = extreme_rows()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        rows, _ = chunk_stats(s.clone(), t.clone(), 0)
    for got, want in zip(rows[:4], stats64(s, t)):
        assert got.dtype == torch.float32
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite].double(), want[finite], atol=2e-6, rtol=1e-5)
        assert torch.equal(torch.isinf(got), ~finite)
    assert rows.forward_kl[7] == math.inf and rows.reverse_kl[8] == math.inf


def test_block_size_changes_no_bit(monkeypatch):
    """Rows are summed one by one: one row a block, a few, or the whole chunk give the same numbers."""
    s, t = extreme_rows(v=3000, seed=1)
    results = []
    for block_bytes in (1, 20 * 3000 * 3, 1 << 40):
        monkeypatch.setattr(losses, "STAT_BLOCK_BYTES", block_bytes)
        results.append(chunk_stats(s.clone(), t.clone(), 3, ChunkBuffers(10, 3000, "cpu")))
    for rows, sums in results[1:]:
        for got, want in zip(rows[:4], results[0][0][:4]):
            assert torch.equal(got, want)
        for name, value in rows.top.items():
            assert torch.equal(value, results[0][0].top[name]), name
        assert torch.equal(sums.z, results[0][1].z) and torch.equal(sums.m, results[0][1].m)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_reverse_kl_from_the_sums_equals_the_log_probability_form(autocast):
    """The kernel's reverse KL (value from the statistics, gradient p (d - sum p d) from the row blocks) against the
    registry's log-probability reverse_kl, on extreme rows; the row with an infinite KL is left out of the gradient."""
    s, t = extreme_rows(seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        d, g, rows = divergence_kernel(s.clone(), t.clone(), DIVERGENCES["reverse_kl"], 0.5, with_grad=True,
                                       with_stats=True)
    d_ref, g_ref = reverse_kl(log_probs_(s.clone(), t.clone(), True, False), 0.5, True)
    assert torch.equal(d, rows.reverse_kl.clamp_min(0.0))
    finite = torch.isfinite(d_ref)
    torch.testing.assert_close(d[finite], d_ref[finite].clamp_min(0.0), atol=2e-6, rtol=1e-5)
    assert d[8] == math.inf
    keep = [i for i in range(10) if i != 8]
    torch.testing.assert_close(g[keep], g_ref[keep], atol=1e-7, rtol=1e-4)
    assert torch.all(g[6, [1, 2]] == 0) and g[7, 9] == 0  # tokens the student rules out get no gradient


def test_reverse_kl_gradient_matches_float64_autograd():
    s, t = extreme_rows(seed=3)
    s, t = torch.cat([s[:6], s[9:]]), torch.cat([t[:6], t[9:]])  # rows without -inf (float64 autograd meets 0 * inf)
    _, g, _ = divergence_kernel(s.clone(), t.clone(), DIVERGENCES["reverse_kl"], 0.5, with_grad=True)
    x = s.double().requires_grad_()
    stats64(x, t)[2].sum().backward()
    err = (g.double() - x.grad).abs()
    assert torch.all(err <= 1e-6 * x.grad.abs().max() + 1e-5 * x.grad.abs()), float(err.max())


def test_non_finite_rows_stay_nan_in_the_block_path():
    s, t = torch.randn(4, 50), torch.randn(4, 50)
    s[0, 3], t[1, 7] = math.nan, math.inf
    s[2] = -math.inf  # a row with no possible token
    d, g, rows = divergence_kernel(s.clone(), t.clone(), DIVERGENCES["reverse_kl"], 0.5, with_grad=True,
                                   with_stats=True)
    assert d[:3].isnan().all() and torch.isfinite(d[3])
    assert g[:3].isnan().any(-1).all() and torch.isfinite(g[3]).all()
    for r in rows[:4]:
        assert r[:3].isnan().all() and torch.isfinite(r[3])


@pytest.mark.parametrize("name", ["jsd", "skew_reverse_kl"])
def test_divergences_that_are_reverse_kl_at_beta_one_take_the_block_path(name):
    assert DIVERGENCES[name].reverse_at(1.0) and not DIVERGENCES[name].reverse_at(0.5)
    assert DIVERGENCES["reverse_kl"].reverse_at(0.5) and not DIVERGENCES["forward_kl"].reverse_at(1.0)
    s, t = extreme_rows(v=500, seed=4)
    d1, g1, _ = divergence_kernel(s.clone(), t.clone(), DIVERGENCES[name], 1.0, with_grad=True)
    d2, g2, _ = divergence_kernel(s.clone(), t.clone(), DIVERGENCES["reverse_kl"], 0.5, with_grad=True)
    torch.testing.assert_close(d1, d2, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(g1, g2, atol=0, rtol=0, equal_nan=True)


def test_stats_pass_of_bf16_logits_equals_that_of_their_float32_values():
    g = torch.Generator().manual_seed(5)
    s, t = (4 * torch.randn(9, 2000, generator=g)).bfloat16(), (4 * torch.randn(9, 2000, generator=g)).bfloat16()
    low, high = stats_pass(s, t, 4), stats_pass(s.float(), t.float(), 4)
    for a, b in zip(low, high):
        for x, y in zip(a[:4], b[:4]):
            assert torch.equal(x, y)


def test_minus_inf_rows_take_exactly_the_log_probability_form():
    s, t = extreme_rows(v=700, seed=6)
    rows, _ = chunk_stats(s.clone(), t.clone(), 0)
    safe = row_stats(log_probs_(s[6:9].clone(), t[6:9].clone(), False, False))
    for got, want in zip(rows[:4], safe):
        assert torch.equal(got[6:9], want)
