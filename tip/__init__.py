"""Token importance in on-policy distillation (TIP): statistics, selectors, taxonomy.

Works on tensors and its own `TokenStats`; imports nothing from `opd`.

    stats = tip.stats_from_nats(h_s, h_t, kl_rev, kl_fwd, sequence_ids, vocab)  # (N,) nats each
    options = dict(normalize="minmax", momentum=0.9, importance_weighting=False)  # the caller's config
    sel = tip.select("soft_or", stats, ratio=0.5, scope="microbatch", generator=g, **options)
    loss = (sel.weights * per_token_loss).sum() / tip.denominator("soft_or", sizes, 0.5, **options)

The caller forms the entropies and KLs (in nats) in its own chunked pass
over the logits (opd: `opd.losses.stats_pass`) and builds the TokenStats with
`tip.stats_from_nats`. With normalize="running", `select`
only reads the caller's `RunningMinMax`; after each optimiser update the
caller folds in that update's global extremes once:
`state.fold(tip.extrema(stats), momentum)` (extremes reduced over
micro-batches and processes first).

The pictures live in `tip.plots` (imported on demand: it pulls in matplotlib).
"""

from tip.dump import token_records, write_jsonl
from tip.selectors import (
    OPTIONS,
    SELECTORS,
    Context,
    RunningMinMax,
    Selection,
    denominator,
    extrema,
    keep_count,
    reads_stats,
    register,
    select,
)
from tip.stats import TokenStats, empty_stats, stats_from_nats
from tip.taxonomy import diagnostics, quadrants, thresholds

__all__ = [
    "OPTIONS", "SELECTORS", "Context", "RunningMinMax", "Selection", "TokenStats",
    "denominator", "diagnostics", "empty_stats", "extrema", "keep_count", "quadrants", "reads_stats", "register",
    "select", "stats_from_nats", "thresholds", "token_records", "write_jsonl",
]
