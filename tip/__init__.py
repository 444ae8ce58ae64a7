"""Token importance in on-policy distillation (TIP): statistics, selectors, taxonomy.

Works on tensors and its own `TokenStats`; imports nothing from `opd`.

    stats = tip.token_stats(student_logits, teacher_logits, sequence_ids, chunk_size=256)
    options = dict(normalize="minmax", momentum=0.9, importance_weighting=False)  # the caller's config
    sel = tip.select("soft_or", stats, ratio=0.5, scope="microbatch", generator=g, **options)
    loss = (sel.weights * per_token_loss).sum() / tip.denominator("soft_or", sizes, 0.5, **options)

A loss kernel that forms the entropies and KLs itself (in nats) builds its
TokenStats with `tip.stats_from_nats`. With normalize="running", `select`
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
from tip.stats import TokenStats, stats_from_nats, token_stats
from tip.taxonomy import diagnostics, quadrants, thresholds

__all__ = [
    "OPTIONS", "SELECTORS", "Context", "RunningMinMax", "Selection", "TokenStats",
    "denominator", "diagnostics", "extrema", "keep_count", "quadrants", "reads_stats", "register",
    "select", "stats_from_nats", "thresholds", "token_records", "token_stats", "write_jsonl",
]
