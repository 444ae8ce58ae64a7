"""One micro-batch of an OPD update, given its teacher side (lm.teacher): student forward -> token stats ->
tip selection -> loss -> backward.

This is the only module of `opd` that imports `tip` (the seam). The two loss
implementations compute the same thing:

  reference  the student's full logits at response positions (N, V) (as the
             upstream implementation holds them), stats, selection, then the
             chunked divergence on the kept rows.
  fused      the student backbone's final hidden states (N, d); stats through
             the LM head chunk by chunk under no_grad; select; the LM head and
             divergence only for kept rows, gradients formed chunk by chunk
             (opd.losses.fused_head_divergence). The teacher side is its final
             hidden states (N, d_T), its LM head applied chunk by chunk.

Loss normalisation: every micro-batch contributes sum_{kept} w_t * D_t / Z,
where Z is the global loss denominator of the update (all micro-batches, all
processes), known before any forward pass from the response-token counts
(tip.denominator). Summed gradients are therefore exactly those of the global
mean, however tokens are split across micro-batches and processes.

Token statistics come from one chunked no-grad pass on both paths (token_stats:
opd.losses.stats_pass, from logits or through the LM heads), turned into tip's
TokenStats in one place (stats_from_rows).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from dataclasses import dataclass
from typing import Callable

import torch

import tip
import tip.plots
from lm.models import gathered
from lm.teacher import RoutedSide, SidePart, TeacherSide
from opd.losses import StatRows, fused_head_divergence, shared_vocab, stats_pass, token_divergence
from tip.stats import TokenStats


@dataclass
class MicroBatch:
    """Rows of rollouts for one forward/backward.

    input_ids, attention_mask, response_mask  (B, L)
    sample_weight  (B,)  per-rollout weight (reward weighting; 1.0 otherwise)
    sequence_ids   (B,)  a step-unique id per rollout (tip scope="sequence")
    route_ids      (B,)  each rollout's teacher, an index of lm.teacher.RoutedTeacher (None: one teacher)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    sample_weight: torch.Tensor
    sequence_ids: torch.Tensor
    route_ids: torch.Tensor | None = None

    def positions(self) -> torch.Tensor:
        """(B, L-1) bool: logits at column j predict token j+1; keep those predicting response tokens."""
        return self.response_mask[:, 1:].bool()

    def response_positions(self) -> torch.Tensor:
        """(N,) in positions() order: each response token's offset from its rollout's first response token."""
        resp = self.positions()
        cols = torch.arange(resp.shape[1], device=resp.device).expand_as(resp)
        first = torch.where(resp, cols, resp.shape[1]).min(1, keepdim=True).values
        return (cols - first)[resp]

    def num_tokens(self) -> int:
        return int(self.response_mask[:, 1:].sum())

    def scope_sizes(self, scope: str) -> list[int]:
        counts = self.response_mask[:, 1:].sum(1)
        return counts.tolist() if scope == "sequence" else [int(counts.sum())]


def stats_from_rows(rows: list[StatRows], sequence_ids: torch.Tensor, vocab: int, topk: int) -> TokenStats:
    """The one conversion of per-row nats (opd.losses.StatRows of consecutive chunks, N rows in all) into
    tip's TokenStats, through tip's one normalisation (entropies / log V, clamps). sequence_ids (N,)."""
    if not rows:
        return tip.empty_stats(sequence_ids.device, topk=min(topk, vocab))
    nats = [torch.cat(column) for column in zip(*(r[:4] for r in rows))]
    top = {name: torch.cat([r.top[name] for r in rows]) for name in rows[0].top}
    return tip.stats_from_nats(*nats, sequence_ids.to(nats[0].device), vocab, **top)


def token_stats(student, teacher, sequence_ids, chunk_size: int, topk: int = 0, heads=None) -> TokenStats:
    """Token statistics of N response rows: the one chunked no-grad pass (opd.losses.stats_pass), float32
    whatever the autocast state, with both sides' top-k when topk > 0 (the token dump; the values do not
    change). Entropies are normalised by log V, V = min(V_S, V_T) (padded vocabularies compare V columns).

    student, teacher: logits (N, V_S), (N, V_T) of any float dtype [reference], or final hidden states
    (N, d_S), (N, d_T) with heads = (W_S (V_S, d_S), W_T (V_T, d_T)), applied chunk by chunk [fused].
    sequence_ids (N,): the rollout of each row. chunk_size: rows per float32 (chunk_size, V) temporary.
    """
    rows = stats_pass(student, teacher, chunk_size, topk, heads)
    return stats_from_rows(rows, torch.as_tensor(sequence_ids), shared_vocab(student, teacher, heads), topk)


def placeholder_stats(sequence_ids: torch.Tensor, vocab: int) -> TokenStats:
    """Zero statistics with the right sequence ids, for selectors that do not read the values."""
    zeros = torch.zeros(sequence_ids.shape[0], device=sequence_ids.device)
    return stats_from_rows([StatRows(zeros, zeros, zeros, zeros, {})], sequence_ids, vocab, 0)


def ordered_stats(rows: list[StatRows], order: torch.Tensor, seq_ids: torch.Tensor, vocab: int, topk: int) -> TokenStats:
    """TokenStats in position order from StatRows of the rows `order` (N,) lists, in that order; one conversion."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return stats_from_rows(rows, seq_ids.to(order.device)[order], vocab, topk).subset(inverse)


@dataclass
class StepSettings:
    loss_impl: str
    loss_type: str
    beta: float
    chunk_size: int
    selector: str
    ratio: float
    scope: str
    select_options: dict
    topk: int = 0  # top-k distributions kept in the stats for the token dump


def denominator(microbatches: list[MicroBatch], st: StepSettings) -> int:
    """This process's share of the loss denominator Z (summed over processes by the caller)."""
    return sum(
        tip.denominator(st.selector, mb.scope_sizes(st.scope), st.ratio, **st.select_options) for mb in microbatches
    )


def student_microbatch(student, student_weight, teacher_weight, mb: MicroBatch, side: TeacherSide, st: StepSettings,
                       loss_scale: float, generator_for: Callable[[tuple], torch.Generator], state, backward):
    """Forward, select and backward one micro-batch. Returns (stats, selection, sum_kept w*D as float).

    `side` is the teacher's side of this micro-batch (lm.teacher.Teacher.score), of the kind the
    configured loss reads.

    `student` is an opd.policy.PolicyModel (possibly wrapped by DDP/DeepSpeed);
    `student_weight` / `teacher_weight` are the LM head matrices (V, d) (read by the fused loss only).
    `generator_for(key)` gives the generator of a selection scope: key ("microbatch",) for the
    micro-batch, ("sequence", sequence_id) for one rollout under scope="sequence" (the trainer
    seeds these by the scope's global place, so the draw does not depend on the split).
    `backward(loss)` runs the backward pass (accelerator.backward in training).
    `loss_scale` is 1/Z times whatever the gradient reduction divides by.
    """
    impl = LOSS_IMPLS[st.loss_impl]
    if side.kind != impl.reads:
        raise ValueError(f"opd.loss_impl={st.loss_impl} reads the teacher's {impl.reads}, the teacher gave {side.kind}")
    # The fused loss multiplies the student's head itself: under ZeRO-3 it is gathered for the forward and
    # the backward (whose gradient is reduced to the shards as usual).
    with gathered(student_weight if impl.reads == "hidden" else None):
        stats, selection, loss_sum = impl.student_side(
            student, student_weight, teacher_weight, mb, side, st, generator_for, state)
        # Backward always runs, also for an empty or non-finite micro-batch: every process
        # must take part in the gradient reduction; a non-finite gradient norm then skips
        # the update on all processes at once. Autocast off: the caller's bf16 autocast is still
        # active on this thread, and backward ops would otherwise be lowered to bf16 where the
        # forward ran in float32 (the LM head on the reference path).
        with torch.autocast(device_type=loss_sum.device.type, enabled=False):
            backward(loss_sum * loss_scale)
    # NaN/Inf in the statistics means a broken teacher or student: the micro-batch reports a non-finite
    # loss so the update is skipped, even where the kept tokens' own loss happens to be finite.
    return stats, selection, float(loss_sum.detach()) if is_finite(stats) else float("nan")


def _rows(mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L-1) response positions, and per response token its sequence id and sample weight."""
    pos = mb.positions()
    return pos, mb.sequence_ids[:, None].expand_as(pos)[pos], mb.sample_weight[:, None].expand_as(pos)[pos].float()


def _select(stats: TokenStats, st: StepSettings, generator_for, state) -> "tip.Selection":
    """tip's selection of a micro-batch; each scope draws from its own generator, generator_for(key)
    (key ("microbatch",) or ("sequence", sequence_id)), so a rollout's selection under scope="sequence"
    does not depend on the rollouts that share its micro-batch."""
    return tip.select(st.selector, finite_stats(stats), st.ratio, scope=st.scope, generator=generator_for,
                      state=state, **st.select_options)


def _reference_student(student, student_weight, teacher_weight, mb, side, st, generator_for, state):
    """Full student logits (N, V) at the response positions, stats, selection, divergence on kept rows."""
    pos, seq_ids, sample_w = _rows(mb)
    logits = student(mb.input_ids, mb.attention_mask, hidden=False, positions=pos)
    teacher_logits = side.values.to(logits.device)
    stats = token_stats(logits.detach(), teacher_logits, seq_ids, st.chunk_size, st.topk)
    selection = _select(stats, st, generator_for, state)
    keep = selection.mask.nonzero().squeeze(1).to(logits.device)
    d = token_divergence(logits[keep], teacher_logits[keep], st.loss_type, st.beta, st.chunk_size)
    return stats, selection, (selection.weights.to(d.device)[keep] * sample_w[keep] * d).sum()


def side_parts(side, teacher_weight: torch.Tensor, device) -> list[SidePart]:
    """The teacher side of a micro-batch as parts on `device`, each rows of one teacher with that teacher's head:
    one part covering every row (one teacher), or a RoutedSide's parts (several, lm.teacher.RoutedTeacher)."""
    parts = side.parts if isinstance(side, RoutedSide) else [SidePart(None, side.values, teacher_weight)]
    return [SidePart(None if p.index is None else p.index.to(device), p.values.to(device), p.head) for p in parts]


def _fused_student(student, student_weight, teacher_weight, mb, side, st, generator_for, state):
    """Final hidden states (N, d); stats through the LM heads chunk by chunk; LM head + divergence on kept rows.
    With several teachers each part of the side (rows of one teacher) goes through its own teacher's head; the
    statistics are put back in position order and the selection is made over the whole micro-batch."""
    pos, seq_ids, sample_w = _rows(mb)
    hidden = student(mb.input_ids, mb.attention_mask, hidden=True, positions=pos)
    parts = side_parts(side, teacher_weight, hidden.device)
    w_s = student_weight.detach()
    vocab = shared_vocab(hidden, parts[0].values, (w_s, parts[0].head))
    stats_first = tip.reads_stats(st.selector)
    if stats_first:
        stats = parts_stats(hidden.detach(), parts, w_s, seq_ids, vocab, st)
        selection = _select(stats, st, generator_for, state)
    else:
        # The choice ignores the statistics: choose first, then take the kept tokens' statistics from the
        # loss kernel's own log-probabilities (the same per-chunk formula; no second LM-head pass for them).
        selection = _select(placeholder_stats(seq_ids, vocab), st, generator_for, state)
    weights = selection.weights.to(hidden.device) * sample_w
    losses, rows, order = [], [], []
    for p in parts:
        local = selection.mask.to(hidden.device) if p.index is None else selection.mask.to(hidden.device)[p.index]
        kept = local.nonzero().squeeze(1)
        where = kept if p.index is None else p.index[kept]
        kernel_rows = None if stats_first else rows
        losses.append(fused_head_divergence(hidden[where], student_weight, p.values[kept], p.head, weights[where],
                                            st.loss_type, st.beta, st.chunk_size, stats_out=kernel_rows, topk=st.topk))
        if not stats_first:  # the dropped rows' statistics, after the kept ones' from the kernel
            drop = (~local).nonzero().squeeze(1)
            order += [where, drop if p.index is None else p.index[drop]]
            if drop.numel():
                rows += stats_pass(hidden.detach()[order[-1]], p.values[drop], st.chunk_size, st.topk, (w_s, p.head))
    stats = stats if stats_first else ordered_stats(rows, torch.cat(order), seq_ids, vocab, st.topk)
    return stats, selection, functools.reduce(operator.add, losses)


def parts_stats(hidden, parts: list[SidePart], w_s, seq_ids, vocab: int, st) -> TokenStats:
    """Every row's statistics, each part through its own teacher's head, in position order."""
    if len(parts) == 1 and parts[0].index is None:
        return token_stats(hidden, parts[0].values, seq_ids, st.chunk_size, st.topk, (w_s, parts[0].head))
    rows = [r for p in parts for r in stats_pass(hidden[p.index], p.values, st.chunk_size, st.topk, (w_s, p.head))]
    return ordered_stats(rows, torch.cat([p.index for p in parts]), seq_ids, vocab, st.topk)


@dataclass(frozen=True)
class LossImpl:
    """One way of computing the step's loss (`opd.loss_impl`); both compute the same loss and gradients.

    reads: what the loss needs of the teacher (lm.teacher.TeacherSide kind): "hidden" states (N, d_T), whose
    LM head (V_T, d_T) the fused kernel applies itself, or float32 "logits" (N, V_T).
    student_side(student, student_weight, teacher_weight, mb, side, st, generator_for, state)
    -> (stats, selection, loss_sum).
    """

    reads: str
    student_side: Callable


LOSS_IMPLS = {
    "reference": LossImpl(reads="logits", student_side=_reference_student),
    "fused": LossImpl(reads="hidden", student_side=_fused_student),
}


_STAT_FIELDS = ("entropy", "divergence", "forward_divergence", "teacher_entropy")


def is_finite(stats: TokenStats) -> bool:
    return all(bool(torch.isfinite(getattr(stats, f)).all()) for f in _STAT_FIELDS)


def finite_stats(stats: TokenStats) -> TokenStats:
    """The statistics a selector sees: NaN/Inf set to 0, so a selector (e.g. a multinomial draw) never crashes on them."""
    if is_finite(stats):
        return stats
    return dataclasses.replace(stats, **{f: torch.nan_to_num(getattr(stats, f), nan=0.0, posinf=0.0, neginf=0.0)
                                         for f in _STAT_FIELDS})


# ----------------------------------------------------------------------------
# the rest of the seam: what the loop needs from tip besides selection


def check_selector(name: str) -> list[str]:
    """tip.selector names a registered selector (one line otherwise)."""
    known = sorted(tip.SELECTORS)
    return [] if name in known else [f"tip.selector: unknown selector {name!r} (known: {', '.join(known)})"]


SelectorState = tip.RunningMinMax
"""Caller-owned state of running (EMA) normalisation, saved in checkpoints."""


def new_selector_state() -> SelectorState:
    return tip.RunningMinMax()


def fold_running_range(state: SelectorState, stats_list: list[TokenStats], momentum: float, gather) -> None:
    """One EMA step of running normalisation per optimiser update (SPEC §3), after the update.

    The extremes of the update's statistics (all micro-batches), reduced over processes
    (`gather` as in gather_stats, None for one process): min of the mins, max of the maxes.
    """
    parts = [tip.extrema(s) for s in stats_list]
    if gather is not None:
        parts = [e for process in gather(parts) for e in process]
    merged: dict[str, tuple[float, float]] = {}
    for part in parts:
        for name, (lo, hi) in part.items():
            old_lo, old_hi = merged.get(name, (lo, hi))
            merged[name] = (min(old_lo, lo), max(old_hi, hi))
    state.fold(merged, momentum)


def combine(stats_list: list[TokenStats], selections: list) -> tuple[TokenStats, "tip.Selection"]:
    mask = torch.cat([s.mask.cpu() for s in selections]) if selections else torch.zeros(0, dtype=torch.bool)
    weights = torch.cat([s.weights.cpu() for s in selections]) if selections else torch.zeros(0)
    return TokenStats.cat([s.to("cpu") for s in stats_list]), tip.Selection(mask=mask, weights=weights)


def gather_stats(stats: TokenStats, selection, gather) -> tuple[TokenStats, "tip.Selection"]:
    """Every process's token statistics and selection of an update, concatenated (top-k ids dropped).

    `gather(obj) -> [obj of process 0, obj of process 1, ...]` (accelerate's gather_object), or None
    for a single process. Quantile thresholds and quadrant shares then cover all tokens of the update.
    """
    if gather is None:
        return stats, selection
    mine = (stats.entropy, stats.divergence, stats.forward_divergence, stats.teacher_entropy, stats.sequence_ids,
            selection.mask, selection.weights)
    columns = [torch.cat([c.cpu() for c in column]) for column in zip(*gather(tuple(t.cpu() for t in mine)))]
    return TokenStats(*columns[:5]), tip.Selection(mask=columns[5], weights=columns[6])


def diagnostics(stats: TokenStats, selection, tc) -> dict:
    """tip/... metrics of one update (tc: the tip config section)."""
    return tip.diagnostics(stats, selection, mode=tc.threshold_mode, entropy_threshold=tc.entropy_threshold,
                           divergence_threshold=tc.divergence_threshold)


def dump_tokens(path, stats: TokenStats, selection, token_ids: torch.Tensor, decode, tc, generator, step: int,
                response_positions: torch.Tensor | None = None) -> None:
    """Append `tc.dump_tokens` token records (paper appendix B.4 style) of one update to `path` (tokens.jsonl)."""
    quad = tip.quadrants(stats, mode=tc.threshold_mode, entropy_threshold=tc.entropy_threshold,
                         divergence_threshold=tc.divergence_threshold)
    tip.write_jsonl(path, tip.token_records(stats, selection, quad, token_ids, decode, tc.dump_tokens, generator,
                                            step=step, response_positions=response_positions))


def render_pictures(run_dir) -> list:
    return tip.plots.render(run_dir)
