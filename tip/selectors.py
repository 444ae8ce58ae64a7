"""Token selectors: which tokens enter the loss, and with what weight (SPEC §3).

`SELECTORS` is one flat registry filled by `@register("name")`. Every selector
has the same signature

    fn(stats: TokenStats, k: int, ctx: Context) -> Selection

and sees the tokens of ONE scope (a micro-batch, or one rollout): `stats` holds
those m > 0 tokens, `k = max(1, floor(ratio * m))` is how many a plain selector
keeps, and `ctx` carries normalisation, the random generator and the options.
`select` does the scoping, so a selector is a few lines and the training loop
never branches on a selector's name.

Loss over the kept set (SPEC Eq. 7):  (1 / denominator) * sum_{kept t} w_t * D_t,
where `denominator(...)` is computable from scope sizes alone.

Exactness (SPEC §3): scores are formed so that exact ties stay exact (a
normalised maximum is exactly 1, Soft-OR is 1 - (1 - h)(1 - d)), and every
top-k rule breaks ties by position (the lower row wins), so the same tokens
are kept however the rollouts are split into calls.

Running normalisation is two steps owned by the caller: `select` reads a
`RunningMinMax` and never changes it; after each optimiser update the caller
folds the update's global extremes into it once (`extrema`, then
`RunningMinMax.fold`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from tip.stats import TokenStats

SCOPES = ("microbatch", "sequence")
NORMALIZE = ("minmax", "running")
# Every option a selector may read. `select` and `denominator` need each of them and refuse any
# other key (a typo must not silently do nothing). Their values (and defaults) belong to the
# caller's configuration (opd: the tip section of the typed config), not to this package.
# `momentum` is validated here but read by the caller's RunningMinMax.fold.
OPTIONS = ("normalize", "momentum", "importance_weighting")
# the TokenStats columns a selector may min-max normalise (and `extrema` reports)
QUANTITIES = ("entropy", "divergence", "forward_divergence", "teacher_entropy")


@dataclass
class Selection:
    """mask (N,) bool: token enters the loss.  weights (N,) float32: its loss weight (0 where not kept)."""

    mask: torch.Tensor
    weights: torch.Tensor

    def __len__(self) -> int:
        return self.mask.shape[0]


@dataclass
class RunningMinMax:
    """Caller-owned min/max EMAs for `normalize="running"` (SPEC §3).

    lo, hi: {quantity name -> float}, e.g. {"entropy": 0.02}. Create one per run
    (`state = tip.RunningMinMax()`) and pass it to every `select` call, which
    normalises with the current lo/hi and clips to [0, 1] but never changes
    them: the state is frozen for the whole optimiser update. A quantity with
    no value yet (the very first update) is normalised per scope instead.

    After each optimiser update, fold the update's extremes in ONCE:

        ext = tip.extrema(stats of every micro-batch of the update)
        # across processes: min of the mins, max of the maxes
        state.fold(ext, momentum)

    so neither the EMA's pace nor the range depends on the micro-batch or the
    process count (under scope="sequence" neither does the selection). Save it
    with `state_dict()` to resume a run.
    """

    lo: dict[str, float] = field(default_factory=dict)
    hi: dict[str, float] = field(default_factory=dict)

    def fold(self, extrema: dict[str, tuple[float, float]], momentum: float) -> None:
        """One EMA step per quantity in `extrema` ({name: (min, max)}).

        lo <- momentum * lo + (1 - momentum) * min, the same for hi; a quantity
        seen for the first time starts at (min, max). Quantities absent from
        `extrema`, or given as (inf, -inf) (the identity of a min/max
        reduction: no token on any process), keep their values.
        """
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not (0.0 <= momentum <= 1.0):
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        for name, (lo, hi) in extrema.items():
            lo, hi = float(lo), float(hi)
            if lo == math.inf and hi == -math.inf:
                continue
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
                raise ValueError(f"RunningMinMax.fold: '{name}' needs finite min <= max, got ({lo}, {hi})")
            if name not in self.lo:
                self.lo[name], self.hi[name] = lo, hi
            else:
                self.lo[name] = momentum * self.lo[name] + (1.0 - momentum) * lo
                self.hi[name] = momentum * self.hi[name] + (1.0 - momentum) * hi

    def state_dict(self) -> dict:
        return {"lo": dict(self.lo), "hi": dict(self.hi)}

    def load_state_dict(self, state: dict) -> None:
        self.lo, self.hi = dict(state["lo"]), dict(state["hi"])


def extrema(stats: TokenStats) -> dict[str, tuple[float, float]]:
    """{quantity: (min, max)} over the given tokens, for `RunningMinMax.fold`.

    Quantities: entropy, divergence, forward_divergence, teacher_entropy.
    Non-finite values (a broken row, an infinite KL) are left out, so they
    cannot poison the running range; a quantity with no finite value, e.g. in
    0 tokens, is absent from the result.
    """
    out = {}
    for name in QUANTITIES:
        column = getattr(stats, name).float()
        column = column[torch.isfinite(column)]
        if column.numel():
            out[name] = (float(column.min()), float(column.max()))
    return out


@dataclass
class Context:
    """What a selector may use besides the scope's stats.

    norm(name, x): min-max normalised x (a (m,) slice of quantity `name` of this
    scope, name in QUANTITIES), per scope or with the running EMAs, in [0, 1];
    the scope's maximum (or anything at or above the running hi) maps to
    exactly 1.0, its minimum to exactly 0.0.
    generator: torch.Generator for random selectors (None = torch's global RNG).
    options: the caller's value of every OPTIONS name.
    """

    norm: Callable[[str, torch.Tensor], torch.Tensor]
    generator: torch.Generator | None
    options: dict


SELECTORS: dict[str, Callable[[TokenStats, int, Context], Selection]] = {}
# name -> options -> True when the selector's estimator averages over ALL tokens
# of a scope (its loss denominator is m rather than k)
_MEAN_OVER_ALL: dict[str, Callable[[dict], bool]] = {}
# names of selectors whose choice does not read the statistics (only sizes, the
# generator and sequence ids), so a caller may compute the statistics later
_STATS_FREE: set[str] = set()


def register(name: str, *, mean_over_all: bool | Callable[[dict], bool] = False, reads_stats: bool = True):
    """Decorator adding a selector to SELECTORS.

    mean_over_all: whether the loss divides by the scope size m instead of k
    (keep-everything selectors and unbiased importance-weighted estimators);
    a callable receives the options.
    reads_stats: False when the choice ignores the statistics' values (it may
    use sizes, sequence ids and the generator), so the training step can form
    the statistics of kept tokens during the loss pass instead of before it.
    """

    def add(fn):
        if name in SELECTORS:
            raise ValueError(f"selector '{name}' is already registered")
        SELECTORS[name] = fn
        if not reads_stats:
            _STATS_FREE.add(name)
        _MEAN_OVER_ALL[name] = mean_over_all if callable(mean_over_all) else (lambda options, v=bool(mean_over_all): v)
        return fn

    return add


# ----------------------------------------------------------------------------
# helpers


def keep_count(m: int, ratio: float) -> int:
    """Tokens a plain selector keeps from a scope of m: max(1, floor(ratio * m)), 0 when m = 0."""
    if m <= 0:
        return 0
    # ratio * m lands a hair under an integer for ratios like 0.7 * 10; do not lose a token to that
    return min(m, max(1, math.floor(ratio * m + 1e-9)))


def minmax(x: torch.Tensor, lo: float | torch.Tensor | None = None, hi: float | torch.Tensor | None = None) -> torch.Tensor:
    """(x - lo) / (hi - lo) clipped to [0, 1]; lo/hi default to x's min/max; all 0 when hi <= lo.

    x >= hi gives exactly 1.0 and x <= lo exactly 0.0, whatever the rounding of
    the division (and also for an infinite hi), so a scope's maximum always
    scores the same as any other scope's.
    """
    x = x.float()
    if x.numel() == 0:
        return x.clone()
    lo = x.min() if lo is None else torch.as_tensor(lo, dtype=torch.float32, device=x.device)
    hi = x.max() if hi is None else torch.as_tensor(hi, dtype=torch.float32, device=x.device)
    span = hi - lo
    if not bool(span > 0):
        return torch.zeros_like(x)
    scaled = ((x - lo) / span).clamp_(0.0, 1.0)
    # (hi - lo) / (hi - lo) is 1 in IEEE arithmetic, but not when the span overflows to inf
    return torch.where(x >= hi, 1.0, torch.where(x <= lo, 0.0, scaled))


def top_k(score: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """(m,) bool mask of the k largest (or smallest) scores; ties go to the lower index.

    Every top-k selector goes through here: a stable sort keeps tied scores in
    position order, so the rule holds on any device.
    """
    order = torch.sort(score, descending=largest, stable=True).indices
    mask = torch.zeros(score.shape[0], dtype=torch.bool, device=score.device)
    mask[order[:k]] = True
    return mask


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    # random draws happen where the generator lives, so a CPU generator drives GPU stats reproducibly
    return generator.device if generator is not None else device


def _uniform(m: int, generator, device) -> torch.Tensor:
    return torch.rand(m, generator=generator, device=_draw_device(generator, device)).to(device)


def _randperm(m: int, generator, device) -> torch.Tensor:
    return torch.randperm(m, generator=generator, device=_draw_device(generator, device)).to(device)


def _plain(mask: torch.Tensor) -> Selection:
    return Selection(mask, mask.float())


def scope_index(sequence_ids: torch.Tensor, scope: str) -> list[torch.Tensor]:
    """Row indices of each scope: one index of all N rows ("microbatch"), or one per distinct sequence id ("sequence")."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope '{scope}' (known: {', '.join(SCOPES)})")
    n = sequence_ids.shape[0]
    if scope == "microbatch":
        return [torch.arange(n, device=sequence_ids.device)] if n > 0 else []
    return [torch.nonzero(sequence_ids == sid).flatten() for sid in torch.unique(sequence_ids)]


def _check(name: str, ratio: float, options: dict) -> dict:
    if name not in SELECTORS:
        raise ValueError(f"unknown selector '{name}' (known: {', '.join(SELECTORS)})")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 < ratio <= 1.0):
        raise ValueError(f"selector ratio must be in (0, 1], got {ratio!r}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown selector option '{unknown[0]}' (known: {', '.join(OPTIONS)})")
    missing = [o for o in OPTIONS if o not in options]
    if missing:
        raise ValueError(f"selector options missing: {', '.join(missing)} (every one of {', '.join(OPTIONS)} is needed)")
    if options["normalize"] not in NORMALIZE:
        raise ValueError(f"unknown normalize '{options['normalize']}' (known: {', '.join(NORMALIZE)})")
    momentum = options["momentum"]
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not (0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    return options


# ----------------------------------------------------------------------------
# the entry points


def select(
    name: str,
    stats: TokenStats,
    ratio: float,
    *,
    scope: str,
    generator: torch.Generator | Callable[[tuple], torch.Generator] | None = None,
    state: RunningMinMax | None = None,
    **options,
) -> Selection:
    """Choose the tokens of `stats` (N rows) that enter the loss.

    name: a key of SELECTORS.  ratio: retention rho in (0, 1].
    scope: "microbatch" ranks all N tokens together; "sequence" ranks each
    rollout (distinct `stats.sequence_ids`) on its own. A scope of m > 0 tokens
    keeps k = max(1, floor(rho * m)) under plain selection.
    generator: drives the random selectors; the same seed gives the same selection.
    Either one generator for every scope, or a callable giving each scope its
    own: generator(("microbatch",)) or generator(("sequence", sequence_id)), so
    a rollout's draw does not depend on the rollouts that share the call.
    state: a RunningMinMax the caller keeps across calls; needed for
    normalize="running". Read, never changed (see RunningMinMax for when the
    caller folds new extremes in); a quantity it has no range for yet is
    normalised per scope.
    options: a value for every name in OPTIONS (normalize: "minmax" | "running",
    momentum in [0, 1], importance_weighting: bool); selectors ignore the ones
    that do not apply to them. momentum is only checked here: the caller passes
    it to RunningMinMax.fold.

    Under scope="sequence" the result for a row depends only on its own
    rollout's rows (and the state), so splitting rollouts across calls changes
    nothing for the deterministic selectors.

    Returns a Selection with (N,) mask and (N,) float32 weights.
    """
    options = _check(name, ratio, options)
    fn = SELECTORS[name]
    n = len(stats)
    device = stats.entropy.device
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    weights = torch.zeros(n, dtype=torch.float32, device=device)
    scopes = scope_index(stats.sequence_ids, scope)

    running = options["normalize"] == "running"
    if running and state is None:
        raise ValueError("normalize='running' needs state=RunningMinMax(), created once by the caller and passed to every call")

    def norm(quantity: str, x: torch.Tensor) -> torch.Tensor:
        if running and quantity in state.lo:
            return minmax(x, state.lo[quantity], state.hi[quantity])
        return minmax(x)

    whole = len(scopes) == 1 and scopes[0].numel() == n
    for index in scopes:
        m = int(index.numel())
        if m == 0:
            continue
        draw = generator
        if callable(generator):
            draw = generator(("microbatch",) if scope == "microbatch" else ("sequence", int(stats.sequence_ids[index[0]])))
        ctx = Context(norm=norm, generator=draw, options=options)
        part = fn(stats if whole else stats.subset(index), keep_count(m, ratio), ctx)
        mask[index] = part.mask.to(device=device, dtype=torch.bool)
        weights[index] = part.weights.to(device=device, dtype=torch.float32)
    return Selection(mask, weights)


def reads_stats(name: str) -> bool:
    """Whether selector `name` looks at the statistics' values to choose tokens."""
    if name not in SELECTORS:
        raise ValueError(f"unknown selector '{name}' (known: {', '.join(sorted(SELECTORS))})")
    return name not in _STATS_FREE


def denominator(name: str, scope_sizes: list[int], ratio: float, **options) -> int:
    """The loss normaliser, from scope sizes alone (before any statistics exist).

    scope_sizes: token count m of every scope the loss covers (e.g. all
    micro-batches of an optimiser step, or all rollouts under scope="sequence").
    Returns sum of k = max(1, floor(ratio * m)) for plain selection (adaptive_kl
    included), sum of m for selectors that average over all tokens (all,
    teacher_entropy, entropy_sample with importance_weighting). For plain
    selectors it equals select(...).mask.sum() over the same scopes.
    """
    options = _check(name, ratio, options)
    sizes = [int(m) for m in scope_sizes]
    if any(m < 0 for m in sizes):
        raise ValueError(f"scope sizes must be >= 0, got {min(sizes)}")
    if _MEAN_OVER_ALL[name](options):
        return sum(sizes)
    return sum(keep_count(m, ratio) for m in sizes)


# ----------------------------------------------------------------------------
# the selectors of the paper (SPEC §3 table)


@register("all", mean_over_all=True, reads_stats=False)
def select_all(stats: TokenStats, k: int, ctx: Context) -> Selection:
    """Every token, weight 1 (plain OPD)."""
    return _plain(torch.ones(len(stats), dtype=torch.bool, device=stats.entropy.device))


def _entropy_draw(h: torch.Tensor, k: int, generator) -> torch.Tensor:
    """(m,) bool: k of m tokens drawn without replacement, p proportional to h (see entropy_sample)."""
    m = h.shape[0]
    device = h.device
    positive = torch.nonzero(h > 0).flatten()
    if positive.numel() >= k:
        chosen = torch.multinomial(h.to(_draw_device(generator, device)), k, replacement=False,
                                   generator=generator).to(device)
    else:
        zero = torch.nonzero(h <= 0).flatten()
        fill = zero[_randperm(zero.numel(), generator, device)[: k - positive.numel()]]
        chosen = torch.cat([positive, fill])
    mask = torch.zeros(m, dtype=torch.bool, device=device)
    mask[chosen] = True
    return mask


@register("entropy_sample", mean_over_all=lambda options: bool(options["importance_weighting"]))
def entropy_sample(stats: TokenStats, k: int, ctx: Context) -> Selection:
    """k tokens sampled without replacement with p_t proportional to h_t (Table 3).

    If fewer than k tokens have h > 0, all of them are kept and the rest are drawn
    uniformly from the zero-entropy tokens; if all h are 0 the draw is uniform.

    importance_weighting=True: Poisson sampling instead (appendix A.2). Token t
    is kept independently with p_t = min(1, k * h_t / sum h) and weighted 1 / p_t,
    so (1/m) * sum_kept w_t D_t is an unbiased estimate of the all-token mean for
    every token with p_t > 0. The number kept is random (k in expectation,
    fewer where p_t caps at 1). A token of exactly zero entropy has p_t = 0 and
    is never kept; when every h is 0 all tokens get p_t = k / m.
    """
    h = stats.entropy.float()
    m = h.shape[0]
    device = h.device
    total = float(h.sum())
    if ctx.options["importance_weighting"]:
        p = (k * h / total).clamp_(max=1.0) if total > 0 else torch.full_like(h, k / m)
        mask = _uniform(m, ctx.generator, device) < p
        weights = torch.where(mask, 1.0 / p.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
        return Selection(mask, weights)

    return _plain(_entropy_draw(h, k, ctx.generator))


@register("entropy_topk")
def entropy_topk(stats: TokenStats, k: int, ctx: Context) -> Selection:
    """The k tokens of largest student entropy h_t (Table 5 "Ent."); ties go to the lower position."""
    return _plain(top_k(stats.entropy, k))


def soft_or_score(h_hat: torch.Tensor, d_hat: torch.Tensor) -> torch.Tensor:
    """s = h + d - h * d for normalised h, d in [0, 1] (Eq. 5), in [0, 1].

    Formed as 1 - (1 - h)(1 - d): a token with h = 1 or d = 1 scores exactly 1
    and s(a, b) == s(b, a) bit for bit, so the top-entropy and the
    top-divergence token tie exactly and the position rule decides between
    them (h + d - h * d can round either of them below 1).
    """
    return 1.0 - (1.0 - h_hat) * (1.0 - d_hat)


def _soft_or(stats: TokenStats, ctx: Context) -> torch.Tensor:
    return soft_or_score(ctx.norm("entropy", stats.entropy), ctx.norm("divergence", stats.divergence))


@register("soft_or")
def soft_or(stats: TokenStats, k: int, ctx: Context) -> Selection:
    """Top-k of the Soft-OR score of normalised entropy and reverse KL (Eq. 5-7, Table 5 "SO").

    s_t = 1 - (1 - h_hat_t)(1 - delta_hat_t), h_hat and delta_hat min-max
    normalised (per scope or running); ties go to the lower position.
    """
    return _plain(top_k(_soft_or(stats, ctx), k))


@register("soft_or_bottom")
def soft_or_bottom(stats: TokenStats, k: int, ctx: Context) -> Selection:
    """The k tokens of SMALLEST Soft-OR score (Table 6 "Bot.", the control); ties go to the lower position."""
    return _plain(top_k(_soft_or(stats, ctx), k, largest=False))


@register("q3_only")
def q3_only(stats: TokenStats, k: int, ctx: Context) -> Selection:
    """Top-k of w = forward KL * (1 - normalised h): confident tokens the teacher disagrees with (Table 4, 7).

    Forward KL in nats, h min-max normalised (per scope or running); ties go to the lower position.
    """
    score = stats.forward_divergence.float() * (1.0 - ctx.norm("entropy", stats.entropy))
    return _plain(top_k(score, k))


@register("random", reads_stats=False)
def random_tokens(stats: TokenStats, k: int, ctx: Context) -> Selection:
    """k tokens uniformly at random (control)."""
    m = len(stats)
    device = stats.entropy.device
    mask = torch.zeros(m, dtype=torch.bool, device=device)
    mask[_randperm(m, ctx.generator, device)[:k]] = True
    return _plain(mask)


@register("adaptive_kl")
def adaptive_kl(stats: TokenStats, k: int, ctx: Context) -> Selection:
    """Adaptive KL as our reading of the paper's Table 8 (appendix B.1).

    Keeps the k tokens `entropy_sample` keeps (p_t proportional to h_t, without
    importance weighting: the same draws for the same generator state), and
    weights each kept token's loss by w_t = 1 + H_T(t) / log V (1 + normalised
    teacher entropy), scaled to mean 1 over the kept tokens of the scope.
    Loss denominator: k per scope, as for any plain selector;
    importance_weighting does not apply (the draw is always plain).
    """
    mask = _entropy_draw(stats.entropy.float(), k, ctx.generator)
    raw = 1.0 + stats.teacher_entropy.float()
    weights = torch.where(mask, raw / raw[mask].mean(), 0.0)
    return Selection(mask, weights)


@register("teacher_entropy", mean_over_all=True)
def teacher_entropy(stats: TokenStats, k: int, ctx: Context) -> Selection:
    """Teacher-entropy weighting alone, the ablation we keep for comparison ("ours").

    Keeps every token and weights its loss by normalised teacher entropy,
    scaled to mean 1 over the scope; all-zero teacher entropy (a one-hot
    teacher everywhere) gives weight 1. `adaptive_kl` is our reading of the
    paper's Table 8 adaptive KL; this variant drops its entropy sampling and
    its 1 + offset.
    """
    h_t = stats.teacher_entropy.float()
    mean = h_t.mean()
    weights = h_t / mean if bool(mean > 0) else torch.ones_like(h_t)
    return Selection(torch.ones_like(h_t, dtype=torch.bool), weights)
