"""The second fault-injection round (tracker issue 15), each defect reproduced through the real CLI.

Hostile config values, unreachable hub ids, failing log writes, damaged checkpoints and run
directories that moved. The rule is the one of test_faults.py: a mistake or a failing
environment ends with one `error:` line and exit code 2, and nothing already written is lost.
The issue's item number is in each test's comment.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import read_metrics, run_cli, tiny_config, write_config, write_prompts
from test_faults import error_lines, run_with_fault, save_tiny_model, tree_digest

OFFLINE = {"HF_HUB_OFFLINE": "1"}


def one_error(out) -> str:
    lines = error_lines(out)
    assert len(lines) == 1, lines
    return lines[0]


def config_file(tmp_path: Path, **sections) -> Path:
    return write_config(tmp_path / "c.yaml", tiny_config(tmp_path, **sections))


# ----------------------------------------------------------------------------
# 1, 3: run names


@pytest.mark.parametrize("name", ["../escaped", "OUTSIDE", ".", "..", "/proc/x", "a" * 300])
def test_run_name_is_one_path_component(tmp_path, name):
    # 1: `../escaped`, an absolute path, `.` and `..` ran (exit 0) and wrote outside or straight into
    # train.output_dir; 3: `/proc/x` and a 300-character name were tracebacks
    name = name.replace("OUTSIDE", str(tmp_path / "outside"))
    line = one_error(run_cli(["--config", str(config_file(tmp_path)), f"train.run_name={name}"]))
    assert line.startswith("error: command line: `train.run_name` = "), line
    assert "one path component" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "prompts.jsonl"]  # nothing written anywhere


# ----------------------------------------------------------------------------
# 2: NaN and Inf


@pytest.mark.parametrize("override,key", [("optim.lr=.inf", "optim.lr"), ("optim.lr=.nan", "optim.lr"),
                                          ("tip.ratio=.nan", "tip.ratio"), ("rollout.temperature=-.inf", "rollout.temperature")])
def test_non_finite_numbers_are_refused(tmp_path, override, key):
    line = one_error(run_cli(["--config", str(config_file(tmp_path)), override]))
    assert line.startswith(f"error: command line: `{key}` = ") and "is not a finite number" in line, line
    assert not (tmp_path / "runs").exists()


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    # 2: a checkpoint of NaN weights was written at step 1 and then named "last good checkpoint"
    def poison(model, tok):
        model.get_output_embeddings().weight[7, 3] = float("nan")

    student = save_tiny_model(tmp_path / "student", poison)
    cfg = config_file(tmp_path, model={"path": str(student), "tokenizer": ""},
                      train={"steps": 4, "save_every": 1, "max_consecutive_skips": 2})
    line = one_error(run_cli(["--config", str(cfg)]))
    assert line == ("error: checkpoint at step 1 not written: the student's weights are not finite (lm_head.weight); "
                    "last good checkpoint: none"), line
    assert not list((tmp_path / "runs").rglob("*step_*"))


# ----------------------------------------------------------------------------
# 3: tracebacks that became one line


def test_names_that_do_not_resolve_are_refused_at_preflight(tmp_path):
    cfg = config_file(tmp_path)
    lines = error_lines(run_cli(["--config", str(cfg), "--check", "opd.reward=json:no_such_function",
                                 "model.attn_implementation=bogus", "teacher.attn_implementation=eagre"]))
    assert len(lines) == 3, lines
    assert lines[0].startswith("error: model.attn_implementation: 'bogus' is not an attention implementation"), lines
    assert lines[1].startswith("error: teacher.attn_implementation: 'eagre' is not an attention implementation"), lines
    assert lines[2] == "error: opd.reward: module json has no function no_such_function", lines
    line = one_error(run_cli(["--config", str(cfg), "opd.reward=no_such_module_xyz:grade"]))
    assert line.startswith("error: opd.reward: cannot import module no_such_module_xyz"), line
    assert not (tmp_path / "runs").exists()


def test_unreachable_hub_ids_end_in_one_line(tmp_path):
    cfg = config_file(tmp_path)
    line = one_error(run_cli(["--config", str(cfg), "teacher.path=owner/no-such-model", "teacher.tokenizer=chars"],
                             env=OFFLINE))
    assert line.startswith("error: teacher.path: cannot reach the hub for owner/no-such-model"), line
    assert line.endswith("; give a local path"), line
    line = one_error(run_cli(["--config", str(cfg), "data.train_path=owner/no-such-data"], env=OFFLINE))
    assert line == "error: data.train_path: cannot reach the hub for owner/no-such-data; give a local path", line


# ----------------------------------------------------------------------------
# 4: a start that fails after preflight


def test_a_start_that_failed_after_preflight_can_be_retried_with_a_corrected_command(tmp_path):
    cfg = config_file(tmp_path, train={"steps": 1, "save_every": 0})
    data = write_prompts(tmp_path / "prompts.jsonl", n=300)
    with open(data, "a") as fh:
        fh.write(json.dumps({"prompt": "", "answer": "1"}) + "\n")  # past the head preflight reads
    line = one_error(run_cli(["--config", str(cfg), "data.bad_records=error"]))
    assert "prompts.jsonl:301: empty prompt" in line, line
    out = run_cli(["--config", str(cfg), "data.bad_records=skip"])
    assert out.returncode == 0, out.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "runs" / "run" / "config.yaml").read_text())
    assert saved["data"]["bad_records"] == "skip"


# ----------------------------------------------------------------------------
# 5: log files that cannot be written


@pytest.mark.parametrize("name,code,cause", [("metrics.jsonl", "ENOSPC", "disk full"),
                                             ("tokens.jsonl", "EROFS", "read-only file system"),
                                             ("metrics.jsonl", "EPERM", "operation not permitted")])
def test_a_log_that_cannot_be_written_ends_the_run_cleanly_and_it_resumes(tmp_path, name, code, cause):
    cfg = config_file(tmp_path, train={"steps": 4, "save_every": 2}, tip={"dump_tokens": 2, "plots": False})
    run = tmp_path / "runs" / "run"
    line = one_error(run_with_fault(f"fail_write={name}@3:{code}", ["--config", str(cfg)]))
    assert line.startswith(f"error: {run / name} could not be written at step 3: {cause}"), line
    assert line.endswith(f"last good checkpoint: {run / 'checkpoints' / 'step_000002'}; "
                         "rerun the same command to resume"), line
    out = run_cli(["--config", str(cfg)])
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_000002'} (step 2)" in out.stdout
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------
# 6, 7, 9: an existing run, damaged, rerun, moved


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 3-step run with a checkpoint at every step."""
    tmp = tmp_path_factory.mktemp("finished")
    cfg = write_config(tmp / "c.yaml", tiny_config(tmp, train={"steps": 3, "save_every": 1, "keep_last": 3}))
    out = run_cli(["--config", str(cfg)])
    assert out.returncode == 0, out.stderr[-3000:]
    return cfg, tmp / "runs" / "run"


def copy_run(finished, tmp_path: Path) -> tuple[list[str], Path]:
    """The finished run copied under tmp_path (its config.yaml told, so only the issue under test differs)."""
    cfg, run = finished
    copy = tmp_path / "runs" / "run"
    shutil.copytree(run, copy)
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    saved["train"]["output_dir"] = str(tmp_path / "runs")
    (copy / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    return ["--config", str(cfg), f"train.output_dir={tmp_path / 'runs'}"], copy


def truncate_weights(ckpt: Path) -> None:
    weights = ckpt / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)


DAMAGE = {
    "truncated weights": truncate_weights,
    "broken trainer_state.json": lambda c: (c / "trainer_state.json").write_text('{"step": 3, "sampler": {'),
    "missing optimizer.pt": lambda c: (c / "optimizer.pt").unlink(),
    "garbage scheduler.pt": lambda c: (c / "scheduler.pt").write_bytes(b"\x80garbage" * 40),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(finished, tmp_path, damage):
    args, run = copy_run(finished, tmp_path)
    newest = run / "checkpoints" / "step_000003"
    (run / "summary.json").unlink()  # as if killed after its last checkpoint
    DAMAGE[damage](newest)
    out = run_cli(args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: checkpoint {newest} is damaged ("), warnings
    assert f"resumed from {run / 'checkpoints' / 'step_000002'} (step 2)" in out.stdout
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]
    assert (newest / "optimizer.pt").is_file() and (newest / "manifest.json").is_file()  # rewritten whole


def test_no_intact_checkpoint_is_refused_in_one_line_and_nothing_is_touched(finished, tmp_path):
    args, run = copy_run(finished, tmp_path)
    (run / "summary.json").unlink()
    for ckpt, damage in zip(sorted((run / "checkpoints").iterdir()), DAMAGE.values()):
        damage(ckpt)
    before = tree_digest(run)
    line = one_error(run_cli(args))
    assert line.startswith(f"error: train.resume: no intact checkpoint in {run / 'checkpoints'} "), line
    assert tree_digest(run) == before


def test_a_no_op_rerun_with_changed_resumable_keys_changes_no_file(finished, tmp_path):
    # 7: the finished run's config.yaml was rewritten (saying 2 steps for a 3-step run)
    args, run = copy_run(finished, tmp_path)
    before = tree_digest(run)
    out = run_cli([*args, "train.steps=2", "eval.every=1"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "already finished at step 3; nothing to train" in out.stdout
    assert tree_digest(run) == before


def test_a_run_directory_that_moved_resumes(finished, tmp_path):
    # 9: refused as a config change of train.output_dir / train.run_name
    cfg, run = finished
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(run, moved)
    out = run_cli(["--config", str(cfg), f"train.output_dir={moved.parent}", "train.run_name=renamed", "train.steps=4"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {moved / 'checkpoints' / 'step_000003'} (step 3)" in out.stdout
    assert [m["step"] for m in read_metrics(moved)] == [1, 2, 3, 4]
    saved = yaml.safe_load((moved / "config.yaml").read_text())
    assert (saved["train"]["output_dir"], saved["train"]["run_name"]) == (str(moved.parent), "renamed")


# ----------------------------------------------------------------------------
# 8: error lines name the real source


def test_errors_name_the_real_source_and_key(tmp_path):
    raw = tiny_config(tmp_path)
    raw["logging"] = 5  # a section set to a scalar
    cfg = write_config(tmp_path / "c.yaml", raw)
    lines = error_lines(run_cli(["--config", str(cfg), "logging.log_every=2", "trian.steps=3", "train={steps: abc}",
                                 "model.vocab_size=10"]))
    expected = [f"error: {cfg}: `logging` must be a mapping of keys",
                f"error: command line: `logging.log_every` cannot be set: `logging` is 5 ({cfg}), not a mapping",
                "error: command line: unknown config key `trian`",
                "error: command line: `train.steps` must be an integer, got 'abc'",
                "error: model.vocab_size: student has 10 embedding rows but its tokenizer defines"]
    for needle in expected:
        assert sum(line.startswith(needle) for line in lines) == 1, (needle, lines)
    assert len(lines) == 5, lines


# ----------------------------------------------------------------------------
# 10: the chars tokenizer's alphabet


def test_characters_outside_the_chars_alphabet_are_refused_with_a_count(tmp_path):
    cfg = config_file(tmp_path)
    with open(tmp_path / "prompts.jsonl", "a") as fh:
        fh.write(json.dumps({"prompt": "3×4=", "answer": "12"}) + "\n")
        fh.write(json.dumps({"prompt": "½+½=¹", "answer": "1"}) + "\n")
    line = one_error(run_cli(["--config", str(cfg)]))
    assert line.startswith("error: data.train_path: 4 characters in 2 prompts are outside the `chars` tokenizer's "
                           "alphabet (e.g. "), line
