"""Per-token divergences and token statistics between student and teacher, exact over the vocabulary.

Everything here works chunk by chunk in float32, so an (N, V) float32 tensor
never exists, and keeps nothing per chunk for backward: gradients are
recomputed from the inputs chunk by chunk (analytic softmax gradients).
A pass over many chunks reuses the same few (chunk, V) buffers (`ChunkBuffers`):
on CPU a fresh 150 MB tensor per chunk cost more than the arithmetic on it
(new pages mapped and zeroed by the kernel at first touch).
Float32 whatever the autocast state: autocast is off inside the kernels (a bf16
matmul would round the logits and the sums), row reductions are elementwise
products and sums, and every KL is one sum of p-weighted per-token log-ratios
(a - b, or log p - log q) plus a normaliser term, never a difference of two large sums.

One chunk goes through one path: its float32 logits (`logit_chunks`, from logits
or from final hidden states through the LM heads) are shifted by their row maxima
and log-softmaxed in place (`log_probs_`, the one log-softmax; after the statistics
`ShiftedChunk.log_probs`, the same numbers), then
  - statistics: `chunk_stats` (entropies and both KLs in nats, `StatRows`),
    the only formula for them (`stat_sums`: four p- and q-weighted sums over the
    max-shifted logits, exp taken once per side; `row_stats`, the log-probability
    form, for rows with -inf logits); `stats_pass` runs it over all rows under no_grad;
  - divergence: an entry of `DIVERGENCES` (opd.loss_type), registered with
    `@register_divergence("name")`, gives the per-token value and its gradient
    w.r.t. the student logits; `token_divergence` (from logits) and
    `fused_head_divergence` (LM heads inside) call the entry, never its name.

Divergences shipped (P_S = softmax(student), P_T = softmax(teacher), beta = opd.beta):
  reverse_kl       KL(P_S || P_T)
  forward_kl       KL(P_T || P_S)
  jsd              beta*KL(P_T || M) + (1-beta)*KL(P_S || M),  M = beta*P_T + (1-beta)*P_S,
                   with beta=0 -> forward KL and beta=1 -> reverse KL (normalised limits).
  skew_reverse_kl  KL(P_S || beta*P_T + (1-beta)*P_S)  (beta=1 -> reverse KL)
Only the first min(V_S, V_T) logits are compared (padded embedding rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch


def _no_autocast(x: torch.Tensor):
    """A context in which matmuls on x's device run in x's own dtype (bf16 autocast would lower them)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _zero_nan_(x: torch.Tensor) -> torch.Tensor:
    """NaN -> 0 in place, infinities kept. Applied to products w * x with w a probability: a NaN there is
    0 * (+-inf) or 0 * NaN, i.e. a token to which a side gives probability 0 (0 log 0 = 0). Rows whose
    logits are themselves non-finite are made NaN again by the row guard (LogProbs.guard)."""
    return x.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)


def _wsum(w: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """sum_v w * x per row (C,), the product formed in `out` (C, V) (which may be x itself).

    An elementwise product and a sum, not a matmul: float32 whatever the autocast state, and the
    reduction's accumulation is as accurate as torch's sum (pairwise), also at V ~ 150k."""
    return _zero_nan_(torch.mul(w, x, out=out)).sum(-1)


# ----------------------------------------------------------------------------
# one chunk: logits -> log-probabilities -> statistics


@dataclass
class LogProbs:
    """One chunk's log-probabilities, formed in its logits' storage.

    ls, lt  (C, V) float32  log P_S, log P_T over the shared vocabulary (-inf where a probability is 0)
    p, q    (C, V) float32  P_S, P_T where asked for, else None
    guard   (C,)   float32  0, or NaN for a row with NaN, +inf or only -inf logits on either side;
                            added to every per-row result, so a broken row stays NaN.
    All of them are the chunk's scratch: a divergence may overwrite them in place.
    """

    ls: torch.Tensor
    lt: torch.Tensor
    p: torch.Tensor | None
    q: torch.Tensor | None
    guard: torch.Tensor


class ChunkBuffers:
    """(rows, V) float32 scratch tensors made once per pass and handed out by name to each of its chunks.

    buffers(name, c) is the first c rows of buffer `name` (contiguous), holding whatever the previous chunk
    left there: a chunk's tensors from here live until the next chunk asks for the same name. Names used:
    "s", "t" (a chunk's logits, logit_chunks), "p", "q" (exp / probabilities, log_probs_ and
    ShiftedChunk.log_probs). Reusing them spares the allocator a fresh (chunk, V) tensor per chunk and name: on CPU
    that cost more than the arithmetic done in it (new pages, zeroed by the kernel at first touch).
    """

    def __init__(self, rows: int, vocab: int, device):
        self.rows, self.vocab, self.device = rows, vocab, device
        self._made: dict[str, torch.Tensor] = {}

    @classmethod
    def like(cls, x: torch.Tensor) -> "ChunkBuffers":
        return cls(x.shape[0], x.shape[1], x.device)

    def __call__(self, name: str, c: int) -> torch.Tensor:
        if name not in self._made:
            self._made[name] = torch.empty(self.rows, self.vocab, dtype=torch.float32, device=self.device)
        return self._made[name][:c]


def log_softmax_(x: torch.Tensor, with_probs: bool = False, out: torch.Tensor | None = None):
    """log_softmax over the last dimension of float32 x (C, V), in x's own storage.

    Returns (log p (x itself), softmax(x) or None, guard (C,): 0 or NaN for a broken row).
    out: a (C, V) float32 scratch for exp(x - max), then the probabilities (new storage when None).
    Not torch.log_softmax: on CPU its float32 normaliser is off by up to ~1e-5 at V = 152k. The row max
    is subtracted first and log sum exp(x - max) (a few nats) last, so no log-probability passes
    through a logsumexp of tens of nats, whose float32 rounding (~1e-6) would shift the whole row.
    """
    with _no_autocast(x):
        x.sub_(x.amax(-1, keepdim=True))
        e = x.exp() if out is None else torch.exp(x, out=out)
        z = e.sum(-1, keepdim=True)
        x.sub_(z.log())
        return x, (e.div_(z) if with_probs else None), z.view(-1) * 0.0


def log_probs_(s: torch.Tensor, t: torch.Tensor, need_p: bool, need_q: bool,
               buffers: ChunkBuffers | None = None) -> LogProbs:
    """log_softmax_ of both sides of a chunk, s and t (C, V) float32 logits CONSUMED in place.

    P_S and P_T (when asked for) go to buffers "p" and "q"; a side without probabilities uses one of them
    as its exp scratch before the probabilities are formed there."""
    buffers = buffers or ChunkBuffers.like(s)
    c = s.shape[0]
    lt, q, guard_t = log_softmax_(t, need_q, buffers("q" if need_q else "p", c))
    ls, p, guard_s = log_softmax_(s, need_p, buffers("p", c))
    return LogProbs(ls, lt, p, q, guard_s + guard_t)


class StatRows(NamedTuple):
    """Token statistics of one chunk of C rows, float32, in nats (tip's TokenStats before normalisation).

    student_entropy H(P_S), teacher_entropy H(P_T), reverse_kl KL(P_S || P_T), forward_kl KL(P_T || P_S):
    (C,) each. top: {} or both sides' top-k (TokenStats' student_top_ids, student_top_probs,
    teacher_top_ids, teacher_top_probs; (C, k) each), for the token dump.
    """

    student_entropy: torch.Tensor
    teacher_entropy: torch.Tensor
    reverse_kl: torch.Tensor
    forward_kl: torch.Tensor
    top: dict


def row_stats(lp: LogProbs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H(P_S), H(P_T), KL(P_S||P_T), KL(P_T||P_S)) per row (C,), nats, float32, from a chunk's LogProbs.

    The log-probability form of the statistics, 0 log 0 counted as 0: what chunk_stats falls back to for
    rows with -inf logits (where stat_sums meets 0 * (-inf)). p = exp(log p) and q = exp(log q) are formed
    where lp does not carry them. Nothing in lp is modified. Each statistic is one sum of p-weighted terms
    (KL as sum p (log p - log q), never a difference of two large sums).
    Temporaries: one (C, V) scratch, plus p and q when not given.
    """
    ls, lt = lp.ls, lp.lt
    with _no_autocast(ls):
        p = ls.exp() if lp.p is None else lp.p
        q = lt.exp() if lp.q is None else lp.q
        buf = torch.empty_like(ls)
        hs = -_wsum(p, ls, buf)
        ht = -_wsum(q, lt, buf)
        rev = _wsum(p, torch.sub(ls, lt, out=buf), buf)
        fwd = _wsum(q, torch.sub(lt, ls, out=buf), buf)
        return hs + lp.guard, ht + lp.guard, rev + lp.guard, fwd + lp.guard


STAT_BLOCKS = 4  # column blocks of stat_sums: its two temporaries are (C, V/4) each, half a logit buffer in all.
# Fewer, larger operations than cache-sized blocks: on a loaded 2-core CPU, 2,048-column blocks (~1,300 small
# parallel operations a chunk) made the pass 8x slower with 2 threads; V/4 costs the same as unblocked.


def stat_sums(a: torch.Tensor, b: torch.Tensor, exp_a: torch.Tensor | None = None):
    """The four statistics of a chunk from its max-shifted logits, without forming log-probabilities.

    a, b (C, V) float32: student and teacher logits minus their row maxima (read, not modified).
    exp_a: a (C, V) float32 buffer to receive exp(a) (P_S before normalisation, for a loss kernel), or None.
    Returns zs, zt (C, 1) = sum exp(a), sum exp(b), and (H(P_S), H(P_T), KL(P_S||P_T), KL(P_T||P_S)),
    (C,) nats each. With log p = a - log zs, log q = b - log zt, c = log zs - log zt and d = a - b:
        H(P_S) = log zs + sum e^a (-a) / zs       (two terms >= 0: nothing cancels)
        KL(P_S||P_T) = sum e^a d / zs - c,   KL(P_T||P_S) = c - sum e^b d / zt
    so each side's exp is taken once and the rest is products and sums, none of which needs a
    normaliser first: one sweep over the vocabulary in STAT_BLOCKS column blocks, with two (C, V/blocks)
    temporaries (no (C, V) one). d is formed per element (never the
    difference of two large sums); for close distributions d and c are both small.
    A product 0 * (-inf) (a -inf logit) makes its row NaN: chunk_stats redoes such rows with row_stats.
    """
    rows, vocab = a.shape
    width = max(1, -(-vocab // STAT_BLOCKS))
    e_block = torch.empty(rows, width, dtype=torch.float32, device=a.device)
    x_block = torch.empty_like(e_block)
    zs, zt, pa, pd, qb, qd = torch.zeros(6, rows, dtype=torch.float32, device=a.device)
    for j in range(0, vocab, width):
        aj, bj = a[:, j:j + width], b[:, j:j + width]
        e, x = e_block[:, :aj.shape[1]], x_block[:, :aj.shape[1]]
        torch.exp(bj, out=e)
        zt += e.sum(-1)
        qb += torch.mul(e, bj, out=x).sum(-1)
        d = torch.sub(aj, bj, out=x)
        qd += e.mul_(d).sum(-1)
        e = torch.exp(aj, out=e if exp_a is None else exp_a[:, j:j + width])
        zs += e.sum(-1)
        pd += d.mul_(e).sum(-1)
        pa += torch.mul(e, aj, out=x).sum(-1)
    lzs, lzt = zs.log(), zt.log()
    c = lzs - lzt
    return zs[:, None], zt[:, None], (lzs - pa / zs, lzt - qb / zt, pd / zs - c, c - qd / zt)


@dataclass
class ShiftedChunk:
    """A chunk as chunk_stats leaves it: a, b (C, V) its logits minus their row maxima (in the logits'
    storage), zs, zt (C, 1) the sums of exp(a) and exp(b), guard (C,) as LogProbs', buffers the chunk's,
    exp_kept: whether buffers "p" already holds exp(a)."""

    a: torch.Tensor
    b: torch.Tensor
    zs: torch.Tensor
    zt: torch.Tensor
    guard: torch.Tensor
    buffers: ChunkBuffers
    exp_kept: bool

    def log_probs(self, need_p: bool, need_q: bool) -> LogProbs:
        """The chunk's LogProbs, formed in place (consumes the chunk): log_probs_'s formula, with the
        normalisers the statistics summed."""
        c = self.a.shape[0]
        p = None
        if need_p:
            p = self.buffers("p", c) if self.exp_kept else torch.exp(self.a, out=self.buffers("p", c))
            p.div_(self.zs)
        q = torch.exp(self.b, out=self.buffers("q", c)).div_(self.zt) if need_q else None
        ls, lt = self.a.sub_(self.zs.log()), self.b.sub_(self.zt.log())
        return LogProbs(ls, lt, p, q, self.guard)


def chunk_stats(s: torch.Tensor, t: torch.Tensor, topk: int, buffers: ChunkBuffers | None = None,
                keep_exp: bool = False) -> tuple[StatRows, ShiftedChunk]:
    """The statistics of one chunk: the one formula, for the stats pass and for the loss kernel alike.

    s, t (C, V) float32 logits over the shared vocabulary, CONSUMED (shifted by their row maxima in place;
    the returned ShiftedChunk goes on to the log-probabilities for a loss kernel). buffers: the chunk's
    ChunkBuffers (new when None); keep_exp: leave exp(a) in buffers "p" for the kernel's P_S (otherwise
    no (C, V) tensor besides s and t is used). topk > 0 adds both sides' top-min(topk, V) ids and probabilities.
    stat_sums forms the values; rows where it meets 0 * (-inf) (a -inf logit) are redone with the
    log-probability form (row_stats), so 0 log 0 counts as 0 as there.
    """
    buffers = buffers or ChunkBuffers.like(s)
    with _no_autocast(s):
        tops = []
        if topk > 0:
            k = min(topk, s.shape[1])
            tops = [s.topk(k, dim=-1), t.topk(k, dim=-1)]
        maxes = [s.amax(-1, keepdim=True), t.amax(-1, keepdim=True)]
        a, b = s.sub_(maxes[0]), t.sub_(maxes[1])
        zs, zt, sums = stat_sums(a, b, buffers("p", a.shape[0]) if keep_exp else None)
        guard = zs.view(-1) * 0.0 + zt.view(-1) * 0.0
        values = [v + guard for v in sums]
        redo = torch.isnan(values[0] + values[1] + values[2] + values[3]) & ~torch.isnan(guard)
        if bool(redo.any()):
            rows = redo.nonzero().squeeze(1)
            for mine, safe in zip(values, row_stats(log_probs_(a[rows], b[rows], False, False))):
                mine[rows] = safe
        top = {}
        if tops:
            (s_vals, s_ids), (t_vals, t_ids) = tops
            s_probs = (s_vals - maxes[0]).sub_(zs.log()).exp_()
            t_probs = (t_vals - maxes[1]).sub_(zt.log()).exp_()
            top = dict(student_top_ids=s_ids, student_top_probs=s_probs, teacher_top_ids=t_ids,
                       teacher_top_probs=t_probs)
        return StatRows(*values, top), ShiftedChunk(a, b, zs, zt, guard, buffers, keep_exp)


# ----------------------------------------------------------------------------
# chunks of rows: logits, or hidden states through the LM heads


def _slice_rows(chunk_size: int, vocab: int, width: int) -> int:
    """Vocabulary rows per float32 slice of a low-precision head: half a (chunk, V) float32 temporary."""
    return max(1, chunk_size * vocab // (2 * max(width, 1)))


def _head_logits(h: torch.Tensor, w: torch.Tensor, rows: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """h (C, d) @ w.T -> (C, V) float32 logits, multiplied in float32 (autocast must be off), in `out` if given.

    A float32 head is used as is; a bf16/fp16 one is upcast `rows` vocabulary rows at a time,
    so no float32 copy of the whole (V, d) matrix exists."""
    h = h.float()
    if w.dtype == torch.float32:  # without `out`, autograd can follow (a head that requires grad, grad enabled)
        return h @ w.T if out is None else torch.mm(h, w.T, out=out)
    if out is None:
        out = torch.empty(h.shape[0], w.shape[0], dtype=torch.float32, device=h.device)
    for j in range(0, w.shape[0], rows):
        torch.mm(h, w[j:j + rows].float().T, out=out[:, j:j + rows])
    return out


def head_logits(h: torch.Tensor, w: torch.Tensor, chunk_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """h (C, d) @ w.T -> (C, V) float32 logits, autocast off (the statistics' numbers, as the loss forms them)."""
    with _no_autocast(h):
        return _head_logits(h, w, _slice_rows(chunk_size, w.shape[0], h.shape[1]), out)


def shared_vocab(student: torch.Tensor, teacher: torch.Tensor, heads=None) -> int:
    """V = min(V_S, V_T): the columns both softmaxes run over (see logit_chunks for the arguments)."""
    if heads is None:
        return min(student.shape[1], teacher.shape[1])
    return min(heads[0].shape[0], heads[1].shape[0])


def chunk_buffers(student: torch.Tensor, teacher: torch.Tensor, chunk_size: int, heads=None) -> ChunkBuffers:
    """The buffers of one pass of logit_chunks over these rows (see there for the arguments)."""
    return ChunkBuffers(max(1, min(chunk_size, student.shape[0])), shared_vocab(student, teacher, heads),
                        student.device)


def logit_chunks(student: torch.Tensor, teacher: torch.Tensor, chunk_size: int, heads=None,
                 buffers: ChunkBuffers | None = None):
    """Yield (start, s, t) per chunk of `chunk_size` rows: float32 logits (C, V) of both sides over the shared
    V columns, in new storage, or in buffers "s" and "t" when given (the caller may consume them; the next
    chunk overwrites them).

    Without heads, student (N, V_S) and teacher (N, V_T) are logits of any float dtype, upcast per chunk.
    With heads = (W_S (V_S, d_S), W_T (V_T, d_T)), they are final hidden states (N, d_S), (N, d_T) and
    the logits are h @ W.T, multiplied in float32 with autocast off (head_logits).
    """
    v = shared_vocab(student, teacher, heads)
    for i in range(0, student.shape[0], chunk_size):
        c = min(chunk_size, student.shape[0] - i)
        s_out, t_out = (buffers("s", c), buffers("t", c)) if buffers is not None else (None, None)
        if heads is None:
            if buffers is None:
                yield (i, student[i:i + c, :v].to(torch.float32, copy=True),
                       teacher[i:i + c, :v].to(torch.float32, copy=True))
            else:
                yield i, s_out.copy_(student[i:i + c, :v]), t_out.copy_(teacher[i:i + c, :v])
        else:
            yield (i, head_logits(student[i:i + c], heads[0][:v], chunk_size, s_out),
                   head_logits(teacher[i:i + c], heads[1][:v], chunk_size, t_out))


@torch.no_grad()
def stats_pass(student: torch.Tensor, teacher: torch.Tensor, chunk_size: int, topk: int = 0,
               heads=None) -> list[StatRows]:
    """Token statistics of N rows in one chunked no-grad pass: one StatRows (nats) per chunk of rows.

    student, teacher, heads: logits (N, V_S), (N, V_T), or final hidden states and LM heads (see
    logit_chunks). The largest float32 temporaries are (chunk_size, V), never (N, V); everything runs in
    float32 with autocast off, so a bf16 autocast region around the call changes no bit of the result.
    0 * log 0 counts as 0, so a token both sides rule out (-inf on both) adds nothing to either KL.
    topk > 0 also records both sides' top-min(topk, V) ids and probabilities (the token dump).
    """
    if heads is None and (student.dim() != 2 or teacher.dim() != 2):
        raise ValueError(f"stats_pass: logits must be 2-D (N, V); got student {tuple(student.shape)}, "
                         f"teacher {tuple(teacher.shape)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"stats_pass: student has {student.shape[0]} rows but teacher has {teacher.shape[0]}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"stats_pass: chunk_size must be a positive int, got {chunk_size!r}")
    buffers = chunk_buffers(student, teacher, chunk_size, heads)
    return [chunk_stats(s, t, topk, buffers)[0] for _, s, t in logit_chunks(student, teacher, chunk_size, heads, buffers)]


# ----------------------------------------------------------------------------
# the divergence registry


@dataclass(frozen=True)
class Divergence:
    """A per-token divergence D (opd.loss_type), as the chunked kernels use it.

    fn(lp, beta, with_grad) -> (D (C,) nats, dD/ds (C, V) or None): from one chunk's LogProbs
        (which it may overwrite in place: they are scratch), the value per row, lp.guard added
        before anything reads it (a broken row stays NaN, its gradient too), and with_grad its
        gradient w.r.t. the student logits. p is always present when with_grad.
        The kernel clamps D at 0 (exact lower bound) afterwards.
    probs(beta) -> "p", "q", "pq" or "": the probabilities fn reads (besides the gradient's p), so the
        kernel forms no (C, V) tensor it does not need.
    """

    name: str
    fn: Callable
    probs: Callable[[float], str]


DIVERGENCES: dict[str, Divergence] = {}


def register_divergence(name: str, probs: str | Callable[[float], str] = "pq"):
    """Decorator adding fn(lp, beta, with_grad) -> (D, dD/ds) to DIVERGENCES as `name` (see Divergence).

    probs: what fn reads of "p" (P_S) and "q" (P_T), or a function of beta giving it."""

    def add(fn):
        if name in DIVERGENCES:
            raise ValueError(f"divergence '{name}' is already registered")
        DIVERGENCES[name] = Divergence(name, fn, probs if callable(probs) else (lambda beta: probs))
        return fn

    return add


def divergence(name: str) -> Divergence:
    if name not in DIVERGENCES:
        raise ValueError(f"unknown loss_type '{name}' (known: {', '.join(DIVERGENCES)})")
    return DIVERGENCES[name]


def _softmax_grad_(pg: torch.Tensor, p: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """p * (g - sum p g) in pg's storage, from pg = p * g (C, V) and total = sum p g (C,): dD/ds when dD/dp = g."""
    return pg.addcmul_(p, total[:, None], value=-1.0)


@register_divergence("reverse_kl", probs="p")
def reverse_kl(lp: LogProbs, beta: float, with_grad: bool):
    """KL(P_S || P_T) = sum p (log p - log q); gradient p * ((log p - log q) - KL)."""
    pd = _zero_nan_(torch.sub(lp.ls, lp.lt, out=lp.lt).mul_(lp.p))
    d = pd.sum(-1) + lp.guard  # the guard before the gradient uses d: a broken row's gradient stays NaN
    return d, (_softmax_grad_(pd, lp.p, d) if with_grad else None)


@register_divergence("forward_kl", probs="q")
def forward_kl(lp: LogProbs, beta: float, with_grad: bool):
    """KL(P_T || P_S) = sum q (log q - log p); gradient p - q."""
    d = -_zero_nan_(torch.sub(lp.ls, lp.lt, out=lp.lt).mul_(lp.q)).sum(-1) + lp.guard
    return d, (lp.p.sub_(lp.q) if with_grad else None)


@register_divergence("jsd", probs=lambda beta: "q" if beta <= 0.0 else "p" if beta >= 1.0 else "pq")
def jsd(lp: LogProbs, beta: float, with_grad: bool):
    """Generalised JSD: beta*KL(P_T || M) + (1-beta)*KL(P_S || M), M = beta*P_T + (1-beta)*P_S, beta = opd.beta.

    beta = 0.5 is the symmetric JSD (bounded by log 2); at beta = 0 and 1, where this is 0, it takes its
    normalised limits: forward KL and reverse KL (TRL's generalized JSD convention)."""
    if beta <= 0.0:
        return forward_kl(lp, beta, with_grad)
    if beta >= 1.0:
        return reverse_kl(lp, beta, with_grad)
    # from D = log p - log q, without forming log m (never large minus large):
    #   log p - log m = -logaddexp(log(1-beta), log(beta) - D)
    #   log q - log m = -logaddexp(log(beta), log(1-beta) + D)
    diff = torch.sub(lp.ls, lp.lt, out=lp.lt)
    log_b = torch.full((), math.log(beta), device=diff.device)
    log_1mb = torch.full((), math.log1p(-beta), device=diff.device)
    s_term = torch.logaddexp(torch.neg(diff, out=lp.ls).add_(log_b), log_1mb, out=lp.ls).neg_()
    t_term = torch.logaddexp(diff.add_(log_1mb), log_b, out=diff).neg_()
    d = beta * _zero_nan_(t_term.mul_(lp.q)).sum(-1)
    ps = _zero_nan_(s_term.mul_(lp.p))  # p (log p - log m)
    ps_sum = ps.sum(-1) + lp.guard
    d = d + (1.0 - beta) * ps_sum
    if not with_grad:
        return d, None
    # dJSD/dp = (1-beta) log(p/m), through the softmax
    return d, _softmax_grad_(ps, lp.p, ps_sum).mul_(1.0 - beta)


@register_divergence("skew_reverse_kl", probs="p")
def skew_reverse_kl(lp: LogProbs, beta: float, with_grad: bool):
    """Skewed reverse KL: KL(P_S || M), M = alpha*P_T + (1-alpha)*P_S, alpha = opd.beta in [0, 1].

    alpha = 1 is reverse KL; a smaller alpha mixes the student into its target, which bounds the
    divergence by log(1/alpha) and softens the pull where the teacher gives a token almost no
    probability; alpha = 0 is 0 (the target is the student itself).
    With r = log p - log m: D = sum p r, dD/dp = r + 1 - (1-alpha) p/m = r + 1 - (1-alpha) exp(r).
    """
    if beta >= 1.0:
        return reverse_kl(lp, beta, with_grad)
    if beta <= 0.0:
        zero = lp.guard + 0.0
        return zero, (torch.zeros_like(lp.ls).add_(lp.guard[:, None]) if with_grad else None)
    # r = -logaddexp(log(alpha) + log q - log p, log(1-alpha)): never log m formed from large terms
    r = torch.sub(lp.lt, lp.ls, out=lp.lt).add_(math.log(beta))
    r = torch.logaddexp(r, torch.full((), math.log1p(-beta), device=r.device), out=r).neg_()
    pr = _zero_nan_(torch.mul(lp.p, r, out=lp.ls))  # p r (log p is no longer needed)
    d = pr.sum(-1) + lp.guard
    if not with_grad:
        return d, None
    pg = pr.sub_(_zero_nan_(r.exp_().mul_(lp.p)), alpha=1.0 - beta)  # p * (r - (1-alpha) exp(r)); the +1 cancels
    return d, _softmax_grad_(pg, lp.p, pg.sum(-1) + lp.guard)


# ----------------------------------------------------------------------------
# the kernel and the two loss paths


def divergence_kernel(s: torch.Tensor, t: torch.Tensor, div: Divergence, beta: float, with_grad: bool,
                      with_stats: bool = False, topk: int = 0, buffers: ChunkBuffers | None = None):
    """Divergence of one chunk and, optionally, its gradient w.r.t. the student logits and its statistics.

    s, t: (C, V) float32 logits over the shared vocabulary. They are CONSUMED
    (overwritten in place, to keep the chunk's temporaries few): pass copies.
    div: a DIVERGENCES entry. with_stats: also the chunk's StatRows (chunk_stats, top-k when topk > 0),
    from the log-probabilities the divergence needs anyway.
    Returns (D (C,) nats, dD/ds (C, V) or None, StatRows or None), all float32 whatever the autocast
    state. A logit of -inf on both sides at the same id contributes exactly 0 (value and gradient).
    buffers: the chunk's "p" and "q" scratch (ChunkBuffers; new when None). The gradient is returned in
    the storage of s, t or a buffer: consume it before the next chunk.
    Temporaries: buffers "p" and "q" (the probabilities the entry and the gradient need).
    """
    with _no_autocast(s):
        needs = div.probs(beta)
        need_p = with_grad or "p" in needs
        need_q = "q" in needs
        if with_stats:
            rows, shifted = chunk_stats(s, t, topk, buffers, keep_exp=need_p)
            lp = shifted.log_probs(need_p, need_q)
        else:
            rows, lp = None, log_probs_(s, t, need_p, need_q, buffers)
        d, grad = div.fn(lp, beta, with_grad)
        return d.clamp_min(0.0), grad, rows


class _ChunkedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, div, beta, chunk_size):
        out = torch.empty(student_logits.shape[0], dtype=torch.float32, device=student_logits.device)
        buffers = chunk_buffers(student_logits, teacher_logits, chunk_size)
        for i, s, t in logit_chunks(student_logits, teacher_logits, chunk_size, buffers=buffers):
            out[i:i + chunk_size], _, _ = divergence_kernel(s, t, div, beta, with_grad=False, buffers=buffers)
        ctx.save_for_backward(student_logits, teacher_logits)
        ctx.config = (div, beta, chunk_size)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        student_logits, teacher_logits = ctx.saved_tensors
        div, beta, chunk_size = ctx.config
        v = shared_vocab(student_logits, teacher_logits)
        grad = torch.zeros_like(student_logits)
        buffers = chunk_buffers(student_logits, teacher_logits, chunk_size)
        for i, s, t in logit_chunks(student_logits, teacher_logits, chunk_size, buffers=buffers):
            _, g, _ = divergence_kernel(s, t, div, beta, with_grad=True, buffers=buffers)
            grad[i:i + chunk_size, :v] = g.mul_(grad_out[i:i + chunk_size, None].float())
        return grad, None, None, None, None


def token_divergence(student_logits, teacher_logits, loss_type: str, beta: float, chunk_size: int):
    """Per-token divergence D_t, float32 (N,) nats, for logits (N, V_S) and (N, V_T) of any float dtype.

    loss_type: a DIVERGENCES name; beta: its knob (opd.beta).
    Differentiable w.r.t. the student logits; the teacher side never receives
    gradients. This is what the loss averages over the kept tokens. Each chunk of
    `chunk_size` rows is upcast to float32 on its own; bf16 autocast does not reach the kernel.
    """
    div = divergence(loss_type)
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"student has {student_logits.shape[0]} rows, teacher {teacher_logits.shape[0]}")
    return _ChunkedDivergence.apply(student_logits, teacher_logits.detach(), div, beta, chunk_size)


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
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, token_weights, div, beta, chunk_size,
                stats_out, topk):
        v = min(weight.shape[0], teacher_weight.shape[0])
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows_s = _slice_rows(chunk_size, v, weight.shape[1])
        heads = (weight, teacher_weight)
        buffers = chunk_buffers(hidden, teacher_hidden, chunk_size, heads)
        with _no_autocast(hidden):
            for i, s, t in logit_chunks(hidden, teacher_hidden, chunk_size, heads, buffers):
                d, g, rows = divergence_kernel(s, t, div, beta, with_grad=need_h or need_w,
                                               with_stats=stats_out is not None, topk=topk, buffers=buffers)
                if rows is not None:
                    stats_out.append(rows)
                tw = token_weights[i:i + chunk_size].float()
                total += (tw * d).sum()
                if g is not None:
                    g = g.mul_(tw[:, None])
                    if need_h:
                        grad_h[i:i + chunk_size] = _head_grad_hidden(g, weight[:v], rows_s)
                    if need_w:
                        grad_w[:v].addmm_(g.T, hidden[i:i + chunk_size].float())
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
                          chunk_size: int, stats_out: list | None = None, topk: int = 0):
    """sum_t token_weights[t] * D_t, computing logits = hidden @ weight.T chunk by chunk.

    hidden (N, d_S) student final hidden states (with grad), weight (V_S, d_S) the
    student LM head (with grad), teacher_hidden (N, d_T) and teacher_weight (V_T, d_T)
    (no grad), token_weights (N,); loss_type a DIVERGENCES name, beta its knob. Equals
    (token_weights * token_divergence(hidden @ weight.T, teacher_hidden @ teacher_weight.T, ...)).sum()
    in value and gradients, with the head matmuls in float32 (bf16 autocast or bf16 weights
    do not round the logits); memory is one chunk's (chunk, V) temporaries.
    `stats_out`, if a list, receives each chunk's StatRows (chunk_stats, with top-k when topk > 0),
    formed from the log-probabilities the loss computes anyway: the cheapest way to the statistics
    of the rows it sees.
    """
    div = divergence(loss_type)
    return _FusedHeadDivergence.apply(
        hidden, weight, teacher_hidden.detach(), teacher_weight.detach(), token_weights.detach(),
        div, beta, chunk_size, stats_out, topk,
    )
