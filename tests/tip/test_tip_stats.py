"""TokenStats and stats_from_nats: tip's normalisation of per-token nats, concatenation and subsets."""

import math

import pytest
import torch

from tip.stats import TokenStats, empty_stats, stats_from_nats


def random_stats(n: int, seed: int, topk: int = 0) -> TokenStats:
    """stats_from_nats of random nats over V = 30 (entropies up to log V), with top-k fields when topk > 0."""
    g = torch.Generator().manual_seed(seed)
    nats = [torch.rand(n, generator=g) * math.log(30) for _ in range(4)]
    top = {}
    if topk:
        ids = torch.randint(0, 30, (n, topk), generator=g)
        probs = torch.rand(n, topk, generator=g)
        top = dict(student_top_ids=ids, student_top_probs=probs, teacher_top_ids=ids.flip(1), teacher_top_probs=probs.flip(1))
    return stats_from_nats(*nats, torch.arange(n) // 4, 30, **top)


def test_stats_from_nats_normalises_and_clamps_without_touching_its_inputs():
    h_s = torch.tensor([0.0, math.log(8), math.log(8) + 1e-6, 1.0])
    h_t = torch.tensor([0.5, 0.25, 3.0, 2.0])
    rev = torch.tensor([-1e-7, 0.0, 0.3, float("nan")])
    fwd = torch.tensor([2.0, -0.0, -3e-8, float("inf")])
    inputs = [t.clone() for t in (h_s, h_t, rev, fwd)]
    stats = stats_from_nats(h_s, h_t, rev, fwd, torch.tensor([0, 0, 1, 1]), 8)
    assert stats.entropy.tolist() == pytest.approx([0.0, 1.0, 1.0, 1.0 / math.log(8)])
    assert stats.entropy[1].item() == 1.0 and stats.entropy[2].item() == 1.0  # clamped to the exact bound
    assert stats.teacher_entropy.tolist() == pytest.approx([0.5 / math.log(8), 0.25 / math.log(8), 1.0, 2.0 / math.log(8)])
    assert stats.divergence[:3].tolist() == pytest.approx([0.0, 0.0, 0.3]) and math.isnan(stats.divergence[3].item())
    assert stats.forward_divergence[:3].tolist() == [2.0, 0.0, 0.0] and math.isinf(stats.forward_divergence[3].item())
    assert all(torch.equal(a, b, ) or (a.isnan() == b.isnan()).all() for a, b in zip(inputs, (h_s, h_t, rev, fwd)))
    assert stats.sequence_ids.dtype == torch.long and stats.entropy.dtype == torch.float32 and not stats.has_top
    # a one-word vocabulary divides by 1 (every entropy is 0 there)
    one = stats_from_nats(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), 1)
    assert one.entropy.tolist() == [0.0, 0.0]
    # top-k fields pass through
    ids, probs = torch.zeros(4, 2, dtype=torch.long), torch.full((4, 2), 0.5)
    with_top = stats_from_nats(h_s, h_t, rev, fwd, torch.zeros(4), 8, student_top_ids=ids, student_top_probs=probs,
                               teacher_top_ids=ids, teacher_top_probs=probs)
    assert with_top.has_top and with_top.teacher_top_probs is probs
    with pytest.raises(ValueError, match="vocab"):
        stats_from_nats(h_s, h_t, rev, fwd, torch.zeros(4), 0)
    with pytest.raises(ValueError, match="forward_kl"):
        stats_from_nats(h_s, h_t, rev, fwd[:3], torch.zeros(4), 8)


def test_cat_of_parts_skips_empty_ones_and_refuses_mixed_top_k():
    whole = random_stats(12, 3, topk=3)
    parts = [whole.subset(torch.arange(a, b)) for a, b in [(0, 7), (7, 7), (7, 12)]]
    joined = TokenStats.cat(parts)
    for name in ("entropy", "divergence", "forward_divergence", "teacher_entropy", "sequence_ids", "student_top_ids",
                 "teacher_top_probs"):
        assert torch.equal(getattr(joined, name), getattr(whole, name)), name
    assert len(TokenStats.cat([])) == 0
    # an empty micro-batch's stats (no top-k, or a different width) do not spoil the rest
    no_rows = empty_stats()
    with_empty = TokenStats.cat([no_rows, whole, empty_stats(topk=1)])
    assert torch.equal(with_empty.student_top_ids, whole.student_top_ids)
    assert torch.equal(with_empty.entropy, whole.entropy)
    with pytest.raises(ValueError, match="top-k"):
        TokenStats.cat([whole, random_stats(12, 3)])
    with pytest.raises(ValueError, match="widths"):
        TokenStats.cat([whole, random_stats(4, 5, topk=2)])


def test_subset_to_and_empty_stats():
    stats = random_stats(6, 4, topk=5)
    sub = stats.subset(torch.tensor([4, 1])).to("cpu")
    assert len(sub) == 2 and torch.equal(sub.student_top_ids, stats.student_top_ids[[4, 1]])
    assert torch.equal(sub.entropy, stats.entropy[[4, 1]])
    assert len(stats.subset(stats.entropy > 2.0)) == 0
    assert len(empty_stats(topk=2)) == 0 and empty_stats(topk=2).student_top_ids.shape == (0, 2)
    assert not empty_stats().has_top
