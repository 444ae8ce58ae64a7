"""Agents evaluated: Avg@k / Best@k of fractional scores, the train/held-out split, and `python -m eval --env`."""

from __future__ import annotations

import json

import pytest

from agent.env import Task
from eval import metrics
from eval.cli import main as eval_main
from eval.runner import agent_metrics, flat_metrics
from opd.agentic import split_tasks
from opd.errors import RunError


def test_avg_and_best_at_k_on_a_known_matrix():
    scores = [[0.0, 0.5, 1.0], [0.25, 0.25, 0.25]]
    assert metrics.avg_at_k(scores) == pytest.approx(100 * 2.25 / 6)
    assert metrics.best_at_k(scores) == pytest.approx(100 * (1.0 + 0.25) / 2)
    sets = [100 * (0.0 + 0.25) / 2, 100 * (0.5 + 0.25) / 2, 100 * (1.0 + 0.25) / 2]
    mean = sum(sets) / 3
    assert metrics.score_std_at_k(scores) == pytest.approx((sum((s - mean) ** 2 for s in sets) / 3) ** 0.5)
    with pytest.raises(ValueError):
        metrics.avg_at_k([[0.5], [0.5, 1.0]])


def test_agent_metrics_and_their_logged_names():
    def sample(j, score, parts):
        return {"sample": j, "score": score, "parts": parts, "length": 10 + j, "truncated": j == 1, "turns": 3,
                "tool_calls": 2, "tool_errors": 1}
    results = [{"index": 0, "samples": [sample(0, 1.0, {"hard": 1.0}), sample(1, 0.0, {"hard": 0.5})]},
               {"index": 1, "samples": [sample(0, 0.5, {"hard": 0.5}), sample(1, 0.5, {"hard": 0.0})]}]
    m = agent_metrics(results)
    assert m["avg@k"] == m["mean@k"] == pytest.approx(50.0) and m["best@k"] == pytest.approx(75.0)
    assert m["truncation_rate"] == 0.5 and m["turns_mean"] == 3 and m["parts"] == {"hard": 0.5}
    flat = flat_metrics({"k": 2, "benchmarks": {"heldout": m}})
    assert flat["val/heldout/avg@2"] == 50.0 and flat["val/heldout/best@2"] == 75.0
    assert flat["val/heldout/score/hard"] == 0.5 and "val/heldout/pass@2" not in flat


def test_the_split_is_seeded_by_task_id_whatever_the_task_order():
    tasks = [Task(f"t{i}", ()) for i in range(50)]
    train, held = split_tasks(tasks, 0.2, seed=3)
    assert len(held) == 10 and len(train) == 40 and not {t.id for t in train} & {t.id for t in held}
    again_train, again_held = split_tasks(list(reversed(tasks)), 0.2, seed=3)
    assert {t.id for t in again_held} == {t.id for t in held}
    assert {t.id for t in split_tasks(tasks, 0.2, seed=4)[1]} != {t.id for t in held}
    with pytest.raises(RunError, match="not unique"):
        split_tasks(tasks + [Task("t0", ())], 0.2, seed=3)


def test_eval_command_with_an_environment(tmp_path, capsys):
    from tests.agent.test_agent_rollout import TOK, tiny_model
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    TOK.save_pretrained(model_dir)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"heldout": ["ng+hd"]}))
    argv = ["--model", str(model_dir), "--env", "lookup", "--env-args", '{"num_tasks": 5}', "--k", "2",
            "--max-new-tokens", "12", "--max-turns", "2", "--out", str(tmp_path / "out")]
    assert eval_main(argv + ["--split", str(split)]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    m = summary["benchmarks"]["heldout"]
    assert m["n_problems"] == 1 and 0.0 <= m["avg@k"] <= m["best@k"] <= 100.0 and "looked_up" in m["parts"]
    lines = (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["problem_id"] == "ng+hd"
    capsys.readouterr()
    for bad, message in ((["--env-args", "[1]"], "--env-args must be a JSON object"),
                         (["--env-args", '{"size": 3}'], "agent.env_args do not fit 'lookup'"),
                         (["--env", "nope"], "unknown agent.env 'nope'")):
        assert eval_main(argv + bad) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    split.write_text(json.dumps({"heldout": ["zz+zz"]}))
    assert eval_main(argv + ["--split", str(split)]) == 2
    assert "task 'zz+zz' is not among" in capsys.readouterr().err
