"""Two CPU processes under accelerate (DDP, DeepSpeed ZeRO-2, ZeRO-3) train exactly what one process trains.

Every launch goes through `accelerate launch` with the shipped file from
configs/accelerate/, as a user would. All runs share one config: 8 prompts per
step, 4 rollouts per micro-batch, so each of the two processes holds one of the
single-process run's two micro-batches; entropy_sample at ratio 0.5 keeps
floor(m / 2) tokens of a micro-batch of m, and responses of uneven length make
the two processes keep different counts (checked on the reference run). Loss,
gradient norm and every logged statistic must then match the single-process run
within fp32 reduction-order noise, and so must the final weights.

On a machine where DeepSpeed never ran, its first launch also compiles DeepSpeed's
shared-memory communication op (about a minute, once; cached under
~/.cache/torch_extensions).
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO, read_metrics, run_cli, tiny_config, write_config

pytest.importorskip("accelerate", reason="accelerate is not installed")

# Observed on these machines: loss within 3e-6 relative, weights within 2e-7; DDP and ZeRO-2 often bit-identical.
RTOL, ATOL = 1e-4, 1e-6  # fp32 reduction-order noise only
WEIGHT_ATOL = 1e-6
VOLATILE = ("timing/", "perf/")  # wall-clock and memory readings differ between any two runs
STEPS = 3

# mode -> (accelerate config file, extra environment, run overrides); {models}: the saved tiny pair
LAUNCHES = {
    # accelerate's MULTI_GPU launch on CPUs; the trainer then asks for gloo (NOTES.md)
    "ddp": ("ddp.yaml", {"ACCELERATE_USE_CPU": "true"}, []),
    # DeepSpeed runs on CPUs as it is; ACCELERATE_USE_CPU would switch it off
    "zero2": ("zero2.yaml", {}, []),
    # both models loaded from HF folders under zero.Init (built sharded), the teacher a ZeRO-3 inference engine
    "zero3": ("zero3.yaml", {}, ["model.path={models}/student", "teacher.path={models}/teacher"]),
    # the random-init student built whole and sharded by its engine; a full teacher loaded per process
    "zero3_replicated_teacher": ("zero3.yaml", {}, ["opd.teacher_zero3=false", "teacher.path={models}/teacher"]),
    "zero3_offload": ("zero3_offload.yaml", {}, []),
    # the models of the run's own config (the agentic runs' prepared pair), loaded sharded under zero.Init
    "zero3_own_models": ("zero3.yaml", {}, []),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, config: Path, run_name: str, *overrides: str) -> subprocess.CompletedProcess:
    """train.py on two processes through `accelerate launch --config_file configs/accelerate/<file>`."""
    if mode != "ddp":
        pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    file, extra_env, mode_overrides = LAUNCHES[mode]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra_env})
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / file), "--num_processes", "2",
               "--main_process_port", str(free_port()), str(REPO / "train.py"),
               "--config", str(config), f"train.run_name={run_name}",
               *(o.format(models=config.parent / "models") for o in mode_overrides), *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)


def stable(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith(VOLATILE)} for m in metrics]


def assert_ok(out: subprocess.CompletedProcess) -> None:
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Traceback" not in out.stderr, out.stderr[-4000:]


def assert_metrics_close(got: list[dict], want: list[dict]) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for g, w in zip(stable(got), stable(want)):
        assert g.keys() == w.keys(), g.keys() ^ w.keys()
        off = {k: (g[k], w[k]) for k in w if not math.isclose(g[k], w[k], rel_tol=RTOL, abs_tol=ATOL)}
        assert not off, f"step {w['step']}: (two processes, one process) {off}"


def assert_weights_close(run_dir: Path, ref_dir: Path) -> None:
    name = f"checkpoints/step_{STEPS:06d}/model.safetensors"
    got, want = load_file(str(run_dir / name)), load_file(str(ref_dir / name))
    assert got.keys() == want.keys(), got.keys() ^ want.keys()
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst <= WEIGHT_ATOL, f"final weights differ by up to {worst:.3g}"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("distributed")
    cfg = tiny_config(tmp, rollout={"max_new_tokens": 24}, train={"steps": STEPS, "save_every": 0},
                      tip={"selector": "entropy_sample", "ratio": 0.5})
    write_config(tmp / "c.yaml", cfg)
    save_pair(tmp / "c.yaml", tmp / "models")
    return tmp


def save_pair(config: Path, folder: Path) -> None:
    """The config's random-init student and teacher as HF folders: loaded from there, they are the same models."""
    import torch

    from opd.config import load_config
    from lm.models import load_model, save_pretrained
    from lm.tokenizers import load_tokenizer

    cfg = load_config([str(config)], [])
    for side, mc in (("student", cfg.model), ("teacher", cfg.teacher)):
        tokenizer = load_tokenizer(mc)
        save_pretrained(load_model(mc, tokenizer, torch.device("cpu"), trainable=False), tokenizer, folder / side)


@pytest.fixture(scope="module")
def reference(workspace) -> Path:
    """The single-process run every two-process run is compared with."""
    out = run_cli(["--config", str(workspace / "c.yaml"), "train.run_name=single"])
    assert_ok(out)
    run_dir = workspace / "runs" / "single"
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all(m["opd/skipped_updates"] == 0 and m["opd/grad_norm"] > 0 for m in metrics)
    # An odd total of kept tokens: the two micro-batches (one per process later) keep different counts,
    # so a mean of per-process means would differ from the global mean these tests demand.
    assert any(m["opd/num_kept"] % 2 for m in metrics), [m["opd/num_kept"] for m in metrics]
    return run_dir


@pytest.fixture(scope="module")
def launched(workspace):
    """mode -> its finished two-process run directory; each mode is launched once per module."""
    done: dict[str, Path] = {}

    def get(mode: str) -> Path:
        if mode not in done:
            out = launch(mode, workspace / "c.yaml", mode)
            assert_ok(out)
            done[mode] = workspace / "runs" / mode
        return done[mode]

    return get


@pytest.mark.parametrize("mode", [
    "ddp", "zero2", "zero3", "zero3_replicated_teacher",
    # works on CPU, but DeepSpeed compiles its cpu_adam op on first use (about 2 minutes here)
    pytest.param("zero3_offload", marks=pytest.mark.slow),
])
def test_two_processes_match_one(mode, reference, launched):
    run_dir = launched(mode)
    metrics = read_metrics(run_dir)
    # one line per step: only the main process logs
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert_metrics_close(metrics, read_metrics(reference))
    assert_weights_close(run_dir, reference)
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == [f"step_{STEPS:06d}"]  # no staging folders left by any process
    engine = run_dir / "checkpoints" / checkpoints[0] / "deepspeed" / "state"
    if mode == "ddp":
        assert not engine.exists()
    else:  # every process's shard of the optimizer state, beside the gathered HF weights
        assert sorted(p.name for p in engine.glob("*optim_states.pt")) == [
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_zero2_run_interrupted_and_resumed_ends_where_the_uninterrupted_run_ends(workspace, launched):
    config = workspace / "c.yaml"
    first = launch("zero2", config, "zero2_parts", "train.max_steps_per_run=2")
    assert_ok(first)
    assert "stopped after train.max_steps_per_run=2" in first.stdout + first.stderr
    parts = workspace / "runs" / "zero2_parts"
    assert [m["step"] for m in read_metrics(parts)] == [1, 2]
    second = launch("zero2", config, "zero2_parts", "train.max_steps_per_run=2")
    assert_ok(second)
    assert "resumed from" in second.stdout + second.stderr
    whole = launched("zero2")
    assert_metrics_close(read_metrics(parts), read_metrics(whole))
    assert_weights_close(parts, whole)


def test_deepspeed_checkpoint_refuses_another_process_count(launched):
    run_dir = launched("zero2")  # one process, same config: resuming is the first thing it tries
    out = run_cli(["--config", str(run_dir / "config.yaml")])
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "DeepSpeed by 2 processes" in errors[0], out.stderr[-3000:]


# ----------------------------------------------------------------------------
# agentic runs: multi-turn conversations with tool calls, two processes vs one


@pytest.fixture(scope="module")
def agent_workspace(tmp_path_factory) -> Path:
    """A briefly trained agent demo pair (it calls the lookup tool, often wrongly) and a 2-step agentic config."""
    from demo.agent_prepare import prepare_agent_pair

    tmp = tmp_path_factory.mktemp("distributed_agent")
    teacher, student = prepare_agent_pair({"teacher_max_steps": 150, "student_max_steps": 150, "check_tasks": 4,
                                           "eval_tasks": 4, "eval_k": 1, "teacher_check_every": 1000,
                                           "student_check_every": 1000, "cache_dir": str(tmp / "cache")},
                                          log=lambda *a: None)
    cfg = {
        "model": {"path": str(student)}, "teacher": {"path": str(teacher)},
        "agent": {"env": "lookup", "env_args": {"num_tasks": 64}, "max_turns": 4, "max_response_tokens": 300,
                  "max_tool_response_tokens": 16, "eval_tasks": 6},
        "data": {"max_prompt_length": 64},
        "rollout": {"max_new_tokens": 48},
        "train": {"steps": STEPS, "prompts_per_step": 8, "micro_batch_size": 4, "output_dir": str(tmp / "runs"),
                  "save_every": 0, "num_threads": 1},
        "optim": {"lr": 1.0e-3},
        "eval": {"every": 0, "at_end": True, "k": 1, "max_new_tokens": 48},
        "logging": {"progress_bar": False},
        "tip": {"selector": "entropy_sample", "ratio": 0.5, "plots": False},
    }
    write_config(tmp / "agent.yaml", cfg)
    return tmp


@pytest.fixture(scope="module")
def agent_reference(agent_workspace) -> Path:
    out = run_cli(["--config", str(agent_workspace / "agent.yaml"), "train.run_name=single"])
    assert_ok(out)
    run_dir = agent_workspace / "runs" / "single"
    steps = [m for m in read_metrics(run_dir) if "opd/loss" in m]
    # the conversations really are multi-turn: tool calls and their results are in the rollouts
    assert sum(m["agent/tool_calls"] for m in steps) > 0 and max(m["agent/turns_max"] for m in steps) >= 2
    return run_dir


@pytest.mark.parametrize("mode", [
    # slow (the one-process reference run ~110 s, each launch 20 s-2 min on 2 cores): .ci/run runs both.
    # ddp; ZeRO-3: processes whose conversations are done keep joining the others' sharded generate calls
    # (agent.rollout: any_live), and processes that draw different numbers of length groups make up the calls
    pytest.param("ddp", marks=pytest.mark.slow),
    pytest.param("zero3_own_models", marks=pytest.mark.slow),
])
def test_agentic_two_processes_match_one(mode, agent_workspace, agent_reference):
    out = launch(mode, agent_workspace / "agent.yaml", f"agent_{mode}")
    assert_ok(out)
    run_dir = agent_workspace / "runs" / f"agent_{mode}"
    assert_metrics_close(read_metrics(run_dir), read_metrics(agent_reference))
    assert_weights_close(run_dir, agent_reference)
    assert (run_dir / "split.json").read_text() == (agent_reference / "split.json").read_text()


@pytest.mark.slow
def test_two_processes_with_a_teacher_per_data_source_match_one(tmp_path):
    """teacher.routes on DDP: each process splits its own micro-batches' rows between the two teachers."""
    import json

    with open(tmp_path / "sourced.jsonl", "w") as fh:
        for i in range(32):
            fh.write(json.dumps({"prompt": f"{i}+{i % 7}=", "data_source": "odd" if i % 3 else "even"}) + "\n")
    other = {"arch": "qwen3", "tokenizer": "chars", "hidden_size": 48, "num_layers": 1, "num_heads": 4,
             "num_kv_heads": 2, "intermediate_size": 64, "init_seed": 5}
    cfg = tiny_config(tmp_path, rollout={"max_new_tokens": 16}, train={"steps": STEPS, "save_every": 0},
                      tip={"selector": "soft_or", "ratio": 0.5})
    cfg["data"]["train_path"] = str(tmp_path / "sourced.jsonl")
    cfg["teacher"]["routes"] = {"even": other}
    config = write_config(tmp_path / "routed.yaml", cfg)
    assert_ok(run_cli(["--config", str(config), "train.run_name=single"]))
    assert_ok(launch("ddp", config, "ddp"))
    single, ddp = tmp_path / "runs" / "single", tmp_path / "runs" / "ddp"
    assert_metrics_close(read_metrics(ddp), read_metrics(single))
    assert all(m["teacher/even/num_tokens"] > 0 for m in read_metrics(ddp))
    assert_weights_close(ddp, single)
