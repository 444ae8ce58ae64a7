"""Table 7's runs end to end on CPU: `train.py --check` on the agentic pair configs, and a 2-step agentic run
of tiny random models on a small DeepPlanning database in the official layout (the fixture tasks and tables
are hand-made; the real benchmark databases cannot be downloaded here).

The runs go through the real CLI entry (`opd.cli.main`, what train.py calls) in this process: a process per
run would spend most of its time importing torch and transformers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deepplanning_fixtures import DATA, TASK, build_database, write_task_file  # noqa: E402

from conftest import REPO, read_metrics, run_cli  # noqa: E402
from opd import cli  # noqa: E402

PAIR = REPO / "configs" / "pairs" / "qwen3-14b_to_qwen3-1.7b.yaml"
METHOD = REPO / "configs" / "methods" / "all.yaml"
# The placeholders the pair config ships (relative to the repository root, where the table scripts run).
PLACEHOLDER_TASKS = "data/deepplanning/travelplanning_query_en.json"
PLACEHOLDER_DATABASES = "data/deepplanning/database_en"
TINY = {"path": "", "arch": "qwen3", "tokenizer": "chat_chars", "hidden_size": 32, "num_layers": 1, "num_heads": 2,
        "num_kv_heads": 1, "intermediate_size": 64, "dtype": "float32", "gradient_checkpointing": False}
TASK_IDS = ["1", "2", "3", "4", "5"]  # 80/20: four for training, one held out


@pytest.fixture
def travel_files(tmp_path) -> tuple[Path, Path]:
    """(task file, database root): five copies of the fixture task, each with its own database."""
    if not (DATA / "tool_schema_en.json").is_file():
        pytest.skip(f"the official tool schemas are not under {DATA}")
    tasks = [{**TASK, "id": task_id} for task_id in TASK_IDS]
    task_file = write_task_file(tmp_path / "travelplanning", tasks, language="en")
    root = tmp_path / "database_en"
    for task_id in TASK_IDS:
        build_database(root, task_id)
    return task_file, root


def tiny_pair_overlay(tmp_path: Path) -> Path:
    """The pair config with tiny random models instead of hub checkpoints (nothing to download) and the
    transformers rollout engine (vLLM is not installed here): its agent.* settings are the shipped ones."""
    overlay = {"model": TINY, "teacher": {**TINY, "init_seed": 1}, "rollout": {"engine": "hf"},
               "train": {"output_dir": str(tmp_path / "runs"), "run_name": "check"}}
    path = tmp_path / "tiny_models.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return path


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_check_on_the_placeholder_paths_names_the_missing_task_file(tmp_path):
    """The shipped pair + method config, as `train.py --check` sees it before the data is downloaded."""
    out = run_cli(["--config", str(PAIR), "--config", str(METHOD), "--config", str(tiny_pair_overlay(tmp_path)),
                   "--check"], timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert error_lines(out.stderr) == [f"error: agent.env_args: deepplanning_travel: task file not found: {PLACEHOLDER_TASKS}"]


def test_check_names_the_missing_database_then_passes(tmp_path, travel_files, capsys, monkeypatch):
    task_file, root = travel_files
    monkeypatch.chdir(REPO)  # the placeholder database_root is relative to the repository root
    configs = ["--config", str(PAIR), "--config", str(METHOD), "--config", str(tiny_pair_overlay(tmp_path))]

    assert cli.main([*configs, "--check", f"agent.env_args.task_file={task_file}"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: agent.env_args: deepplanning_travel: database root not found: "
                                               f"{PLACEHOLDER_DATABASES};")

    # one task's database missing: that task's directory is named
    (root / "id_9").mkdir()
    (root / "id_3").rename(root / "id_9")
    assert cli.main([*configs, "--check", f"agent.env_args.task_file={task_file}",
                     f"agent.env_args.database_root={root}"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and f"task 3 database not found: {root / 'id_3'}" in err[0]

    (root / "id_9").rename(root / "id_3")
    assert cli.main([*configs, "--check", f"agent.env_args.task_file={task_file}",
                     f"agent.env_args.database_root={root}"]) == 0
    out = capsys.readouterr().out
    assert "agent: deepplanning_travel: 5 tasks, 1 held out" in out and "check passed" in out


def test_check_reports_an_unknown_environment_option(tmp_path, capsys):
    configs = ["--config", str(PAIR), "--config", str(METHOD), "--config", str(tiny_pair_overlay(tmp_path))]
    assert cli.main([*configs, "--check", "agent.env_args.plan_format=pdf"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert err == ["error: agent.env: deepplanning_travel: plan_format must be 'json' or 'text', not 'pdf'"]
    assert cli.main([*configs, "--check", "agent.env_args.plan_format=text"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert err == ["error: agent.env: deepplanning_travel: plan_format 'text' needs a converter model (converter: PATH)"]


def test_two_step_agentic_run_on_the_fixture_database(tmp_path, travel_files):
    """Tiny random models, 2 steps: the split, the agent/... metrics and the held-out Avg@k / Best@k."""
    task_file, root = travel_files
    config = {
        "model": TINY, "teacher": {**TINY, "init_seed": 1},
        "agent": {"env": "deepplanning_travel",
                  "env_args": {"task_file": str(task_file), "database_root": str(root), "language": "en"},
                  "max_turns": 2, "max_response_tokens": 48, "max_tool_response_tokens": 16, "heldout_ratio": 0.2,
                  "eval_tasks": 1},
        # the pair's prompt cap; `chat_chars` names the tools without their schemas (~3.4k characters, all ASCII)
        "data": {"train_path": "", "enable_thinking": True, "max_prompt_length": 4096, "long_prompts": "error"},
        "rollout": {"max_new_tokens": 16, "n": 2},
        "tip": {"selector": "q3_only", "ratio": 0.2, "plots": False},
        "train": {"steps": 2, "prompts_per_step": 2, "micro_batch_size": 2, "output_dir": str(tmp_path / "runs"),
                  "run_name": "table7_tiny", "save_every": 0, "num_threads": 1},
        "eval": {"every": 0, "at_start": False, "at_end": True, "k": 2, "max_new_tokens": 16, "benchmarks": []},
        "logging": {"progress_bar": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["--config", str(path)]) == 0
    run = tmp_path / "runs" / "table7_tiny"

    split = json.loads((run / "split.json").read_text())
    assert split["env"] == "deepplanning_travel" and split["heldout_ratio"] == 0.2
    assert len(split["train"]) == 4 and len(split["heldout"]) == 1
    assert sorted(split["train"] + split["heldout"]) == TASK_IDS

    metrics = read_metrics(run)
    steps = [m for m in metrics if "opd/loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for key in ("agent/turns_mean", "agent/turns_max", "agent/tool_calls", "agent/tool_errors", "agent/score_mean",
                "agent/score/hard_constraint_rate", "agent/score/parse_failed", "tip/num_kept", "tip/num_tokens"):
        assert all(key in m for m in steps), key
    assert all(1.0 <= m["agent/turns_mean"] <= 2.0 for m in steps)

    summary = json.loads((run / "eval" / "final" / "summary.json").read_text())
    heldout = summary["benchmarks"]["heldout"]
    assert summary["k"] == 2 and heldout["n_problems"] == 1
    assert 0.0 <= heldout["avg@k"] <= heldout["best@k"] <= 100.0
    assert heldout["mean@k"] == heldout["avg@k"]
    assert {"hard_constraint_rate", "hard_all_pass", "commonsense", "composite"} <= set(heldout["parts"])
    final = metrics[-1]
    assert final["val/heldout/avg@2"] == heldout["avg@k"] and final["val/heldout/best@2"] == heldout["best@k"]
    assert "val/heldout/score/hard_constraint_rate" in final
