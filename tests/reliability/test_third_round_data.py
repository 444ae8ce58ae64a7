"""The third hostile round (tracker issue 26), items 10-15: configs and data that were quietly wrong.

Each defect is reproduced once through the real CLI (`train.py ... --check` where that shows it) and its
variants by calling the function that decides. The rule is the earlier rounds': a mistake ends with one
`error:` line naming the problem and the file (with its line for YAML) or key, exit code 2, and nothing
already written changed. The issue's item number is in each test's comment.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from lm.tokenizers import char_tokenizer
from opd.config import ConfigError, DataConfig, load_config
from opd.data import DataError, data_files, load_prompts
from test_faults import error_lines, tree_digest
from test_second_round import config_file, one_error


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
    # 10: `base: 42` and `base: [1, {a: b}]` were tracebacks (TypeError); a problem of a config file reaches the
    # command line as one line (test_a_duplicate_section_is_refused_naming_file_and_line), so no CLI run here
    cfg = tmp_path / "c.yaml"
    for value, shown in (("[1, {a: b}]", "[1, {'a': 'b'}]"), ("42", "42"), ("[base.yaml, 7]", "['base.yaml', 7]"),
                         ("{a: b}", "{'a': 'b'}"), ("''", "''")):
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


# ----------------------------------------------------------------------------
# 12: a byte-order mark, and a directory of splits


def records(n: int, start: int = 0) -> str:
    return "".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(start, start + n))


def test_a_directory_of_splits_trains_on_its_train_split_and_a_bom_is_no_record(tmp_path):
    # 12: a UTF-8 byte-order mark made the first record malformed; a directory holding train.jsonl and
    # test.jsonl trained on both, and one holding dataset_info.json beside train.jsonl was refused blaming it
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\ufeff" + records(10), encoding="utf-8")
    (data / "test.jsonl").write_text(records(5, start=100))
    (data / "dataset_info.json").write_text(json.dumps({"description": "x", "splits": {"train": {}}}, indent=1))
    (data / "README.md").write_text("# data\n")
    (data / ".gitattributes").write_text("*.jsonl filter=lfs\n")
    cfg = config_file(tmp_path, data={"train_path": str(data)})
    out = run_cli(["--config", str(cfg), "--check"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "data: 10 prompts: 10 for training, 0 held out" in out.stdout, out.stdout


def test_the_split_files_of_a_directory_follow_the_datasets_conventions(tmp_path):
    # 12: splits named by file (train.jsonl, train-00000-of-00002.parquet, my_dev.jsonl) or by folder (test/...);
    # metadata files and hidden files are no data; a directory that names no split is read whole
    def layout(*names):
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        for name in names:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(records(1))
        return root

    def rel(root, files):
        return [str(f.relative_to(root)) for f in files]

    root = layout("train.jsonl", "test.jsonl", "dataset_info.json", "dataset_dict.json")
    assert rel(root, data_files(root, "train")) == ["train.jsonl"]
    assert rel(root, data_files(root, "test")) == ["test.jsonl"]
    root = layout("data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet", "data/my_dev.jsonl")
    assert rel(root, data_files(root, "train")) == ["data/train-00000-of-00002.parquet",
                                                    "data/train-00001-of-00002.parquet"]
    assert rel(root, data_files(root, "validation")) == ["data/my_dev.jsonl"]
    assert rel(root, data_files(root, "test")) == ["data/my_dev.jsonl"]  # held out: test, else validation
    root = layout("training/a.jsonl", "training/b.jsonl", "eval/c.jsonl", ".cache/d.jsonl")
    assert rel(root, data_files(root, "train")) == ["training/a.jsonl", "training/b.jsonl"]
    root = layout("prompts.jsonl", "more/prompts.json", "config.json", ".hidden.jsonl")
    assert rel(root, data_files(root, "train")) == ["more/prompts.json", "prompts.jsonl"]
    assert rel(root, data_files(root, "test")) == ["more/prompts.json", "prompts.jsonl"]  # a val_path directory
    root = layout("test.jsonl", "validation.jsonl")
    with pytest.raises(DataError, match=r"holds the splits test, validation and no `train` split"):
        data_files(root, "train")


def test_a_bom_is_no_record_under_bad_records_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + records(3).encode())
    train, _, report = load_prompts(DataConfig(train_path=str(path), bad_records="error", chat_template=False),
                                    char_tokenizer(), seed=0)
    assert len(train) == 3 and not report.skipped


# ----------------------------------------------------------------------------
# 13: held-out prompts that are also trained on


def test_repeated_prompts_never_straddle_training_and_held_out(tmp_path):
    # 13: with data.dedup off, copies of a held-out prompt stayed in training, without a word
    path = tmp_path / "p.jsonl"
    path.write_text("".join(records(1, start=i % 10) for i in range(100)))  # 10 prompts, 10 copies each
    dc = DataConfig(train_path=str(path), val_ratio=0.2, chat_template=False)
    train, val, _ = load_prompts(dc, char_tokenizer(), seed=0)
    held = {tuple(p.ids) for p in val}
    assert len(held) == 2 == len(val)  # 20% of the 10 distinct prompts, each held out once
    assert len(train) == 80 and not held & {tuple(p.ids) for p in train}
    # distinct prompts split as before: the first int(n * val_ratio) of the seeded shuffle are held out
    path.write_text(records(50))
    train, val, _ = load_prompts(DataConfig(train_path=str(path), val_ratio=0.2), char_tokenizer(), seed=3)
    assert len(val) == 10 and len(train) == 40


def test_a_val_path_that_is_the_train_data_is_refused(tmp_path):
    # 13: data.val_path equal to data.train_path was accepted: every held-out prompt was trained on
    cfg = config_file(tmp_path)
    data = tmp_path / "prompts.jsonl"
    line = one_error(run_cli(["--config", str(cfg), "--check", f"data.val_path={tmp_path}/./prompts.jsonl"]))
    assert line == (f"error: data.val_path: {tmp_path}/./prompts.jsonl is data.train_path's own data ({data}); "
                    "held-out prompts would be trained on: give other prompts, or data.val_ratio"), line
    assert not (tmp_path / "runs").exists()


def test_a_directory_may_be_both_train_and_val_path_when_its_splits_differ(tmp_path):
    from opd.data import check_data

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(records(10))
    (data / "test.jsonl").write_text(records(5, start=100))
    assert check_data(DataConfig(train_path=str(data), val_path=str(data)), need_answers=False) == []
    train, val, _ = load_prompts(DataConfig(train_path=str(data), val_path=str(data)), char_tokenizer(), seed=0)
    assert (len(train), len(val)) == (10, 5)
    (data / "test.jsonl").unlink()  # now both read train.jsonl
    assert check_data(DataConfig(train_path=str(data), val_path=str(data / "train.jsonl")), need_answers=False) == [
        f"data.val_path: {data / 'train.jsonl'} is data.train_path's own data ({data / 'train.jsonl'}); "
        "held-out prompts would be trained on: give other prompts, or data.val_ratio"]


# ----------------------------------------------------------------------------
# 14: the data changed between the parts of a run


@pytest.mark.slow  # two CLI runs, one of them training a step (about 50 s on a shared CPU)
def test_a_run_does_not_resume_on_other_prompts(tmp_path):
    # 14: with train.max_steps_per_run the second part resumed silently on the changed file's prompts
    cfg = config_file(tmp_path, train={"steps": 2, "max_steps_per_run": 1, "save_every": 0})
    first = run_cli(["--config", str(cfg)])
    assert first.returncode == 0 and "stopped after train.max_steps_per_run=1 steps" in first.stdout, first.stderr[-3000:]
    data = tmp_path / "prompts.jsonl"
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[:-1]) + records(1, start=500))  # one prompt replaced
    run_dir = tmp_path / "runs" / "run"
    before = tree_digest(run_dir)
    line = one_error(run_cli(["--config", str(cfg)]))
    assert line == (f"error: data.train_path: the training prompts of {data} differ from the ones run {run_dir} was "
                    f"trained on (checkpoint {run_dir / 'checkpoints' / 'step_000001'}); restore that data to resume, "
                    "or choose another train.run_name to start a new run"), line
    assert tree_digest(run_dir) == before


def test_the_data_hash_is_compared_with_the_newest_checkpoint(tmp_path):
    # 14, the decision without a training run: a checkpoint from before data hashes is not compared
    from opd.checkpoint import check_same_data
    from opd.data import Prompt, prompts_digest
    from opd.errors import RunError

    prompts = [Prompt(ids=[1, 2, 3], answer="", source="a:1"), Prompt(ids=[4, 5], answer="", source="a:2")]
    digest = prompts_digest(prompts)
    assert digest != prompts_digest(prompts[::-1]) and digest != prompts_digest(prompts[:1])
    run_dir = tmp_path / "run"
    check_same_data(run_dir, digest, "data.train_path", "p.jsonl")  # no checkpoint yet
    ckpt = run_dir / "checkpoints" / "step_000003"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 3}))
    check_same_data(run_dir, digest, "data.train_path", "p.jsonl")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 3, "data_hash": digest}))
    check_same_data(run_dir, digest, "data.train_path", "p.jsonl")
    with pytest.raises(RunError, match=r"^data.train_path: the training prompts of p.jsonl differ .* \(checkpoint "):
        check_same_data(run_dir, prompts_digest(prompts[:1]), "data.train_path", "p.jsonl")


# ----------------------------------------------------------------------------
# 15: a huge prompt is tokenised before its length is checked


def huge_prompt_file(path: Path, chars: int) -> Path:
    path.write_text(records(2) + json.dumps({"prompt": "7" * chars, "answer": "1"}) + "\n" + records(2, start=10))
    return path


def test_a_huge_prompt_is_never_tokenised(tmp_path, monkeypatch):
    # 15: a 5 MB prompt went through the tokenizer before the length check (2.4 GB peak against 0.5 GB)
    import lm.chat

    seen = []
    encode = lm.chat.encode_prompt

    def spy(tokenizer, prompt, **kw):
        seen.append(sum(len(m["content"]) for m in prompt) if isinstance(prompt, list) else len(prompt))
        return encode(tokenizer, prompt, **kw)

    monkeypatch.setattr(lm.chat, "encode_prompt", spy)
    path = huge_prompt_file(tmp_path / "p.jsonl", 5_000_000)
    tok = char_tokenizer()
    dc = DataConfig(train_path=str(path), max_prompt_length=64, chat_template=False)
    train, _, report = load_prompts(dc, tok, seed=0)
    assert len(train) == 4 and report.skipped == {"prompts over max_prompt_length": 1}
    assert max(seen) < 100
    messages = tmp_path / "m.jsonl"
    messages.write_text(json.dumps({"prompt": [{"role": "user", "content": "7" * 5_000_000}]}) + "\n" + records(1))
    train, _, report = load_prompts(DataConfig(train_path=str(messages), max_prompt_length=64), tok, seed=0)
    assert len(train) == 1 and report.skipped == {"prompts over max_prompt_length": 1} and max(seen) < 100
    # truncate_left keeps the prompt's end: only its last characters are tokenised, the same last tokens
    seen.clear()
    dc = DataConfig(train_path=str(path), max_prompt_length=64, chat_template=False, long_prompts="truncate_left")
    train, _, report = load_prompts(dc, tok, seed=0)
    assert len(train) == 5 and not report.skipped and max(seen) < 100_000
    assert sorted(len(p.ids) for p in train)[-1] == 64


def test_a_huge_prompt_under_long_prompts_error_is_one_line(tmp_path):
    # 15: the same refusal as for any over-long prompt, naming file and line, decided on its characters
    path = huge_prompt_file(tmp_path / "huge.jsonl", 5_000_000)
    cfg = config_file(tmp_path, data={"train_path": str(path), "long_prompts": "error"})
    line = one_error(run_cli(["--config", str(cfg), "--check"]))
    assert line.startswith(f"error: data.train_path: {path}:3: prompt of 5000000 characters exceeds "
                           "data.max_prompt_length=64 (more than 64 tokens"), line
    assert line.endswith("(data.long_prompts=error)"), line
