"""Per-token statistics: the two TIP axes and their companions (SPEC §2).

One chunked pass over a student's and a teacher's logits yields, for every
response position t:

    h_t        student entropy / log V              (normalised, in [0, 1])
    delta_t    KL(P_S || P_T)                        (reverse KL, nats)
    delta_fwd  KL(P_T || P_S)                        (forward KL, nats)
    h_T        teacher entropy / log V              (normalised, in [0, 1])

`token_stats` forms them from logits, always in float32 whatever the autocast
setting. A pass that forms the same four sums elsewhere (a fused loss kernel)
hands them, in nats, to `stats_from_nats`: the one place where entropies are
divided by log V and every value is clamped to its exact bounds.

Selectors, the taxonomy and the token dump only read a `TokenStats`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch


@dataclass
class TokenStats:
    """Statistics of N response tokens, one row per token.

    entropy            (N,) float32  normalised student entropy h = H(P_S) / log V, in [0, 1]
    divergence         (N,) float32  reverse KL(P_S || P_T), nats
    forward_divergence (N,) float32  forward KL(P_T || P_S), nats
    teacher_entropy    (N,) float32  normalised teacher entropy H(P_T) / log V, in [0, 1]
    sequence_ids       (N,) long     which rollout each token belongs to
    student_top_ids    (N, k) long   optional: the student's k most likely token ids, most likely first
    student_top_probs  (N, k) float32 optional: their probabilities
    teacher_top_ids    (N, k) long   optional: the same for the teacher
    teacher_top_probs  (N, k) float32 optional
    """

    entropy: torch.Tensor
    divergence: torch.Tensor
    forward_divergence: torch.Tensor
    teacher_entropy: torch.Tensor
    sequence_ids: torch.Tensor
    student_top_ids: torch.Tensor | None = None
    student_top_probs: torch.Tensor | None = None
    teacher_top_ids: torch.Tensor | None = None
    teacher_top_probs: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.entropy.shape[0]

    @property
    def has_top(self) -> bool:
        return self.student_top_ids is not None

    @classmethod
    def cat(cls, parts: list["TokenStats"]) -> "TokenStats":
        """Concatenate along the token axis (e.g. the per-chunk stats of one micro-batch).

        Top-k fields survive only if every non-empty part has them; 0-row parts are
        skipped (their top-k width may differ); an empty list gives 0 rows.
        """
        parts = list(parts)
        if not parts:
            return empty_stats()
        nonempty = [p for p in parts if len(p) > 0]
        if len(nonempty) <= 1:
            return nonempty[0] if nonempty else parts[0]
        parts = nonempty
        with_top = [p.has_top for p in parts]
        if any(with_top) and not all(with_top):
            raise ValueError("TokenStats.cat: some parts have top-k ids and some do not; compute them all with the same topk")
        if all(with_top) and len({p.student_top_ids.shape[1] for p in parts}) > 1:
            raise ValueError("TokenStats.cat: parts have different top-k widths; compute them all with the same topk")
        values = {}
        for f in fields(cls):
            column = [getattr(p, f.name) for p in parts]
            values[f.name] = None if column[0] is None else torch.cat(column)
        return cls(**values)

    def subset(self, index: torch.Tensor) -> "TokenStats":
        """Rows `index` ((n,) long or (N,) bool) as a new TokenStats."""
        return TokenStats(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index] for f in fields(self)})

    def to(self, device) -> "TokenStats":
        return TokenStats(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device) for f in fields(self)})


def empty_stats(device=None, topk: int = 0) -> TokenStats:
    """A TokenStats with 0 rows (topk > 0 gives (0, topk) top-k fields)."""
    f32 = torch.zeros(0, dtype=torch.float32, device=device)
    top = {}
    if topk > 0:
        ids = torch.zeros(0, topk, dtype=torch.long, device=device)
        probs = torch.zeros(0, topk, dtype=torch.float32, device=device)
        top = dict(student_top_ids=ids, student_top_probs=probs, teacher_top_ids=ids.clone(), teacher_top_probs=probs.clone())
    return TokenStats(f32, f32.clone(), f32.clone(), f32.clone(), torch.zeros(0, dtype=torch.long, device=device), **top)


def stats_from_nats(
    student_entropy: torch.Tensor,
    teacher_entropy: torch.Tensor,
    reverse_kl: torch.Tensor,
    forward_kl: torch.Tensor,
    sequence_ids: torch.Tensor,
    vocab: int,
    *,
    student_top_ids: torch.Tensor | None = None,
    student_top_probs: torch.Tensor | None = None,
    teacher_top_ids: torch.Tensor | None = None,
    teacher_top_probs: torch.Tensor | None = None,
) -> TokenStats:
    """A TokenStats from the four per-token sums in nats, normalised and clamped.

    student_entropy, teacher_entropy  (N,)  H(P_S), H(P_T) in nats over V = vocab columns
    reverse_kl, forward_kl            (N,)  KL(P_S || P_T), KL(P_T || P_S) in nats
    sequence_ids                      (N,)  rollout index of each row
    vocab: V, the number of columns both softmaxes ran over; entropies are
    divided by log V (by 1 when V = 1, where every entropy is 0 anyway).
    The top-k fields, (N, k) each, pass through unchanged.

    Rounding can push a normalised entropy a hair past 1 and a KL a hair below
    0; both bounds are exact, so the results are clamped to [0, 1] and [0, inf).
    NaN stays NaN (the caller decides what a broken row means). The inputs are
    not modified; the results are float32 on student_entropy's device.
    """
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise ValueError(f"stats_from_nats: vocab must be a positive int, got {vocab!r}")
    n = student_entropy.shape[0]
    for label, t in (("teacher_entropy", teacher_entropy), ("reverse_kl", reverse_kl), ("forward_kl", forward_kl),
                     ("sequence_ids", sequence_ids)):
        if tuple(t.shape) != (n,):
            raise ValueError(f"stats_from_nats: {label} must have shape ({n},), got {tuple(t.shape)}")
    log_vocab = math.log(vocab) if vocab > 1 else 1.0
    device = student_entropy.device
    return TokenStats(
        entropy=(student_entropy.float() / log_vocab).clamp(0.0, 1.0),
        divergence=reverse_kl.float().clamp(min=0.0),
        forward_divergence=forward_kl.float().clamp(min=0.0),
        teacher_entropy=(teacher_entropy.float() / log_vocab).clamp(0.0, 1.0),
        sequence_ids=sequence_ids.to(device).long(),
        student_top_ids=student_top_ids,
        student_top_probs=student_top_probs,
        teacher_top_ids=teacher_top_ids,
        teacher_top_probs=teacher_top_probs,
    )


def _log_probs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, p) of the softmax over the last axis of float32 logits x (n, V), both new tensors.

    Not torch.log_softmax: on CPU its float32 normaliser is off by up to ~1e-5
    at V = 152k, an error every entropy and KL inherits (~3e-5 nats). Shifting
    by the row maximum, summing exp once and dividing keeps them within ~2e-6.
    A -inf logit gives p = 0 and log p = -inf.
    """
    shifted = x - x.amax(dim=-1, keepdim=True)
    p = shifted.exp()
    z = p.sum(dim=-1, keepdim=True)
    return shifted.sub_(z.log()), p.div_(z)


def _plogq_sum(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Row sums of p * log_q, where p = 0 contributes 0 (also where log_q is -inf or NaN there)."""
    return torch.where(p > 0, p * log_q, 0.0).sum(-1)


@torch.no_grad()
def token_stats(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    sequence_ids: torch.Tensor,
    chunk_size: int,
    topk: int = 0,
) -> TokenStats:
    """Entropies and both KL directions of N token positions in one chunked no-grad pass.

    student_logits (N, V_S), teacher_logits (N, V_T): any float dtype, any device.
    Only the first V = min(V_S, V_T) columns are compared (embedding matrices are
    often padded to different sizes, SPEC §1); both softmaxes are over those V
    columns and entropies are divided by log V.
    sequence_ids (N,): rollout index of each row.
    chunk_size: rows per chunk; each chunk is upcast to float32 on its own, so the
    largest float32 temporaries are (chunk_size, V), never (N, V).
    topk > 0 also records both sides' top-min(topk, V) token ids and probabilities.

    Everything runs in float32 with autocast switched off, so a bf16 autocast
    region around the call changes no bit of the result (SPEC §3 exactness).
    Every sum is a row reduction of products, 0 * log 0 counts as 0, and a
    token that both sides give probability 0 (-inf logits on both) adds
    nothing to either KL. Returns float32 stats on the logits' device (see
    `stats_from_nats` for the normalisation and clamping).
    """
    if student_logits.dim() != 2 or teacher_logits.dim() != 2:
        raise ValueError(f"token_stats: logits must be 2-D (N, V); got student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}")
    n = student_logits.shape[0]
    if teacher_logits.shape[0] != n:
        raise ValueError(f"token_stats: student has {n} rows but teacher has {teacher_logits.shape[0]}")
    sequence_ids = torch.as_tensor(sequence_ids, device=student_logits.device)
    if sequence_ids.shape != (n,):
        raise ValueError(f"token_stats: sequence_ids must have shape ({n},), got {tuple(sequence_ids.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"token_stats: chunk_size must be a positive int, got {chunk_size!r}")
    if topk < 0:
        raise ValueError(f"token_stats: topk must be >= 0, got {topk}")
    if not (student_logits.is_floating_point() and teacher_logits.is_floating_point()):
        raise ValueError("token_stats: logits must be floating point")
    vocab = min(student_logits.shape[1], teacher_logits.shape[1])
    if vocab < 1:
        raise ValueError("token_stats: logits have no vocabulary columns")
    k = min(topk, vocab)
    device = student_logits.device

    parts = []
    with torch.autocast(device_type=device.type, enabled=False):
        for start in range(0, n, chunk_size):
            s = student_logits[start:start + chunk_size, :vocab].to(device=device, dtype=torch.float32)
            t = teacher_logits[start:start + chunk_size, :vocab].to(device=device, dtype=torch.float32)
            log_ps, ps = _log_probs(s)
            log_pt, pt = _log_probs(t)
            del s, t
            entropy = -_plogq_sum(ps, log_ps)
            teacher_entropy = -_plogq_sum(pt, log_pt)
            # per-element log ratios, not a difference of two ~log V sums: a small KL keeps its digits.
            # Where both sides give -inf the ratio is NaN, but there p = 0 and _plogq_sum drops it.
            diff = log_ps - log_pt
            reverse = _plogq_sum(ps, diff)
            forward = -_plogq_sum(pt, diff)
            del diff
            top = {}
            if k > 0:
                top_ps, top_s = ps.topk(k, dim=-1)
                top_pt, top_t = pt.topk(k, dim=-1)
                top = dict(student_top_ids=top_s, student_top_probs=top_ps, teacher_top_ids=top_t, teacher_top_probs=top_pt)
            parts.append(stats_from_nats(entropy, teacher_entropy, reverse, forward,
                                         sequence_ids[start:start + chunk_size], vocab, **top))
    if not parts:
        return empty_stats(device=device, topk=k)
    return TokenStats.cat(parts)
