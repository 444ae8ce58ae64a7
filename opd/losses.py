"""Per-token divergences between student and teacher, exact over the vocabulary.

Everything here works chunk by chunk in float32, so an (N, V) float32 tensor
never exists, and keeps nothing per chunk for backward: gradients are
recomputed from the inputs chunk by chunk (analytic softmax gradients).
Float32 whatever the autocast state: autocast is off inside the kernels (a bf16
matmul would round the logits and the sums), row reductions are elementwise
products and sums, and every KL is one sum of p (log p - log q) terms, never a
difference of two large sums.

Divergences (spec §1), with P_S = softmax(student), P_T = softmax(teacher):
  reverse_kl  KL(P_S || P_T)
  forward_kl  KL(P_T || P_S)
  jsd         beta*KL(P_T || M) + (1-beta)*KL(P_S || M),  M = beta*P_T + (1-beta)*P_S,
              with beta=0 -> forward KL and beta=1 -> reverse KL (normalised limits).
Only the first min(V_S, V_T) logits are compared (padded embedding rows).
"""

from __future__ import annotations

import math

import torch

LOSS_TYPES = ("reverse_kl", "forward_kl", "jsd")


def _resolve(loss_type: str, beta: float) -> str:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r} (known: {', '.join(LOSS_TYPES)})")
    if loss_type == "jsd" and beta <= 0.0:
        return "forward_kl"
    if loss_type == "jsd" and beta >= 1.0:
        return "reverse_kl"
    return loss_type


def _no_autocast(x: torch.Tensor):
    """A context in which matmuls on x's device run in x's own dtype (bf16 autocast would lower them)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _zero_nan_(x: torch.Tensor) -> torch.Tensor:
    """NaN -> 0 in place, infinities kept. Applied to products w * x with w a probability: a NaN there is
    0 * (+-inf) or 0 * NaN, i.e. a token to which a side gives probability 0 (0 log 0 = 0). Rows whose
    logits are themselves non-finite are made NaN again by the callers' row guard."""
    return x.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)


def _wsum(w: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """sum_v w * x per row (C,), the product formed in `out` (C, V) (which may be x itself).

    An elementwise product and a sum, not a matmul: float32 whatever the autocast state, and the
    reduction's accumulation is as accurate as torch's sum (pairwise), also at V ~ 150k."""
    return _zero_nan_(torch.mul(w, x, out=out)).sum(-1)


def log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dimension, in x's own storage.

    The row max is subtracted first and log sum exp(x - max) (a few nats) last, so no log-probability
    passes through a logsumexp of tens of nats, whose float32 rounding (~1e-6) would shift the whole row."""
    with _no_autocast(x):
        x.sub_(x.amax(-1, keepdim=True))
        return x.sub_(torch.logsumexp(x, dim=-1, keepdim=True))


def _log_probs_(x: torch.Tensor, with_probs: bool):
    """log_softmax_ of x (C, V) in place, with softmax(x) (new storage, None unless with_probs) and a row
    guard (C,): 0, or NaN for a row with NaN, +inf or only -inf logits."""
    x.sub_(x.amax(-1, keepdim=True))
    e = x.exp()
    z = e.sum(-1, keepdim=True)
    x.sub_(z.log())
    guard = z.view(-1) * 0.0
    return x, (e.div_(z) if with_probs else None), guard


def row_stats(ls: torch.Tensor, lt: torch.Tensor, p: torch.Tensor | None = None,
              q: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(student entropy, teacher entropy, KL(p||q), KL(q||p)) per row, in nats, float32.

    ls, lt (C, V): float32 log-probabilities (-inf allowed where a probability is 0); p = exp(ls)
    and q = exp(lt) may be passed in. Nothing passed in is modified. Each statistic is one sum of
    p-weighted terms (KL as sum p (log p - log q), never a difference of two large sums), so a small
    divergence keeps its relative precision. Temporaries: one (C, V) scratch, plus p and q when not given.
    """
    with _no_autocast(ls):
        p = ls.exp() if p is None else p
        q = lt.exp() if q is None else q
        guard = (p.sum(-1) + q.sum(-1)) * 0.0  # NaN rows stay NaN (the sums below zero their NaN terms)
        buf = torch.empty_like(ls)
        hs = -_wsum(p, ls, buf)
        ht = -_wsum(q, lt, buf)
        rev = _wsum(p, torch.sub(ls, lt, out=buf), buf)
        fwd = _wsum(q, torch.sub(lt, ls, out=buf), buf)
        return hs + guard, ht + guard, rev + guard, fwd + guard


def divergence_kernel(s: torch.Tensor, t: torch.Tensor, loss_type: str, beta: float, with_grad: bool,
                      with_stats: bool = False):
    """Divergence of one chunk and, optionally, its gradient w.r.t. the student logits.

    s, t: (C, V) float32 logits over the shared vocabulary. They are CONSUMED
    (overwritten in place, to keep the chunk's temporaries few): pass copies.
    Returns (D (C,) nats, dD/ds (C, V) or None, row_stats(...) or None), all float32
    whatever the autocast state. A logit of -inf on both sides at the same id contributes
    exactly 0 (value and gradient), as in the exact divergence.
    Temporaries: p and/or q, plus one (C, V) scratch when with_stats.
    """
    kind = _resolve(loss_type, beta)
    with _no_autocast(s):
        need_p = with_grad or with_stats or kind != "forward_kl"
        need_q = with_stats or kind != "reverse_kl"
        if need_p:  # the side without probabilities first: its exp temporary is gone before p exists
            lt, q, guard_t = _log_probs_(t, need_q)
            ls, p, guard_s = _log_probs_(s, True)
        else:
            ls, p, guard_s = _log_probs_(s, False)
            lt, q, guard_t = _log_probs_(t, True)
        guard = guard_s + guard_t
        stats = row_stats(ls, lt, p, q) if with_stats else None
        diff = torch.sub(ls, lt, out=lt)  # log p - log q, in lt's storage
        grad = None
        if kind == "reverse_kl":
            pd = _zero_nan_(diff.mul_(p))
            d = pd.sum(-1) + guard  # the guard before the gradient uses d: a broken row's gradient stays NaN
            if with_grad:  # p * ((log p - log q) - KL)
                grad = pd.addcmul_(p, d[:, None], value=-1.0)
        elif kind == "forward_kl":
            d = -_zero_nan_(diff.mul_(q)).sum(-1) + guard
            if with_grad:
                grad = p.sub_(q)
        else:  # jsd, 0 < beta < 1, from D = log p - log q without forming log m (never large minus large):
            #   log p - log m = -logaddexp(log(1-beta), log(beta) - D)
            #   log q - log m = -logaddexp(log(beta), log(1-beta) + D)
            log_b = torch.full((), math.log(beta), device=s.device)
            log_1mb = torch.full((), math.log1p(-beta), device=s.device)
            s_term = torch.logaddexp(torch.neg(diff, out=ls).add_(log_b), log_1mb, out=ls).neg_()
            t_term = torch.logaddexp(diff.add_(log_1mb), log_b, out=diff).neg_()
            d = beta * _zero_nan_(t_term.mul_(q)).sum(-1)
            ps = _zero_nan_(s_term.mul_(p))  # p (log p - log m)
            ps_sum = ps.sum(-1) + guard
            d = d + (1.0 - beta) * ps_sum
            if with_grad:  # dJSD/dp = (1-beta) log(p/m), through the softmax: p * (g - sum p g)
                grad = ps.addcmul_(p, ps_sum[:, None], value=-1.0).mul_(1.0 - beta)
        d = d.clamp_min(0.0)
    return d, grad, stats


class _ChunkedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, loss_type, beta, chunk_size):
        n = student_logits.shape[0]
        v = min(student_logits.shape[1], teacher_logits.shape[1])
        out = torch.empty(n, dtype=torch.float32, device=student_logits.device)
        for i in range(0, n, chunk_size):
            s = student_logits[i:i + chunk_size, :v].to(torch.float32, copy=True)
            t = teacher_logits[i:i + chunk_size, :v].to(torch.float32, copy=True)
            out[i:i + chunk_size], _, _ = divergence_kernel(s, t, loss_type, beta, with_grad=False)
        ctx.save_for_backward(student_logits, teacher_logits)
        ctx.config = (loss_type, beta, chunk_size, v)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        student_logits, teacher_logits = ctx.saved_tensors
        loss_type, beta, chunk_size, v = ctx.config
        grad = torch.zeros_like(student_logits)
        for i in range(0, student_logits.shape[0], chunk_size):
            s = student_logits[i:i + chunk_size, :v].to(torch.float32, copy=True)
            t = teacher_logits[i:i + chunk_size, :v].to(torch.float32, copy=True)
            _, g, _ = divergence_kernel(s, t, loss_type, beta, with_grad=True)
            grad[i:i + chunk_size, :v] = g.mul_(grad_out[i:i + chunk_size, None].float())
        return grad, None, None, None, None


def token_divergence(student_logits, teacher_logits, loss_type: str, beta: float, chunk_size: int):
    """Per-token divergence D_t, float32 (N,) nats, for logits (N, V_S) and (N, V_T) of any float dtype.

    Differentiable w.r.t. the student logits; the teacher side never receives
    gradients. This is what the loss averages over the kept tokens. Each chunk of
    `chunk_size` rows is upcast to float32 on its own; bf16 autocast does not reach the kernel.
    """
    kind = _resolve(loss_type, beta)
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"student has {student_logits.shape[0]} rows, teacher {teacher_logits.shape[0]}")
    return _ChunkedDivergence.apply(student_logits, teacher_logits.detach(), kind, beta, chunk_size)


def _slice_rows(chunk_size: int, vocab: int, width: int) -> int:
    """Vocabulary rows per float32 slice of a low-precision head: half a (chunk, V) float32 temporary."""
    return max(1, chunk_size * vocab // (2 * max(width, 1)))


def _head_logits(h: torch.Tensor, w: torch.Tensor, rows: int) -> torch.Tensor:
    """h (C, d) @ w.T -> (C, V) float32 logits, multiplied in float32 (autocast must be off).

    A float32 head is used as is; a bf16/fp16 one is upcast `rows` vocabulary rows at a time,
    so no float32 copy of the whole (V, d) matrix exists."""
    h = h.float()
    if w.dtype == torch.float32:
        return h @ w.T
    out = torch.empty(h.shape[0], w.shape[0], dtype=torch.float32, device=h.device)
    for j in range(0, w.shape[0], rows):
        torch.mm(h, w[j:j + rows].float().T, out=out[:, j:j + rows])
    return out


def head_logits(h: torch.Tensor, w: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """h (C, d) @ w.T -> (C, V) float32 logits, autocast off (the statistics' numbers, as the loss forms them)."""
    with _no_autocast(h):
        return _head_logits(h, w, _slice_rows(chunk_size, w.shape[0], h.shape[1]))


def top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely ids per row of float32 logits (C, V), most likely first, and their probabilities."""
    with _no_autocast(logits):
        values, ids = logits.topk(k, dim=-1)
        return ids, (values - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()


def _head_grad_hidden(g: torch.Tensor, w: torch.Tensor, rows: int) -> torch.Tensor:
    """g (C, V) float32 @ w (V, d) -> (C, d) float32, upcasting a low-precision w slice by slice."""
    if w.dtype == torch.float32:
        return g @ w
    out = torch.zeros(g.shape[0], w.shape[1], dtype=torch.float32, device=g.device)
    for j in range(0, w.shape[0], rows):
        out.addmm_(g[:, j:j + rows], w[j:j + rows].float())
    return out


class _FusedHeadDivergence(torch.autograd.Function):
    """sum_t w_t * D_t with the LM heads applied inside, chunk by chunk.

    The gradients are computed during the forward pass (the value is a scalar
    whose upstream gradient just scales them), so each chunk's logits exist
    only while that chunk is processed, and nothing of size (N, V) is kept.
    Head matmuls, kernel and gradient matmuls all run in float32 with autocast off.
    """

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, token_weights, loss_type, beta, chunk_size, observe,
                stats_out):
        n = hidden.shape[0]
        v = min(weight.shape[0], teacher_weight.shape[0])
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w_s, w_t = weight[:v], teacher_weight[:v]
        rows_s = _slice_rows(chunk_size, v, w_s.shape[1])
        rows_t = _slice_rows(chunk_size, v, w_t.shape[1])
        with _no_autocast(hidden):
            for i in range(0, n, chunk_size):
                h = hidden[i:i + chunk_size].float()
                s = _head_logits(h, w_s, rows_s)
                t = _head_logits(teacher_hidden[i:i + chunk_size], w_t, rows_t)
                if observe is not None:
                    observe(i, s, t)
                d, g, stats = divergence_kernel(s, t, loss_type, beta, with_grad=need_h or need_w,
                                                with_stats=stats_out is not None)
                del s, t  # consumed by the kernel
                if stats is not None:
                    stats_out.append(stats)
                tw = token_weights[i:i + chunk_size].float()
                total += (tw * d).sum()
                if g is not None:
                    g = g.mul_(tw[:, None])
                    if need_h:
                        grad_h[i:i + chunk_size] = _head_grad_hidden(g, w_s, rows_s)
                    if need_w:
                        grad_w[:v].addmm_(g.T, h)
        ctx.save_for_backward(grad_h if need_h else torch.empty(0), grad_w if need_w else torch.empty(0))
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = grad_w.mul_(grad_out).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None, None, None, None, None


def fused_head_divergence(hidden, weight, teacher_hidden, teacher_weight, token_weights, loss_type: str, beta: float,
                          chunk_size: int, observe=None, stats_out=None):
    """sum_t token_weights[t] * D_t, computing logits = hidden @ weight.T chunk by chunk.

    hidden (N, d_S) student final hidden states (with grad), weight (V_S, d_S) the
    student LM head (with grad), teacher_hidden (N, d_T) and teacher_weight (V_T, d_T)
    (no grad), token_weights (N,). Equals
    (token_weights * token_divergence(hidden @ weight.T, teacher_hidden @ teacher_weight.T, ...)).sum()
    in value and gradients, with the head matmuls in float32 (bf16 autocast or bf16 weights
    do not round the logits); memory is one chunk's (chunk, V) temporaries.
    `observe(start_row, s, t)`, if given, sees each chunk's float32 logits
    (C, V) of both sides, e.g. to compute token statistics without another pass.
    `stats_out`, if a list, receives each chunk's row_stats from the log-probabilities
    the loss computes anyway (the cheapest way to the kept tokens' statistics).
    """
    kind = _resolve(loss_type, beta)
    return _FusedHeadDivergence.apply(
        hidden, weight, teacher_hidden.detach(), teacher_weight.detach(), token_weights.detach(),
        kind, beta, chunk_size, observe, stats_out,
    )
