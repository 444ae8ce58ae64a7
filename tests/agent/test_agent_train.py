"""Agentic OPD runs end to end (lookup environment, tiny random models in Qwen3's chat format): the run
directory, agent metrics, the token dump, interrupt and resume, and the split a resumed run must find."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_metrics, write_config
import opd.trainer as trainer
from opd import cli

TINY = {"arch": "llama", "tokenizer": "chat_chars", "hidden_size": 32, "num_layers": 1, "num_heads": 2,
        "num_kv_heads": 1, "intermediate_size": 64}


def agent_config(tmp_path: Path, **sections) -> Path:
    cfg = {
        "model": dict(TINY), "teacher": {**TINY, "init_seed": 1},
        "agent": {"env": "lookup", "env_args": {"num_tasks": 40}, "max_turns": 3, "max_response_tokens": 100,
                  "max_tool_response_tokens": 8, "eval_tasks": 4},
        "rollout": {"max_new_tokens": 24, "n": 2},
        "train": {"steps": 3, "prompts_per_step": 4, "micro_batch_size": 4, "output_dir": str(tmp_path / "runs"),
                  "save_every": 1, "seed": 5},
        "eval": {"every": 0, "at_start": False, "k": 2, "max_new_tokens": 24},
        "tip": {"selector": "entropy_topk", "ratio": 0.5, "dump_tokens": 10},
        "logging": {"progress_bar": False},
        "optim": {"lr": 1e-3},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return write_config(tmp_path / "agent.yaml", cfg)


def stable(metrics):
    return [{k: v for k, v in m.items() if not k.startswith(("timing/", "perf/"))} for m in metrics]


def test_agentic_run_writes_its_split_metrics_dump_and_resumes_exactly(tmp_path, capsys):
    config = agent_config(tmp_path)
    assert cli.main(["--config", str(config), "train.run_name=whole"]) == 0
    whole = tmp_path / "runs" / "whole"
    split = json.loads((whole / "split.json").read_text())
    assert len(split["train"]) == 32 and len(split["heldout"]) == 8 and split["split_seed"] == 0
    metrics = read_metrics(whole)
    steps = [m for m in metrics if "opd/loss" in m]
    assert len(steps) == 3
    for m in steps:
        assert m["agent/turns_mean"] >= 1 and m["agent/turns_max"] <= 3
        assert m["agent/student_tokens"] == m["opd/num_tokens"]  # the loss sees exactly the student's tokens
        for key in ("agent/tool_calls", "agent/tool_errors", "agent/tool_tokens", "agent/capped", "agent/score_mean",
                    "agent/score/looked_up"):
            assert key in m and math.isfinite(m[key])
    final = json.loads((whole / "eval" / "final" / "summary.json").read_text())["benchmarks"]["heldout"]
    assert final["n_problems"] == 4 and "best@k" in final
    records = [json.loads(line) for line in (whole / "tokens.jsonl").read_text().splitlines()]
    assert records and all("rollout" in r and "response_position" in r for r in records)
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["metric"].startswith("Avg@2") and summary["best_metric"] == "Best@2"

    assert cli.main(["--config", str(config), "train.run_name=parts", "train.max_steps_per_run=2"]) == 0
    assert cli.main(["--config", str(config), "train.run_name=parts"]) == 0
    parts = tmp_path / "runs" / "parts"
    got = [m for m in read_metrics(parts) if "opd/loss" in m]
    assert stable(got) == stable(steps)
    a = load_file(str(whole / "checkpoints" / "step_000003" / "model.safetensors"))
    b = load_file(str(parts / "checkpoints" / "step_000003" / "model.safetensors"))
    assert all(bool((a[k] == b[k]).all()) for k in a)

    # a resumed run must find the split it started with
    capsys.readouterr()
    assert cli.main(["--config", str(config), "train.run_name=parts", "train.steps=4", "agent.split_seed=1"]) == 2
    err = capsys.readouterr().err
    assert "agent.split_seed" in err and "Traceback" not in err


@pytest.mark.parametrize("override,message", [
    ("agent.env=nope", "unknown agent.env 'nope'"),
    ("data.train_path=x.jsonl", "an agentic run takes its tasks from the environment"),
    ("agent.env_args={num_tasks: 0}", "num_tasks must be at least 1"),
])
def test_bad_agent_settings_are_one_line(tmp_path, capsys, override, message):
    config = agent_config(tmp_path)
    assert cli.main(["--config", str(config), "train.run_name=bad", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_reward_weighted_agentic_opd_weights_conversations_by_the_environment_score(tmp_path, monkeypatch):
    """opd.reward_beta > 0: the per-conversation weights are softmax(score / beta), from the environment's scores."""
    seen = []
    original = trainer.reward_weights

    def spy(rewards, beta, acc):
        weights = original(rewards, beta, acc)
        seen.append((list(rewards), weights))
        return weights

    monkeypatch.setattr(trainer, "reward_weights", spy)
    config = agent_config(tmp_path, train={"steps": 1, "save_every": 0}, opd={"reward_beta": 0.5},
                          eval={"at_end": False})
    assert cli.main(["--config", str(config), "train.run_name=weighted"]) == 0
    (rewards, weights), = seen
    step = next(m for m in read_metrics(tmp_path / "runs" / "weighted") if "opd/loss" in m)
    assert len(rewards) == 8 and math.isclose(sum(rewards) / 8, step["agent/score_mean"])
    assert math.isclose(step["opd/accuracy"], step["agent/score_mean"])
    expected = torch.softmax(torch.tensor(rewards, dtype=torch.float64) / 0.5, 0) * 8
    assert torch.allclose(weights.double(), expected, atol=1e-6)
