"""Per-token divergences between student and teacher, exact over the vocabulary.

Everything here works chunk by chunk in float32, so an (N, V) float32 tensor
never exists, and keeps nothing per chunk for backward: gradients are
recomputed from the inputs chunk by chunk (analytic softmax gradients).

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


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(C, V) x (C, V) -> (C,) row-wise dot product, as a batched matmul (no (C, V) temporary)."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).view(-1)


def log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dimension, in x's own storage."""
    return x.sub_(torch.logsumexp(x, dim=-1, keepdim=True))


def row_stats(ls: torch.Tensor, lt: torch.Tensor, p: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(student entropy, teacher entropy, KL(p||q), KL(q||p)) per row, in nats, from finite
    log-probabilities (C, V): two exponentials (p = exp(ls) may be passed in) and four row dot
    products, no other (C, V) temporary."""
    p = ls.exp() if p is None else p
    q = lt.exp()
    hs, ht = -_rowdot(p, ls), -_rowdot(q, lt)
    return hs, ht, -hs - _rowdot(p, lt), -ht - _rowdot(q, ls)


def divergence_kernel(s: torch.Tensor, t: torch.Tensor, loss_type: str, beta: float, with_grad: bool,
                      with_stats: bool = False):
    """Divergence of one chunk and, optionally, its gradient w.r.t. the student logits.

    s, t: (C, V) float32 logits over the shared vocabulary. They are CONSUMED
    (overwritten in place, to keep the chunk's temporaries few): pass copies.
    Returns (D (C,) nats, dD/ds (C, V) or None, row_stats(...) or None).
    """
    ls, lt = log_softmax_(s), log_softmax_(t)
    p = ls.exp() if with_stats or loss_type != "forward_kl" else None  # the statistics and most losses share it
    stats = row_stats(ls, lt, p) if with_stats else None
    if loss_type == "reverse_kl":
        diff = lt.neg_().add_(ls)  # log p - log q, in lt's storage
        d = _rowdot(p, diff)
        grad = diff.sub_(d[:, None]).mul_(p) if with_grad else None
    elif loss_type == "forward_kl":
        q = lt.exp()
        if with_grad and p is None:
            p = ls.exp()
        d = _rowdot(q, lt.sub_(ls))  # sum q (log q - log p)
        grad = p.sub_(q) if with_grad else None
    else:  # jsd with 0 < beta < 1
        q = lt.exp()
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        s_term = ls.sub_(lm)  # log p - log m
        d = beta * _rowdot(q, lt.sub_(lm)) + (1.0 - beta) * _rowdot(p, s_term)
        if with_grad:
            # d/dp_i of the JSD is (1-beta)*log(p_i/m_i); push it through the softmax.
            g = s_term.mul_(1.0 - beta)
            grad = g.sub_(_rowdot(p, g)[:, None]).mul_(p)
        else:
            grad = None
    return d.clamp_min(0.0), grad, stats


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
            grad[i:i + chunk_size, :v] = (g * grad_out[i:i + chunk_size, None]).to(grad.dtype)
        return grad, None, None, None, None


def token_divergence(student_logits, teacher_logits, loss_type="reverse_kl", beta=0.5, chunk_size=512):
    """Per-token divergence D_t, float32 (N,), for logits (N, V_S) and (N, V_T).

    Differentiable w.r.t. the student logits; the teacher side never receives
    gradients. This is what the loss averages over the kept tokens.
    """
    kind = _resolve(loss_type, beta)
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"student has {student_logits.shape[0]} rows, teacher {teacher_logits.shape[0]}")
    return _ChunkedDivergence.apply(student_logits, teacher_logits.detach(), kind, beta, chunk_size)


class _FusedHeadDivergence(torch.autograd.Function):
    """sum_t w_t * D_t with the LM heads applied inside, chunk by chunk.

    The gradients are computed during the forward pass (the value is a scalar
    whose upstream gradient just scales them), so each chunk's logits exist
    only while that chunk is processed, and nothing of size (N, V) is kept.
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
        for i in range(0, n, chunk_size):
            h = hidden[i:i + chunk_size]
            s = (h @ w_s.T).float()
            t = (teacher_hidden[i:i + chunk_size] @ w_t.T).float()
            if observe is not None:
                observe(i, s, t)
            d, g, stats = divergence_kernel(s, t, loss_type, beta, with_grad=need_h or need_w,
                                            with_stats=stats_out is not None)
            if stats is not None:
                stats_out.append(stats)
            tw = token_weights[i:i + chunk_size].float()
            total += (tw * d).sum()
            if g is not None:
                g = g.mul_(tw[:, None]).to(weight.dtype)
                if need_h:
                    grad_h[i:i + chunk_size] = g @ w_s
                if need_w:
                    if g.dtype == h.dtype == torch.float32:
                        grad_w[:v].addmm_(g.T, h)
                    else:
                        grad_w[:v] += (g.T @ h).float()
        ctx.save_for_backward(grad_h if need_h else torch.empty(0), grad_w if need_w else torch.empty(0))
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = grad_w.mul_(grad_out).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None, None, None, None, None


def fused_head_divergence(hidden, weight, teacher_hidden, teacher_weight, token_weights,
                          loss_type="reverse_kl", beta=0.5, chunk_size=512, observe=None, stats_out=None):
    """sum_t token_weights[t] * D_t, computing logits = hidden @ weight.T chunk by chunk.

    hidden (N, d_S) student final hidden states (with grad), weight (V_S, d_S) the
    student LM head (with grad), teacher_hidden (N, d_T) and teacher_weight (V_T, d_T)
    (no grad), token_weights (N,). Equals
    (token_weights * token_divergence(hidden @ weight.T, teacher_hidden @ teacher_weight.T)).sum()
    in value and gradients; memory is one chunk's (chunk, V) temporaries.
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
