"""Per-token statistics: the two TIP axes and their companions (SPEC §2).

One chunked pass over a student's and a teacher's logits yields, for every
response position t:

    h_t        student entropy / log V              (normalised, in [0, 1])
    delta_t    KL(P_S || P_T)                        (reverse KL, nats)
    delta_fwd  KL(P_T || P_S)                        (forward KL, nats)
    h_T        teacher entropy / log V              (normalised, in [0, 1])

The caller's chunked pass over the logits (in opd: `opd.losses.stats_pass`,
float32 whatever the autocast setting) forms the four sums in nats and hands
them to `stats_from_nats`: the one place where entropies are divided by log V
and every value is clamped to its exact bounds.

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
