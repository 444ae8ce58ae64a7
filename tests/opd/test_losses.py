"""Chunked divergences against a naive float64 full-tensor computation."""

import math

import pytest
import torch

from opd.losses import (DIVERGENCES, ChunkBuffers, chunk_stats, divergence_kernel, fused_head_divergence, log_probs_,
                        row_stats, stats_pass, token_divergence)

CASES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.0), ("jsd", 1.0),
         ("skew_reverse_kl", 0.3), ("skew_reverse_kl", 1.0)]


def naive(s, t, kind, beta):
    v = min(s.shape[1], t.shape[1])
    p, q = s[:, :v].double().softmax(-1), t[:, :v].double().softmax(-1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if kind == "skew_reverse_kl":
        return kl(p, beta * q + (1 - beta) * p)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return kl(p, q)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return kl(q, p)
    m = beta * q + (1 - beta) * p
    return beta * kl(q, m) + (1 - beta) * kl(p, m)


@pytest.mark.parametrize("kind,beta", CASES)
@pytest.mark.parametrize("teacher_vocab", [50, 44])  # 44: teacher embedding padded differently
def test_chunked_matches_naive_values_and_gradients(kind, beta, teacher_vocab):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(37, 50, generator=g, requires_grad=True)
    t = 2 * torch.randn(37, teacher_vocab, generator=g)
    w = torch.rand(37, generator=g)
    d = token_divergence(s, t, kind, beta, chunk_size=8)
    (d * w).sum().backward()
    s_ref = s.detach().clone().requires_grad_()
    d_ref = naive(s_ref, t, kind, beta)
    (d_ref * w.double()).sum().backward()
    assert d.dtype == torch.float32 and d.shape == (37,)
    torch.testing.assert_close(d.double(), d_ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(s.grad, s_ref.grad, atol=1e-6, rtol=1e-5)
    if teacher_vocab < 50:  # columns the teacher does not have get no gradient
        assert torch.all(s.grad[:, teacher_vocab:] == 0)


@pytest.mark.parametrize("kind,beta", CASES)
def test_identical_distributions_have_zero_divergence(kind, beta):
    s = torch.randn(20, 30)
    d = token_divergence(s, s.clone(), kind, beta, chunk_size=7)
    assert torch.all(d.abs() < 1e-6)


def test_jsd_end_points_are_forward_and_reverse_kl():
    s, t = torch.randn(10, 16), torch.randn(10, 16)
    torch.testing.assert_close(token_divergence(s, t, "jsd", 0.0, 4), token_divergence(s, t, "forward_kl", 0.5, 4))
    torch.testing.assert_close(token_divergence(s, t, "jsd", 1.0, 4), token_divergence(s, t, "reverse_kl", 0.5, 4))
    mid = token_divergence(s, t, "jsd", 0.5, 4)
    assert torch.all(mid <= torch.log(torch.tensor(2.0)) + 1e-6)  # symmetric JSD is bounded by log 2


def test_teacher_never_receives_gradient():
    s = torch.randn(6, 12, requires_grad=True)
    t = torch.randn(6, 12, requires_grad=True)
    token_divergence(s, t, "reverse_kl", 0.5, 4).sum().backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("kind,beta", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_equals_logits_path(kind, beta, dtype):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(29, 16, generator=g).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(50, 16, generator=g)).to(dtype).requires_grad_()
    th, tw = torch.randn(29, 8, generator=g).to(dtype), torch.randn(45, 8, generator=g).to(dtype)
    weights = torch.rand(29, generator=g)
    total = fused_head_divergence(h, w, th, tw, weights, kind, beta, chunk_size=6)
    total.backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = (token_divergence(h2 @ w2.T, th @ tw.T, kind, beta, chunk_size=11) * weights).sum()
    ref.backward()
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(total, ref, **tol)
    torch.testing.assert_close(h.grad.float(), h2.grad.float(), **tol)
    torch.testing.assert_close(w.grad.float(), w2.grad.float(), **tol)
    assert w.grad.dtype == dtype


def test_fused_with_no_rows_is_zero_and_differentiable():
    h = torch.randn(0, 4, requires_grad=True)
    w = torch.randn(10, 4, requires_grad=True)
    total = fused_head_divergence(h, w, torch.randn(0, 4), torch.randn(10, 4), torch.ones(0), "reverse_kl", 0.5, 8)
    total.backward()
    assert float(total.detach()) == 0.0 and torch.all(w.grad == 0)


def test_kernel_row_stats_equal_the_stats_pass_on_peaked_and_flat_rows():
    """The fused path's stats-free selectors read these; they must match the stats pass they replace."""
    g = torch.Generator().manual_seed(4)
    v = 5000
    s = torch.randn(64, v, generator=g) * torch.linspace(0.1, 12.0, 64)[:, None]  # flat to very peaked rows
    t = torch.randn(64, v, generator=g) * 4.0
    _, _, rows = divergence_kernel(s.clone(), t.clone(), DIVERGENCES["reverse_kl"], 0.5, with_grad=True, with_stats=True)
    (ref,) = stats_pass(s, t, 64)
    for got, want in zip(rows[:4], ref[:4]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_stat_sums_equal_the_log_probability_form_and_minus_inf_rows_take_it():
    """chunk_stats' fast sums (one exp per side, no log-probabilities) against row_stats, the log-probability
    form: close on flat to peaked rows, and exactly it on rows with -inf logits (the rows it redoes)."""
    g = torch.Generator().manual_seed(5)
    v = 3000
    s = torch.randn(32, v, generator=g) * torch.linspace(0.1, 12.0, 32)[:, None]
    t = s + torch.randn(32, v, generator=g) * torch.linspace(0.01, 3.0, 32)[:, None]
    s[3, [5, 9]], t[3, [5, 9]] = -math.inf, -math.inf  # both sides rule the same ids out
    s[7, 11] = -math.inf  # only the student
    t[8, 12] = -math.inf  # only the teacher: KL(q||p) finite, KL(p||q) infinite
    fast, _ = chunk_stats(s.clone(), t.clone(), 0)
    safe = row_stats(log_probs_(s.clone(), t.clone(), False, False))
    normal = [i for i in range(32) if i not in (3, 7, 8)]
    for got, want in zip(fast[:4], safe):
        torch.testing.assert_close(got[normal], want[normal], atol=2e-6, rtol=1e-5)
        assert torch.equal(got[[3, 7, 8]], want[[3, 7, 8]])
    assert fast.reverse_kl[8] == math.inf and math.isfinite(fast.forward_kl[8])


@pytest.mark.parametrize("kind,beta", CASES)
def test_kernel_value_and_gradient_do_not_change_with_stats_or_reused_buffers(kind, beta):
    """The statistics route into the loss (ShiftedChunk.log_probs, normalisers summed by blocks) gives what
    log_probs_ gives to float32 rounding, and a pass's reused ChunkBuffers give what fresh tensors give."""
    g = torch.Generator().manual_seed(6)
    s, t = 3 * torch.randn(10, 70, generator=g), 3 * torch.randn(10, 70, generator=g)
    plain_d, plain_g, _ = divergence_kernel(s.clone(), t.clone(), DIVERGENCES[kind], beta, with_grad=True)
    buffers = ChunkBuffers(16, 70, s.device)
    buffers("p", 16).fill_(7.0), buffers("q", 16).fill_(-3.0)  # whatever an earlier chunk left
    d, grad, rows = divergence_kernel(s.clone(), t.clone(), DIVERGENCES[kind], beta, with_grad=True,
                                      with_stats=True, buffers=buffers)
    torch.testing.assert_close(d, plain_d, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, plain_g, atol=1e-7, rtol=1e-5)
    assert rows is not None
    h, w = torch.randn(23, 8, generator=g), torch.randn(70, 8, generator=g)
    th, tw = torch.randn(23, 8, generator=g), torch.randn(70, 8, generator=g)
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    fused_head_divergence(h1, w, th, tw, torch.ones(23), kind, beta, 5).backward()  # 5 chunks, buffers reused
    fused_head_divergence(h2, w, th, tw, torch.ones(23), kind, beta, 23).backward()  # one chunk
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-6, rtol=1e-5)


def test_head_logits_follow_autograd_for_a_trainable_head():
    """Outside no_grad with a head that requires grad (an evaluation's or a test's log-probs): the product is an
    ordinary autograd op, equal to h @ w.T (a regression: an `out=` product refused autograd)."""
    from opd.engine import sampled_logprobs
    from opd.losses import head_logits

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(5, 8, generator=g), torch.randn(11, 8, generator=g, requires_grad=True)
    logits = head_logits(h, w, 4)
    torch.testing.assert_close(logits, h @ w.T)
    tokens = torch.tensor([0, 3, 10, 7, 1])
    lp = sampled_logprobs(h, w, tokens, 2)
    torch.testing.assert_close(lp, torch.log_softmax(h @ w.T, -1).gather(1, tokens[:, None])[:, 0])
    lp.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
