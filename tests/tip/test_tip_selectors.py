"""Selectors: the SPEC §3 rules, checked on hand-built statistics against naive references."""

import ast
import math
import random
from fractions import Fraction
from pathlib import Path

import pytest
import torch

import tip
from conftest import select, tip_denominator
from tip import selectors as sel_mod
from tip.stats import TokenStats

PLAIN = ["entropy_sample", "entropy_topk", "soft_or", "q3_only", "soft_or_bottom", "random"]
KEEP_ALL = ["all", "teacher_entropy"]
# keep k per scope like PLAIN, but weight the kept tokens
WEIGHTED_K = ["adaptive_kl"]
TOP_K = ["entropy_topk", "soft_or", "q3_only", "soft_or_bottom"]


def make_stats(h, d, fwd=None, teacher=None, seq=None) -> TokenStats:
    h = torch.as_tensor(h, dtype=torch.float32)
    d = torch.as_tensor(d, dtype=torch.float32)
    n = h.shape[0]
    return TokenStats(
        entropy=h,
        divergence=d,
        forward_divergence=d.clone() if fwd is None else torch.as_tensor(fwd, dtype=torch.float32),
        teacher_entropy=torch.full((n,), 0.1) if teacher is None else torch.as_tensor(teacher, dtype=torch.float32),
        sequence_ids=torch.zeros(n, dtype=torch.long) if seq is None else torch.as_tensor(seq, dtype=torch.long),
    )


def random_stats(n, seed, num_seqs=1) -> TokenStats:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, num_seqs, (n,), generator=g)
    return make_stats(torch.rand(n, generator=g), torch.rand(n, generator=g) ** 3 * 5,
                      fwd=torch.rand(n, generator=g) * 4, teacher=torch.rand(n, generator=g) * 0.2, seq=seq)


def naive_minmax(xs):
    lo, hi = min(xs), max(xs)
    return [0.0 if hi == lo else (x - lo) / (hi - lo) for x in xs]


def naive_top(scores, k, largest=True):
    """Indices of the k best scores, ties to the lower index."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i] if largest else scores[i], i))
    return set(order[:k])


def kept(selection):
    return set(torch.nonzero(selection.mask).flatten().tolist())


def expected_k(m, ratio_text):
    return max(1, math.floor(Fraction(ratio_text) * m))


def sizes_of(sequence_ids, scope):
    """Token count of each scope, counted independently of tip."""
    if scope == "microbatch":
        return [len(sequence_ids)] if len(sequence_ids) else []
    return [sequence_ids.tolist().count(i) for i in sorted(set(sequence_ids.tolist()))]


# ---------------------------------------------------------------------------- Proposition 2


def test_low_entropy_high_divergence_token_is_the_entropy_blind_spot():
    # tokens 0-7: moderately uncertain, teacher agrees; token 8: confident and wrong (Q3)
    h = [0.50, 0.55, 0.60, 0.45, 0.52, 0.58, 0.48, 0.62, 0.02]
    d = [0.05, 0.04, 0.06, 0.05, 0.03, 0.05, 0.04, 0.06, 5.00]
    stats = make_stats(h, d)
    ratio = 3 / 9
    assert 8 in kept(select("soft_or", stats, ratio))
    assert 8 in kept(select("q3_only", stats, ratio))
    assert 8 not in kept(select("entropy_topk", stats, ratio))
    assert 8 not in kept(select("soft_or_bottom", stats, ratio))


# ---------------------------------------------------------------------------- scores


def test_soft_or_score_is_one_minus_product_of_complements_and_selection_matches_naive():
    stats = random_stats(40, seed=0)
    h_hat = naive_minmax(stats.entropy.tolist())
    d_hat = naive_minmax(stats.divergence.tolist())
    score = tip.selectors.soft_or_score(torch.tensor(h_hat), torch.tensor(d_hat))
    expected = [1 - (1 - a) * (1 - b) for a, b in zip(h_hat, d_hat)]
    torch.testing.assert_close(score, torch.tensor(expected), atol=1e-6, rtol=0)
    for ratio in (0.1, 0.25, 0.5, 0.9):
        k = tip.keep_count(40, ratio)
        assert kept(select("soft_or", stats, ratio)) == naive_top(expected, k)
        assert kept(select("soft_or_bottom", stats, ratio)) == naive_top(expected, k, largest=False)


def test_q3_only_ranks_by_forward_kl_times_confidence():
    stats = random_stats(30, seed=1)
    h_hat = naive_minmax(stats.entropy.tolist())
    w = [f * (1 - a) for f, a in zip(stats.forward_divergence.tolist(), h_hat)]
    for ratio in (0.1, 0.3, 0.7):
        assert kept(select("q3_only", stats, ratio)) == naive_top(w, tip.keep_count(30, ratio))


def test_soft_or_with_constant_divergence_ranks_like_entropy():
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        stats = make_stats(torch.rand(25, generator=g), torch.full((25,), 0.7))
        for ratio in (0.2, 0.5, 0.8):
            assert torch.equal(select("soft_or", stats, ratio).mask, select("entropy_topk", stats, ratio).mask)


def test_soft_or_bottom_complements_soft_or_at_half():
    even = random_stats(20, seed=2)
    top, bottom = kept(select("soft_or", even, 0.5)), kept(select("soft_or_bottom", even, 0.5))
    assert top.isdisjoint(bottom) and top | bottom == set(range(20))
    odd = random_stats(21, seed=3)
    top, bottom = kept(select("soft_or", odd, 0.5)), kept(select("soft_or_bottom", odd, 0.5))
    missing = set(range(21)) - (top | bottom)
    assert top.isdisjoint(bottom) and len(missing) == 1
    h_hat, d_hat = naive_minmax(odd.entropy.tolist()), naive_minmax(odd.divergence.tolist())
    s = [1 - (1 - a) * (1 - b) for a, b in zip(h_hat, d_hat)]
    assert missing == {sorted(range(21), key=lambda i: s[i])[10]}  # the median-scored token


def test_ties_break_by_position():
    stats = make_stats([0.3] * 6, [1.0] * 6)
    for name in TOP_K:
        assert kept(select(name, stats, 0.5)) == {0, 1, 2}, name


def test_minmax_maps_the_maximum_to_exactly_one_and_the_minimum_to_exactly_zero():
    g = torch.Generator().manual_seed(30)
    for trial in range(300):
        scale = 10.0 ** float(torch.empty(1).uniform_(-30, 30, generator=g))
        x = (torch.randn(int(torch.randint(2, 50, (1,), generator=g)), generator=g) * scale
             + float(torch.randn(1, generator=g)) * scale * 10)
        out = sel_mod.minmax(x)
        assert out[x == x.max()].eq(1.0).all() and out[x == x.min()].eq(0.0).all(), (trial, x)
        assert bool(((out >= 0) & (out <= 1)).all())
        # running range: a value at or above hi is exactly 1, at or below lo exactly 0
        lo, hi = float(x.min()), float(x.max())
        out = sel_mod.minmax(x, lo, hi)
        assert out[x >= hi].eq(1.0).all() and out[x <= lo].eq(0.0).all()
    # a span that overflows float32 still gives exact end points, not NaN
    wide = torch.tensor([-3e38, 0.0, 3e38])
    assert sel_mod.minmax(wide).tolist()[::2] == [0.0, 1.0]
    assert sel_mod.minmax(torch.tensor([0.5, 2.0]), 0.0, float("inf")).tolist() == [0.0, 0.0]


def test_soft_or_score_is_exactly_one_at_either_maximum_and_symmetric():
    g = torch.Generator().manual_seed(31)
    a, b = torch.rand(10_000, generator=g), torch.rand(10_000, generator=g)
    one = torch.ones_like(a)
    assert sel_mod.soft_or_score(one, b).eq(1.0).all() and sel_mod.soft_or_score(a, one).eq(1.0).all()
    assert torch.equal(sel_mod.soft_or_score(a, b), sel_mod.soft_or_score(b, a))
    assert sel_mod.soft_or_score(torch.zeros(1), torch.zeros(1)).item() == 0.0
    # the old form h + d - h*d rounds some of these below 1 (the tracker's bug); the product form never does
    assert bool((one + b - one * b < 1).any() or (a + one - a * one < 1).any())


def test_soft_or_tie_between_top_entropy_and_top_divergence_goes_to_the_lower_position():
    """Tracker reproduction: index 1 is the top-divergence token (delta_hat = 1), index 2 the
    top-entropy one (h_hat = 1); both score exactly 1, so the lower position, index 1, is kept."""
    stats = make_stats([0.6011906862258911, 0.8179197311401367, 0.9736230969429016],
                       [8.17527961730957, 9.74706745147705, 4.638391494750977])
    assert kept(select("soft_or", stats, 0.5)) == {1}
    assert kept(select("soft_or", stats, 0.5, scope="sequence")) == {1}


def test_soft_or_one_kept_scopes_resolve_the_top_tie_by_position():
    """In every scope that keeps one token the winner is the first token that holds the scope's
    largest entropy or its largest divergence (both score exactly 1)."""
    g = torch.Generator().manual_seed(32)
    lengths = torch.randint(2, 60, (600,), generator=g).tolist()
    seq = torch.cat([torch.full((m,), i) for i, m in enumerate(lengths)])
    n = seq.numel()
    # float32 values of the reproduction's kind: entropies in [0, 1), divergences in nats
    h = torch.rand(n, generator=g)
    d = torch.rand(n, generator=g) * 10
    stats = make_stats(h, d, seq=seq)
    ratio = 1 / 64  # k = 1 in every scope
    selection = select("soft_or", stats, ratio, scope="sequence")
    start = 0
    for i, m in enumerate(lengths):
        hs, ds = h[start:start + m], d[start:start + m]
        expected = min(j for j in range(m) if hs[j] == hs.max() or ds[j] == ds.max())
        assert kept(tip.Selection(selection.mask[start:start + m], selection.weights[start:start + m])) == {expected}, i
        start += m


@pytest.mark.parametrize("name", TOP_K)
def test_every_top_k_selector_breaks_exact_ties_by_position(name):
    """Duplicated rows score bit for bit alike; wherever one copy is kept and the other not, the
    kept copy is the earlier one."""
    g = torch.Generator().manual_seed(33)
    splits = 0
    for trial in range(40):
        m = int(torch.randint(2, 30, (1,), generator=g))
        base = random_stats(m, seed=100 + trial)
        order = torch.randperm(2 * m, generator=g)
        stats = base.subset(torch.cat([torch.arange(m), torch.arange(m)])[order])
        source = (torch.cat([torch.arange(m), torch.arange(m)])[order]).tolist()
        for ratio in (0.1, 0.25, 0.5, 0.77):
            mask = select(name, stats, ratio).mask.tolist()
            for row in range(m):
                first, second = [j for j, src in enumerate(source) if src == row]
                if mask[first] != mask[second]:
                    splits += 1
                    assert mask[first] and not mask[second], (trial, ratio, row)
    assert splits > 20  # boundary ties did occur


# ---------------------------------------------------------------------------- counts and scopes


def test_kept_count_is_max_1_floor_ratio_m_for_random_sizes():
    rng = random.Random(0)
    cases = [(10, "0.7"), (100, "0.29"), (3, "0.1"), (1, "1"), (7, "1"), (50, "0.02")]
    cases += [(rng.randint(1, 150), f"{rng.randint(1, 1000) / 1000:.3f}") for _ in range(40)]
    for i, (m, ratio_text) in enumerate(cases):
        stats = random_stats(m, seed=i)
        k = expected_k(m, ratio_text)
        assert tip.keep_count(m, float(ratio_text)) == k
        for name in PLAIN + WEIGHTED_K:
            selection = select(name, stats, float(ratio_text), generator=torch.Generator().manual_seed(i))
            assert int(selection.mask.sum()) == k, (name, m, ratio_text)
            if name in PLAIN:
                assert torch.equal(selection.weights, selection.mask.float())


def test_sequence_scope_keeps_the_count_in_every_rollout():
    g = torch.Generator().manual_seed(5)
    lengths = [1, 2, 5, 13, 40, 7]
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    seq = seq[torch.randperm(seq.numel(), generator=g)]  # rollouts need not be contiguous
    base = random_stats(seq.numel(), seed=6)
    stats = make_stats(base.entropy, base.divergence, base.forward_divergence, base.teacher_entropy, seq)
    for name in PLAIN + WEIGHTED_K:
        for ratio_text in ("0.2", "0.5", "0.75"):
            selection = select(name, stats, float(ratio_text), scope="sequence", generator=torch.Generator().manual_seed(1))
            for i, n in enumerate(lengths):
                assert int(selection.mask[seq == i].sum()) == expected_k(n, ratio_text), (name, i)
            assert int(selection.mask.sum()) == tip_denominator(name, sizes_of(seq, "sequence"), float(ratio_text))


def test_sequence_scope_normalises_within_each_rollout():
    # rollout 1's divergences are 100x larger; per-rollout min-max must still pick its own top tokens
    h = [0.1, 0.15, 0.2, 0.25, 0.1, 0.2, 0.3, 0.4]
    d = [0.01, 0.02, 0.03, 0.04, 1.0, 2.0, 3.0, 4.0]
    stats = make_stats(h, d, seq=[0, 0, 0, 0, 1, 1, 1, 1])
    assert kept(select("soft_or", stats, 0.25, scope="sequence")) == {3, 7}
    assert kept(select("soft_or", stats, 0.25, scope="microbatch")) == {6, 7}


def test_denominator_invariant_and_keep_all_selectors():
    stats = random_stats(57, seed=7, num_seqs=4)
    for scope in ("microbatch", "sequence"):
        sizes = sizes_of(stats.sequence_ids, scope)
        assert sum(sizes) == 57
        for name in PLAIN + WEIGHTED_K:
            for ratio in (0.05, 0.33, 1.0):
                selection = select(name, stats, ratio, scope=scope, generator=torch.Generator().manual_seed(0))
                assert int(selection.mask.sum()) == tip_denominator(name, sizes, ratio)
        for name in KEEP_ALL:
            assert bool(select(name, stats, 0.3, scope=scope).mask.all())
            assert tip_denominator(name, sizes, 0.3) == 57
        assert tip_denominator("entropy_sample", sizes, 0.3, importance_weighting=True) == 57
    assert tip_denominator("soft_or", [0, 0], 0.5) == 0
    assert tip_denominator("soft_or", [10, 3], 0.5) == 5 + 1


def test_zero_tokens_give_an_empty_selection():
    empty = make_stats([], [])
    for name in tip.SELECTORS:
        selection = select(name, empty, 0.5, scope="sequence", state=tip.RunningMinMax(), normalize="running")
        assert selection.mask.shape == (0,) and selection.weights.shape == (0,)


# ---------------------------------------------------------------------------- random selectors


def test_same_seed_same_selection():
    stats = random_stats(200, seed=8, num_seqs=3)
    for name in ("entropy_sample", "random", "adaptive_kl"):
        for options in ({}, {"importance_weighting": True}):
            a = select(name, stats, 0.3, scope="sequence", generator=torch.Generator().manual_seed(42), **options)
            b = select(name, stats, 0.3, scope="sequence", generator=torch.Generator().manual_seed(42), **options)
            c = select(name, stats, 0.3, scope="sequence", generator=torch.Generator().manual_seed(43), **options)
            assert torch.equal(a.mask, b.mask) and torch.equal(a.weights, b.weights)
            assert not torch.equal(a.mask, c.mask)


def test_entropy_sample_draws_in_proportion_to_entropy():
    h = torch.tensor([0.05, 0.1, 0.2, 0.25, 0.4])
    stats = make_stats(h, torch.zeros(5))
    g = torch.Generator().manual_seed(0)
    draws = 4000
    counts = torch.zeros(5)
    for _ in range(draws):
        counts += select("entropy_sample", stats, 0.2, generator=g).mask.float()  # k = 1
    p = h / h.sum()
    se = (p * (1 - p) / draws).sqrt()
    assert torch.all((counts / draws - p).abs() < 4 * se), (counts / draws, p)


def test_entropy_sample_with_zero_entropies():
    stats = make_stats([0.0, 0.5, 0.0, 0.3, 0.0], torch.zeros(5))
    for seed in range(10):
        selection = select("entropy_sample", stats, 0.6, generator=torch.Generator().manual_seed(seed))  # k = 3
        assert int(selection.mask.sum()) == 3 and {1, 3} <= kept(selection)
    all_zero = make_stats([0.0] * 6, torch.zeros(6))
    assert int(select("entropy_sample", all_zero, 0.5, generator=torch.Generator().manual_seed(0)).mask.sum()) == 3
    weighted = select("entropy_sample", all_zero, 0.5, generator=torch.Generator().manual_seed(0), importance_weighting=True)
    assert torch.allclose(weighted.weights[weighted.mask], torch.tensor(2.0))  # p = k / m = 1/2


def test_importance_weighted_entropy_sample_is_unbiased():
    g = torch.Generator().manual_seed(0)
    m = 40
    h = torch.rand(m, generator=g) * 0.9 + 0.01
    h[3] = 0.95  # p capped at 1 for this one
    values = torch.randn(m, generator=g) * 2 + 1  # any per-token quantity, e.g. a loss D_t
    stats = make_stats(h, torch.rand(m, generator=g))
    target = float(values.mean())
    draws = 3000
    estimates = torch.empty(draws)
    counts = torch.empty(draws)
    for i in range(draws):
        selection = select("entropy_sample", stats, 0.25, generator=g, importance_weighting=True)
        estimates[i] = (selection.weights * values).sum() / tip_denominator("entropy_sample", [m], 0.25, importance_weighting=True)
        counts[i] = selection.mask.sum()
        assert torch.all(selection.weights[~selection.mask] == 0)
    se = float(estimates.std()) / math.sqrt(draws)
    assert abs(float(estimates.mean()) - target) < 4 * se, (float(estimates.mean()), target, se)
    # expected count is sum of min(1, k h / sum h), a bit under k = 10 because of the cap
    p = (10 * h / h.sum()).clamp(max=1)
    assert abs(float(counts.mean()) - float(p.sum())) < 4 * float(counts.std()) / math.sqrt(draws)
    # and plain (unweighted) entropy sampling is NOT unbiased here: the test has teeth
    plain = torch.stack([(select("entropy_sample", stats, 0.25, generator=g).mask.float() * values).sum() / 10 for _ in range(500)])
    assert abs(float(plain.mean()) - target) > 4 * float(plain.std()) / math.sqrt(500)


def test_adaptive_kl_keeps_what_entropy_sample_keeps_with_the_same_generator():
    stats = random_stats(150, seed=40, num_seqs=5)
    for scope in ("microbatch", "sequence"):
        for ratio in (0.1, 0.5, 1.0):
            g_a, g_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
            adaptive = select("adaptive_kl", stats, ratio, scope=scope, generator=g_a)
            sampled = select("entropy_sample", stats, ratio, scope=scope, generator=g_b)
            assert torch.equal(adaptive.mask, sampled.mask), (scope, ratio)
            assert torch.equal(g_a.get_state(), g_b.get_state())  # the same draws, no extra ones
            assert int(adaptive.mask.sum()) == tip_denominator("adaptive_kl", sizes_of(stats.sequence_ids, scope), ratio)
    # importance weighting does not apply: adaptive KL samples k tokens either way
    plain = select("adaptive_kl", stats, 0.3, generator=torch.Generator().manual_seed(1))
    with_iw = select("adaptive_kl", stats, 0.3, generator=torch.Generator().manual_seed(1), importance_weighting=True)
    assert torch.equal(plain.mask, with_iw.mask) and torch.equal(plain.weights, with_iw.weights)
    assert tip_denominator("adaptive_kl", [150], 0.3, importance_weighting=True) == 45


def test_adaptive_kl_weights_are_one_plus_teacher_entropy_with_mean_one_over_the_kept_set():
    stats = random_stats(90, seed=41, num_seqs=3)
    for scope in ("microbatch", "sequence"):
        selection = select("adaptive_kl", stats, 0.4, scope=scope, generator=torch.Generator().manual_seed(3))
        assert torch.all(selection.weights[~selection.mask] == 0)
        groups = [torch.ones(90, dtype=torch.bool)] if scope == "microbatch" else [stats.sequence_ids == i for i in range(3)]
        for group in groups:
            keep = group & selection.mask
            w = selection.weights[keep].double()
            raw = 1 + stats.teacher_entropy[keep].double()
            assert float(w.mean()) == pytest.approx(1.0, abs=1e-6)
            torch.testing.assert_close(w, raw / raw.mean(), atol=1e-6, rtol=0)
            # the ordering of the weights is the ordering of teacher entropy
            by_teacher = w[torch.argsort(stats.teacher_entropy[keep])]
            assert bool((by_teacher[1:] >= by_teacher[:-1]).all()) and by_teacher[-1] > by_teacher[0]
    # one kept token has weight exactly 1
    single = select("adaptive_kl", make_stats([0.5, 0.1], [0, 0], teacher=[0.3, 0.9]), 0.5,
                        generator=torch.Generator().manual_seed(0))
    assert single.weights[single.mask].tolist() == [1.0]


def test_random_selector_is_uniform():
    stats = random_stats(10, seed=9)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(10)
    draws = 3000
    for _ in range(draws):
        counts += select("random", stats, 0.3, generator=g).mask.float()
    p = 0.3
    assert torch.all((counts / draws - p).abs() < 4 * math.sqrt(p * (1 - p) / draws))


# ---------------------------------------------------------------------------- weights and normalisation


def test_teacher_entropy_weights_have_mean_one_per_scope():
    te = [0.1, 0.3, 0.2, 0.0, 0.5, 0.5]
    stats = make_stats([0.2] * 6, [1.0] * 6, teacher=te, seq=[0, 0, 0, 1, 1, 1])
    micro = select("teacher_entropy", stats, 0.5)
    torch.testing.assert_close(micro.weights, torch.tensor(te) / (sum(te) / 6))
    per_seq = select("teacher_entropy", stats, 0.5, scope="sequence")
    torch.testing.assert_close(per_seq.weights, torch.tensor([0.5, 1.5, 1.0, 0.0, 1.5, 1.5]))
    flat = select("teacher_entropy", make_stats([0.2] * 4, [1.0] * 4, teacher=[0.0] * 4), 0.5)
    assert torch.equal(flat.weights, torch.ones(4)) and bool(flat.mask.all())


def test_extrema_are_the_min_and_max_of_each_quantity_over_finite_values():
    stats = random_stats(25, seed=10)
    ext = tip.extrema(stats)
    assert set(ext) == {"entropy", "divergence", "forward_divergence", "teacher_entropy"}
    for name, (lo, hi) in ext.items():
        column = getattr(stats, name).tolist()
        assert (lo, hi) == (min(column), max(column)), name
    assert tip.extrema(make_stats([], [])) == {}
    broken = make_stats([0.2, float("nan"), 0.6], [1.0, 2.0, float("inf")], fwd=[float("nan")] * 3)
    ext = tip.extrema(broken)
    assert ext["entropy"] == pytest.approx((0.2, 0.6)) and ext["divergence"] == (1.0, 2.0)
    assert "forward_divergence" not in ext  # no finite value at all


def test_fold_is_one_ema_step_per_call_and_the_first_call_initialises():
    state = tip.RunningMinMax()
    momentum = 0.8
    lo = hi = None
    for seed in (10, 11, 12):
        ext = tip.extrema(random_stats(30, seed=seed))
        state.fold(ext, momentum)
        cur_lo, cur_hi = ext["entropy"]
        lo = cur_lo if lo is None else momentum * lo + (1 - momentum) * cur_lo
        hi = cur_hi if hi is None else momentum * hi + (1 - momentum) * cur_hi
        assert state.lo["entropy"] == pytest.approx(lo, abs=1e-12) and state.hi["entropy"] == pytest.approx(hi, abs=1e-12)
    # a quantity missing from the extremes (an update without tokens) keeps its range
    before = state.state_dict()
    state.fold({}, momentum)
    state.fold({"divergence": (math.inf, -math.inf)}, momentum)  # what an all-reduce of no tokens gives
    assert state.state_dict() == before
    state.fold({"entropy": (0.0, 1.0)}, momentum)
    assert state.lo["divergence"] == before["lo"]["divergence"] and state.lo["entropy"] != before["lo"]["entropy"]
    # the checkpoint format: {"lo": {name: float}, "hi": {name: float}}
    saved = state.state_dict()
    assert set(saved) == {"lo", "hi"} and all(isinstance(v, float) for v in saved["lo"].values())
    restored = tip.RunningMinMax()
    restored.load_state_dict(saved)
    assert restored == state
    with pytest.raises(ValueError, match="momentum"):
        state.fold({"entropy": (0.0, 1.0)}, 1.5)
    for bad in ((0.0, math.inf), (math.nan, 1.0), (0.6, 0.5)):
        with pytest.raises(ValueError, match="finite min <= max"):
            state.fold({"entropy": bad}, 0.5)


def test_one_fold_per_update_whatever_the_micro_batch_and_process_split():
    """Extremes reduced over micro-batches / processes (min of mins, max of maxes) then folded once
    give the same state as the extremes of all the update's tokens at once."""
    updates = [random_stats(40, seed=s, num_seqs=4) for s in (20, 21, 22)]
    whole, split = tip.RunningMinMax(), tip.RunningMinMax()
    for stats in updates:
        whole.fold(tip.extrema(stats), 0.9)
        parts = [tip.extrema(stats.subset(torch.arange(a, b))) for a, b in ((0, 7), (7, 8), (8, 31), (31, 40))]
        reduced = {name: (min(p[name][0] for p in parts), max(p[name][1] for p in parts)) for name in parts[0]}
        split.fold(reduced, 0.9)
    assert split == whole


def test_running_normalisation_reads_the_state_and_never_changes_it():
    stats = random_stats(30, seed=13)
    # no range yet (the first update): per-scope min-max, and the state stays empty
    state = tip.RunningMinMax()
    for scope in ("microbatch", "sequence"):
        for name in TOP_K:
            running = select(name, stats, 0.3, scope=scope, state=state, normalize="running", momentum=0.5)
            assert torch.equal(running.mask, select(name, stats, 0.3, scope=scope).mask)
    assert state == tip.RunningMinMax()
    # with a range: normalised by the state's lo/hi, clipped to [0, 1]; select leaves the state alone
    state.fold(tip.extrema(random_stats(30, seed=14)), 0.9)
    state.fold({"entropy": (0.2, 0.7), "divergence": (0.1, 2.0)}, 0.9)
    before = state.state_dict()
    selection = select("soft_or", stats, 0.3, state=state, normalize="running")
    assert state.state_dict() == before
    (h_lo, d_lo), (h_hi, d_hi) = (state.lo["entropy"], state.lo["divergence"]), (state.hi["entropy"], state.hi["divergence"])
    h_hat = [min(1, max(0, (x - h_lo) / (h_hi - h_lo))) for x in stats.entropy.tolist()]
    d_hat = [min(1, max(0, (x - d_lo) / (d_hi - d_lo))) for x in stats.divergence.tolist()]
    s = [1 - (1 - a) * (1 - b) for a, b in zip(h_hat, d_hat)]
    assert kept(selection) == naive_top(s, 9)
    assert kept(selection) != kept(select("soft_or", stats, 0.3))  # the test has teeth
    # a quantity the state has no range for is still normalised per scope
    h_only = tip.RunningMinMax()
    h_only.fold({"divergence": (0.0, 1.0)}, 0.9)
    assert torch.equal(select("entropy_topk", stats, 0.3, state=h_only, normalize="running").mask,
                       select("entropy_topk", stats, 0.3).mask)
    assert torch.equal(select("q3_only", stats, 0.3, state=h_only, normalize="running").mask,
                       select("q3_only", stats, 0.3).mask)


def test_running_with_momentum_zero_equals_minmax_and_needs_state():
    stats = random_stats(30, seed=13)
    state = tip.RunningMinMax()
    state.fold(tip.extrema(random_stats(30, seed=14)), 0.0)
    state.fold(tip.extrema(stats), 0.0)  # momentum 0: the range is this update's own
    running = select("q3_only", stats, 0.3, state=state, normalize="running")
    assert torch.equal(running.mask, select("q3_only", stats, 0.3).mask)
    with pytest.raises(ValueError, match="RunningMinMax"):
        select("soft_or", stats, 0.3, normalize="running")
    # selectors that do not normalise ignore the option (the loop passes the same options always)
    select("entropy_topk", stats, 0.3, normalize="running", importance_weighting=True, momentum=0.5, state=state)


def test_sequence_scope_selection_does_not_depend_on_how_rollouts_are_split_into_calls():
    stats = random_stats(120, seed=15, num_seqs=9)
    folded = tip.RunningMinMax()
    folded.fold({"entropy": (0.1, 0.8), "divergence": (0.0, 2.0), "forward_divergence": (0.5, 3.0),
                 "teacher_entropy": (0.0, 0.2)}, 0.9)
    groups = [[0, 4], [1], [2, 3, 8], [5, 6, 7]]
    for normalize, state in (("minmax", None), ("running", tip.RunningMinMax()), ("running", folded)):
        for name in TOP_K + ["all", "teacher_entropy"]:
            for ratio in (0.1, 0.5):
                whole = select(name, stats, ratio, scope="sequence", normalize=normalize, state=state)
                mask = torch.zeros(len(stats), dtype=torch.bool)
                weights = torch.zeros(len(stats))
                for group in groups:
                    rows = torch.nonzero(torch.isin(stats.sequence_ids, torch.tensor(group))).flatten()
                    part = select(name, stats.subset(rows), ratio, scope="sequence", normalize=normalize, state=state)
                    mask[rows], weights[rows] = part.mask, part.weights
                assert torch.equal(mask, whole.mask), (name, normalize, ratio)
                assert torch.equal(weights, whole.weights), (name, normalize, ratio)


# ---------------------------------------------------------------------------- errors and registry


def test_bad_arguments_are_one_line_errors():
    stats = random_stats(5, seed=15)
    with pytest.raises(ValueError, match=r"unknown selector 'nope' \(known: all, entropy_sample, "):
        select("nope", stats, 0.5)
    for ratio in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="ratio"):
            select("soft_or", stats, ratio)
        with pytest.raises(ValueError, match="ratio"):
            tip_denominator("soft_or", [5], ratio)
    with pytest.raises(ValueError, match="unknown selector option 'normalise'"):
        select("soft_or", stats, 0.5, normalise="running")
    with pytest.raises(ValueError, match="unknown scope"):
        select("soft_or", stats, 0.5, scope="batch")
    with pytest.raises(ValueError, match="normalize"):
        select("soft_or", stats, 0.5, normalize="zscore")
    with pytest.raises(ValueError, match="momentum"):
        select("soft_or", stats, 0.5, momentum=1.5)


def test_register_adds_a_selector_the_loop_can_use_unchanged():
    @tip.register("last_tokens_test")
    def last_tokens(stats, k, ctx):
        mask = torch.zeros(len(stats), dtype=torch.bool)
        mask[-k:] = True
        return tip.Selection(mask, mask.float())

    try:
        stats = random_stats(12, seed=16, num_seqs=1)
        assert kept(select("last_tokens_test", stats, 0.25)) == {9, 10, 11}
        assert tip_denominator("last_tokens_test", [12], 0.25) == 3
        with pytest.raises(ValueError, match="already registered"):
            tip.register("last_tokens_test")(last_tokens)
    finally:
        del tip.SELECTORS["last_tokens_test"]
        del sel_mod._MEAN_OVER_ALL["last_tokens_test"]


def test_registry_holds_every_selector_of_the_spec():
    assert set(tip.SELECTORS) == set(PLAIN + KEEP_ALL + WEIGHTED_K)


def test_tip_imports_nothing_from_opd():
    package = Path(tip.__file__).resolve().parent
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "opd" or n.startswith("opd.") for n in names), f"{path.name} imports {names}"


@pytest.mark.parametrize("name", ["random", "entropy_sample", "adaptive_kl"])
def test_a_generator_per_scope_equals_one_call_per_rollout_with_its_own_generator(name):
    """generator may be a callable of the scope key: under scope="sequence" each rollout draws from
    generator(("sequence", id)), exactly as a separate call per rollout with that generator."""
    stats = random_stats(40, 11, num_seqs=5)
    per_scope = lambda key: torch.Generator().manual_seed(100 + (key[1] if key[0] == "sequence" else -1))
    got = select(name, stats, 0.3, scope="sequence", generator=per_scope)
    for sid in torch.unique(stats.sequence_ids).tolist():
        index = (stats.sequence_ids == sid).nonzero().squeeze(1)
        alone = select(name, stats.subset(index), 0.3, scope="sequence", generator=per_scope(("sequence", sid)))
        assert torch.equal(got.mask[index], alone.mask) and torch.equal(got.weights[index], alone.weights), sid
    whole = select(name, stats, 0.3, generator=per_scope)  # scope="microbatch": key ("microbatch",)
    assert torch.equal(whole.mask, select(name, stats, 0.3, generator=per_scope(("microbatch",))).mask)
