"""scripts/gpu_check.sh: the plan fits in 10 minutes, a machine without a GPU is told so in one line, and the
closing table reads each step's results (the GPU steps themselves run only on a GPU machine)."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import gpu_check  # noqa: E402


def test_dry_run_prints_the_four_steps_within_ten_minutes():
    out = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for name in ("gpu tests", "memory", "rollout", "train"):
        assert f"  {name} " in out.stdout
    assert "tests/gpu" in out.stdout and "qwen3-4b" in out.stdout and "hf,vllm" in out.stdout
    steps = gpu_check.plan(REPO / "runs" / "x", "python", with_vllm=False)
    assert sum(s.limit_s for s in steps) <= gpu_check.BUDGET_S == 600
    assert "hf,vllm" not in " ".join(steps[2].argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_without_a_gpu_it_says_so_in_one_line_and_fails(tmp_path):
    out = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode != 0
    assert out.stdout.strip().count("\n") == 0 and "no CUDA GPU" in out.stdout
    assert not list(tmp_path.iterdir())  # nothing run, nothing written


def test_train_config_parses_and_the_table_reads_the_results(tmp_path):
    from opd.config import load_config

    gpu_check.write_inputs(tmp_path)
    cfg = load_config(tmp_path / "train.yaml", [])
    assert cfg.model.hidden_size == 2048 and cfg.model.vocab_size == 151936 and cfg.train.steps == 3
    (tmp_path / "memory.json").write_text(json.dumps({"rows": [
        {"impl": "fused", "ratio": 0.2, "extra_gib": 3.0, "memory_ratio": 0.12, "step_s": 1.5, "score_select_share": 0.2}]}))
    (tmp_path / "rollout.json").write_text(json.dumps([{"engine": "hf", "tok_s": 900.0},
                                                       {"engine": "vllm", "tok_s": 5000.0, "sync_s": 0.4}]))
    runs = tmp_path / "runs" / "gpu_check"
    runs.mkdir(parents=True)
    (runs / "metrics.jsonl").write_text("\n".join(json.dumps({"opd/loss": 0.5 - i / 10, "timing/step_s": 4.0})
                                                  for i in range(3)))
    steps = {s.name: s for s in gpu_check.plan(tmp_path, "python", with_vllm=True)}
    results = [{"name": n, "status": "ok", "seconds": 10.0, "limit_s": steps[n].limit_s,
                "result": gpu_check.summarise(steps[n], tmp_path, "3 passed in 9.1s\n")} for n in steps]
    text = gpu_check.table(results)
    assert "| gpu tests | ok | 10 | 120 | 3 passed in 9.1s |" in text
    assert "fused@20% 3.0 GiB (0.12) 1.5 s, score+select 20%" in text
    assert "vllm 5000 tok/s, sync 0.40 s" in text and "3 steps, loss 0.3000, 4.0 s/step" in text
    assert text.splitlines()[-1].startswith("| total | ok | 40 | 600 |")
