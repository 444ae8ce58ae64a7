"""The demo task (generator, verifier, tokenizer) and the pair preparation (cache, atomic writes, reload)."""

from __future__ import annotations

import json
import re

import pytest
import yaml
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from demo import prepare, task

TINY = {"teacher_layers": 1, "teacher_hidden": 16, "teacher_heads": 2, "teacher_steps": 3,
        "student_layers": 1, "student_hidden": 8, "student_heads": 2, "student_steps": 2,
        "batch_size": 4, "warmup_steps": 1, "eval_problems": 8}


def test_every_generated_solution_is_graded_correct_and_its_steps_are_arithmetic():
    records = task.train_records(3000, seed=0) + task.train_records(200, seed=1, digits=2)
    step = re.compile(r"^(\d)\*(\d)\+(\d)=(\d\d)$")
    for rec in records:
        a, b = map(int, rec["prompt"].split("*"))
        assert rec["answer"] == str(a * b) and task.grade(rec["solution"], rec["answer"])
        work, answer = rec["solution"].split(task.ANSWER_MARK)
        assert answer == rec["answer"]
        carry = 0
        for digit, part in zip(reversed(str(a)), work.split(",")):  # digits right to left, carries passed on
            d, m, c, value = map(int, step.match(part).groups())
            assert (d, m, c) == (int(digit), b, carry) and value == d * m + c
            carry = value // 10
        assert set(rec["solution"]) <= set(task.ALPHABET)


def test_verifier_rejects_wrong_missing_and_malformed_answers():
    good = task.solution(4738, 7)
    assert task.grade(good, "33166") and task.grade(good + "<eos>", "33166")
    assert not task.grade(good.replace(">33166", ">33167"), "33166")
    assert not task.grade(good.split(">")[0], "33166")  # no final answer
    assert not task.grade("", "33166") and not task.grade(None, "33166") and not task.grade(good, "n/a")
    assert task.extract_answer("1*2+0=02>2") == "2" and task.extract_answer(">12a") is None


def test_held_out_problems_are_distinct_seeded_and_never_in_training():
    held = task.eval_problems(300, seed=0)
    assert len({p["prompt"] for p in held}) == 300
    assert held == task.eval_problems(300, seed=0) and held != task.eval_problems(300, seed=1)
    train = {r["prompt"] for s in range(3) for r in task.train_records(5000, seed=s)}
    assert not train & {p["prompt"] for p in held}
    with pytest.raises(ValueError, match="too many"):
        task.eval_problems(10**6, seed=0)


def test_tokenizer_round_trips_every_character_of_the_task():
    tok = task.tokenizer()
    text = task.solution(9999, 9)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1


def test_settings_are_validated_with_one_line_naming_the_key():
    for bad, needle in (({"teacher_step": 3}, "unknown config key `teacher_step`"),
                        ({"teacher_steps": "many"}, "`teacher_steps` must be an integer"),
                        ({"student_hidden": 10, "student_heads": 4}, "`student_hidden` = 10 must be a multiple"),
                        ({"arch": "gpt2"}, "`arch` = 'gpt2' is not one of"),
                        ({"teacher_layers": -1}, "`teacher_layers` = -1 is below the minimum 1")):
        with pytest.raises(ValueError, match=re.escape(needle)):
            prepare.pair_settings(bad)
    assert prepare.pair_settings({"teacher_steps": "7"}).teacher_steps == 7
    # num_threads does not change the pair; every training setting does
    key = prepare.settings_key(prepare.pair_settings(TINY))
    assert prepare.settings_key(prepare.pair_settings({**TINY, "num_threads": 1})) == key
    assert prepare.settings_key(prepare.pair_settings({**TINY, "student_steps": 3})) != key


def test_prepared_pair_reloads_with_from_pretrained_and_is_reused(tmp_path):
    logs = []
    teacher_dir, student_dir = prepare.prepare_pair({**TINY, "cache_dir": str(tmp_path)}, log=logs.append)
    info = json.loads((teacher_dir.parent / "pair.json").read_text())
    assert info["teacher"]["steps"] == 3 and 0.0 <= info["student"]["accuracy_t1"] <= 1.0
    assert [p.name for p in tmp_path.iterdir()] == [teacher_dir.parent.name]  # no staging debris
    tok = AutoTokenizer.from_pretrained(student_dir)
    assert tok.get_vocab() == task.tokenizer().get_vocab()
    for path, hidden in ((teacher_dir, 16), (student_dir, 8)):
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.hidden_size == hidden
        ids = torch.tensor([prepare.encode_prompt(tok, "1234*5")])
        assert torch.isfinite(model(input_ids=ids).logits).all()
    weights = (student_dir / "model.safetensors").read_bytes()
    logs.clear()
    assert prepare.prepare_pair({**TINY, "cache_dir": str(tmp_path)}, log=logs.append) == (teacher_dir, student_dir)
    assert any("reusing" in line for line in logs) and not any("training" in line for line in logs)
    assert (student_dir / "model.safetensors").read_bytes() == weights


def test_interrupted_preparation_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "accuracy", fail)  # dies after the teacher's training, before anything is final
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_pair({**TINY, "cache_dir": str(tmp_path)}, log=lambda *a: None)
    assert list(tmp_path.iterdir()) == []


def test_default_job_runs_end_to_end_on_a_tiny_pair(tmp_path):
    """train.py with no --config is the demo job; here shrunk to seconds (tiny pair, 2 steps, 8 problems)."""
    from conftest import run_cli

    args = [f"demo.{k}={v}" for k, v in TINY.items()] + [
        f"demo.cache_dir={tmp_path / 'cache'}", f"train.output_dir={tmp_path / 'runs'}", "train.steps=2",
        "train.prompts_per_step=8", "eval.max_problems=8", "eval.k=1", "eval.every=0"]
    out = run_cli(args)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "runs" / "demo"
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after"):
        assert 0.0 <= summary[key] <= 100.0, key
    assert summary["steps"] == 2 and summary["wall_time_s"] > 0
    assert "student before" in out.stdout and "student after" in out.stdout and "teacher" in out.stdout
    assert {p.name for p in (run_dir / "plots").iterdir()} >= {"hd_plane.png", "quadrant_shares.png"}
    assert (run_dir / "checkpoints" / "step_000002" / "model.safetensors").is_file()

    # the console: the two step-0 tables say whose they are; the wall time counts the pair's preparation;
    # no library noise (weight-file progress bars, DeepSpeed's CPU-fallback warning)
    text = out.stdout + out.stderr
    assert "teacher (the upper bound), step 0" in out.stdout and "student before training, step 0" in out.stdout
    trained = [float(m) for m in re.findall(r"\((\d+) s of training\)", out.stdout)]
    assert len(trained) == 2 and summary["wall_time_s"] >= sum(trained)
    assert not any(noise in text for noise in ("Writing model shards", "Loading weights", "Setting accelerator to CPU"))
    # the resolved config is what ran: the demo models come from the demo: section, no random-init sizes shown
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["teacher"]["path"] == "demo:teacher" and "hidden_size" not in saved["teacher"]
    assert saved["demo"]["teacher_hidden"] == TINY["teacher_hidden"]
    # tokens.jsonl: each token's place in its rollout's response, under names that say so
    records = [json.loads(line) for line in (run_dir / "tokens.jsonl").read_text().splitlines()]
    assert records and all(0 <= r["response_position"] < 49 and r["rollout"] >= 0 for r in records)
    assert any(r["response_position"] == 0 for r in records) and "position" not in records[0]

    # rerunning the finished run trains nothing and prints its result table again
    again = run_cli(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished at step 2; nothing to train" in again.stdout and "student after" in again.stdout
