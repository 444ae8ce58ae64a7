"""Forwards in length groups (lm.length_groups) against the padded forward transformers runs: the same states
and gradients, fp32 and bf16 autocast, for every architecture the trainer builds."""

import itertools
import random

import pytest
import torch

from lm.config import ModelConfig
from lm.length_groups import CALL_SLOTS, plan, split, states, states_at
from lm.models import load_model
from lm.tokenizers import char_tokenizer

TOK = char_tokenizer()
CPU = torch.device("cpu")
ARCHS = ["qwen3", "llama", "qwen2"]


def model(arch="qwen3", attention="sdpa", seed=0, trainable=False):
    mc = ModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                     attn_implementation=attention, init_seed=seed)
    return load_model(mc, TOK, CPU, trainable=trainable)


def rollouts(rows=7, seed=0):
    """A batch as lm.rollout assembles it: left-padded prompts of 3-9 tokens, right-padded responses of 0-20."""
    rng = random.Random(seed)
    prompts = [rng.randint(3, 9) for _ in range(rows)]
    responses = [rng.choice([0, 2, 5, 20, 20]) + rng.randint(0, 3) for _ in range(rows)]
    width = max(prompts) + max(responses)
    ids = torch.randint(6, len(TOK), (rows, width), generator=torch.Generator().manual_seed(seed))
    att = torch.zeros(rows, width, dtype=torch.long)
    resp = torch.zeros(rows, width, dtype=torch.long)
    for r, (p, n) in enumerate(zip(prompts, responses)):
        att[r, max(prompts) - p:max(prompts) + n] = 1
        resp[r, max(prompts):max(prompts) + n] = 1
    return ids, att, resp[:, 1:].bool()


def cost(lengths, groups):
    return sum(len(g) * max(lengths[r] for r in g) for g in groups) + CALL_SLOTS * (len(groups) - 1)


def test_split_is_the_cheapest_contiguous_split_of_the_sorted_rows():
    rng = random.Random(3)
    for _ in range(300):
        lengths = [rng.choice([0, rng.randint(1, 40), rng.randint(40, 200)]) for _ in range(rng.randint(1, 9))]
        groups = split(lengths)
        order = sorted((r for r, n in enumerate(lengths) if n), key=lambda r: (lengths[r], r))
        assert [r for g in groups for r in g] == order  # every row of length > 0 once, in sorted order
        if not order:
            continue
        best = min(cost(lengths, [order[i:j] for i, j in zip((0, *cuts), (*cuts, len(order)))])
                   for k in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), k))
        assert cost(lengths, groups) == best


def test_plan_moves_every_row_to_its_group_start():
    ids, att, _ = rollouts(rows=9, seed=1)
    groups = plan(att)
    assert groups and len(groups) > 1
    real = att.bool()
    seen = []
    for g in groups:
        gids, gmask = g.inputs(ids)
        assert gmask.shape[1] == int(real[g.rows].sum(1).max())  # as wide as its longest row
        for k, r in enumerate(g.rows.tolist()):
            n = int(real[r].sum())
            assert gmask[k].tolist() == [1] * n + [0] * (gmask.shape[1] - n)
            assert torch.equal(gids[k, :n], ids[r][real[r]])
            seen.append(r)
    assert sorted(seen) == [r for r in range(9) if real[r].any()]
    assert sum(g.source.numel() for g in groups) < ids.numel()


def test_plan_declines_batches_it_cannot_shrink_or_with_holes():
    ids = torch.randint(6, 30, (3, 8))
    assert plan(torch.ones(3, 8, dtype=torch.long)) is None
    holes = torch.ones(3, 8, dtype=torch.long)
    holes[1, 3] = 0
    holes[2, 6:] = 0
    assert plan(holes) is None
    with torch.no_grad():
        rows, where = states(model(), ids, torch.ones(3, 8, dtype=torch.long), group=True)
    assert rows.shape[0] == ids.numel() and torch.equal(where.reshape(-1), torch.arange(ids.numel()))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_grouped_states_equal_padded_states(arch, attention):
    m = model(arch, attention)
    ids, att, pos = rollouts()
    with torch.no_grad():
        padded = m.model(input_ids=ids, attention_mask=att).last_hidden_state[:, :-1][pos]
        grouped = states_at(m, ids, att, pos, group=True)
        unchanged = states_at(m, ids, att, pos, group=False)
    assert len(plan(att)) > 1 and grouped.shape == padded.shape
    assert torch.equal(unchanged, padded)
    torch.testing.assert_close(grouped, padded, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_grouped_states_under_bf16_autocast_are_as_close_to_float32_as_padded_ones(arch):
    m = model(arch)
    ids, att, pos = rollouts(seed=2)
    with torch.no_grad():
        exact = states_at(m, ids, att, pos, group=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            padded = states_at(m, ids, att, pos, group=False).float()
            grouped = states_at(m, ids, att, pos, group=True).float()
    padded_err = (padded - exact).abs().max().item()
    assert 0 < padded_err < 0.1
    assert (grouped - exact).abs().max().item() <= 2 * padded_err


@pytest.mark.parametrize("arch", ARCHS)
def test_grouped_forwards_give_the_padded_gradients(arch):
    m = model(arch, trainable=True)
    ids, att, pos = rollouts(seed=4)
    target = torch.randn(int(pos.sum()), 32, generator=torch.Generator().manual_seed(0))

    def grads(group):
        m.zero_grad(set_to_none=True)
        (states_at(m, ids, att, pos, group) * target).sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    want, got = grads(False), grads(True)
    assert want.keys() == got.keys() and want
    for name in want:  # float32 rounding of sums over ~100 rows: within 1e-6 of the gradient's largest entry
        assert (got[name] - want[name]).abs().max() <= 1e-6 * want[name].abs().max(), name


@pytest.mark.parametrize("group", [True, False])
def test_calls_made_up_to_every_processes_count_run_forward_and_backward_and_change_nothing(group):
    """ZeRO-3 (every process must make the same forward and backward calls): same_calls says every process makes 2
    calls more than this one; they run, on one token, in the forward and in the backward, and the states and
    gradients are this process's own."""
    m = model(trainable=True)
    ids, att, pos = rollouts(seed=6)
    target = torch.randn(int(pos.sum()), 32, generator=torch.Generator().manual_seed(1))
    calls, backward_calls, asked = [], [], []
    layer = m.model.layers[0]
    layer.register_forward_hook(lambda mod, a, out: calls.append(a[0].shape[:2]))
    layer.register_full_backward_hook(lambda mod, gi, go: backward_calls.append(go[0].shape[:2]))

    def run(same_calls):
        calls.clear(), backward_calls.clear()
        m.zero_grad(set_to_none=True)
        out = states_at(m, ids, att, pos, group, same_calls)
        (out * target).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    own_out, own_grads = run(None)
    own_calls = len(calls)
    assert own_calls == (len(plan(att)) if group else 1) and (own_calls > 1) == group
    out, grads = run(lambda n: asked.append((n, len(calls))) or n + 2)
    # asked before any forward (under ZeRO-3 a forward's gathers are collectives the agreement must not cross)
    assert asked == [(own_calls, 0)] and len(calls) == own_calls + 2 and calls[-2:] == [torch.Size([1, 1])] * 2
    assert len(backward_calls) == own_calls + 2  # the made-up calls are in the graph: the backward runs them too
    assert torch.equal(out, own_out)
    for name in own_grads:
        torch.testing.assert_close(grads[name], own_grads[name], atol=0, rtol=0, msg=name)
    with torch.no_grad():  # no graph (the teacher): the calls run, nothing joins
        states_at(m, ids, att, pos, group, lambda n: n + 1)
