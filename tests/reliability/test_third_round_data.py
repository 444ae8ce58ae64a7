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
