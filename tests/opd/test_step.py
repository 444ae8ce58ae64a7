"""The training step: fused == reference, normalisation, gradient flow."""

import dataclasses
import functools

import pytest
import torch

from lm.config import ModelConfig
from lm.models import head_weight, load_model
from lm.tokenizers import char_tokenizer
from opd.policy import PolicyModel
from opd.step import MicroBatch, StepSettings, denominator, fold_running_range, student_microbatch

import tip
from conftest import select, teacher_of, tip_denominator

TOK = char_tokenizer()
CPU = torch.device("cpu")


@functools.lru_cache(maxsize=None)
def models(student_vocab=0, teacher_vocab=0, arch="qwen3"):
    """Tiny student/teacher, built once per shape (tests that train build their own)."""
    return fresh_models(student_vocab, teacher_vocab, arch)


def fresh_models(student_vocab=0, teacher_vocab=0, arch="qwen3"):
    s = load_model(ModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                               intermediate_size=64, vocab_size=student_vocab), TOK, CPU, trainable=True)
    t = load_model(ModelConfig(arch=arch, hidden_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                               intermediate_size=64, vocab_size=teacher_vocab, init_seed=3), TOK, CPU, trainable=False)
    return PolicyModel(s), t


def batch(rows=6, length=20, seed=0, weights=None, offset=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, len(TOK), (rows, length), generator=g)
    att = torch.ones(rows, length, dtype=torch.long)
    resp = torch.zeros(rows, length, dtype=torch.long)
    for r in range(rows):  # prompt of 5..8 tokens, response of varying length, right padding
        p = 5 + r % 4
        end = length - (r * 2) % 7
        resp[r, p:end] = 1
        att[r, end:] = 0
    w = torch.ones(rows) if weights is None else weights
    return MicroBatch(ids, att, resp, w, torch.arange(rows) + offset)


def settings(impl, selector="all", ratio=1.0, loss_type="reverse_kl", beta=0.5, scope="microbatch", iw=False):
    return StepSettings(loss_impl=impl, loss_type=loss_type, beta=beta, chunk_size=7, selector=selector,
                        ratio=ratio, scope=scope,
                        select_options={"normalize": "minmax", "momentum": 0.9, "importance_weighting": iw})


def grads_and_loss(policy, teacher, micro, st, seed=0, autocast=False):
    """Run one update's micro-batches; return (loss, {param: grad}). The teacher runs in length groups when the
    student does (policy.group); autocast: the forwards under bf16 autocast, as the trainer runs them."""
    policy.zero_grad(set_to_none=True)
    z = denominator(micro, st)
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for mb in micro:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            cached = teacher_of(teacher, st.loss_impl, CPU, group=policy.group).score([mb])[0]
            _, sel, value = student_microbatch(policy, head_weight(policy.lm), head_weight(teacher), mb, cached, st,
                                               1.0 / z, lambda key: gen, tip.RunningMinMax(),
                                               lambda loss: loss.backward())
        total += value
    return total / z, {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


def assert_same(a, b, atol=1e-5, rtol=1e-4):
    (la, ga), (lb, gb) = a, b
    assert abs(la - lb) <= atol + rtol * abs(lb)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("loss_type,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5)])
@pytest.mark.parametrize("selector,ratio", [("all", 1.0), ("soft_or", 0.5), ("entropy_topk", 0.2), ("q3_only", 0.2),
                                            ("entropy_sample", 0.5), ("teacher_entropy", 1.0)])
def test_fused_equals_reference(loss_type, beta, selector, ratio):
    policy, teacher = models(student_vocab=len(TOK) + 5, teacher_vocab=len(TOK) + 17)  # padded differently
    micro = [batch(seed=1, weights=torch.tensor([1.0, 0.5, 2.0, 1.0, 0.1, 1.4])), batch(rows=3, seed=2, offset=6)]
    ref = grads_and_loss(policy, teacher, micro, settings("reference", selector, ratio, loss_type, beta))
    fused = grads_and_loss(policy, teacher, micro, settings("fused", selector, ratio, loss_type, beta))
    assert_same(fused, ref)


def test_fused_equals_reference_with_importance_weights_and_sequence_scope():
    policy, teacher = models()
    micro = [batch(seed=4)]
    st = dict(selector="entropy_sample", ratio=0.5, scope="sequence", iw=True)
    assert_same(grads_and_loss(policy, teacher, micro, settings("fused", **st)),
                grads_and_loss(policy, teacher, micro, settings("reference", **st)))


def test_teacher_hidden_path_equals_teacher_logits():
    _, teacher = models(teacher_vocab=len(TOK) + 9)
    mb = batch(seed=5)
    logits = teacher_of(teacher, "reference", CPU).score([mb])[0]
    hidden = teacher_of(teacher, "fused", CPU).score([mb])[0]
    assert (logits.kind, hidden.kind) == ("logits", "hidden")
    torch.testing.assert_close(hidden.values @ head_weight(teacher).T, logits.values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("selector,ratio", [("all", 1.0), ("soft_or", 0.5)])
def test_micro_batch_split_does_not_change_gradients(impl, selector, ratio, group):
    """Loss normalised by the global token count: one micro-batch of 6 rows == 3 of 2 rows
    (with sequence scope, so the kept set does not depend on the split); in length groups too (each split
    groups its rows differently)."""
    policy, teacher = models()
    policy = PolicyModel(policy.lm, group=group)
    whole = batch(rows=6, seed=7)
    parts = [MicroBatch(*(getattr(whole, f)[i:i + 2] for f in ("input_ids", "attention_mask", "response_mask",
                                                                "sample_weight", "sequence_ids")))
             for i in range(0, 6, 2)]
    st = settings(impl, selector, ratio, scope="sequence")
    assert_same(grads_and_loss(policy, teacher, parts, st), grads_and_loss(policy, teacher, [whole], st))


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("selector,ratio", [("all", 1.0), ("soft_or", 0.5), ("entropy_sample", 0.2)])
def test_length_groups_give_the_padded_step(impl, selector, ratio):
    """Teacher and student in length groups (lm.length_groups) == both padded: the same statistics, selection, loss,
    gradients."""
    policy, teacher = models()
    grouped = PolicyModel(policy.lm, group=True)
    micro = [batch(seed=9, weights=torch.tensor([1.0, 0.5, 2.0, 1.0, 0.1, 1.4])), batch(rows=3, seed=10, offset=6)]
    st = settings(impl, selector, ratio)
    assert_same(grads_and_loss(grouped, teacher, micro, st), grads_and_loss(policy, teacher, micro, st))


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_length_groups_under_bf16_autocast_stay_as_close_to_float32_as_padded_forwards(impl):
    """Under bf16 autocast the backbones round differently grouped and padded; each is as far from the float32
    step as the other (the loss within 2x, every gradient within 2x of the padded one's error + 1e-6)."""
    policy, teacher = models()
    grouped = PolicyModel(policy.lm, group=True)
    micro = [batch(seed=11)]
    st = settings(impl, "soft_or", 0.5)
    exact_loss, exact = grads_and_loss(policy, teacher, micro, st)
    pad_loss, pad = grads_and_loss(policy, teacher, micro, st, autocast=True)
    group_loss, group = grads_and_loss(grouped, teacher, micro, st, autocast=True)
    assert abs(group_loss - exact_loss) <= 2 * abs(pad_loss - exact_loss) + 1e-6
    for name in exact:
        pad_err = (pad[name] - exact[name]).abs().max().item()
        assert (group[name] - exact[name]).abs().max().item() <= 2 * pad_err + 1e-6, name


def test_loss_is_mean_over_kept_tokens():
    policy, teacher = models()
    mb = batch(seed=8)
    loss, _ = grads_and_loss(policy, teacher, [mb], settings("reference", "all", 1.0))
    with torch.no_grad():
        pos = mb.positions()
        s = policy(mb.input_ids, mb.attention_mask, hidden=False)[:, :-1][pos]
        t = teacher(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1][pos]
        expected = (s.log_softmax(-1).exp() * (s.log_softmax(-1) - t.log_softmax(-1))).sum(-1).mean()
    assert abs(loss - float(expected)) < 1e-5
    assert denominator([mb], settings("reference")) == int(mb.response_mask[:, 1:].sum())


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_gradients_reach_student_only_and_divergence_falls(impl):
    policy, teacher = fresh_models()
    st = settings(impl)
    mb = batch(seed=9)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss, grads = grads_and_loss(policy, teacher, [mb], st)
        losses.append(loss)
        opt.step()
    assert len(grads) == sum(1 for p in policy.parameters())  # every student parameter got a gradient
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("topk", [3, 0])  # 0: fused stats-free selectors take the loss kernel's own statistics
@pytest.mark.parametrize("selector,ratio", [("all", 1.0), ("random", 0.5), ("soft_or", 0.5)])
def test_token_stats_and_selection_are_the_same_on_both_paths(selector, ratio, topk):
    """Stats-free selectors get their kept tokens' stats from the loss pass; the result must not change."""
    policy, teacher = models(teacher_vocab=len(TOK) + 3)
    mb = batch(seed=11)
    out = {}
    for impl in ("reference", "fused"):
        st = settings(impl, selector, ratio)
        st.topk = topk
        cached = teacher_of(teacher, impl, CPU).score([mb])[0]
        stats, sel, _ = student_microbatch(policy, head_weight(policy.lm), head_weight(teacher), mb, cached, st, 1.0,
                                           lambda key: torch.Generator().manual_seed(2), tip.RunningMinMax(), lambda loss: None)
        out[impl] = (stats, sel)
    (s_ref, sel_ref), (s_fused, sel_fused) = out["reference"], out["fused"]
    assert torch.equal(sel_ref.mask, sel_fused.mask)
    for name in ("entropy", "divergence", "forward_divergence", "teacher_entropy") + (
            ("student_top_probs", "teacher_top_probs") if topk else ()):
        torch.testing.assert_close(getattr(s_fused, name), getattr(s_ref, name), atol=1e-5, rtol=1e-4, msg=name)
    assert torch.equal(s_fused.sequence_ids, s_ref.sequence_ids)
    if topk:
        assert torch.equal(s_fused.teacher_top_ids, s_ref.teacher_top_ids)


def test_running_range_folds_once_per_update_from_every_process():
    """Two processes' micro-batch statistics, reduced and folded once, give the state that one fold of
    all the update's tokens gives; select() itself never changes it."""
    g = torch.Generator().manual_seed(12)
    parts = [tip.TokenStats(torch.rand(n, generator=g), torch.rand(n, generator=g) * 3, torch.rand(n, generator=g),
                            torch.rand(n, generator=g) * 0.1, torch.zeros(n, dtype=torch.long)) for n in (5, 0, 9, 4)]
    processes = [parts[:2], parts[2:]]
    split, whole = tip.RunningMinMax(), tip.RunningMinMax()
    for _ in range(2):  # two updates: the first initialises, the second is one EMA step
        fold_running_range(split, processes[0], 0.7, gather=lambda mine: [mine, [tip.extrema(s) for s in processes[1]]])
        whole.fold(tip.extrema(tip.TokenStats.cat(parts)), 0.7)
    assert split == whole and split.lo
    before = split.state_dict()
    select("soft_or", parts[0], 0.5, state=split, normalize="running")
    assert split.state_dict() == before


def split_rows(mb: MicroBatch, sizes: list[int]) -> list[MicroBatch]:
    """The same rollouts as consecutive micro-batches of `sizes` rows."""
    out, start = [], 0
    for n in sizes:
        rows = slice(start, start + n)
        out.append(MicroBatch(mb.input_ids[rows], mb.attention_mask[rows], mb.response_mask[rows],
                              mb.sample_weight[rows], mb.sequence_ids[rows]))
        start += n
    return out


def run_split(policy, teacher, micro, st, state):
    """Loss, gradients and the concatenated selection of one update, with per-scope seeded generators."""
    policy.zero_grad(set_to_none=True)
    z = denominator(micro, st)
    total, masks, weights = 0.0, [], []
    for j, mb in enumerate(micro):
        # as the trainer does: a rollout's generator from its global id, a micro-batch's from its place
        def generator_for(key, j=j):
            return torch.Generator().manual_seed(1000 + (int(key[1]) if key[0] == "sequence" else j))

        cached = teacher_of(teacher, st.loss_impl, CPU).score([mb])[0]
        _, sel, value = student_microbatch(policy, head_weight(policy.lm), head_weight(teacher), mb, cached, st,
                                           1.0 / z, generator_for, state, lambda loss: loss.backward())
        total += value
        masks.append(sel.mask)
        weights.append(sel.weights)
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return total / z, grads, torch.cat(masks), torch.cat(weights)


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("normalize", ["minmax", "running"])
@pytest.mark.parametrize("selector", sorted(tip.SELECTORS))
def test_sequence_scope_selection_and_gradients_do_not_depend_on_the_micro_batch_split(selector, normalize, impl):
    """SPEC §3: the same rollouts select the same tokens however they are split (1, 2 and uneven micro-batches)."""
    policy, teacher = models()
    mb = batch(rows=6, length=22, seed=3)
    state = tip.RunningMinMax()
    if normalize == "running":  # a range from an earlier update, narrower than this batch's
        state.fold({"entropy": (0.2, 0.6), "divergence": (0.1, 1.5), "forward_divergence": (0.1, 1.0),
                    "teacher_entropy": (0.0, 0.5)}, 0.9)
    st = dataclasses.replace(settings(impl, selector=selector, ratio=0.3, scope="sequence"),
                             select_options={"normalize": normalize, "momentum": 0.9, "importance_weighting": False})
    whole = run_split(policy, teacher, split_rows(mb, [6]), st, state)
    for sizes in ([3, 3], [1, 4, 1]):
        parts = run_split(policy, teacher, split_rows(mb, sizes), st, state)
        assert torch.equal(parts[2], whole[2]), sizes
        # weights from statistics: equal to rounding (a BLAS product may round a row differently in another shape)
        torch.testing.assert_close(parts[3], whole[3], atol=1e-7, rtol=1e-6, msg=str(sizes))
        assert_same(parts[:2], whole[:2], atol=1e-6, rtol=1e-5)


def test_microbatch_scope_all_tokens_does_not_depend_on_the_split():
    policy, teacher = models()
    mb = batch(rows=6, length=22, seed=4)
    st = settings("fused", selector="all")
    whole = run_split(policy, teacher, split_rows(mb, [6]), st, tip.RunningMinMax())
    parts = run_split(policy, teacher, split_rows(mb, [1, 4, 1]), st, tip.RunningMinMax())
    assert torch.equal(parts[2], whole[2])
    assert_same(parts[:2], whole[:2], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("selector,ratio", [("soft_or", 0.5), ("q3_only", 0.2), ("entropy_topk", 0.2),
                                            ("adaptive_kl", 0.5), ("all", 1.0)])
def test_under_bf16_autocast_fused_and_reference_select_the_same_tokens(selector, ratio):
    """The backbone runs in bf16; statistics and divergences stay float32 on both paths, so they agree."""
    policy, teacher = models(student_vocab=len(TOK) + 5, teacher_vocab=len(TOK) + 17)
    mb = batch(rows=6, length=24, seed=21)
    out = {}
    for impl in ("reference", "fused"):
        st = settings(impl, selector, ratio)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            policy.zero_grad(set_to_none=True)
            cached = teacher_of(teacher, impl, CPU).score([mb])[0]
            stats, sel, value = student_microbatch(policy, head_weight(policy.lm), head_weight(teacher), mb, cached, st,
                                                   1.0, lambda key: torch.Generator().manual_seed(5),
                                                   tip.RunningMinMax(), lambda loss: loss.backward())
        assert stats.entropy.dtype == torch.float32 and sel.weights.dtype == torch.float32
        out[impl] = (stats, sel, value, {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
    (s_ref, sel_ref, v_ref, g_ref), (s_fu, sel_fu, v_fu, g_fu) = out["reference"], out["fused"]
    assert torch.equal(sel_ref.mask, sel_fu.mask)
    torch.testing.assert_close(s_fu.divergence, s_ref.divergence, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(s_fu.entropy, s_ref.entropy, atol=2e-6, rtol=1e-5)
    assert abs(v_fu - v_ref) <= 1e-5 * max(1.0, abs(v_ref))
    # The head's gradient is float32 on both paths; the backbone's passes through bf16 backward ops, where
    # float32 differences of 1e-7 can flip a bf16 rounding: equal to bf16 precision (2^-8 ~ 0.4%).
    for name in g_ref:
        scale = max(float(g_ref[name].abs().max()), 1e-12)
        tol = 1e-5 if name in ("lm.lm_head.weight", "lm.model.norm.weight") else 1e-2
        torch.testing.assert_close(g_fu[name], g_ref[name], atol=tol * scale, rtol=0.0, msg=name)


def test_response_positions_count_from_each_rollouts_first_response_token():
    """tokens.jsonl's response_position: 0 at the first generated token, whatever the (left) padding and prompt."""
    from opd.step import MicroBatch
    # row 0: pad, 2 prompt tokens, 3 response tokens; row 1: 1 prompt token, 4 response tokens, then padding
    response = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 0]])
    mb = MicroBatch(input_ids=torch.zeros(2, 6, dtype=torch.long), attention_mask=torch.ones(2, 6, dtype=torch.long),
                    response_mask=response, sample_weight=torch.ones(2), sequence_ids=torch.arange(2))
    assert mb.response_positions().tolist() == [0, 1, 2, 0, 1, 2, 3]
    assert len(mb.response_positions()) == mb.num_tokens()
