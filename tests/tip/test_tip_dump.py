"""Token dump: records carry the right numbers, texts and top-5 lists; write_jsonl appends."""

import json

import pytest
import torch

import tip
from conftest import select, tip_denominator
from opd.step import token_stats  # the one producer of TokenStats

VOCAB = "abcdefghijklmnopqrstuvwxyz"


def decode(i: int) -> str:
    return VOCAB[i]


def setup(n=12, topk=5):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(n, 26, generator=g) * 2
    teacher = torch.randn(n, 26, generator=g) * 2
    stats = token_stats(student, teacher, torch.arange(n) // 4, 5, topk=topk)
    selection = select("soft_or", stats, 0.5)
    quad = tip.quadrants(stats)
    token_ids = torch.randint(0, 26, (n,), generator=g)
    return student, teacher, stats, selection, quad, token_ids


def test_records_of_every_token_when_n_is_large():
    student, teacher, stats, selection, quad, token_ids = setup()
    places = torch.arange(12) % 4  # 3 rollouts of 4 response tokens
    records = tip.token_records(stats, selection, quad, token_ids, decode, n=100, step=7, response_positions=places)
    assert [(r["rollout"], r["response_position"]) for r in records] == [(i // 4, i % 4) for i in range(12)]
    for i, r in enumerate(records):
        assert r["step"] == 7 and "position" not in r and "sequence" not in r
        assert r["token"] == VOCAB[int(token_ids[i])]
        assert r["entropy"] == pytest.approx(float(stats.entropy[i]), rel=1e-5)
        assert r["divergence"] == pytest.approx(float(stats.divergence[i]), rel=1e-5)
        assert r["forward_divergence"] == pytest.approx(float(stats.forward_divergence[i]), rel=1e-5)
        assert r["teacher_entropy"] == pytest.approx(float(stats.teacher_entropy[i]), rel=1e-5)
        assert r["quadrant"] == int(quad[i]) and r["kept"] == bool(selection.mask[i])
        assert r["weight"] == float(selection.weights[i])
        # the top-5 lists come from the logits themselves
        probs, ids = torch.softmax(student[i], -1).topk(5)
        assert [t for t, _ in r["student_top5"]] == [VOCAB[j] for j in ids.tolist()]
        assert [p for _, p in r["student_top5"]] == pytest.approx(probs.tolist(), rel=1e-5)
        t_probs, t_ids = torch.softmax(teacher[i], -1).topk(5)
        assert [t for t, _ in r["teacher_top5"]] == [VOCAB[j] for j in t_ids.tolist()]
        assert [p for _, p in r["teacher_top5"]] == pytest.approx(t_probs.tolist(), rel=1e-5)


def test_random_subset_is_reproducible_and_top_lists_are_optional():
    _, _, stats, selection, quad, token_ids = setup(topk=0)
    a = tip.token_records(stats, selection, quad, token_ids, decode, n=4, generator=torch.Generator().manual_seed(3))
    b = tip.token_records(stats, selection, quad, token_ids, decode, n=4, generator=torch.Generator().manual_seed(3))
    assert a == b and len(a) == 4 and len({r["token"] + str(r["entropy"]) for r in a}) == 4
    assert "student_top5" not in a[0] and "teacher_top5" not in a[0]
    assert "response_position" not in a[0]  # not given, not invented
    assert tip.token_records(stats, selection, quad, token_ids, decode, n=0) == []


def test_write_jsonl_appends(tmp_path):
    _, _, stats, selection, quad, token_ids = setup()
    records = tip.token_records(stats, selection, quad, token_ids, decode, n=3, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "run" / "tokens.jsonl"
    tip.write_jsonl(path, records)
    tip.write_jsonl(path, records)
    lines = path.read_text().splitlines()
    assert len(lines) == 6 and [json.loads(x) for x in lines] == records + records


def test_mismatched_lengths_are_errors():
    _, _, stats, selection, quad, token_ids = setup()
    with pytest.raises(ValueError, match="token_ids has 11 tokens"):
        tip.token_records(stats, selection, quad, token_ids[:11], decode, n=3)
    with pytest.raises(ValueError, match="response_positions has 5 tokens"):
        tip.token_records(stats, selection, quad, token_ids, decode, n=3, response_positions=torch.arange(5))
