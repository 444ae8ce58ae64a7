"""PolicyModel(embedding_rows=True): the input embedding's gradient added from its lookups' rows after the backward
equals autograd's (tied and untied heads, padding ids, length groups, gradient accumulation, bf16 autocast,
bf16 weights), on both loss paths; and what it never does."""

import pytest
import torch

from lm.config import ModelConfig
from lm.models import head_weight, load_model
from lm.tokenizers import char_tokenizer
from opd.policy import PolicyModel, plain_embedding
from opd.step import MicroBatch, StepSettings, denominator, student_microbatch

import tip
from conftest import teacher_of

TOK = char_tokenizer()
CPU = torch.device("cpu")


def student(tied: bool, dtype=torch.float32, vocab=0):
    lm = load_model(ModelConfig(arch="qwen3", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                intermediate_size=64, vocab_size=vocab, tie_word_embeddings=tied), TOK, CPU,
                    trainable=True)
    return lm.to(dtype)


TEACHER = load_model(ModelConfig(arch="qwen3", hidden_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                                 intermediate_size=64, init_seed=3), TOK, CPU, trainable=False)


def batch(rows=6, length=20, seed=0, pad_inside=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, len(TOK), (rows, length), generator=g)
    ids[:, 3] = ids[0, 3]  # one id many times: its rows must add up
    att = torch.ones(rows, length, dtype=torch.long)
    resp = torch.zeros(rows, length, dtype=torch.long)
    for r in range(rows):
        p = 5 + r % 4
        end = length - (r * 3) % 11
        resp[r, p:end] = 1
        att[r, end:] = 0
        ids[r, end:] = TOK.pad_token_id
    if pad_inside:  # the pad id as a real prompt token: autograd gives its row no gradient (padding_idx)
        ids[:, 1] = TOK.pad_token_id
    return MicroBatch(ids, att, resp, torch.ones(rows), torch.arange(rows))


def grads(policy, micro, impl="fused", autocast=False, selector="all", ratio=1.0):
    st = StepSettings(loss_impl=impl, loss_type="reverse_kl", beta=0.5, chunk_size=7, selector=selector, ratio=ratio,
                      scope="microbatch", select_options={"normalize": "minmax", "momentum": 0.9,
                                                          "importance_weighting": False})
    policy.zero_grad(set_to_none=True)
    z = denominator(micro, st)
    gen = torch.Generator().manual_seed(0)
    for mb in micro:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            side = teacher_of(TEACHER, impl, CPU, group=policy.group).score([mb])[0]
            student_microbatch(policy, head_weight(policy.lm), head_weight(TEACHER), mb, side, st, 1.0 / z,
                               lambda key: gen, tip.RunningMinMax(), lambda loss: loss.backward())
        policy.add_embedding_grads()
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


def compare(make, micro, group=False, atol=1e-6, rtol=1e-5, **kw):
    """make() builds the student (the same weights every call): the embedding's hook stays with its model."""
    rows = grads(PolicyModel(make(), group=group, embedding_rows=True), micro, **kw)
    autograd = grads(PolicyModel(make(), group=group), micro, **kw)
    assert rows.keys() == autograd.keys() and rows
    for name in autograd:
        torch.testing.assert_close(rows[name], autograd[name], atol=atol, rtol=rtol, msg=name)
    return rows, autograd


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("group", [False, True])
def test_embedding_rows_give_autograds_gradients(impl, tied, group):
    """Two micro-batches (the second adds onto the first's gradient), padding ids inside the prompts, an id that
    recurs in every row; padded and length-grouped forwards."""
    lm = student(tied)
    assert plain_embedding(lm.get_input_embeddings())
    assert (lm.get_input_embeddings().weight is lm.get_output_embeddings().weight) == tied
    micro = [batch(seed=1, pad_inside=True), batch(rows=3, seed=2)]
    rows, _ = compare(lambda: student(tied), micro, group=group, impl=impl)
    assert rows["lm.model.embed_tokens.weight"].abs().sum() > 0


def test_the_pad_row_gets_no_embedding_gradient():
    """Untied: the embedding's gradient comes from the lookups alone, and the pad id's row (padding_idx) stays 0,
    as autograd leaves it, though the pad id is looked up in every row; prompt tokens' rows do get gradient."""
    assert student(tied=False).get_input_embeddings().padding_idx == TOK.pad_token_id
    rows, _ = compare(lambda: student(tied=False), [batch(seed=3, pad_inside=True)])
    name = "lm.model.embed_tokens.weight"
    assert rows[name][TOK.pad_token_id].abs().max() == 0
    prompt_ids = torch.unique(batch(seed=3, pad_inside=True).input_ids[:, [0, 2, 3, 4]])  # seen by every response
    assert (rows[name][prompt_ids].abs().sum(1) > 0).all()


@pytest.mark.parametrize("selector,ratio", [("all", 1.0), ("soft_or", 0.5)])
def test_embedding_rows_under_bf16_autocast(selector, ratio):
    """The lookups run in float32 under autocast (torch does not autocast embeddings): the same gradients."""
    compare(lambda: student(tied=True), [batch(seed=4)], autocast=True, selector=selector, ratio=ratio, atol=1e-5, rtol=1e-4)


def test_embedding_rows_with_bf16_weights():
    """bf16 weights: the rows of an id summed in float32 and rounded once, as autograd's embedding backward does;
    the result within one bf16 rounding of autograd's."""
    rows = grads(PolicyModel(student(tied=True, dtype=torch.bfloat16), embedding_rows=True), [batch(seed=5)])
    autograd = grads(PolicyModel(student(tied=True, dtype=torch.bfloat16)), [batch(seed=5)])
    for name in autograd:
        scale = autograd[name].float().abs().max().item()
        assert (rows[name].float() - autograd[name].float()).abs().max().item() <= 2 ** -7 * scale, name


def test_lookups_outside_a_backward_add_nothing_and_are_dropped():
    lm = student(tied=True)
    policy = PolicyModel(lm, embedding_rows=True)
    mb = batch(seed=6)
    with torch.no_grad():
        policy(mb.input_ids, mb.attention_mask, hidden=True)
    assert policy._lookups == []  # no graph, nothing recorded
    policy(mb.input_ids, mb.attention_mask, hidden=True)  # a forward no backward reaches
    assert len(policy._lookups) == 1
    policy.add_embedding_grads()
    assert policy._lookups == [] and lm.get_input_embeddings().weight.grad is None


def test_only_a_plain_embedding_takes_rows():
    class Scaled(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    assert not plain_embedding(Scaled(10, 4))
    assert not plain_embedding(torch.nn.Embedding(10, 4, max_norm=1.0))
    assert not plain_embedding(torch.nn.Embedding(10, 4, scale_grad_by_freq=True))
    assert not plain_embedding(torch.nn.Embedding(10, 4, sparse=True))
    lm = student(tied=True)
    lm.set_input_embeddings(Scaled(lm.get_input_embeddings().num_embeddings, 32))
    assert not PolicyModel(lm, embedding_rows=True).embedding_rows
