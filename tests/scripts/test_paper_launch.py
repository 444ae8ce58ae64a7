"""The table scripts' dry runs plan the right cells; the launcher links reusable runs and refuses blocked ones.

No model is loaded and nothing is trained: `--dry-run` only resolves configs,
and the non-dry runs below only reach cells that are done, reusable or blocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opd import cli
from opd.config import load_config, to_dict
import tip
from scripts.paper import launch

ROOT = Path(__file__).resolve().parents[2]
QWEN3, LLAMA, QWEN25 = "qwen3-8b_to_qwen3-4b", "llama3.3-70b_to_llama3.1-8b", "qwen2.5-14b_to_qwen2.5-1.5b"
AGENT14, AGENT32 = "qwen3-14b_to_qwen3-1.7b", "qwen3-32b_to_qwen3-1.7b"
MATH = [QWEN3, LLAMA, QWEN25]
LR = {QWEN3: 1e-6, LLAMA: 3e-7, QWEN25: 1e-6, AGENT14: 1e-6, AGENT32: 1e-6}
# method -> (selector, ratio), written out from the paper, not read from the configs
METHOD = {
    "all": ("all", 1.0),
    "entropy_sample_50": ("entropy_sample", 0.5), "entropy_sample_30": ("entropy_sample", 0.3),
    "entropy_sample_20": ("entropy_sample", 0.2), "entropy_sample_10": ("entropy_sample", 0.1),
    "entropy_topk_50": ("entropy_topk", 0.5), "entropy_topk_20": ("entropy_topk", 0.2),
    "soft_or_50": ("soft_or", 0.5), "soft_or_20": ("soft_or", 0.2), "soft_or_bottom_50": ("soft_or_bottom", 0.5),
    "q3_only_10": ("q3_only", 0.1), "q3_only_20": ("q3_only", 0.2), "teacher_entropy": ("teacher_entropy", 1.0),
    "adaptive_kl_50": ("adaptive_kl", 0.5),
}
TABLES = {
    3: (MATH, ["all", "entropy_sample_50", "entropy_sample_30", "entropy_sample_20", "entropy_sample_10"]),
    4: (MATH, ["all", "q3_only_10"]),
    5: (MATH, ["all", "entropy_topk_50", "entropy_topk_20", "soft_or_50", "soft_or_20"]),
    6: (MATH, ["soft_or_50", "soft_or_bottom_50"]),
    7: ([AGENT14, AGENT32], ["all", "entropy_topk_50", "entropy_topk_20", "q3_only_20", "soft_or_50", "soft_or_20"]),
    8: ([QWEN3], ["all", "entropy_sample_50", "adaptive_kl_50", "teacher_entropy"]),
}


def run_script(table: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(["bash", str(ROOT / "scripts" / f"reproduce_table{table}.sh"), *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def parse_plan(stdout: str) -> list[dict]:
    """One dict per cell: the `pair=... method=...` line's fields plus the command and status."""
    cells, lines = [], stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("  pair="):
            fields = dict(item.split("=", 1) for item in line.split())
            fields["status"] = lines[i - 1].rsplit(": ", 1)[1]
            fields["command"] = lines[i + 1].strip()
            cells.append(fields)
    return cells


@pytest.mark.parametrize("table", sorted(TABLES))
def test_dry_run_plans_every_cell_of_the_table(table):
    proc = run_script(table, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    pairs, methods = TABLES[table]
    cells = parse_plan(proc.stdout)
    assert [(c["pair"], c["method"]) for c in cells] == [(p, m) for p in pairs for m in methods]
    for cell in cells:
        selector, ratio = METHOD[cell["method"]]
        assert cell["selector"] == selector
        assert float(cell["ratio"]) == pytest.approx(ratio)
        assert float(cell["lr"]) == pytest.approx(LR[cell["pair"]])
        command = cell["command"]
        assert command.startswith("$ accelerate launch --config_file configs/accelerate/")
        assert f"--config configs/pairs/{cell['pair']}.yaml --config configs/methods/{cell['method']}.yaml" in command
        assert f"train.output_dir=runs/table{table}" in command
        assert f"train.run_name={cell['pair']}__{cell['method']}" in command
        # the 70B teacher needs offloading on top of ZeRO-3
        expected = "zero3_offload" if cell["pair"] == LLAMA else "zero3"
        assert f"configs/accelerate/{expected}.yaml" in command


def test_pair_choice_student_teacher_and_overrides_reach_the_command():
    proc = run_script(3, "--dry-run", "--pair", QWEN3, "--teacher", "/ckpt/qwen3-8b-grpo", "eval.max_problems=8")
    assert proc.returncode == 0, proc.stderr
    cells = parse_plan(proc.stdout)
    assert {c["pair"] for c in cells} == {QWEN3} and len(cells) == 5
    for cell in cells:
        assert cell["teacher"] == "/ckpt/qwen3-8b-grpo"
        assert cell["command"].endswith("teacher.path=/ckpt/qwen3-8b-grpo eval.max_problems=8")


def test_placeholder_teacher_is_flagged_in_the_plan():
    proc = run_script(8, "--dry-run")
    assert proc.returncode == 0
    assert all(c["status"] == "blocked" for c in parse_plan(proc.stdout))
    assert "teacher.path = ./checkpoints/qwen3-8b-grpo does not exist" in proc.stdout


def test_a_selector_missing_from_the_tip_registry_blocks_its_cell(tmp_path):
    """adaptive_kl_50 (table 8) needs the adaptive_kl selector; a checkout without it must not launch the cell."""
    (cell,) = launch.plan([QWEN3], ["adaptive_kl_50"], str(tmp_path / "table8"),
                          pair_overrides={QWEN3: ["teacher.path=Qwen/Qwen3-8B"]})
    blocked = [line for line in cell.blockers if "tip registry" in line]
    if "adaptive_kl" in tip.SELECTORS:
        assert blocked == []
    else:
        assert blocked == ["tip.selector = adaptive_kl is not in this checkout's tip registry"]


@pytest.mark.parametrize("args,message", [
    (["--pair", "gpt2_to_gpt2"], "is not in table 3"),
    (["--teacher", "/ckpt/x"], "choose one with --pair"),
    (["tip.ratio=1.5"], "tip.ratio"),
    (["not-an-override"], "section.key=value"),
])
def test_bad_arguments_exit_2_with_one_clear_line(args, message):
    proc = run_script(3, "--dry-run", *args)
    assert proc.returncode == 2
    assert message in proc.stdout + proc.stderr


def _finish(run_dir: Path, cfg_dict: dict, mean: float) -> None:
    """A finished run as the trainer leaves it (test fixture: fabricated numbers)."""
    (run_dir / "eval" / "final").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    bench = {"mean@k": mean, "std@k": 1.0, "pass@k": 90.0, "maj@k": 80.0, "n_problems": 500, "mean_length": 900.0,
             "truncation_rate": 0.0}
    summary = {"step": None, "k": 16, "benchmarks": {"math500": bench, "aime24": bench, "aime25": bench}}
    (run_dir / "eval" / "final" / "summary.json").write_text(json.dumps(summary))


def test_finished_run_of_another_table_is_linked_not_rerun(tmp_path, capsys):
    teacher = ["--teacher", f"{QWEN3}=/ckpt/t"]
    # table 3 already finished the all-token run with the same settings
    done = tmp_path / "table3" / f"{QWEN3}__all"
    cfg = load_config([ROOT / "configs/pairs" / f"{QWEN3}.yaml", ROOT / "configs/methods/all.yaml"],
                      [f"train.output_dir={tmp_path / 'table3'}", f"train.run_name={QWEN3}__all", "teacher.path=/ckpt/t"])
    _finish(done, to_dict(cfg), 76.0)

    argv = ["--table", "5", "--pairs", QWEN3, "--methods", "all", "--runs", str(tmp_path / "table5")]
    assert launch.main(argv + teacher + ["--dry-run"]) == 0
    assert f"{QWEN3}__all: reuse" in capsys.readouterr().out
    # a different setting (another teacher) must not reuse it
    assert launch.main(argv + ["--teacher", "/ckpt/other", "--dry-run"]) == 0
    (cell_line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[1/1]")]
    assert "reuse" not in cell_line

    assert launch.main(argv + teacher) == 0  # nothing to launch: the one cell is linked
    linked = tmp_path / "table5" / f"{QWEN3}__all"
    assert linked.is_symlink() and linked.resolve() == done.resolve()
    table = (tmp_path / "table5" / "table5.md").read_text()
    assert "76.0 ± 1.00 (paper 76.7, from section 7.2 (table 3), Δ -0.7)" in table
    assert json.loads((tmp_path / "table5" / "plan.json").read_text())["methods"] == ["all"]


def test_table7_plans_its_agentic_runs_once_the_benchmark_paths_are_given(tmp_path):
    """Table 7 is planned like the others: 2 pairs x 6 methods, each an agentic run of deepplanning_travel."""
    task_file, databases = tmp_path / "travelplanning_query_en.json", tmp_path / "database_en"
    task_file.write_text("[]")
    databases.mkdir()
    paths = [f"agent.env_args.task_file={task_file}", f"agent.env_args.database_root={databases}"]
    proc = run_script(7, "--dry-run", *paths)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("table 7: 2 pair(s) x 6 method(s) = 12 runs under runs/table7")
    cells = parse_plan(proc.stdout)
    pairs, methods = TABLES[7]
    assert [(c["pair"], c["method"]) for c in cells] == [(p, m) for p in pairs for m in methods]
    for cell in cells:
        assert cell["status"] == "todo" and cell["env"] == "deepplanning_travel"
        assert cell["command"].endswith(" ".join(paths))
    assert "note:" not in proc.stdout


def test_placeholder_benchmark_paths_block_table7_cells_and_fail_the_table(tmp_path, capsys):
    """Without the DeepPlanning files the cells are planned but not started; the table run says which key to set."""
    proc = run_script(7, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert all(c["status"] == "blocked" for c in parse_plan(proc.stdout))
    argv = ["--table", "7", "--pairs", AGENT14, "--methods", "all", "--runs", str(tmp_path / "table7")]
    assert launch.main(argv) == 1
    err = capsys.readouterr().err
    assert "agent.env_args.task_file = ./data/deepplanning/travelplanning_query_en.json does not exist" in err
    assert "agent.env_args.database_root" in err
    assert not (tmp_path / "table7" / f"{AGENT14}__all").exists()


@pytest.mark.parametrize("table", [5, 7])
def test_planned_commands_are_accepted_by_the_trainer_cli(table, capsys, monkeypatch):
    """Each cell's train.py arguments resolve through the real CLI (--print-config loads no model); in this
    process, through the same `main` train.py calls (a process per cell would spend its time importing torch)."""
    if not (ROOT / "train.py").is_file():
        pytest.skip("train.py is not in this checkout yet")
    proc = run_script(table, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    monkeypatch.chdir(ROOT)  # the plan's config paths are relative to the repository, as train.py sees them
    for cell in parse_plan(proc.stdout):
        argv = cell["command"].split()
        train_args = argv[argv.index("train.py") + 1:]
        capsys.readouterr()
        status = cli.main([*train_args, "--print-config"])
        out = capsys.readouterr()
        assert status == 0, out.out + out.err
        resolved = yaml.safe_load(out.out)
        assert resolved["train"]["run_name"] == f"{cell['pair']}__{cell['method']}"
        assert (resolved["tip"]["selector"], resolved["tip"]["ratio"]) == METHOD[cell["method"]]
