"""The TIP taxonomy: four quadrants of the (entropy, divergence) plane (SPEC §4).

    Q1  high h, high delta   uncertain, teacher disagrees
    Q2  high h, low delta    uncertain, teacher agrees
    Q3  low h,  high delta   overconfident: the entropy blind spot
    Q4  low h,  low delta    solved

"High" means >= the threshold, so with the default median thresholds the
median token itself counts as high. h is normalised student entropy and delta
the reverse KL(P_S || P_T) in nats.
"""

from __future__ import annotations

import torch

from tip.selectors import Selection
from tip.stats import TokenStats

MODES = ("quantile", "absolute")


def thresholds(
    stats: TokenStats,
    mode: str = "quantile",
    entropy_threshold: float = 0.5,
    divergence_threshold: float = 0.5,
) -> tuple[float, float]:
    """The (entropy, divergence) cut points actually used.

    mode "quantile": the given quantiles (in [0, 1], linear interpolation) of h
    and delta over the given tokens; "absolute": the values themselves
    (normalised entropy, nats). With 0 tokens a quantile threshold is 0.
    """
    if mode not in MODES:
        raise ValueError(f"unknown taxonomy mode '{mode}' (known: {', '.join(MODES)})")
    if mode == "absolute":
        return float(entropy_threshold), float(divergence_threshold)
    for label, q in (("entropy_threshold", entropy_threshold), ("divergence_threshold", divergence_threshold)):
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"{label} is a quantile in quantile mode and must be in [0, 1], got {q}")
    if len(stats) == 0:
        return 0.0, 0.0
    h = torch.quantile(stats.entropy.float(), float(entropy_threshold))
    d = torch.quantile(stats.divergence.float(), float(divergence_threshold))
    return float(h), float(d)


def quadrants(
    stats: TokenStats,
    mode: str = "quantile",
    entropy_threshold: float = 0.5,
    divergence_threshold: float = 0.5,
) -> torch.Tensor:
    """(N,) long quadrant label 1..4 of every token (see the module docstring)."""
    h_cut, d_cut = thresholds(stats, mode, entropy_threshold, divergence_threshold)
    high_h = stats.entropy >= h_cut
    high_d = stats.divergence >= d_cut
    # Q1 = 1, Q2 = 2, Q3 = 3, Q4 = 4
    return 1 + (~high_d).long() + 2 * (~high_h).long()


def _mean_std(x: torch.Tensor) -> tuple[float, float]:
    if x.numel() == 0:
        return 0.0, 0.0
    x = x.float()
    # population std: defined (0) for a single token, where the sample std is NaN
    return float(x.mean()), float(x.std(correction=0))


def diagnostics(
    stats: TokenStats,
    selection: Selection | None,
    mode: str = "quantile",
    entropy_threshold: float = 0.5,
    divergence_threshold: float = 0.5,
) -> dict[str, float]:
    """Per-step taxonomy metrics under `tip/` keys; zeros (never NaN) for 0 tokens.

    tip/q{i}_share        share of all tokens in quadrant i
    tip/kept_q{i}_share   share of the kept tokens in quadrant i (0 if none kept)
    tip/kept_fraction, tip/num_tokens, tip/num_kept
    tip/{entropy,divergence,teacher_entropy}_{mean,std}, tip/forward_divergence_mean
    tip/entropy_threshold, tip/divergence_threshold   the cut points used (for the plots)
    selection None counts every token as kept.
    """
    n = len(stats)
    h_cut, d_cut = thresholds(stats, mode, entropy_threshold, divergence_threshold)
    quad = quadrants(stats, "absolute", h_cut, d_cut)
    kept = torch.ones(n, dtype=torch.bool, device=quad.device) if selection is None else selection.mask.to(quad.device)
    if kept.shape[0] != n:
        raise ValueError(f"diagnostics: selection has {kept.shape[0]} tokens but stats have {n}")
    num_kept = int(kept.sum())
    out: dict[str, float] = {}
    for q in range(1, 5):
        in_q = quad == q
        out[f"tip/q{q}_share"] = float(in_q.sum()) / n if n else 0.0
        out[f"tip/kept_q{q}_share"] = float((in_q & kept).sum()) / num_kept if num_kept else 0.0
    out["tip/kept_fraction"] = num_kept / n if n else 0.0
    out["tip/entropy_mean"], out["tip/entropy_std"] = _mean_std(stats.entropy)
    out["tip/divergence_mean"], out["tip/divergence_std"] = _mean_std(stats.divergence)
    out["tip/forward_divergence_mean"], _ = _mean_std(stats.forward_divergence)
    out["tip/teacher_entropy_mean"], out["tip/teacher_entropy_std"] = _mean_std(stats.teacher_entropy)
    out["tip/entropy_threshold"] = h_cut
    out["tip/divergence_threshold"] = d_cut
    out["tip/num_tokens"] = float(n)
    out["tip/num_kept"] = float(num_kept)
    return out
