"""Tokenizer compatibility, rollouts and prompt data."""

import json

import pytest
import torch

from opd.config import DataConfig
from lm.config import ModelConfig
from opd.data import DataError, PromptSampler, load_prompts
from lm.tokenizers import char_tokenizer, check_tokenizers
from lm.models import load_model
from lm.rollout import sample


def test_padded_vocabulary_is_accepted_and_differing_ids_refused():
    tok = char_tokenizer()
    check_tokenizers(tok, char_tokenizer(), len(tok) + 128, len(tok))  # padded embedding rows: fine
    other = char_tokenizer("abcdefghijklmnopqrstuvwxyz0123456789+= ")
    with pytest.raises(ValueError, match="differ on"):
        check_tokenizers(tok, other, len(tok), len(other))
    with pytest.raises(ValueError, match="embedding rows"):
        check_tokenizers(tok, char_tokenizer(), len(tok) - 1, len(tok))


def test_rollouts_are_seeded_and_masked():
    tok = char_tokenizer()
    model = load_model(ModelConfig(arch="llama", hidden_size=32, num_heads=4, num_kv_heads=2), tok,
                       torch.device("cpu"), trainable=True)
    prompts = [tok("12+34=")["input_ids"], tok("7+8=")["input_ids"]]
    kw = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, max_new_tokens=9, n=3, seed=5,
              temperature=1.0, top_p=1.0, top_k=0, batch_size=0)
    a, b, c = sample(model, prompts, **kw), sample(model, prompts, **kw), sample(model, prompts, **{**kw, "seed": 6})
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    assert a.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert model.training  # restored after sampling
    for row, resp in enumerate(a.response_ids()):
        assert 1 <= len(resp) <= 9
        assert a.truncated[row] == (tok.eos_token_id not in resp)
        prompt = prompts[a.prompt_index[row]]
        start = a.prompt_length - len(prompt)
        assert a.input_ids[row, start:a.prompt_length].tolist() == prompt
        assert a.response_mask[row, :a.prompt_length].sum() == 0  # prompt tokens never count


def test_per_prompt_seeds_make_responses_independent_of_the_batch_and_keep_the_warpers():
    tok = char_tokenizer()
    model = load_model(ModelConfig(arch="llama", hidden_size=32, num_heads=4, num_kv_heads=2), tok,
                       torch.device("cpu"), trainable=True)
    p, q = tok("12+34=")["input_ids"], tok("56+78=")["input_ids"]  # same length: no padding difference
    kw = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, max_new_tokens=12, n=2, batch_size=0)
    plain = dict(temperature=1.0, top_p=1.0, top_k=0)
    both = sample(model, [p, q], prompt_seeds=[11, 22], seed=0, **plain, **kw).response_ids()
    alone = sample(model, [q], prompt_seeds=[22], seed=7, **plain, **kw).response_ids()
    assert both[2:] == alone  # the second prompt's responses, sampled with or without the first
    assert both[:2] != sample(model, [p], prompt_seeds=[12], **plain, **kw).response_ids()  # the seed matters
    # temperature, top-k and top-p still apply: each of these leaves only the greedy token
    greedy = sample(model, [p, q], **{**plain, "temperature": 0.0}, **kw).response_ids()
    for warp in ({"temperature": 1e-4}, {"top_k": 1}, {"top_p": 1e-6}):
        assert sample(model, [p, q], prompt_seeds=[11, 22], **{**plain, **warp}, **kw).response_ids() == greedy, warp


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_bad_records_are_skipped_with_counts_or_refused_with_line(tmp_path):
    tok = char_tokenizer()
    path = write(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "1+1=", "answer": "2"}),
        "{not json",
        json.dumps({"prompt": "", "answer": "0"}),
        json.dumps({"question": "no prompt"}),
        json.dumps({"prompt": "9" * 200, "answer": "x"}),
        json.dumps({"prompt": "2+2=", "answer": "4"}),
    ])
    dc = DataConfig(train_path=path, max_prompt_length=64, chat_template=False)
    train, val, report = load_prompts(dc, tok, seed=0)
    assert len(train) == 2 and not val
    assert report.skipped == {"malformed lines": 1, "empty prompt": 1, "missing field `prompt`": 1,
                              "prompts over max_prompt_length": 1}
    with pytest.raises(DataError, match=r"p.jsonl:2: malformed JSON"):
        load_prompts(DataConfig(train_path=path, bad_records="error"), tok, seed=0)
    trunc = DataConfig(train_path=path, max_prompt_length=64, long_prompts="truncate_left", chat_template=False)
    assert len(load_prompts(trunc, tok, seed=0)[0]) == 3


def test_split_and_sampler_are_deterministic_and_resumable(tmp_path):
    tok = char_tokenizer()
    path = write(tmp_path / "p.jsonl", [json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) for i in range(50)])
    dc = DataConfig(train_path=path, val_ratio=0.2)
    train, val, _ = load_prompts(dc, tok, seed=3)
    train2, val2, _ = load_prompts(dc, tok, seed=3)
    assert len(val) == 10 and [p.ids for p in val] == [p.ids for p in val2]
    assert not {tuple(p.ids) for p in val} & {tuple(p.ids) for p in train}
    a = PromptSampler(train, seed=1)
    first = [p.answer for p in a.next_batch(30)]  # crosses an epoch boundary (40 prompts)
    state = a.state_dict()
    rest = [p.answer for p in a.next_batch(30)]
    b = PromptSampler(train2, seed=1)
    b.load_state_dict(state)
    assert [p.answer for p in b.next_batch(30)] == rest
    assert sorted(first + rest[:10]) == sorted(p.answer for p in train)  # one epoch = every prompt once
    with pytest.raises(DataError, match="not found"):
        load_prompts(DataConfig(train_path=str(tmp_path / "missing.jsonl")), tok, seed=0)


def test_chat_template_and_thinking_flag_pass_through():
    from opd.data import encode_prompt

    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if enable_thinking %}T{% else %}N{% endif %}")
    on = encode_prompt(tok, "q", DataConfig(enable_thinking=True, instruction="!"))
    off = encode_prompt(tok, "q", DataConfig(enable_thinking=False))
    assert tok.decode(on) == "q\n!T" and tok.decode(off) == "qN"


def test_dedup_drops_repeated_prompts_before_the_split(tmp_path):
    tok = char_tokenizer()
    lines = [json.dumps({"prompt": f"{i % 5}+1=", "answer": str(i % 5 + 1)}) for i in range(40)]
    path = write(tmp_path / "p.jsonl", lines)
    train, val, report = load_prompts(DataConfig(train_path=path, dedup=True, val_ratio=0.2), tok, seed=0)
    assert len(train) + len(val) == 5 and report.skipped == {"repeated prompts": 35}
    assert len(load_prompts(DataConfig(train_path=path), tok, seed=0)[0]) == 40


def test_dapo_prompt_format_strips_dapos_instruction_and_dedups_the_stripped_prompts(tmp_path):
    from eval.benchmarks import _DAPO_PREFIX, _DAPO_SUFFIX
    tok = char_tokenizer()
    # the same question with and without DAPO's wording: one prompt once stripped (same token ids)
    records = [{"prompt": [{"role": "user", "content": _DAPO_PREFIX + "2+2=" + _DAPO_SUFFIX}], "answer": "4"},
               {"prompt": [{"role": "user", "content": "2+2="}], "answer": "4"},
               {"prompt": [{"role": "user", "content": _DAPO_PREFIX + "2+2=" + _DAPO_SUFFIX}], "answer": "4"}]
    path = write(tmp_path / "p.jsonl", [json.dumps(r) for r in records])
    dc = DataConfig(train_path=path, dedup=True, prompt_format="dapo", instruction="Box it.", instruction_separator="\n\n",
                    chat_template=False)
    train, val, report = load_prompts(dc, tok, seed=0)
    assert [tok.decode(p.ids, skip_special_tokens=True) for p in train] == ["2+2=\n\nBox it."]
    assert report.skipped == {"repeated prompts": 2}
    as_is = load_prompts(DataConfig(train_path=path, prompt_format="as_is", chat_template=False), tok, seed=0)[0]
    assert sum("Answer:" in tok.decode(p.ids) for p in as_is) == 2


def test_the_batched_rowwise_sampler_draws_from_the_warped_distribution():
    from lm.rollout import RowwiseSampler

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    seeds = list(range(20000))
    scores = RowwiseSampler(seeds, prompt_width=3, temperature=1.0, top_k=0, top_p=1.0)(
        torch.zeros(len(seeds), 3, dtype=torch.long), logits.expand(len(seeds), -1))
    assert ((scores == 0).sum(1) == 1).all() and (scores[scores != 0] == float("-inf")).all()  # one token kept per row
    share = torch.bincount(scores.argmax(1), minlength=5).double() / len(seeds)
    assert torch.allclose(share, torch.softmax(logits[0].double(), 0), atol=0.01)  # 20k draws: sd <= 0.0035
    # a row's draw depends on its seed and counter only: the same seeds in another order draw the same tokens
    shuffled = RowwiseSampler(seeds[::-1], prompt_width=3, temperature=1.0, top_k=0, top_p=1.0)(
        torch.zeros(len(seeds), 3, dtype=torch.long), logits.expand(len(seeds), -1))
    assert torch.equal(shuffled.argmax(1).flip(0), scores.argmax(1))
    # the next token (counter 1) is a fresh draw
    later = RowwiseSampler(seeds, prompt_width=3, temperature=1.0, top_k=0, top_p=1.0)(
        torch.zeros(len(seeds), 4, dtype=torch.long), logits.expand(len(seeds), -1))
    assert (later.argmax(1) != scores.argmax(1)).float().mean() > 0.3
