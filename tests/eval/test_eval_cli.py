"""The commands: `python -m eval` and `python -m eval.compare`."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval import cli, compare


REPO = Path(__file__).resolve().parents[2]


def run_module(*args, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import torch

    from lm.config import ModelConfig
    from lm.tokenizers import char_tokenizer
    from lm.models import load_model, save_pretrained

    tok = char_tokenizer()
    model = load_model(
        ModelConfig(arch="qwen3", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64),
        tok, torch.device("cpu"), trainable=False,
    )
    path = tmp_path_factory.mktemp("ckpt")
    save_pretrained(model, tok, path)
    return path


def test_eval_command_runs_a_checkpoint(tiny_checkpoint, shared_eval, tmp_path):
    out = tmp_path / "out"
    result = run_module(
        "eval", "--model", str(tiny_checkpoint), "--benchmarks", f"aime24={shared_eval / 'aime24.jsonl'}",
        "--k", "2", "--max-new-tokens", "6", "--max-problems", "2", "--batch-size", "3", "--out", str(out), "--seed", "1",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["k"] == 2 and summary["step"] is None
    assert summary["benchmarks"]["aime24"]["n_problems"] == 2
    assert summary["benchmarks"]["aime24"]["mean_length"] <= 6
    assert len((out / "samples.jsonl").read_text().splitlines()) == 4
    assert "mean@2" in result.stdout and "aime24" in result.stdout  # the printed table


def test_eval_command_bad_benchmark_is_one_line_exit_2(tmp_path):
    result = run_module("eval", "--model", str(tmp_path), "--benchmarks", "math500,nope")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "unknown benchmark 'nope'" in lines[0] and "aime24, aime25, dapo, demo, math500" in lines[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--benchmarks", "gsm8k"], "unknown benchmark 'gsm8k'"),
        (["--benchmarks", "x=/no/such.jsonl"], "benchmark file not found"),
        (["--benchmarks", ","], "give --benchmarks or an agent --env"),
        (["--benchmarks", "{aime}", "--k", "0"], "--k = 0 is below the minimum 1"),
        (["--benchmarks", "{aime}", "--top-p", "1.5"], "--top-p = 1.5 is above the maximum 1.0"),
        (["--benchmarks", "{aime}", "--model", "/no/such/model"], "model directory not found"),
    ],
)
def test_eval_command_bad_input(argv, message, shared_eval, tmp_path, capsys):
    argv = [a.replace("{aime}", str(shared_eval / "aime24.jsonl")) for a in argv]
    if "--model" not in argv:
        argv = ["--model", str(tmp_path)] + argv
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_eval_config_keeps_dataclass_defaults():
    args = cli.build_parser().parse_args(["--model", "m", "--benchmarks", "aime24", "--k", "4"])
    cfg = cli.eval_config(args)
    from eval.config import EvalConfig

    defaults = EvalConfig()
    assert cfg.k == 4
    assert (cfg.temperature, cfg.max_new_tokens, cfg.batch_size) == (
        defaults.temperature, defaults.max_new_tokens, defaults.batch_size)


# ----------------------------------------------------------------------------
# compare


def write_summary(path: Path, step, k, means: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    benches = {
        name: {"mean@k": mean, "std@k": std, "pass@k": 0.0, "maj@k": 0.0, "n_problems": 1,
               "mean_length": 1.0, "truncation_rate": 0.0}
        for name, (mean, std) in means.items()
    }
    (path / "summary.json").write_text(json.dumps({"step": step, "k": k, "benchmarks": benches}))
    return path / "summary.json"


def test_find_summary_prefers_final_then_the_highest_step(tmp_path):
    run = tmp_path / "run"
    write_summary(run / "eval" / "step_000040", 40, 16, {"math500": (1.0, 0.0)})
    write_summary(run / "eval" / "step_000005", 5, 16, {"math500": (1.0, 0.0)})
    time.sleep(0.01)
    write_summary(run / "eval" / "step_000005", 5, 16, {"math500": (1.0, 0.0)})  # newer file, older step
    assert compare.find_summary(run) == run / "eval" / "step_000040" / "summary.json"
    write_summary(run / "eval" / "final", 50, 16, {"math500": (1.0, 0.0)})
    assert compare.find_summary(run) == run / "eval" / "final" / "summary.json"
    assert compare.find_summary(run / "eval" / "step_000005") == run / "eval" / "step_000005" / "summary.json"
    with pytest.raises(ValueError, match="no such file"):
        compare.find_summary(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="summary.json"):
        compare.find_summary(tmp_path / "empty")


def test_compare_reads_training_run_directories(tmp_path, capsys):
    """A training run holds the run's summary.json (no `k`) beside eval/: compare must use eval/final/."""
    runs = []
    for name, mean in (("a", 40.0), ("b", 55.0)):
        run = tmp_path / name
        write_summary(run / "eval" / "final", 200, 4, {"demo": (mean, 1.0)})
        (run / "summary.json").write_text(json.dumps({"teacher_accuracy": 99.0, "student_accuracy_after": mean,
                                                      "benchmarks": {"final": {}}}))
        runs.append(str(run))
    assert compare.find_summary(runs[0]) == tmp_path / "a" / "eval" / "final" / "summary.json"
    assert compare.main(runs) == 0
    assert "55.0 ± 1.0 (+15.0)" in capsys.readouterr().out


def test_compare_table_shows_mean_std_and_differences(tmp_path, capsys):
    a = write_summary(tmp_path / "a", 10, 16, {"math500": (76.7, 0.8), "aime24": (20.0, 2.5)})
    run_b = tmp_path / "run_b"
    write_summary(run_b / "eval" / "final", 20, 16, {"math500": (78.6, 0.7), "aime24": (18.75, 3.0)})
    c = write_summary(tmp_path / "c", 30, 16, {"math500": (70.0, 1.0)})
    assert compare.main([str(a), str(run_b), str(c)]) == 0
    out = capsys.readouterr().out.splitlines()
    math_row = next(line for line in out if line.startswith("math500"))
    aime_row = next(line for line in out if line.startswith("aime24"))
    assert "76.7 ± 0.8" in math_row and "78.6 ± 0.7 (+1.9)" in math_row and "70.0 ± 1.0 (-6.7)" in math_row
    assert "20.0 ± 2.5" in aime_row and "18.8 ± 3.0 (-1.2)" in aime_row and aime_row.rstrip().endswith("-")
    assert not any(line.startswith("average") for line in out)  # c lacks aime24
    assert any(str(run_b / "eval" / "final" / "summary.json") in line for line in out)


def test_compare_average_row(tmp_path):
    s1 = {"k": 16, "step": 1, "benchmarks": {"x": {"mean@k": 10.0, "std@k": 1.0}, "y": {"mean@k": 30.0, "std@k": 1.0}}}
    s2 = {"k": 16, "step": 2, "benchmarks": {"x": {"mean@k": 20.0, "std@k": 1.0}, "y": {"mean@k": 30.0, "std@k": 1.0}}}
    table = compare.format_comparison([s1, s2], ["A", "B"])
    average = next(line for line in table.splitlines() if line.startswith("average"))
    assert average.split()[1:] == ["20.0", "25.0", "(+5.0)"]


def test_compare_command_errors_and_runs(tmp_path):
    a = write_summary(tmp_path / "a", 1, 4, {"m": (50.0, 5.0)})
    result = run_module("eval.compare", str(a), str(tmp_path / "nope"))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "nope" in result.stderr
    (tmp_path / "junk.json").write_text("[1, 2]")
    assert compare.main([str(a), str(tmp_path / "junk.json")]) == 2
    result = run_module("eval.compare", str(a), str(a))
    assert result.returncode == 0 and "50.0 ± 5.0 (+0.0)" in result.stdout
