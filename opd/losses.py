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
or from final hidden states through the LM heads), then
  - statistics: `chunk_stats` (entropies and both KLs in nats, `StatRows`), the only
    formula for them: rows in cache-sized blocks (`block_sums`: four p- and q-weighted
    sums over the max-shifted logits, exp taken once per side, no log-probabilities;
    `stats_from_sums`; `row_stats`, the log-probability form, for rows with -inf
    logits); `stats_pass` runs it over all rows under no_grad;
  - divergence: an entry of `DIVERGENCES` (opd.loss_type), registered with
    `@register_divergence("name")`, gives the per-token value and its gradient
    w.r.t. the student logits; `token_divergence` (from logits) and
    `fused_head_divergence` (LM heads inside) call the entry, never its name.
    Reverse KL is itself a statistic: its value comes from `chunk_stats` and its
    gradient from the same row blocks (`reverse_kl_grad_`); the other entries read
    log-probabilities (`log_probs_`, the one log-softmax, or `shifted_log_probs`
    with the statistics' normalisers: the same numbers).

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
    """Float32 scratch tensors made once per pass and handed out by name to each of its chunks.

    buffers(name, c) is the first c rows of a (rows, V) buffer `name` (contiguous), holding whatever the previous
    chunk left there: a chunk's tensors from here live until the next chunk asks for the same name. Names used:
    "s", "t" (a chunk's logits, logit_chunks), "p", "q" (probabilities, log_probs_ and shifted_log_probs).
    buffers.scratch(name, *shape) is a contiguous tensor of any shape, for the statistics' row blocks ("x", "e",
    "d", chunk_stats). Reusing them spares the allocator a fresh (chunk, V) tensor per chunk and name: on CPU
    that cost more than the arithmetic done in it (new pages, zeroed by the kernel at first touch).
    """

    def __init__(self, rows: int, vocab: int, device):
        self.rows, self.vocab, self.device = rows, vocab, device
        self._made: dict[str, torch.Tensor] = {}

    @classmethod
    def like(cls, x: torch.Tensor) -> "ChunkBuffers":
        return cls(x.shape[0], x.shape[1], x.device)

    def __call__(self, name: str, c: int) -> torch.Tensor:
        return self.scratch(name, self.rows, self.vocab)[:c]

    def scratch(self, name: str, *shape: int) -> torch.Tensor:
        """A float32 tensor of `shape` in buffer `name`, made (or made larger) on first need."""
        size = math.prod(shape)
        made = self._made.get(name)
        if made is None or made.numel() < size:
            made = self._made[name] = torch.empty(size, dtype=torch.float32, device=self.device)
        return made[:size].view(shape)


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
    rows with -inf logits (where block_sums meets 0 * (-inf)). p = exp(log p) and q = exp(log q) are formed
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


STAT_BLOCK_BYTES = 12 * 2**20
"""Scratch of one row block of the statistics on a CPU: five float32 numbers per row and column (both sides'
shifted logits and their exponentials, and the difference of the logits), ~3 MB a row at V = 152k, so 4 rows.
A block's eight passes then run in the last-level cache; the same passes over whole (chunk, V) tensors ran
from memory and cost ~3x as much (2-core CPU, measured at 1, 2, 4, 16, 64 and 256 rows a block)."""


def block_rows(chunk: int, vocab: int, device) -> int:
    """Rows per block of chunk_stats: cache-sized on a CPU; a quarter of a chunk elsewhere (an accelerator wants
    few, large kernels, and a block ends in a host sync; the scratch is then 1.25 (chunk, V) tensors)."""
    if torch.device(device).type != "cpu":
        return max(1, -(-chunk // 4))
    return max(1, min(chunk, STAT_BLOCK_BYTES // (20 * max(vocab, 1))))


def block_sums(x: torch.Tensor, e: torch.Tensor, d: torch.Tensor):
    """The sums behind the statistics of r rows: x (r, 2, V) float32 both sides' logits [student, teacher],
    CONSUMED; e (r, 2, V) and d (r, V) float32 scratch.

    With a, b the student's and the teacher's logits minus their row maxima and d = a - b per column, returns
    m (r, 2) the row maxima, z (r, 2) = [sum e^a, sum e^b], xe (r, 2) = [sum e^a a, sum e^b b] and
    de (r, 2) = [sum e^a d, sum e^b d], and leaves e = [e^a, e^b] and d for a loss's gradient.
    Each side's exp is taken once; everything else is a product and a sum (torch's pairwise sum, not a
    matmul: a BLAS dot over V = 152k terms was 50x less accurate). Products 0 * (+-inf or NaN) in e * d (a
    column one side rules out) count 0, as 0 log 0; in xe they stay NaN, which is how chunk_stats finds
    the rows (with a -inf logit) it redoes in the log-probability form.
    """
    m = x.amax(-1, keepdim=True)
    x.sub_(m)
    torch.exp(x, out=e)
    torch.sub(x[:, 0], x[:, 1], out=d)
    z = e.sum(-1)
    xe = x.mul_(e).sum(-1)
    de = _zero_nan_(torch.mul(e, d[:, None], out=x)).sum(-1)
    return m[..., 0], z, xe, de


def stats_from_sums(z: torch.Tensor, xe: torch.Tensor, de: torch.Tensor):
    """(H(P_S), H(P_T), KL(P_S||P_T), KL(P_T||P_S)) (r,) nats each, and the guard (r,), from block_sums' (r, 2) sums.

    With zs, zt the sums of e^a, e^b and c = log zs - log zt (log P_S = a - log zs, log P_T = b - log zt):
        H(P_S) = log zs - sum e^a a / zs       (two terms >= 0: nothing cancels)
        KL(P_S||P_T) = sum e^a d / zs - c,   KL(P_T||P_S) = c - sum e^b d / zt
    d is formed per column (never the difference of two large sums); for close distributions d and c are
    both small. guard: 0, or NaN for a row with NaN, +inf or only -inf logits on a side (LogProbs.guard).
    """
    lz = z.log()
    c = lz[:, 0] - lz[:, 1]
    guard = z[:, 0] * 0.0 + z[:, 1] * 0.0
    h = lz - xe / z
    w = de / z
    return [h[:, 0] + guard, h[:, 1] + guard, w[:, 0] - c + guard, c - w[:, 1] + guard], guard


def reverse_kl_grad_(g: torch.Tensor, e: torch.Tensor, d: torch.Tensor, z: torch.Tensor, de: torch.Tensor):
    """dKL(P_S||P_T)/ds = p (d - sum p d) into g (r, V), from block_sums' e^a = e (r, V) (made P_S here), d (r, V),
    z and de (r,) of the student side.

    log P_S - log P_T = d - c and KL = sum p d - c: the constant c cancels, so no logarithm enters. p d is
    zeroed where it is 0 * (+-inf or NaN) (a token the student rules out); a broken row (z NaN) stays NaN.
    """
    p = e.div_(z[:, None])
    _zero_nan_(torch.mul(p, d, out=g)).addcmul_(p, (de / z)[:, None], value=-1.0)


class ChunkSums(NamedTuple):
    """A chunk's row maxima m and exp-sums z, (C, 2) [student, teacher], and its guard (C,), as chunk_stats leaves
    them for a loss kernel's log-probabilities (log p = s - m - log z)."""

    m: torch.Tensor
    z: torch.Tensor
    guard: torch.Tensor


def _chunk_top(s: torch.Tensor, t: torch.Tensor, topk: int):
    """Both sides' top-min(topk, V) logits and ids, (C, k) each, or None."""
    if topk <= 0:
        return None
    k = min(topk, s.shape[1])
    return s.topk(k, dim=-1), t.topk(k, dim=-1)


def _top_probs(tops, sums: ChunkSums) -> dict:
    """TokenStats' top-k fields from _chunk_top's logits: p = exp(logit - m - log z)."""
    if tops is None:
        return {}
    (s_vals, s_ids), (t_vals, t_ids) = tops
    lz = sums.z.log()
    s_probs = (s_vals - sums.m[:, :1]).sub_(lz[:, :1]).exp_()
    t_probs = (t_vals - sums.m[:, 1:]).sub_(lz[:, 1:]).exp_()
    return dict(student_top_ids=s_ids, student_top_probs=s_probs, teacher_top_ids=t_ids, teacher_top_probs=t_probs)


def chunk_stats(s: torch.Tensor, t: torch.Tensor, topk: int, buffers: ChunkBuffers | None = None,
                reverse_grad: bool = False) -> tuple[StatRows, ChunkSums]:
    """The statistics of one chunk: the one formula, for the stats pass and for the loss kernel alike.

    s, t (C, V) float32 logits over the shared vocabulary, read and not modified, except that with
    reverse_grad s receives dKL(P_S||P_T)/ds (the reverse KL's gradient, reverse_kl_grad_) in place.
    Rows go in blocks (block_rows; buffers' scratch "x", "e", "d") through block_sums and stats_from_sums;
    rows where those meet 0 * (-inf) (a -inf logit) get their values from the log-probability form
    (row_stats), so 0 log 0 counts as 0 as there. topk > 0 adds both sides' top-min(topk, V) ids and
    probabilities. Returns the StatRows and the chunk's ChunkSums.
    """
    buffers = buffers or ChunkBuffers.like(s)
    rows, vocab = s.shape
    r = block_rows(rows, vocab, s.device)
    x, e, d = buffers.scratch("x", r, 2, vocab), buffers.scratch("e", r, 2, vocab), buffers.scratch("d", r, vocab)
    values = torch.empty(4, rows, dtype=torch.float32, device=s.device)
    m, z = (torch.empty(rows, 2, dtype=torch.float32, device=s.device) for _ in range(2))
    guard = torch.empty(rows, dtype=torch.float32, device=s.device)
    with _no_autocast(s):
        tops = _chunk_top(s, t, topk)
        for i in range(0, rows, r):
            n = min(r, rows - i)
            xb, eb, db = x[:n], e[:n], d[:n]
            torch.stack((s[i:i + n], t[i:i + n]), 1, out=xb)
            m[i:i + n], z[i:i + n], xe, de = block_sums(xb, eb, db)
            block, guard[i:i + n] = stats_from_sums(z[i:i + n], xe, de)
            values[:, i:i + n] = torch.stack(block)
            redo = xe.isnan().any(-1) & ~guard[i:i + n].isnan()
            if bool(redo.any()):
                at = redo.nonzero().squeeze(1) + i
                values[:, at] = torch.stack(row_stats(log_probs_(s[at], t[at], False, False)))
            if reverse_grad:
                reverse_kl_grad_(s[i:i + n], eb[:, 0], db, z[i:i + n, 0], de[:, 0])
        sums = ChunkSums(m, z, guard)
        return StatRows(*values, _top_probs(tops, sums)), sums


def shifted_log_probs(s: torch.Tensor, t: torch.Tensor, sums: ChunkSums, need_p: bool, need_q: bool,
                      buffers: ChunkBuffers) -> LogProbs:
    """The chunk's LogProbs from its logits s, t (C, V) (CONSUMED: formed in place) and the normalisers the
    statistics summed: log_probs_'s formula (the row max subtracted first, log z last), P_S and P_T (when
    asked for) in buffers "p" and "q"."""
    c = s.shape[0]
    a, b = s.sub_(sums.m[:, :1]), t.sub_(sums.m[:, 1:])
    p = torch.exp(a, out=buffers("p", c)).div_(sums.z[:, :1]) if need_p else None
    q = torch.exp(b, out=buffers("q", c)).div_(sums.z[:, 1:]) if need_q else None
    lz = sums.z.log()
    return LogProbs(a.sub_(lz[:, :1]), b.sub_(lz[:, 1:]), p, q, sums.guard)


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
    reverse_at(beta) -> True where D is KL(P_S || P_T) at this beta: the kernel then takes D from the
        statistics' sums (chunk_stats) and its gradient from the same row blocks (reverse_kl_grad_), and
        fn is not called: no log-probabilities, no (C, V) tensor besides the logits.
    """

    name: str
    fn: Callable
    probs: Callable[[float], str]
    reverse_at: Callable[[float], bool] = lambda beta: False


DIVERGENCES: dict[str, Divergence] = {}


def register_divergence(name: str, probs: str | Callable[[float], str] = "pq",
                        reverse_at: Callable[[float], bool] = lambda beta: False):
    """Decorator adding fn(lp, beta, with_grad) -> (D, dD/ds) to DIVERGENCES as `name` (see Divergence).

    probs: what fn reads of "p" (P_S) and "q" (P_T), or a function of beta giving it. reverse_at(beta): whether
    the divergence is KL(P_S || P_T) at beta (see Divergence)."""

    def add(fn):
        if name in DIVERGENCES:
            raise ValueError(f"divergence '{name}' is already registered")
        DIVERGENCES[name] = Divergence(name, fn, probs if callable(probs) else (lambda beta: probs), reverse_at)
        return fn

    return add


def divergence(name: str) -> Divergence:
    if name not in DIVERGENCES:
        raise ValueError(f"unknown loss_type '{name}' (known: {', '.join(DIVERGENCES)})")
    return DIVERGENCES[name]


def _softmax_grad_(pg: torch.Tensor, p: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """p * (g - sum p g) in pg's storage, from pg = p * g (C, V) and total = sum p g (C,): dD/ds when dD/dp = g."""
    return pg.addcmul_(p, total[:, None], value=-1.0)


@register_divergence("reverse_kl", probs="p", reverse_at=lambda beta: True)
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


@register_divergence("jsd", probs=lambda beta: "q" if beta <= 0.0 else "p" if beta >= 1.0 else "pq",
                     reverse_at=lambda beta: beta >= 1.0)
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


@register_divergence("skew_reverse_kl", probs="p", reverse_at=lambda beta: beta >= 1.0)
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
    div: a DIVERGENCES entry. with_stats: also the chunk's StatRows (chunk_stats, top-k when topk > 0).
    Returns (D (C,) nats, dD/ds (C, V) or None, StatRows or None), all float32 whatever the autocast
    state. A logit of -inf on both sides at the same id contributes exactly 0 (value and gradient).
    buffers: the chunk's scratch (ChunkBuffers; new when None). The gradient is returned in the storage
    of s, t or a buffer: consume it before the next chunk.
    Where div is reverse KL at beta (div.reverse_at), D is the statistics' KL(P_S||P_T) and its gradient
    is formed in s by the same row blocks: one pass, no (C, V) temporary besides s and t. Otherwise the
    statistics' normalisers give the log-probabilities (buffers "p" and "q") that div.fn reads.
    """
    buffers = buffers or ChunkBuffers.like(s)
    with _no_autocast(s):
        if div.reverse_at(beta):
            rows, _ = chunk_stats(s, t, topk, buffers, reverse_grad=with_grad)
            return rows.reverse_kl.clamp_min(0.0), (s if with_grad else None), (rows if with_stats else None)
        needs = div.probs(beta)
        need_p = with_grad or "p" in needs
        need_q = "q" in needs
        if with_stats:
            rows, sums = chunk_stats(s, t, topk, buffers)
            lp = shifted_log_probs(s, t, sums, need_p, need_q, buffers)
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
                if g is not None:  # w_t scales (C, d) products, not the (C, V) gradient (one pass less)
                    if need_h:
                        grad_h[i:i + chunk_size] = _head_grad_hidden(g, weight[:v], rows_s).mul_(tw[:, None])
                    if need_w:
                        grad_w[:v].addmm_(g.T, hidden[i:i + chunk_size].float() * tw[:, None])
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
