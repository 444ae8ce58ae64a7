"""Fault injection through the real CLI on tiny models: bad input, degenerate batches, NaN, signals, kill -9, full disk.

Every fault must end in one of two ways: training goes on (the bad thing is
skipped and counted), or the run stops with one line on stderr, exit code 2,
no traceback, and its last complete checkpoint intact so the same command resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, TINY_MODEL, read_metrics, run_cli, tiny_config, write_config

WITH_FAULT = Path(__file__).with_name("with_fault.py")
VOLATILE = ("timing/", "perf/")  # wall-clock and memory readings differ between any two runs


def stable(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith(VOLATILE)} for m in metrics]


def error_lines(out: subprocess.CompletedProcess) -> list[str]:
    """The `error: ...` lines of a refused run, after checking it failed the clean way."""
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return [line for line in out.stderr.splitlines() if line.startswith("error: ")]


def start_cli(args: list[str], log: Path) -> subprocess.Popen:
    """train.py in the background (stdout+stderr to `log`), with the environment run_cli uses."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, cwd=REPO, env=env)


def run_with_fault(fault: str, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """train.py with one fault of tests/reliability/with_fault.py injected (e.g. "disk_free=1000")."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(WITH_FAULT), fault, *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=env, **kwargs)


def wait_for_text(log: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before {text!r}: {log.read_text()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no {text!r} within {timeout} s")


def wait_for_steps(run_dir: Path, n: int, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Block until metrics.jsonl holds at least n complete records."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and path.read_text().count("\n") >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before step {n}: {log.read_text()[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no step {n} within {timeout} s")


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime_ns) of every file under root."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def save_tiny_model(path: Path, edit=None, init_seed: int = 1) -> Path:
    """A tiny random Qwen3 checkpoint (char tokenizer) written with save_pretrained; `edit(model)` may change it first."""
    from transformers import AutoModelForCausalLM

    from lm.config import ModelConfig
    from lm.tokenizers import char_tokenizer
    from lm.models import random_model_config, save_pretrained

    tok = char_tokenizer()
    mc = ModelConfig(arch="qwen3", **{k: v for k, v in TINY_MODEL.items() if k != "tokenizer"})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = AutoModelForCausalLM.from_config(random_model_config(mc, len(tok), tok))
    if edit is not None:
        with torch.no_grad():
            edit(model, tok)
    save_pretrained(model, tok, path)
    return path


# ----------------------------------------------------------------------------
# checked before anything loads


def test_config_and_preflight_problems_are_reported_in_one_round(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    out = run_cli(["--config", str(cfg), "tip.ratio=0", "optim.lr=fast", "model.path=/nonexistent/model",
                   "teacher.tokenizer=/nonexistent/tokenizer", "data.prompt_key=question",
                   "eval.benchmarks=[demo, math5OO, /nonexistent/bench.jsonl]"])  # demo: valid, loads offline
    lines = error_lines(out)
    for needle in ("`tip.ratio`", "`optim.lr`", "model.path: /nonexistent/model does not exist",
                   "teacher.tokenizer: /nonexistent/tokenizer does not exist", "data.prompt_key: no record",
                   "eval.benchmarks: unknown benchmark 'math5OO' (known: aime24, aime25, dapo, demo, math500;",
                   "eval.benchmarks: benchmark file not found: /nonexistent/bench.jsonl"):
        assert sum(needle in line for line in lines) == 1, (needle, lines)
    assert len(lines) == 7, lines
    assert "fields there: answer, prompt" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_check_reports_every_problem_and_loads_no_model(tmp_path):
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "my_own_lm", "auto_map": {"AutoModelForCausalLM": "m.M"}}))
    (remote / "model.safetensors").write_bytes(b"")
    (tmp_path / "a_file").write_text("not a directory")
    stray = tmp_path / "runs" / "run"
    stray.mkdir(parents=True)
    (stray / "notes.txt").write_text("someone else's file")
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    out = run_cli(["--config", str(cfg), "--check", f"model.path={no_weights}", f"teacher.path={remote}"])
    lines = error_lines(out)
    expected = ["model.path: " + str(no_weights) + " holds no weights",
                "teacher.trust_remote_code: " + str(remote) + " needs its own Python code",
                "train.run_name: run directory " + str(stray) + " is not empty but holds no run config",
                f"teacher.path: {remote / 'model.safetensors'} is not a safetensors file, or its header is cut short (0 bytes)"]
    for needle in expected:
        assert sum(needle in line for line in lines) == 1, (needle, lines)
    assert len(lines) == 4, lines
    assert (stray / "notes.txt").read_text() == "someone else's file"
    out = run_cli(["--config", str(cfg), "--check", f"train.output_dir={tmp_path / 'a_file' / 'runs'}"])
    assert [line for line in error_lines(out) if "train.output_dir" in line] == [
        f"error: train.output_dir: {tmp_path / 'a_file' / 'runs'} cannot be created: {tmp_path / 'a_file'} is a file"]


def test_teacher_with_another_tokenizer_is_refused_before_any_model_loads(tmp_path):
    from lm.tokenizers import char_tokenizer

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps({"model_type": "qwen3", "vocab_size": 200}))
    # a well-formed file whose one tensor has the wrong shape: loading it would fail with another error
    save_file({"lm_head.weight": torch.zeros(1, 1)}, str(teacher / "model.safetensors"))
    char_tokenizer(alphabet="0123456789+= ").save_pretrained(teacher)
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, teacher={"path": str(teacher), "tokenizer": ""}))
    lines = error_lines(run_cli(["--config", str(cfg)]))  # a run, not only --check, compares the tokenizers first
    assert len(lines) == 1 and lines[0].startswith("error: teacher.path: student and teacher tokenizers differ"), lines
    assert not (tmp_path / "runs").exists()


def test_weights_cut_short_are_refused_before_loading(tmp_path):
    student = save_tiny_model(tmp_path / "student")
    weights = student / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as fh:
        fh.truncate(size // 2)  # an interrupted download or copy
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, model={"path": str(student), "tokenizer": ""}))
    lines = error_lines(run_cli(["--config", str(cfg)]))
    assert lines == [f"error: model.path: {weights} is cut short: {size // 2} bytes where its header describes {size}"]
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------
# bad data


def write_bad_data(path: Path) -> Path:
    good = [json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) for a in range(10, 26)]
    lines = good[:2] + [
        json.dumps({"prompt": "", "answer": "1"}),                      # line 3: empty prompt
        json.dumps({"prompt": "9" * 200, "answer": "1"}),               # 4: over data.max_prompt_length
        json.dumps({"prompt": "3+4="}),                                 # 5: no answer (needed: reward_beta > 0)
        '{"prompt": "1+1=", "answer": ',                                # 6: malformed JSON
        # 7: invalid UTF-8, written below
        "[1, 2, 3]",                                                    # 8: not an object
        json.dumps({"prompt": 42, "answer": "1"}),                      # 9: not text
        json.dumps({"prompt": [{"role": "user"}], "answer": "1"}),      # 10: a message without content
        json.dumps({"question": "5+5=", "answer": "10"}),               # 11: no prompt field
    ] + good[2:]
    with open(path, "wb") as fh:
        fh.write(("\n".join(lines[:6]) + "\n").encode())
        fh.write(b'{"prompt": "\xff\xfe bad bytes", "answer": "1"}\n')
        fh.write(("\n".join(lines[6:]) + "\n").encode())
    return path


def test_bad_records_are_skipped_with_counts_and_training_runs(tmp_path):
    data = write_bad_data(tmp_path / "bad.jsonl")
    cfg = write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, data={"train_path": str(data), "answer_key": "answer"}, opd={"reward_beta": 1.0},
        train={"steps": 1, "save_every": 0}))
    out = run_cli(["--config", str(cfg)])
    assert out.returncode == 0, out.stderr[-3000:]
    summary = next(line for line in out.stdout.splitlines() if line.startswith("data: "))
    assert summary.startswith("data: 16 prompts (skipped: "), summary
    for count in ("1 empty prompt", "3 malformed lines", "1 missing answer field `answer`", "1 missing field `prompt`",
                  "1 prompts over max_prompt_length", "2 `prompt` is neither text nor a list of {role, content} messages"):
        assert count in summary, (count, summary)
    assert [m["step"] for m in read_metrics(tmp_path / "runs" / "run")] == [1]


@pytest.mark.parametrize("override,needle", [
    ("data.bad_records=error", "bad.jsonl:3: empty prompt"),
    # data.long_prompts=error refuses even while other bad records are skipped
    ("data.long_prompts=error", "bad.jsonl:4: prompt of"),
])
def test_bad_records_are_refused_with_file_and_line(tmp_path, override, needle):
    data = write_bad_data(tmp_path / "bad.jsonl")
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, data={"train_path": str(data)}))
    out = run_cli(["--config", str(cfg), override])
    lines = error_lines(out)
    assert len(lines) == 1 and needle in lines[0], lines
    assert not list((tmp_path / "runs").rglob("checkpoints"))


# ----------------------------------------------------------------------------
# degenerate batches


def test_selector_that_keeps_nothing_skips_the_update(tmp_path):
    # Poisson sampling keeps each token with p = h / sum h here (k = 1): an update of one short
    # rollout often keeps no token at all. Such an update must not step AdamW.
    cfg = write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, tip={"selector": "entropy_sample", "ratio": 0.01, "importance_weighting": True},
        train={"steps": 2, "mini_batch_size": 1, "micro_batch_size": 1, "save_every": 0}))
    out = run_cli(["--config", str(cfg)])
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "run"
    metrics = read_metrics(run)
    empty = sum(m["opd/empty_updates"] for m in metrics)
    assert empty >= 1, metrics
    assert all(m["opd/skipped_updates"] == 0 and isinstance(m["opd/loss"], float) for m in metrics)
    # the scheduler and AdamW counted only the updates that kept something
    sched = torch.load(run / "checkpoints" / "step_000002" / "scheduler.pt", weights_only=True)
    optim = torch.load(run / "checkpoints" / "step_000002" / "optimizer.pt", weights_only=True)
    assert sched["last_epoch"] == 16 - empty
    assert {int(s["step"]) for s in optim["state"].values()} == {16 - empty}


def test_rollouts_with_zero_response_tokens(tmp_path):
    # step 1: all 8 rollouts come back empty (nothing to learn from: the update is skipped, no division
    # by zero); step 2: the first 4, one whole micro-batch, are empty; step 3: none
    cfg = write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, tip={"selector": "soft_or", "ratio": 0.5, "normalize": "running", "dump_tokens": 4},
        train={"steps": 3, "save_every": 1, "keep_last": 3}))
    out = run_with_fault("empty_rollouts=8,4", ["--config", str(cfg)])
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "run"
    metrics = read_metrics(run)
    assert [(m["opd/num_tokens"], m["opd/empty_updates"], m["opd/empty_microbatches"]) for m in metrics] == [
        (0, 1, 2), (metrics[1]["opd/num_tokens"], 0, 1), (metrics[2]["opd/num_tokens"], 0, 0)]
    assert 0 < metrics[1]["opd/num_tokens"] < metrics[2]["opd/num_tokens"]
    assert metrics[0]["opd/loss"] == 0.0 and metrics[0]["opd/grad_norm"] == 0.0
    assert all(m["opd/skipped_updates"] == 0 and math.isfinite(m["opd/loss"]) for m in metrics)
    # the empty step moved nothing: no AdamW step, no running min/max yet
    steps = lambda s: {int(v["step"]) for v in torch.load(run / "checkpoints" / f"step_{s:06d}" / "optimizer.pt",
                                                             weights_only=True)["state"].values()}
    assert steps(1) == set() and steps(2) == {1} and steps(3) == {2}
    state = lambda s: json.loads((run / "checkpoints" / f"step_{s:06d}" / "trainer_state.json").read_text())
    assert not state(1)["selector_state"]["lo"] and state(2)["selector_state"]["lo"]


def test_micro_batches_that_keep_nothing_add_nothing_and_the_update_goes_on(tmp_path):
    # One update of 8 one-rollout micro-batches; Poisson sampling with k = 1 keeps no token of a
    # micro-batch with probability about 1/e, so some micro-batches are empty and others are not.
    cfg = write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, tip={"selector": "entropy_sample", "ratio": 0.01, "importance_weighting": True},
        train={"steps": 2, "micro_batch_size": 1, "save_every": 0}))
    out = run_cli(["--config", str(cfg)])
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = read_metrics(tmp_path / "runs" / "run")
    assert sum(m["opd/empty_microbatches"] for m in metrics) >= 1, metrics
    for m in metrics:
        assert m["opd/empty_microbatches"] < 8 and m["opd/num_kept"] >= 1  # the update itself kept something
        assert m["opd/skipped_updates"] == 0 and m["opd/empty_updates"] == 0
        assert math.isfinite(m["opd/loss"]) and math.isfinite(m["opd/grad_norm"]) and m["opd/grad_norm"] > 0
    optim = torch.load(tmp_path / "runs" / "run" / "checkpoints" / "step_000002" / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in optim["state"].values()} == {2}  # both updates stepped AdamW


def test_student_that_only_emits_eos(tmp_path):
    def always_eos(model, tok):
        # every token embeds to the same vector and no layer adds anything: the final hidden state is
        # constant, and the LM head maps it to EOS alone, so every response is exactly [EOS]
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.get_input_embeddings().weight.fill_(1.0)
        head = model.get_output_embeddings().weight
        head.zero_()
        head[tok.eos_token_id] = 2.0

    student = save_tiny_model(tmp_path / "eos_student", always_eos)
    cfg = write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, model={"path": str(student), "tokenizer": ""}, tip={"selector": "entropy_sample", "ratio": 0.5},
        train={"steps": 2, "save_every": 0}))
    out = run_cli(["--config", str(cfg)])
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = read_metrics(tmp_path / "runs" / "run")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["opd/response_length"] == 1.0 and m["opd/num_tokens"] == 8
        assert m["opd/num_kept"] == 4 and m["opd/skipped_updates"] == 0  # 2 of 4 one-token rows per micro-batch
        assert isinstance(m["opd/loss"], float) and m["opd/loss"] > 0 and m["opd/entropy"] < 1e-3


# ----------------------------------------------------------------------------
# numerical faults


def test_nan_teacher_skips_steps_then_stops_with_the_last_good_checkpoint(tmp_path):
    teacher = save_tiny_model(tmp_path / "teacher")
    cfg = write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, teacher={"path": str(teacher)},
        tip={"selector": "soft_or", "ratio": 0.5, "normalize": "running"},
        train={"steps": 8, "save_every": 1, "keep_last": 5, "max_consecutive_skips": 3}))
    first = run_cli(["--config", str(cfg), "train.max_steps_per_run=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "run"
    good = run / "checkpoints" / "step_000002"
    before = tree_digest(good)

    weights = load_file(str(teacher / "model.safetensors"))
    weights["lm_head.weight"][7, 3] = float("nan")  # one bad weight poisons every teacher distribution
    save_file(weights, str(teacher / "model.safetensors"), metadata={"format": "pt"})
    out = run_cli(["--config", str(cfg)])
    lines = error_lines(out)
    assert len(lines) == 1 and "3 consecutive steps skipped" in lines[0], lines
    assert f"last good checkpoint: {run / 'checkpoints' / 'step_000004'}" in lines[0]

    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert [m["opd/skipped_updates"] for m in metrics] == [0, 0, 1, 1, 1]
    assert all(m["opd/loss"] == "nan" for m in metrics[2:])
    assert tree_digest(good) == before  # the last checkpoint from before the fault is untouched
    assert not (run / "checkpoints" / "step_000005").exists()
    # skipped steps changed nothing: weights, AdamW state and running min/max equal step 2's
    later = run / "checkpoints" / "step_000004"
    a, b = load_file(str(good / "model.safetensors")), load_file(str(later / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a = torch.load(good / "optimizer.pt", weights_only=True)
    opt_b = torch.load(later / "optimizer.pt", weights_only=True)
    assert all(torch.equal(opt_a["state"][i][k], opt_b["state"][i][k]) for i in opt_a["state"] for k in opt_a["state"][i])
    state_a = json.loads((good / "trainer_state.json").read_text())["selector_state"]
    state_b = json.loads((later / "trainer_state.json").read_text())["selector_state"]
    assert state_a == state_b and state_a["lo"], (state_a, state_b)


def test_nan_student_samples_without_crashing_and_stops_after_the_skips(tmp_path):
    def poison(model, tok):
        model.get_output_embeddings().weight[7, 3] = float("nan")  # every logit row of the student is NaN

    student = save_tiny_model(tmp_path / "student", poison)
    cfg = write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, model={"path": str(student), "tokenizer": ""}, train={"steps": 6, "save_every": 0,
                                                                           "max_consecutive_skips": 2}))
    lines = error_lines(run_cli(["--config", str(cfg)]))
    assert len(lines) == 1 and "2 consecutive steps skipped" in lines[0] and "last good checkpoint: none" in lines[0]
    metrics = read_metrics(tmp_path / "runs" / "run")
    assert [(m["step"], m["opd/skipped_updates"], m["opd/loss"]) for m in metrics] == [(1, 1, "nan"), (2, 1, "nan")]


# ----------------------------------------------------------------------------
# interruption


STEPS = 8


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run; interrupted runs of the same config must end with the same metrics."""
    tmp = tmp_path_factory.mktemp("reference")
    base = tiny_config(tmp, tip={"selector": "soft_or", "ratio": 0.5, "normalize": "running"},
                       train={"steps": STEPS, "save_every": 1, "keep_last": 2}, rollout={"max_new_tokens": 24})
    base["train"].pop("output_dir")
    base["train"].pop("run_name")
    cfg = write_config(tmp / "c.yaml", base)
    out = run_cli(["--config", str(cfg), f"train.output_dir={tmp / 'runs'}", "train.run_name=whole"])
    assert out.returncode == 0, out.stderr[-3000:]
    return cfg, tmp / "runs" / "whole"


def stop_with_signal(args: list[str], run: Path, sig: int, log: Path) -> int:
    """Start a run, send `sig` after its first step; it must finish that step, checkpoint and exit 0.
    Returns the step it stopped at."""
    proc = start_cli(args, log)
    wait_for_steps(run, 1, proc, log)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    stopped = len(read_metrics(run))
    assert f"stopped by signal at step {stopped}; checkpoint saved" in log.read_text()
    assert (run / "checkpoints" / f"step_{stopped:06d}" / "trainer_state.json").is_file()
    return stopped


def test_sigterm_then_kill_9_then_resume_matches_the_uninterrupted_run(tmp_path, reference):
    cfg, whole = reference
    args = ["--config", str(cfg), f"train.output_dir={tmp_path / 'runs'}", "train.run_name=parts"]
    run = tmp_path / "runs" / "parts"
    ckpts = run / "checkpoints"

    # 1. SIGTERM (preemption): the step in flight finishes, a checkpoint is written, exit 0
    stopped = stop_with_signal(args, run, signal.SIGTERM, tmp_path / "term.log")
    assert stopped < STEPS

    # 2. resumed, then kill -9 at a random moment (saves happen every step, so often mid-save)
    log = tmp_path / "kill.log"
    proc = start_cli(args, log)
    wait_for_steps(run, stopped + 1, proc, log)
    time.sleep(random.uniform(0.0, 0.4))
    proc.kill()
    proc.wait(timeout=60)

    # 3. what a kill during a save or a log write can leave behind, made certain
    complete = sorted(p.name for p in ckpts.glob("step_*") if (p / "trainer_state.json").is_file())
    last = int(complete[-1].removeprefix("step_"))
    partial = ckpts / f"step_{last + 1:06d}"
    partial.mkdir(exist_ok=True)
    (partial / "model.safetensors").write_bytes(b"\0" * 100)  # no trainer_state.json: never finished
    (ckpts / f".tmp-step_{last + 2:06d}-99999").mkdir()
    (ckpts / f".tmp-step_{last + 2:06d}-99999" / "optimizer.pt").write_bytes(b"half")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 99, "opd/lo')  # a line cut short

    # 4. the same command resumes from the last complete checkpoint and ends where the whole run did
    out = run_cli(args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {ckpts / f'step_{last:06d}'}" in out.stdout
    assert stable(read_metrics(run)) == stable(read_metrics(whole))
    left = sorted(p.name for p in ckpts.iterdir())
    assert left == [f"step_{STEPS - 1:06d}", f"step_{STEPS:06d}"], left  # debris gone, keep_last honoured
    final_a = load_file(str(ckpts / f"step_{STEPS:06d}" / "model.safetensors"))
    final_b = load_file(str(whole / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors"))
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_b)


def test_second_interrupt_stops_at_once_without_a_traceback(tmp_path, reference):
    cfg, _ = reference
    run = tmp_path / "runs" / "ctrl_c"
    log = tmp_path / "int.log"
    proc = start_cli(["--config", str(cfg), f"train.output_dir={tmp_path / 'runs'}", "train.run_name=ctrl_c"], log)
    wait_for_steps(run, 1, proc, log)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=120)
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    # the second signal usually lands mid-step (130); rarely the first one's checkpoint-and-exit wins (0)
    assert (rc == 130 and "interrupted; rerun the same command" in text) or (rc == 0 and "stopped by signal" in text), (rc, text[-2000:])
    ckpts = run / "checkpoints"
    if ckpts.is_dir():
        assert not [p.name for p in ckpts.iterdir() if p.name.startswith(".")]  # no half-written checkpoint


def test_sigint_then_kill_9_inside_a_checkpoint_write_then_resume(tmp_path, reference):
    cfg, whole = reference
    args = ["--config", str(cfg), f"train.output_dir={tmp_path / 'runs'}", "train.run_name=ctrl_c_once"]
    run = tmp_path / "runs" / "ctrl_c_once"
    ckpts = run / "checkpoints"

    # 1. one Ctrl-C behaves like SIGTERM: the step finishes, a checkpoint is written, exit 0
    stopped = stop_with_signal(args, run, signal.SIGINT, tmp_path / "int.log")
    assert stopped < STEPS - 2

    # 2. resumed; the write of checkpoint stopped+2 hangs once all its files are written, just before
    #    the rename that publishes it; kill -9 there
    victim = stopped + 2
    log = tmp_path / "stall.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(WITH_FAULT), f"stall_save={victim}", *args], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, cwd=REPO, env=env)
    wait_for_text(log, "fault: stalled writing", proc)
    (tmp,) = ckpts.glob(f".tmp-step_{victim:06d}-*")
    assert (tmp / "model.safetensors").is_file() and (tmp / "trainer_state.json").is_file()
    assert not (ckpts / f"step_{victim:06d}").exists()
    before = tree_digest(ckpts / f"step_{victim - 1:06d}")
    proc.kill()
    proc.wait(timeout=60)
    assert tree_digest(ckpts / f"step_{victim - 1:06d}") == before

    # 3. the same command resumes from the checkpoint before the killed write and ends as the whole run did
    out = run_cli(args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {ckpts / f'step_{victim - 1:06d}'} (step {victim - 1})" in out.stdout
    assert stable(read_metrics(run)) == stable(read_metrics(whole))
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step_{STEPS - 1:06d}", f"step_{STEPS:06d}"]
    final = ckpts / f"step_{STEPS:06d}"
    assert (final / "model.safetensors").is_file() and not list(final.glob("*.bin"))  # weights as safetensors only
    a = load_file(str(final / "model.safetensors"))
    b = load_file(str(whole / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)


# ----------------------------------------------------------------------------
# existing run directories


def test_finished_run_rerun_changes_nothing(reference):
    cfg, whole = reference
    before = tree_digest(whole)
    out = run_cli(["--config", str(cfg), f"train.output_dir={whole.parent}", "train.run_name=whole"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"already finished at step {STEPS}; nothing to train" in out.stdout
    assert "train.run_name=NEW for a fresh run" in out.stdout
    assert tree_digest(whole) == before


def test_existing_directories_that_are_not_this_run_are_refused(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "run").write_text("a file where the run directory would go")
    lines = error_lines(run_cli(["--config", str(cfg)]))
    assert lines == [f"error: train.run_name: {runs / 'run'} exists and is not a directory"]
    (runs / "run").unlink()
    (runs / "run").mkdir()
    (runs / "run" / "config.yaml").write_text("model: [unclosed\n")
    lines = error_lines(run_cli(["--config", str(cfg)]))
    assert len(lines) == 1 and "config.yaml cannot be read" in lines[0], lines
    assert (runs / "run" / "config.yaml").read_text() == "model: [unclosed\n"


# ----------------------------------------------------------------------------
# a disk that fills up


def test_checkpoint_that_cannot_be_written_ends_the_run_cleanly(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train={"steps": 3, "save_every": 1}))
    limit = 48 * 1024  # bytes per file: logs and config fit, the model's weights (~100 KiB) do not

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(cfg)], capture_output=True,
                         text=True, timeout=300, cwd=REPO, env=env, preexec_fn=small_files)
    lines = error_lines(out)
    assert len(lines) == 1 and "checkpoint at step 1 could not be written" in lines[0], lines
    assert "last good checkpoint: none" in lines[0]
    ckpts = tmp_path / "runs" / "run" / "checkpoints"
    assert not list(ckpts.iterdir())  # the half-written temporary is gone


# ----------------------------------------------------------------------------
# an output filesystem without room or write permission


def test_a_disk_without_room_for_a_checkpoint_is_refused_before_anything_loads(tmp_path, reference):
    _, whole = reference  # same student architecture: its checkpoint's real size
    real = sum(f.stat().st_size for f in (whole / "checkpoints" / f"step_{STEPS:06d}").rglob("*") if f.is_file())
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    out = run_with_fault(f"disk_free={int(1.25 * real)}", ["--config", str(cfg), "--check"])
    assert out.returncode == 0, out.stderr[-3000:]  # the estimate is not far above the real size
    lines = error_lines(run_with_fault(f"disk_free={int(0.8 * real)}", ["--config", str(cfg)]))
    assert len(lines) == 1 and lines[0].startswith("error: train.output_dir: "), lines
    assert "free on" in lines[0] and "parameters, weights + AdamW state) needs about" in lines[0], lines
    assert not (tmp_path / "runs").exists()

    # a checkpoint directory's own parameter count comes from its safetensors header
    student = save_tiny_model(tmp_path / "student")
    params = sum(t.numel() for t in load_file(str(student / "model.safetensors")).values())
    lines = error_lines(run_with_fault("disk_free=1000", ["--config", str(cfg), f"model.path={student}",
                                                          "model.tokenizer=", "--check"]))
    assert len(lines) == 1 and f"({params:,} parameters, weights + AdamW state)" in lines[0], lines


def as_a_user_without_root_powers():
    """preexec_fn: as root, drop CAP_DAC_OVERRIDE so directory permissions apply (as for any other user)."""
    if os.geteuid() == 0:
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(24, 1, 0, 0, 0) != 0:  # PR_CAPBSET_DROP, CAP_DAC_OVERRIDE
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) refused")


def test_output_directory_that_is_not_writable_is_refused(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    runs = tmp_path / "runs"
    runs.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}

    def lines_of(args):
        try:
            out = subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True,
                                 timeout=300, cwd=REPO, env=env, preexec_fn=as_a_user_without_root_powers)
        except subprocess.SubprocessError as exc:
            pytest.skip(f"cannot run without root's file permissions here ({exc})")
        return error_lines(out)

    try:
        runs.chmod(0o555)
        assert lines_of(["--config", str(cfg)]) == [f"error: train.output_dir: {runs} is not writable"]
        assert lines_of(["--config", str(cfg), f"train.output_dir={runs / 'sub' / 'dir'}"]) == [
            f"error: train.output_dir: {runs / 'sub' / 'dir'} cannot be created: {runs} is not writable"]
        runs.chmod(0o755)
        (runs / "run").mkdir(mode=0o555)
        assert lines_of(["--config", str(cfg)]) == [f"error: train.run_name: run directory {runs / 'run'} is not writable"]
    finally:
        runs.chmod(0o755)
        if (runs / "run").exists():
            (runs / "run").chmod(0o755)
    assert list(runs.rglob("*")) == [runs / "run"]  # nothing was written anywhere
