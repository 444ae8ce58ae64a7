"""The real CLI on tiny models: runs, checkpoints, resume, and clean errors."""

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, read_metrics, run_cli, tiny_config, write_config

VOLATILE = ("timing/", "perf/")  # wall-clock and memory readings differ between any two runs


def stable(metrics):
    return [{k: v for k, v in m.items() if not k.startswith(VOLATILE)} for m in metrics]


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen2"])
def test_three_step_run_writes_metrics_and_checkpoint(tmp_path, arch):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, arch, tip={"selector": "soft_or", "ratio": 0.5}))
    out = run_cli(["--config", str(cfg)])
    assert out.returncode == 0, out.stderr[-2000:]
    run = tmp_path / "runs" / "run"
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for key in ("opd/loss", "opd/entropy", "opd/grad_norm", "opd/num_tokens", "opd/lr", "timing/step_s",
                "tip/q3_share", "tip/kept_fraction"):
        assert key in metrics[0], key
    assert all(m["opd/num_kept"] < m["opd/num_tokens"] for m in metrics)
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model"]["arch"] == arch and resolved["tip"]["selector"] == "soft_or"
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_000002", "step_000003"]
    weights = load_file(str(run / "checkpoints" / "step_000003" / "model.safetensors"))
    assert weights and all(t.isfinite().all() for t in weights.values())


def test_resume_reproduces_uninterrupted_run(tmp_path):
    base = tiny_config(tmp_path, train={"steps": 4, "save_every": 2}, tip={"selector": "entropy_sample", "ratio": 0.5})
    cfg = write_config(tmp_path / "c.yaml", base)
    assert run_cli(["--config", str(cfg), "train.run_name=whole"]).returncode == 0
    first = run_cli(["--config", str(cfg), "train.run_name=parts", "train.max_steps_per_run=2"])
    assert first.returncode == 0 and "stopped after train.max_steps_per_run=2" in first.stdout + first.stderr
    assert [m["step"] for m in read_metrics(tmp_path / "runs" / "parts")] == [1, 2]
    second = run_cli(["--config", str(cfg), "train.run_name=parts"])
    assert second.returncode == 0, second.stderr[-2000:]
    whole = stable(read_metrics(tmp_path / "runs" / "whole"))
    parts = stable(read_metrics(tmp_path / "runs" / "parts"))
    assert [m["step"] for m in parts] == [1, 2, 3, 4]
    assert parts == whole


def test_changed_config_is_refused_for_an_existing_run(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train={"steps": 1}))
    assert run_cli(["--config", str(cfg)]).returncode == 0
    out = run_cli(["--config", str(cfg), "optim.lr=0.5"])
    assert out.returncode == 2
    assert "different config" in out.stderr and "optim.lr" in out.stderr and "Traceback" not in out.stderr
    refuse = run_cli(["--config", str(cfg), "train.on_existing=refuse"])
    assert refuse.returncode == 2 and "already holds a run" in refuse.stderr


@pytest.mark.parametrize("override,needle", [
    ("tip.ratio=0", "tip.ratio"),
    ("tip.ratio=1.5", "tip.ratio"),
    ("opd.loss_type=kl", "opd.loss_type"),
    ("train.nonsense=1", "unknown config key `train.nonsense`"),
    ("optim.lr=fast", "optim.lr"),
    ("tip.selector=magic", "unknown selector 'magic'"),
    ("model.path=/nonexistent/model", "model.path"),
])
def test_bad_config_fails_with_one_line(tmp_path, override, needle):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    out = run_cli(["--config", str(cfg), override])
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_bad_yaml_key_names_the_file(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["rollout"]["temprature"] = 0.7
    path = write_config(tmp_path / "typo.yaml", cfg)
    out = run_cli(["--config", str(path)])
    assert out.returncode == 2 and "typo.yaml" in out.stderr and "rollout.temprature" in out.stderr


def test_print_config_resolves_without_loading(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    out = run_cli(["--config", str(cfg), "tip.selector=q3_only", "--print-config"])
    assert out.returncode == 0
    assert yaml.safe_load(out.stdout)["tip"]["selector"] == "q3_only"
    assert not (tmp_path / "runs").exists()


def test_held_out_prompts_are_evaluated_as_val_heldout(tmp_path):
    """data.val_ratio holds prompts out of training; they are evaluated, formatted as in training, graded by opd.reward."""
    base = tiny_config(tmp_path, data={"val_ratio": 0.25, "answer_key": "answer"},
                       opd={"reward": "tests_rewards:ends_with_answer"},
                       eval={"at_end": True, "k": 2, "max_new_tokens": 4, "batch_size": 8}, train={"steps": 1})
    (tmp_path / "tests_rewards.py").write_text(
        "def ends_with_answer(text, answer):\n    return text.strip().endswith(answer)\n")
    cfg = write_config(tmp_path / "c.yaml", base)
    out = run_cli(["--config", str(cfg)], env={"PYTHONPATH": f"{tmp_path}:{REPO}"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "data: 64 prompts: 48 for training, 16 held out" in out.stdout + out.stderr
    final = json.loads((tmp_path / "runs" / "run" / "eval" / "final" / "summary.json").read_text())
    assert final["benchmarks"]["heldout"]["n_problems"] == 16
    samples = (tmp_path / "runs" / "run" / "eval" / "final" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 32 and all(json.loads(s)["benchmark"] == "heldout" for s in samples)
    assert "val/heldout/mean@2" in read_metrics(tmp_path / "runs" / "run")[-1]
    off = run_cli(["--config", str(cfg), "eval.heldout=false", "train.run_name=off"],
                  env={"PYTHONPATH": f"{tmp_path}:{REPO}"})
    assert off.returncode == 0, off.stderr[-2000:]
    assert not (tmp_path / "runs" / "off" / "eval" / "final" / "summary.json").exists()


def test_student_with_more_embedding_rows_than_the_teacher_samples_only_shared_ids(tmp_path):
    """Padded rows beyond the teacher's are not tokens: rollouts never sample them (the teacher could not score them)."""
    base = tiny_config(tmp_path, train={"steps": 2})
    base["model"]["vocab_size"], base["teacher"]["vocab_size"] = 140, 110  # the tokenizer defines 102 ids
    cfg = write_config(tmp_path / "c.yaml", base)
    out = run_cli(["--config", str(cfg)])  # an id >= 110 in a rollout would be an IndexError in the teacher
    assert out.returncode == 0, out.stderr[-2000:]
    assert [m["step"] for m in read_metrics(tmp_path / "runs" / "run")] == [1, 2]


@pytest.mark.parametrize("selector", ["soft_or", "random"])  # stats first / stats from the loss kernel
def test_token_dump_is_an_observer(tmp_path, selector):
    """Turning tip.dump_tokens on changes no metric and no weight."""
    runs = {}
    for dump in (0, 50):
        cfg = write_config(tmp_path / f"c{dump}.yaml", tiny_config(
            tmp_path, train={"run_name": f"dump{dump}", "steps": 4, "save_every": 0},
            tip={"selector": selector, "ratio": 0.5, "dump_tokens": dump}))
        out = run_cli(["--config", str(cfg)])
        assert out.returncode == 0, out.stderr[-2000:]
        run = tmp_path / "runs" / f"dump{dump}"
        runs[dump] = (stable(read_metrics(run)), load_file(str(run / "checkpoints" / "step_000004" / "model.safetensors")))
    assert (tmp_path / "runs" / "dump50" / "tokens.jsonl").stat().st_size > 0
    assert runs[0][0] == runs[50][0]
    assert runs[0][1].keys() == runs[50][1].keys()
    assert all(torch.equal(runs[0][1][k], runs[50][1][k]) for k in runs[0][1])


def test_bf16_mixed_precision_runs_on_a_cpu(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train={"mixed_precision": "bf16", "steps": 2},
                                                       tip={"selector": "soft_or", "ratio": 0.5}))
    out = run_cli(["--config", str(cfg)])
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = read_metrics(tmp_path / "runs" / "run")
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["opd/loss"]) for m in metrics)


def test_length_groups_run_matches_a_padded_run(tmp_path):
    """Length groups are the default and change nothing but rounding: the first step of a grouped and a padded run
    (the same rollouts: the same weights sample them) has the same loss, statistics and gradient norm to float32
    rounding."""
    prompts = tmp_path / "prompts.jsonl"  # 2 to 60 characters: rows of very different lengths to regroup
    prompts.write_text("".join(json.dumps({"prompt": "7" * (2 + (17 * i) % 59) + "="}) + "\n" for i in range(16)))
    runs = {}
    for group in (True, False):
        (tmp_path / str(group)).mkdir()
        cfg = tiny_config(tmp_path / str(group), tip={"selector": "soft_or", "ratio": 0.5},
                          train={"steps": 1, "save_every": 0, "micro_batch_size": 8}, opd={"length_groups": group},
                          data={"train_path": str(prompts)})
        out = run_cli(["--config", str(write_config(tmp_path / str(group) / "c.yaml", cfg))])
        assert out.returncode == 0, out.stderr[-2000:]
        [runs[group]] = read_metrics(tmp_path / str(group) / "runs" / "run")
    grouped, padded = runs[True], runs[False]
    assert grouped["opd/num_tokens"] == padded["opd/num_tokens"] and grouped["opd/num_kept"] == padded["opd/num_kept"]
    for key in ("opd/loss", "opd/entropy", "opd/grad_norm", "tip/q3_share"):
        assert math.isclose(grouped[key], padded[key], rel_tol=1e-4, abs_tol=1e-6), (key, grouped[key], padded[key])
