"""opd.step.token_stats (opd.losses.stats_pass, then tip.stats_from_nats): the chunked pass equals a naive
full-tensor computation."""

import math

import pytest
import torch

from opd.step import token_stats
from tip.stats import TokenStats, empty_stats, stats_from_nats

FIELDS = ("entropy", "divergence", "forward_divergence", "teacher_entropy")


def naive_stats(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
    """Textbook formulas in float64 on the whole (N, V) tensors."""
    v = min(student.shape[1], teacher.shape[1])
    ps = torch.softmax(student[:, :v].double(), -1)
    pt = torch.softmax(teacher[:, :v].double(), -1)
    h_s = -(ps * ps.log()).sum(-1)
    h_t = -(pt * pt.log()).sum(-1)
    return {
        "entropy": h_s / math.log(v),
        "teacher_entropy": h_t / math.log(v),
        "divergence": (ps * (ps.log() - pt.log())).sum(-1),
        "forward_divergence": (pt * (pt.log() - ps.log())).sum(-1),
    }


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_chunked_equals_naive_with_padded_teacher_vocab(chunk_size):
    g = torch.Generator().manual_seed(0)
    n, v_s, v_t = 23, 11, 16  # teacher embedding padded by 5 rows; 23 not a multiple of 3, 7
    student = torch.randn(n, v_s, generator=g) * 3
    teacher = torch.randn(n, v_t, generator=g) * 3
    seq = torch.arange(n) // 5
    stats = token_stats(student, teacher, seq, chunk_size)
    ref = naive_stats(student, teacher)
    assert len(stats) == n
    for name, expected in ref.items():
        got = getattr(stats, name)
        assert got.dtype == torch.float32 and got.shape == (n,)
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5, msg=name)
    assert torch.equal(stats.sequence_ids, seq)
    # the padded teacher columns must not matter: huge values there change nothing
    teacher_junk = teacher.clone()
    teacher_junk[:, v_s:] = 1e4
    again = token_stats(student, teacher_junk, seq, chunk_size)
    torch.testing.assert_close(again.divergence, stats.divergence)


def test_bfloat16_input_is_upcast_per_chunk():
    g = torch.Generator().manual_seed(1)
    student = (torch.randn(10, 32, generator=g) * 2).bfloat16()
    teacher = (torch.randn(10, 32, generator=g) * 2).bfloat16()
    stats = token_stats(student, teacher, torch.zeros(10, dtype=torch.long), 4)
    ref = naive_stats(student.float(), teacher.float())
    assert stats.entropy.dtype == torch.float32
    torch.testing.assert_close(stats.divergence.double(), ref["divergence"], atol=1e-5, rtol=1e-5)


def test_identical_rows_have_exactly_zero_kl_and_bounds_hold():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 50, generator=g) * 10
    stats = token_stats(logits, logits.clone(), torch.zeros(9, dtype=torch.long), 4)
    assert torch.all(stats.divergence == 0) and torch.all(stats.forward_divergence == 0)
    assert torch.equal(stats.entropy, stats.teacher_entropy)
    assert torch.all((stats.entropy >= 0) & (stats.entropy <= 1))


def test_uniform_is_entropy_one_and_one_hot_is_zero_without_nan():
    v = 8
    uniform = torch.zeros(1, v)
    # -inf logits: p = 0 exactly, where 0 * log 0 must count as 0
    one_hot = torch.full((1, v), float("-inf"))
    one_hot[0, 2] = 0.0
    stats = token_stats(torch.cat([uniform, one_hot]), torch.cat([uniform, uniform]), torch.tensor([0, 1]), 1)
    assert stats.entropy.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    # KL(one-hot || uniform) = log V; KL(uniform || one-hot) = inf (the teacher's mass the student misses)
    assert stats.divergence[1].item() == pytest.approx(math.log(v), abs=1e-5)
    assert math.isinf(stats.forward_divergence[1].item())
    assert not torch.isnan(stats.entropy).any() and not torch.isnan(stats.divergence).any()


def test_a_token_both_sides_rule_out_adds_nothing_and_stays_finite():
    g = torch.Generator().manual_seed(5)
    student = torch.randn(4, 12, generator=g) * 2
    teacher = torch.randn(4, 12, generator=g) * 2
    ruled_out = student.clone(), teacher.clone()
    for logits in ruled_out:
        logits[:, [3, 7]] = float("-inf")  # the same ids on both sides
    stats = token_stats(*ruled_out, torch.zeros(4, dtype=torch.long), 3)
    keep = [j for j in range(12) if j not in (3, 7)]
    ref = naive_stats(student[:, keep], teacher[:, keep])
    for name in FIELDS:
        got = getattr(stats, name)
        assert torch.isfinite(got).all(), name
        # entropies are still divided by log 12, the vocabulary the softmax ran over
        expected = ref[name] * (math.log(10) / math.log(12) if "entropy" in name else 1.0)
        torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_autocast_around_the_call_changes_no_bit():
    g = torch.Generator().manual_seed(6)
    student = torch.randn(19, 300, generator=g) * 4
    teacher = torch.randn(19, 300, generator=g) * 4
    seq = torch.arange(19) // 4
    plain = token_stats(student, teacher, seq, 5, topk=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = token_stats(student, teacher, seq, 5, topk=4)
    for name in FIELDS + ("student_top_probs", "teacher_top_probs", "student_top_ids"):
        assert torch.equal(getattr(autocast, name), getattr(plain, name)), name
    assert autocast.entropy.dtype == torch.float32


def test_float32_error_at_a_real_vocabulary_size_is_within_6e_6_nats():
    v = 151_936  # Qwen's padded vocabulary
    g = torch.Generator().manual_seed(7)
    base = torch.randn(5, v, generator=g) * 3
    student = base.clone()
    student[1, 17] += 25.0  # a confident row
    student[2] = torch.randn(v, generator=g) * 0.1  # a nearly uniform row
    teacher = base + torch.randn(5, v, generator=g) * 0.05  # close to the student: small KL
    teacher[3] = torch.randn(v, generator=g) * 3  # and far from it
    teacher[4, 5] += 30.0
    stats = token_stats(student, teacher, torch.zeros(5, dtype=torch.long), 2)
    ref = naive_stats(student, teacher)
    log_v = math.log(v)
    for name in FIELDS:
        scale = log_v if "entropy" in name else 1.0  # compare in nats
        err = (getattr(stats, name).double() * scale - ref[name] * scale).abs().max().item()
        assert err <= 6e-6, (name, err)


def test_token_stats_is_stats_from_nats_of_the_float32_sums():
    g = torch.Generator().manual_seed(8)
    s, t = torch.randn(6, 40, generator=g) * 3, torch.randn(6, 50, generator=g) * 3
    ref = naive_stats(s, t)
    nats = [ref[name] * (math.log(40) if "entropy" in name else 1.0) for name in ("entropy", "teacher_entropy", "divergence", "forward_divergence")]
    expected = stats_from_nats(*nats, torch.zeros(6), 40)
    got = token_stats(s, t, torch.zeros(6, dtype=torch.long), 4)
    for name in FIELDS:
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=1e-6, rtol=1e-5, msg=name)


def test_zero_rows_and_cat_of_chunks():
    empty = token_stats(torch.zeros(0, 10), torch.zeros(0, 12), torch.zeros(0, dtype=torch.long), 4, topk=3)
    assert len(empty) == 0 and empty.student_top_ids.shape == (0, 3)
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(12, 10, generator=g), torch.randn(12, 12, generator=g)
    seq = torch.arange(12) // 4
    whole = token_stats(s, t, seq, 5, topk=3)
    # the loop's memory-saving path: one call per slice of rows, then cat (an empty slice included)
    parts = [token_stats(s[a:b], t[a:b], seq[a:b], 5, topk=3) for a, b in [(0, 7), (7, 7), (7, 12)]]
    joined = TokenStats.cat(parts)
    for name in ("entropy", "divergence", "forward_divergence", "teacher_entropy", "sequence_ids", "student_top_ids", "teacher_top_probs"):
        assert torch.equal(getattr(joined, name), getattr(whole, name)), name
    assert len(TokenStats.cat([])) == 0
    # an empty micro-batch's stats (no top-k, or a different width) do not spoil the rest
    no_rows = token_stats(torch.zeros(0, 1), torch.zeros(0, 1), seq[:0], 5)
    with_empty = TokenStats.cat([no_rows, whole, no_rows])
    assert torch.equal(with_empty.student_top_ids, whole.student_top_ids)
    assert torch.equal(with_empty.entropy, whole.entropy)
    with pytest.raises(ValueError, match="top-k"):
        TokenStats.cat([whole, token_stats(s, t, seq, 5)])


def test_topk_matches_torch_topk_and_subset_to():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(6, 20, generator=g), torch.randn(6, 25, generator=g)
    stats = token_stats(s, t, torch.zeros(6, dtype=torch.long), 4, topk=5)
    probs, ids = torch.softmax(s, -1).topk(5)
    assert torch.equal(stats.student_top_ids, ids)
    torch.testing.assert_close(stats.student_top_probs, probs)
    t_probs, t_ids = torch.softmax(t[:, :20], -1).topk(5)
    assert torch.equal(stats.teacher_top_ids, t_ids)
    torch.testing.assert_close(stats.teacher_top_probs, t_probs)
    sub = stats.subset(torch.tensor([4, 1])).to("cpu")
    assert len(sub) == 2 and torch.equal(sub.student_top_ids, ids[[4, 1]])
    assert len(empty_stats(topk=2)) == 0


def test_bad_input_errors_name_the_problem():
    x = torch.zeros(4, 5)
    seq = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="rows"):
        token_stats(x, torch.zeros(3, 5), seq, 2)
    with pytest.raises(ValueError, match="sequence_ids"):
        token_stats(x, x, torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="chunk_size"):
        token_stats(x, x, seq, 0)
    with pytest.raises(ValueError, match="2-D"):
        token_stats(torch.zeros(4), x, seq, 2)


def test_hidden_states_through_the_heads_equal_their_logits():
    """The fused path's route (LM heads applied chunk by chunk) gives the statistics of the logits h @ W.T."""
    g = torch.Generator().manual_seed(9)
    h, th = torch.randn(11, 8, generator=g), torch.randn(11, 6, generator=g)
    w, tw = torch.randn(40, 8, generator=g), torch.randn(44, 6, generator=g)  # teacher head padded by 4 rows
    seq = torch.arange(11) // 3
    fused = token_stats(h, th, seq, 4, topk=3, heads=(w, tw))
    ref = token_stats(h @ w.T, th @ tw.T, seq, 4, topk=3)
    for name in FIELDS + ("student_top_probs", "teacher_top_probs"):
        torch.testing.assert_close(getattr(fused, name), getattr(ref, name), atol=1e-6, rtol=1e-5, msg=name)
    assert torch.equal(fused.teacher_top_ids, ref.teacher_top_ids) and torch.equal(fused.sequence_ids, seq)
