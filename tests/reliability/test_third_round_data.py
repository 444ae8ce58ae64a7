"""The third hostile round (tracker issue 26), items 10-15: configs and data that were quietly wrong.

Each defect is reproduced once through the real CLI (`train.py ... --check` where that shows it) and its
variants by calling the function that decides. The rule is the earlier rounds': a mistake ends with one
`error:` line naming the problem and the file (with its line for YAML) or key, exit code 2, and nothing
already written changed. The issue's item number is in each test's comment.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli, tiny_config, write_config
from opd.config import ConfigError, load_config
from test_faults import error_lines


def one_error(out) -> str:
    lines = error_lines(out)
    assert len(lines) == 1, lines
    return lines[0]


def config_file(tmp_path: Path, **sections) -> Path:
    return write_config(tmp_path / "c.yaml", tiny_config(tmp_path, **sections))


def config_problems(paths, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(paths, list(overrides))
    return caught.value.problems


# ----------------------------------------------------------------------------
# 11: duplicate keys and sections in one YAML file


def test_a_duplicate_section_is_refused_naming_file_and_line(tmp_path):
    # 11: a second `train:` section silently replaced the first (the run went into another directory)
    cfg = config_file(tmp_path)
    text = cfg.read_text()
    first = text.splitlines().index("train:") + 1
    cfg.write_text(text + "train:\n  run_name: elsewhere\n")
    line = one_error(run_cli(["--config", str(cfg), "--check"]))
    assert line == (f"error: {cfg}:{len(text.splitlines()) + 1}: duplicate key `train` (first on line {first}); "
                    "one file may set a key once"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "prompts.jsonl"]


def test_a_duplicate_key_inside_a_section_is_refused(tmp_path):
    # 11: the same key twice in one section, at any depth; a key repeated in another section is fine
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  run_name: a\n  steps: 3\n  run_name: b\n")
    assert config_problems([base]) == [f"{base}:4: duplicate key `train.run_name` (first on line 2); "
                                       "one file may set a key once"]
    base.write_text("model:\n  path: x\nteacher:\n  path: x\n")
    load_config([base], ["data.train_path=demo:multiplication", "model.tokenizer=chars"])


# ----------------------------------------------------------------------------
# 10: `base:` that names no file, and numbers no run uses


def test_a_base_that_is_not_file_names_is_one_line(tmp_path):
    # 10: `base: 42` and `base: [1, {a: b}]` were tracebacks (TypeError)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("base: [1, {a: b}]\n")
    line = one_error(run_cli(["--config", str(cfg), "--check"]))
    assert line == (f"error: {cfg}: `base:` must be a file name or a list of file names (relative to this file), "
                    "got [1, {'a': 'b'}]"), line
    for value, shown in (("42", "42"), ("[base.yaml, 7]", "['base.yaml', 7]"), ("{a: b}", "{'a': 'b'}"), ("''", "''")):
        cfg.write_text(f"base: {value}\n")
        assert config_problems([cfg]) == [f"{cfg}: `base:` must be a file name or a list of file names "
                                          f"(relative to this file), got {shown}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_numbers_beyond_any_real_run_are_refused_at_check(tmp_path):
    # 10: train.num_threads=10**23 passed --check and was an overflow traceback at start;
    # train.prompts_per_step=10**20 passed --check and grew memory until MemoryError
    cfg = config_file(tmp_path)
    lines = error_lines(run_cli(["--config", str(cfg), "--check", f"train.num_threads={10**23}",
                                 f"train.prompts_per_step={10**20}"]))
    assert lines == [f"error: command line: `train.num_threads` = {10**23} is above the maximum 4096",
                     f"error: command line: `train.prompts_per_step` = {10**20} is above the maximum 1048576"], lines
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override,problem", [
    ("train.num_threads=1.0e+23", f"`train.num_threads` = {int(1e23)} is above the maximum 4096"),
    ("train.mini_batch_size=2097152", "`train.mini_batch_size` = 2097152 is above the maximum 1048576"),
    ("train.micro_batch_size=100000", "`train.micro_batch_size` = 100000 is above the maximum 65536"),
    ("data.max_prompt_length=2000000", "`data.max_prompt_length` = 2000000 is above the maximum 1048576"),
    ("rollout.max_new_tokens=2000000", "`rollout.max_new_tokens` = 2000000 is above the maximum 1048576"),
    ("rollout.n=5000", "`rollout.n` = 5000 is above the maximum 4096"),
    (f"train.seed={2**63}", f"`train.seed` = {2**63} does not fit in a 64-bit integer"),
    (f"train.seed={-2**63 - 1}", f"`train.seed` = {-2**63 - 1} does not fit in a 64-bit integer"),
])
def test_integer_bounds(tmp_path, override, problem):
    # 10: every integer fits in 64 bits (torch and numpy take no more); the ones that size memory or threads
    # have an upper bound no real run reaches, named in their help text
    assert config_problems([config_file(tmp_path)], [override]) == [f"command line: {problem}"]


def test_the_bounds_are_in_the_help_text():
    import dataclasses

    from lm.config import RolloutConfig
    from opd.config import DataConfig, TrainConfig

    for section in (TrainConfig, DataConfig, RolloutConfig):
        for f in dataclasses.fields(section):
            if "max" in f.metadata and f.type in ("int", int):
                assert f"at most {f.metadata['max']:,}" in f.metadata["help"], (section.__name__, f.name)
