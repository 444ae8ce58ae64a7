"""Several teachers by data source (teacher.routes, lm.teacher.RoutedTeacher).

The routed step against a naive one: every row's full logits from its own teacher's whole forward, the
statistics, selection and loss formed with plain log-softmax formulas in float64. Then whole runs: routes to
copies of the teacher train exactly what one teacher trains, a routed run reports each teacher and resumes,
and the ways a route can be wrong are refused in one line.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tip
from conftest import read_metrics, run_cli, tiny_config, write_config
from lm.config import ModelConfig
from lm.models import head_weight, load_model, rows
from lm.teacher import LocalTeacher, RoutedSide, RoutedTeacher
from lm.tokenizers import char_tokenizer
from opd.config import load_config
from opd.errors import RunError
from opd.policy import PolicyModel
from opd.setup import teacher_sections
from opd.step import MicroBatch, StepSettings, student_microbatch
from opd.trainer import train

TOK = char_tokenizer()
CPU = torch.device("cpu")


def tiny(hidden: int, seed: int, vocab: int = 0, trainable: bool = False):
    mc = ModelConfig(arch="qwen3", hidden_size=hidden, num_layers=1, num_heads=4, num_kv_heads=2,
                     intermediate_size=64, vocab_size=vocab, init_seed=seed, tokenizer="chars")
    return load_model(mc, TOK, CPU, trainable=trainable)


def micro_batch(route_ids: list[int], length: int = 18) -> MicroBatch:
    g = torch.Generator().manual_seed(7)
    n = len(route_ids)
    ids = torch.randint(6, len(TOK), (n, length), generator=g)
    att, resp = torch.ones(n, length, dtype=torch.long), torch.zeros(n, length, dtype=torch.long)
    for r in range(n):  # prompts of 4..6 tokens, responses ending at different places, right padding
        end = length - (3 * r) % 7
        resp[r, 4 + r % 3:end] = 1
        att[r, end:] = 0
    return MicroBatch(ids, att, resp, torch.linspace(0.5, 1.5, n), torch.arange(n), torch.tensor(route_ids))


def settings(selector: str, ratio: float, impl: str = "fused") -> StepSettings:
    return StepSettings(loss_impl=impl, loss_type="reverse_kl", beta=0.5, chunk_size=5, selector=selector,
                        ratio=ratio, scope="microbatch",
                        select_options={"normalize": "minmax", "momentum": 0.9, "importance_weighting": False})


@pytest.fixture(scope="module")
def pair():
    """A student (vocabulary padded by 3) and two teachers of other widths, one padded by 7."""
    student = PolicyModel(tiny(32, 0, vocab=len(TOK) + 3, trainable=True))
    teachers = {"default": tiny(32, 1), "b": tiny(48, 2, vocab=len(TOK) + 7)}
    return student, teachers


def routed(teachers: dict, reads: str = "hidden") -> RoutedTeacher:
    return RoutedTeacher({name: LocalTeacher(m, reads=reads, device=CPU, cache_device=CPU)
                          for name, m in teachers.items()}, "default")


def step(student, teacher: RoutedTeacher, mb: MicroBatch, st: StepSettings):
    """One routed micro-batch: (stats, selection, loss, gradients)."""
    student.zero_grad(set_to_none=True)
    side = teacher.score([mb])[0]
    stats, sel, loss = student_microbatch(student, head_weight(student.lm), teacher.head, mb, side, st, 1.0,
                                          lambda key: torch.Generator().manual_seed(3), tip.RunningMinMax(),
                                          lambda value: value.backward())
    return stats, sel, loss, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def naive(student, teachers: dict, mb: MicroBatch, st: StepSettings):
    """Each row's logits from its own teacher's forward over the whole micro-batch, V = the smallest vocabulary;
    plain float64 log-softmax formulas; the same tip selection; the loss's gradients by autograd."""
    student.zero_grad(set_to_none=True)
    pos = mb.positions()
    models = list(teachers.values())
    vocab = min([rows(head_weight(student.lm))] + [rows(head_weight(m)) for m in models])
    logits = student(mb.input_ids, mb.attention_mask, hidden=False)[:, :-1][pos][:, :vocab].double()
    route = mb.route_ids[:, None].expand_as(pos)[pos]
    teacher_logits = torch.zeros_like(logits)
    for r, model in enumerate(models):
        with torch.no_grad():
            full = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1][pos]
        teacher_logits[route == r] = full[route == r][:, :vocab].double()
    ls, lt = torch.log_softmax(logits, -1), torch.log_softmax(teacher_logits, -1)
    p, q = ls.exp(), lt.exp()
    reverse = (p * (ls - lt)).sum(-1)
    nats = [(-(p * ls).sum(-1)).detach(), -(q * lt).sum(-1), reverse.detach(), (q * (lt - ls)).sum(-1).detach()]
    seq = mb.sequence_ids[:, None].expand_as(pos)[pos]
    stats = tip.stats_from_nats(*[x.float() for x in nats], seq, vocab)
    sel = tip.select(st.selector, stats, st.ratio, scope=st.scope, generator=lambda key: torch.Generator().manual_seed(3),
                     state=tip.RunningMinMax(), **st.select_options)
    weights = sel.weights.double() * mb.sample_weight[:, None].expand_as(pos)[pos].double()
    loss = (weights * reverse)[sel.mask].sum()
    loss.backward()
    return stats, sel, float(loss.detach()), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def assert_close_step(got, want, atol: float, rtol: float, grad_share: float = 0.0) -> None:
    """Statistics, selection and loss within atol/rtol; gradients too, or (grad_share > 0: a bf16 backbone's
    backward, which rounds the same float32 gradients differently) within grad_share of each tensor's largest."""
    (s1, sel1, l1, g1), (s2, sel2, l2, g2) = got, want
    for field in ("entropy", "divergence", "forward_divergence", "teacher_entropy"):
        torch.testing.assert_close(getattr(s1, field), getattr(s2, field), atol=atol, rtol=rtol, msg=field)
    assert torch.equal(sel1.mask, sel2.mask)
    assert abs(l1 - l2) <= atol + rtol * abs(l2)
    assert g1.keys() == g2.keys() and g1
    for name in g1:
        scale = grad_share * float(g2[name].abs().max())
        torch.testing.assert_close(g1[name], g2[name], atol=max(atol, scale), rtol=0.0 if scale else rtol, msg=name)


@pytest.mark.parametrize("selector,ratio", [("soft_or", 0.5), ("random", 0.5), ("all", 1.0)])
def test_a_routed_micro_batch_matches_each_row_scored_by_its_own_teacher(pair, selector, ratio):
    student, teachers = pair
    mb = micro_batch([0, 1, 1, 0, 1])
    teacher = routed(teachers)
    side = teacher.score([mb])[0]
    assert isinstance(side, RoutedSide) and [p.values.shape[1] for p in side.parts] == [32, 48]
    assert {rows(p.head) for p in side.parts} == {len(TOK)}  # every head cut to the smallest vocabulary
    assert_close_step(step(student, teacher, mb, settings(selector, ratio)),
                      naive(student, teachers, mb, settings(selector, ratio)), atol=2e-6, rtol=2e-5)


def test_the_reference_path_reassembles_each_teachers_logits(pair):
    student, teachers = pair
    mb = micro_batch([1, 0, 1, 0])
    st = settings("soft_or", 0.5, impl="reference")
    assert_close_step(step(student, routed(teachers, reads="logits"), mb, st), naive(student, teachers, mb, st),
                      atol=2e-6, rtol=2e-5)


def test_in_bf16_autocast_the_routed_fused_step_matches_the_routed_reference_step(pair):
    student, teachers = pair
    mb = micro_batch([0, 1, 0, 1, 1, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = step(student, routed(teachers), mb, settings("soft_or", 0.5))
        reference = step(student, routed(teachers, reads="logits"), mb, settings("soft_or", 0.5, impl="reference"))
    assert_close_step(fused, reference, atol=1e-5, rtol=1e-4, grad_share=1e-2)
    # the LM head's gradient is float32 on both paths: as close as in float32
    torch.testing.assert_close(fused[3]["lm.lm_head.weight"], reference[3]["lm.lm_head.weight"], atol=1e-6, rtol=1e-4)


def test_a_micro_batch_of_one_source_is_scored_whole_by_that_teacher(pair):
    student, teachers = pair
    mb = micro_batch([1, 1, 1])
    side = routed(teachers).score([mb])[0]
    assert len(side.parts) == 1 and side.parts[0].index is None and side.parts[0].values.shape[1] == 48
    assert_close_step(step(student, routed(teachers), mb, settings("soft_or", 0.5)),
                      naive(student, teachers, mb, settings("soft_or", 0.5)), atol=2e-6, rtol=2e-5)


# ----------------------------------------------------------------------------
# whole runs


def sourced_prompts(path: Path, sources=("add", "sub")) -> Path:
    rng = random.Random(0)
    with open(path, "w") as fh:
        for i in range(48):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            fh.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b), "data_source": sources[i % 3 == 0]})
                     + "\n")
    return path


def routed_config(tmp_path: Path, name: str, routes: dict | None, **sections) -> Path:
    d = tiny_config(tmp_path, **{"tip": {"selector": "soft_or", "ratio": 0.5}, **sections})
    d["data"]["train_path"] = str(sourced_prompts(tmp_path / "sourced.jsonl"))
    d["train"]["run_name"] = name
    if routes is not None:
        d["teacher"]["routes"] = routes
    return write_config(tmp_path / f"{name}.yaml", d)


OTHER = {"arch": "qwen3", "tokenizer": "chars", "hidden_size": 48, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2,
         "intermediate_size": 64, "init_seed": 5}


def stable(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith(("timing/", "perf/", "teacher/"))}
            for m in read_metrics(run_dir)]


def last_weights(run_dir: Path) -> dict:
    last = sorted(p.name for p in (run_dir / "checkpoints").iterdir())[-1]
    return load_file(str(run_dir / "checkpoints" / last / "model.safetensors"))


def test_routes_to_copies_of_the_teacher_train_what_one_teacher_trains(tmp_path):
    one = train(load_config([str(routed_config(tmp_path, "one", None))]))
    copy = dict(tiny_config(tmp_path)["teacher"])  # the teacher: section itself, as a route
    both = train(load_config([str(routed_config(tmp_path, "both", {"sub": copy}))]))
    a, b = stable(both), stable(one)
    assert len(a) == len(b) == 3
    for got, want in zip(a, b):
        assert got.keys() == want.keys()
        for key in want:  # the sub-batches' forwards may differ from the whole batch's in the last bits
            assert math.isclose(got[key], want[key], rel_tol=1e-5, abs_tol=1e-6), key
    wa, wb = last_weights(both), last_weights(one)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wb) <= 1e-6


def test_a_routed_run_reports_each_teacher_and_resumes_where_it_stopped(tmp_path):
    whole = train(load_config([str(routed_config(tmp_path, "whole", {"sub": OTHER}))]))
    metrics = read_metrics(whole)
    for m in metrics:
        assert m["teacher/default/num_tokens"] + m["teacher/sub/num_tokens"] == m["opd/num_tokens"]
        assert m["teacher/default/num_kept"] + m["teacher/sub/num_kept"] == m["opd/num_kept"]
        assert m["teacher/sub/num_tokens"] > 0 and m["teacher/default/num_tokens"] > 0
        # the sides that came back: 32 float32 numbers a token from the default teacher, 48 from the other
        assert m["teacher/payload_mb"] * 2**20 == 4 * (32 * m["teacher/default/num_tokens"]
                                                      + 48 * m["teacher/sub/num_tokens"])
    # the other teacher is far from the student: its tokens' divergence differs from the default teacher's
    assert all(m["teacher/sub/reverse_kl"] != m["teacher/default/reverse_kl"] for m in metrics)
    path = routed_config(tmp_path, "parts", {"sub": OTHER}, train={"max_steps_per_run": 1, "save_every": 1})
    for _ in range(3):  # steps 1, 2 and 3, each invocation resuming from the last one's checkpoint
        parts = train(load_config([str(path)]))
    assert stable(parts) == stable(whole)


def one_line(result, start: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"error: {start}"), lines[0]


def test_a_route_to_a_source_no_prompt_has_is_refused_at_check_and_at_start(tmp_path):
    path = routed_config(tmp_path, "typo", {"subb": OTHER})
    one_line(run_cli(["--config", str(path), "--check"]), "teacher.routes.subb: no training prompt has the data "
                                                           "source 'subb' (data.source_key = 'data_source'; sources "
                                                           "found: 'add', 'sub')")
    with pytest.raises(RunError, match="teacher.routes.subb: no training prompt"):
        train(load_config([str(path)]))


def test_a_route_whose_vocabulary_cannot_hold_the_tokenizer_is_refused_naming_it(tmp_path):
    path = routed_config(tmp_path, "small", {"sub": {**OTHER, "vocab_size": 12}})
    one_line(run_cli(["--config", str(path), "--check"]), "teacher.routes.sub.vocab_size: ")


def test_route_names_are_checked_with_the_config(tmp_path):
    path = routed_config(tmp_path, "named", {"default": OTHER})
    one_line(run_cli(["--config", str(path), "--check"]), "teacher.routes.default: the name `default` is the "
                                                           "teacher of the teacher: section itself")
    result = run_cli(["--config", str(path), "--check", "teacher.routes.x=3"])
    assert result.returncode == 2 and "`teacher.routes.x` must be a mapping of keys" in result.stderr
    cfg = load_config([str(routed_config(tmp_path, "agent", None))], ["data.train_path=", "agent.env=lookup"])
    with pytest.raises(Exception, match="the one name a route may have"):
        load_config([str(routed_config(tmp_path, "agent", {"code": OTHER}))], ["data.train_path=", "agent.env=lookup"])
    assert not cfg.teacher.routes


def test_only_the_teachers_the_prompts_need_are_loaded_and_never_zero3_sharded(tmp_path):
    cfg = load_config([str(routed_config(tmp_path, "sections", {"sub": OTHER, "add": OTHER}))])
    assert sorted(name for name, _, _ in teacher_sections(cfg, frozenset({"add", "sub"}), zero3=False)) == ["add", "sub"]
    assert [name for name, _, _ in teacher_sections(cfg, frozenset({"add", "sub", ""}), zero3=False)][0] == "default"
    with pytest.raises(RunError, match="opd.teacher_zero3: false"):
        teacher_sections(cfg, frozenset({"add", "sub"}), zero3=True)


def test_an_agentic_route_distils_every_conversation_from_the_environments_teacher(tmp_path):
    chat = {"arch": "llama", "tokenizer": "chat_chars", "hidden_size": 32, "num_layers": 1, "num_heads": 2,
            "num_kv_heads": 1, "intermediate_size": 64}
    d = tiny_config(tmp_path, model=chat, teacher={**chat, "init_seed": 1},
                    agent={"env": "lookup", "env_args": {"num_tasks": 24}, "max_turns": 2, "max_response_tokens": 40,
                           "max_tool_response_tokens": 8, "eval_tasks": 2},
                    rollout={"max_new_tokens": 12, "n": 2}, train={"steps": 2, "prompts_per_step": 4})
    d["data"] = {"max_prompt_length": 256}
    plain = dict(d, teacher={**chat, "init_seed": 2}, train={**d["train"], "run_name": "plain"})
    routed_run = dict(d, teacher={**d["teacher"], "routes": {"lookup": {**chat, "init_seed": 2}}},
                      train={**d["train"], "run_name": "routed"})
    a = train(load_config([str(write_config(tmp_path / "plain.yaml", plain))]))
    b = train(load_config([str(write_config(tmp_path / "routed.yaml", routed_run))]))
    assert stable(b) == stable(a)  # the default teacher (init_seed 1) scored nothing: it was not even loaded
    assert all(m["teacher/lookup/num_tokens"] == m["opd/num_tokens"] for m in read_metrics(b))
