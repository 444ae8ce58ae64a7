"""scripts/bench_peers.py on a tiny random pair: our side runs, its table and JSON say what ran; bad input is one
line and exit 2. The TRL side needs TRL's own environment (/tmp/tip-trl-venv, requirements-trl.txt): skipped,
with the reason, without it. Smoke tests of the script, not timings."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, tiny_chat_pair

SCRIPT = REPO / "scripts" / "bench_peers.py"
TRL_PYTHON = Path("/tmp/tip-trl-venv/bin/python")
SMALL = ["--repeats", "1", "--warmup", "0", "--steps", "1", "--prompts", "8", "--batch", "4", "--new-tokens", "8",
         "--lock", ""]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    """Two tiny random Llama checkpoints sharing a character tokenizer with a chat template."""
    return tiny_chat_pair(tmp_path_factory.mktemp("pair"))


def bench(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The printed table: run label -> its cells."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ") and not line.startswith("| run ")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def test_our_side_one_step(pair, tmp_path):
    out_json = tmp_path / "bench.json"
    out = bench(["--pair", str(pair), "--variants", "soft_or:0.5", "--json", str(out_json), *SMALL])
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out_json.read_text())
    [row] = data["rows"]
    assert row["label"] == "ours Soft-OR 50%" and row["runs"] == 1
    assert 0 < row["kept"]["median"] < row["tokens"]["median"] == 4 * 8  # Soft-OR kept part; fixed lengths
    assert row["step_s"]["median"] >= row["generate_s"]["median"] > 0 and row["update_s"]["median"] > 0
    assert row["peak_rss_gib"]["median"] > row["extra_gib"]["median"] >= 0 and row["step1_loss"] > 0
    assert row["step_vs_trl"] is None  # no TRL row: no ratios
    [run] = data["runs"]
    assert len(run["steps"]) == 1 and run["torch_threads"] == 2
    printed = table_rows(out.stdout)
    assert list(printed) == ["ours Soft-OR 50%"]
    cells = printed["ours Soft-OR 50%"]
    assert cells[1] == f"{row['kept']['median']:.0f}" and cells[2].startswith(f"{row['step_s']['median']:.2f} [")
    assert cells[-3:] == ["-", "-", "-"]
    assert "load average (1 min)" in out.stdout and "step-1 loss" not in out.stdout  # no 100% run, no loss check


def test_a_variant_carries_config_overrides_to_our_run(pair, tmp_path):
    out_json = tmp_path / "bench.json"
    variant = "all:1.0@rollout.max_new_tokens=2@opd.length_groups=false"
    out = bench(["--pair", str(pair), "--variants", variant, "--json", str(out_json), "--lengths", "natural", *SMALL])
    assert out.returncode == 0, out.stderr[-3000:]
    [row] = json.loads(out_json.read_text())["rows"]
    assert row["label"] == "ours OPD 100% (rollout.max_new_tokens=2, opd.length_groups=false)"
    assert 0 < row["tokens"]["median"] <= 4 * 2  # the override reached the run: 2 new tokens, not --new-tokens 8
    assert list(table_rows(out.stdout)) == [row["label"]]


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--variants", "soft_or:1.5"], "the ratio must be in (0, 1]"),
    (["--variants", "soft_or"], "is not SELECTOR:RATIO or trl"),
    (["--variants", "all:1.0@opd.length_groups"], "an override after @ is KEY=VALUE"),
    (["--pair", "/nonexistent"], "does not hold teacher/config.json"),
    (["--prompts", "4", "--batch", "8"], "must be at least --batch"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--lengths", "short"], "invalid choice: 'short'"),
])
def test_bad_input_one_line_exit_2(args, message):
    out = bench(args, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and message in out.stderr, out.stderr


@pytest.mark.slow
def test_trl_side_one_step(pair, tmp_path):
    if not TRL_PYTHON.is_file():
        pytest.skip(f"{TRL_PYTHON} is absent: TRL's environment (requirements-trl.txt) is not installed here")
    out_json = tmp_path / "bench.json"
    out = bench(["--pair", str(pair), "--variants", "all:1.0,trl", "--json", str(out_json), *SMALL])
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["label"]: r for r in json.loads(out_json.read_text())["rows"]}
    trl, ours = rows["TRL DistillationTrainer"], rows["ours OPD 100%"]
    assert trl["step_vs_trl"] == 1.0 and ours["step_vs_trl"] == pytest.approx(
        ours["step_s"]["median"] / trl["step_s"]["median"])
    assert trl["tokens"]["median"] == ours["tokens"]["median"] == 4 * 8 and trl["step1_loss"] > 0  # fixed lengths
    assert ours["kept"]["median"] == ours["tokens"]["median"]  # 100%: every response token
    assert "the same prompts step by step on both sides (prompt tokens per step equal in every run): yes" in out.stdout
    # the same weights at step 1: the two losses (reverse KL per token, different samples) are of the same order
    assert 0.2 < ours["step1_loss"] / trl["step1_loss"] < 5
