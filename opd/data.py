"""Prompts: load records, apply the chat template, filter, split, and iterate deterministically."""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

import lm.chat
from lm.tokenizers import longest_token_chars, unknown_id
from demo import real_task, task as demo_task
from eval.benchmarks import dapo_problem
from opd.config import DataConfig
from opd.errors import DataError


@dataclass
class Prompt:
    ids: list[int]
    answer: str
    source: str  # "file:line" or "hub:id[index]", for messages
    data_source: str = ""  # the record's data.source_key field (an agentic task: its environment): teacher.routes' key


@dataclass
class LoadReport:
    records: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skip_many(reason, 1)

    def skip_many(self, reason: str, n: int) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.records} prompts"
        parts = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return f"{self.records} prompts (skipped: {parts})"


def field_value(record: dict, key: str):
    """`a.b` looks up nested fields (DAPO keeps its answer in reward_model.ground_truth)."""
    node = record
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def read_records(path: str, split: str, bad_records: str, report: LoadReport, *, seed: int = 0, n: int = 0):
    """Yield (record dict, source string) from a file, directory, hub id or task."""
    if path.startswith("demo:"):
        if path in (f"demo:{real_task.TRAIN_NAME}", f"demo:{real_task.HELDOUT_NAME}"):
            records = real_task.records(path.removeprefix("demo:"))
        elif path == f"demo:{demo_task.NAME}":
            records = demo_task.train_records(n or 20000, seed)
        else:
            raise DataError(f"unknown demo task {path!r} (known: demo:{demo_task.NAME}, demo:{real_task.TRAIN_NAME}, "
                            f"demo:{real_task.HELDOUT_NAME})")
        for i, rec in enumerate(records):
            yield rec, f"{path}[{i}]"
        return
    local = Path(path)
    if not path.startswith("hub:") and local.exists():
        for file in data_files(local, split):
            yield from _read_file(file, bad_records, report)
        return
    if path.endswith((".jsonl", ".json", ".parquet")) or path.startswith(("/", "./", "../")):
        raise DataError(f"data file not found: {path}")
    hub_id = path.removeprefix("hub:")
    import datasets  # here, not at the top: half a second of every start, for hub ids only

    ds = datasets.load_dataset(hub_id, split=split)
    for i, rec in enumerate(ds):
        yield dict(rec), f"{hub_id}[{i}]"


# A directory of prompt files is read the way `datasets` reads one: a file belongs to a split when a word of its
# folder names (first) or of its file name is one of that split's words ("train-00000-of-00002.parquet",
# "my_dev.jsonl", "test/part1.jsonl"); a directory whose files name no split is read whole. Metadata files and
# hidden files are never data. Words are split on anything but letters, so "pretrain.jsonl" names no split.
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
SPLIT_WORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
               "test": ("test", "testing", "eval", "evaluation")}
METADATA_FILES = ("dataset_info.json", "dataset_infos.json", "dataset_dict.json", "config.json", "state.json")


def _split_named(text: str) -> str | None:
    words = set(re.split(r"[^a-z]+", text.lower()))
    return next((split for split, names in SPLIT_WORDS.items() if words & set(names)), None)


def data_files(path: Path, split: str) -> list[Path]:
    """The files of `split` in a data file or directory (a file is its own only split), sorted.

    `split` is a split name or one of its words ("dev" is the validation split); "test" (the held-out prompts
    of data.val_path) takes the validation split where there is no test split. A directory that names no split
    is read whole. DataError when the directory names splits but not this one."""
    if not path.is_dir():
        return [path]
    files = [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in DATA_SUFFIXES
             and p.name not in METADATA_FILES and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    by_folder = {f: _split_named(str(f.relative_to(path).parent)) for f in files}
    by_name = {f: _split_named(f.stem) for f in files}
    splits = by_folder if any(by_folder.values()) else by_name if any(by_name.values()) else None
    if splits is None:  # no split named: all of it, whichever split is asked (train_path's, or val_path's)
        return files
    wanted = _split_named(split) or split
    chosen = [f for f in files if splits[f] == wanted]
    if not chosen and wanted == "test":
        chosen = [f for f in files if splits[f] == "validation"]
    if files and not chosen:
        named = ", ".join(sorted({s for s in splits.values() if s}))
        raise DataError(f"{path} holds the splits {named} and no `{split}` split")
    return chosen


def _read_file(file: Path, bad_records: str, report: LoadReport):
    if file.suffix == ".parquet":
        for i, rec in enumerate(pq.read_table(file).to_pylist()):
            yield rec, f"{file}[{i}]"
        return
    # bytes, decoded line by line: one line of bad UTF-8 is one malformed record, not a crash
    with open(file, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))  # a byte-order mark is no data
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:  # UnicodeDecodeError included
                if bad_records == "error":
                    raise DataError(f"{file}:{lineno}: malformed JSON line ({exc})") from None
                report.skip("malformed lines")
                continue
            yield rec, f"{file}:{lineno}"


def strip_source_instruction(prompt, dc: DataConfig):
    """The prompt with its data set's own answer instruction removed (data.prompt_format); text or messages.

    `dapo`: the last user message loses DAPO-Math-17k's "Solve the following
    math problem ... Answer: $Answer" prefix and its "Remember to put your
    answer on its own line after \"Answer:\"" suffix, the same function the
    `dapo` benchmark uses. A message without that wording is left as it is.
    """
    if dc.prompt_format == "as_is":
        return prompt
    if isinstance(prompt, str):
        return dapo_problem(prompt)
    messages = [dict(m) for m in prompt]
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is not None:
        messages[last_user]["content"] = dapo_problem(messages[last_user]["content"])
    return messages


def encode_prompt(tokenizer, prompt, dc: DataConfig) -> list[int]:
    """Token ids of one prompt (text, or a list of chat messages) as the data section formats it:
    the source's own instruction stripped (data.prompt_format), then data.instruction appended after
    data.instruction_separator, then the chat template."""
    return _encode_stripped(tokenizer, strip_source_instruction(prompt, dc), dc)


def _encode_stripped(tokenizer, prompt, dc: DataConfig) -> list[int]:
    return lm.chat.encode_prompt(tokenizer, prompt, instruction=dc.instruction, separator=dc.instruction_separator,
                                 system_prompt=dc.system_prompt, chat_template=dc.chat_template,
                                 enable_thinking=dc.enable_thinking)


# A token stands for at most C characters, C the longest string of the tokenizer's vocabulary
# (lm.tokenizers.longest_token_chars), so a prompt of more than C x max_prompt_length characters has more than
# max_prompt_length tokens; the factor 2 leaves room for a normalizer that composes characters (NFC: a letter and
# its accents become one). Such a prompt is judged on its characters and never tokenised: tokenising a 5 MB prompt
# took 2.4 GB. Under long_prompts=truncate_left a text prompt keeps only its last 2 x that many characters
# before tokenising (still more than max_prompt_length tokens, of which the last ones are kept), so the memory a
# prompt takes is bounded by data.max_prompt_length; a list of chat messages is tokenised whole in that mode.
CHARS_PER_TOKEN_MARGIN = 2


def _chars(prompt) -> int:
    return len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)


def _is_prompt(prompt) -> bool:
    if isinstance(prompt, str):
        return True
    return isinstance(prompt, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
    )


VAL_SPLIT = "test"  # the split data.val_path is read from (a hub data set's, or a directory's)


def load_prompts(dc: DataConfig, tokenizer, *, seed: int, need_answers: bool = False):
    """Load, encode and split prompts. Returns (train, val, report)."""
    report = LoadReport()
    prompts = _encode_all(dc.train_path, dc.train_split, dc, tokenizer, report, seed, need_answers)
    if dc.dedup:
        seen: set[tuple[int, ...]] = set()
        unique = [p for p in prompts if not (tuple(p.ids) in seen or seen.add(tuple(p.ids)))]
        if len(unique) < len(prompts):
            report.skip_many("repeated prompts", len(prompts) - len(unique))
            report.records -= len(prompts) - len(unique)
        prompts = unique
    rng = random.Random(seed)
    rng.shuffle(prompts)
    if dc.val_path:
        val = _encode_all(dc.val_path, VAL_SPLIT, dc, tokenizer, LoadReport(), seed, need_answers)
    else:
        val, prompts = hold_out(prompts, dc.val_ratio)
    if not prompts:
        raise DataError(f"{dc.train_path}: no usable prompts ({report.summary()})")
    return prompts, val, report


def hold_out(prompts: list[Prompt], ratio: float) -> tuple[list[Prompt], list[Prompt]]:
    """(held out, train) of shuffled prompts: the first int(distinct x ratio) distinct prompts (token ids) are held
    out, one copy each, and none of their copies is trained on. Distinct prompts split as a plain cut would."""
    first: dict[tuple[int, ...], Prompt] = {}  # each distinct prompt's first copy, in order of appearance
    for p in prompts:
        first.setdefault(tuple(p.ids), p)
    held = dict(list(first.items())[:int(len(first) * ratio)])
    return list(held.values()), [p for p in prompts if tuple(p.ids) not in held]


def _encode_all(path, split, dc: DataConfig, tokenizer, report, seed, need_answers) -> list[Prompt]:
    out: list[Prompt] = []
    seen: set[str] = set()  # data.dedup: prompt fields already encoded (a repeat is skipped before tokenizing)
    longest = longest_token_chars(tokenizer)
    char_limit = None if longest is None else CHARS_PER_TOKEN_MARGIN * longest * dc.max_prompt_length
    for rec, source in read_records(path, split, dc.bad_records, report, seed=seed, n=dc.max_samples):
        prompt = field_value(rec, dc.prompt_key)
        if dc.dedup and prompt is not None:
            key = json.dumps(prompt, sort_keys=True, ensure_ascii=False, default=str)
            if key in seen:
                report.skip("repeated prompts")
                continue
            seen.add(key)
        answer = field_value(rec, dc.answer_key) if dc.answer_key else ""
        problem = None
        if prompt is None:
            problem = f"missing field `{dc.prompt_key}`"
        elif (isinstance(prompt, str) and not prompt.strip()) or (isinstance(prompt, list) and not prompt):
            problem = "empty prompt"
        elif not _is_prompt(prompt):
            problem = f"`{dc.prompt_key}` is neither text nor a list of {{role, content}} messages"
        elif need_answers and (answer is None or str(answer).strip() == ""):
            problem = f"missing answer field `{dc.answer_key}`"
        ids = None
        if problem is None:
            prompt = strip_source_instruction(prompt, dc)
            if char_limit is not None and _chars(prompt) > char_limit and dc.long_prompts != "truncate_left":
                if dc.long_prompts == "error":
                    raise DataError(f"{source}: prompt of {_chars(prompt)} characters exceeds data.max_prompt_length="
                                    f"{dc.max_prompt_length} (more than {dc.max_prompt_length} tokens: over "
                                    f"{char_limit} characters) (data.long_prompts=error)")
                report.skip("prompts over max_prompt_length")
                continue
            if char_limit is not None and isinstance(prompt, str) and len(prompt) > 2 * char_limit:
                prompt = prompt[-2 * char_limit:]  # truncate_left keeps the end
            try:
                ids = _encode_stripped(tokenizer, prompt, dc)
            except Exception as exc:  # a chat template may reject a message sequence; that is this record's problem
                problem, ids = f"chat template failed ({exc})".splitlines()[0], []
            if problem is None and len(ids) > dc.max_prompt_length:
                if dc.long_prompts == "truncate_left":
                    ids = ids[-dc.max_prompt_length:]
                elif dc.long_prompts == "error":  # refused whatever data.bad_records says
                    raise DataError(f"{source}: prompt of {len(ids)} tokens exceeds "
                                    f"data.max_prompt_length={dc.max_prompt_length} (data.long_prompts=error)")
                else:
                    report.skip("prompts over max_prompt_length")
                    continue
        if problem is not None:
            if dc.bad_records == "error":
                raise DataError(f"{source}: {problem}")
            report.skip(problem)
            continue
        label = field_value(rec, dc.source_key) if dc.source_key else None
        out.append(Prompt(ids=ids, answer="" if answer is None else str(answer), source=source,
                          data_source="" if label is None else str(label)))
        if dc.max_samples and len(out) >= dc.max_samples:
            break
    report.records += len(out)
    return out


def prompts_digest(prompts: list[Prompt]) -> str:
    """SHA-256 of the prompts' token ids in their order: what a run trains on, recorded in its checkpoints."""
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(json.dumps(p.ids, separators=(",", ":")).encode() + b"\n")
    return digest.hexdigest()


# ----------------------------------------------------------------------------
# checks before a run (the single-turn source's check, opd.sources)

PEEK_RECORDS = 200  # records read from the head of a data file to catch misnamed fields early


def check_data(dc: DataConfig, need_answers: bool) -> list[str]:
    """Data paths exist, and the head of each local file has the configured fields."""
    problems = []
    for key in ("train_path", "val_path"):
        path = getattr(dc, key)
        if not path or path.startswith(("hub:", "demo:")):
            continue
        local = Path(path).expanduser()
        if path.startswith(("/", "./", "../", "~")) or local.exists() or path.endswith((".jsonl", ".json", ".parquet")):
            if not local.exists():
                problems.append(f"data.{key}: {path} does not exist")
            else:
                problems += _peek_fields(key, local, dc, need_answers)
    shared = same_data(dc)
    if shared:
        problems.append(f"data.val_path: {dc.val_path} is data.train_path's own data ({shared}); held-out prompts "
                        "would be trained on: give other prompts, or data.val_ratio")
    return problems


def same_data(dc: DataConfig) -> str | None:
    """The file data.val_path would read that data.train_path trains on (or the hub id / task both name), else None.
    One directory may be both when its splits differ (train.jsonl for training, test.jsonl held out)."""
    train, val = dc.train_path, dc.val_path
    if not (train and val):
        return None
    if train.startswith(("hub:", "demo:")) or val.startswith(("hub:", "demo:")) or not Path(val).expanduser().exists():
        same = train.removeprefix("hub:") == val.removeprefix("hub:") and dc.train_split == VAL_SPLIT
        return val if same or (train == val and train.startswith("demo:")) else None
    try:
        trained = {f.resolve(): f for f in data_files(Path(train).expanduser(), dc.train_split)}
        held = [f.resolve() for f in data_files(Path(val).expanduser(), VAL_SPLIT)]
    except (DataError, OSError):  # a path that does not resolve is reported on its own
        return None
    return next((str(trained[f]) for f in held if f in trained), None)


def _head_records(file: Path) -> tuple[list[dict], int]:
    """Up to PEEK_RECORDS records from the start of a file, and how many lines were not JSON objects."""
    if file.suffix == ".parquet":
        table = pq.ParquetFile(file).iter_batches(batch_size=PEEK_RECORDS)
        first = next(table, None)
        return (first.to_pylist() if first is not None else []), 0
    records, bad = [], 0
    with open(file, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if len(records) + bad >= PEEK_RECORDS:
                break
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
            except ValueError:  # UnicodeDecodeError is a ValueError too
                bad += 1
                continue
            if isinstance(rec, dict):
                records.append(rec)
            else:
                bad += 1
    return records, bad


def _peek_fields(key: str, path: Path, dc: DataConfig, need_answers: bool) -> list[str]:
    try:
        files = data_files(path, dc.train_split if key == "train_path" else VAL_SPLIT)
    except DataError as exc:
        return [f"data.{key}: {exc}"]
    if not files:
        return [f"data.{key}: {path} holds no .jsonl, .json or .parquet files"]
    try:
        records, bad = _head_records(files[0])
    except Exception as exc:  # an unreadable file is one line, whatever the reader raised
        return [f"data.{key}: {files[0]} cannot be read ({exc})".splitlines()[0]]
    if not records:
        if bad:
            return [f"data.{key}: {files[0]}: none of the first {bad} lines is a JSON object"]
        return [f"data.{key}: {files[0]} holds no records"]
    problems = []
    wanted = [("prompt_key", dc.prompt_key)]
    if dc.answer_key and need_answers:
        wanted.append(("answer_key", dc.answer_key))
    for name, field in wanted:
        if not any(field_value(r, field) is not None for r in records):
            fields = sorted({k for r in records for k in r})
            problems.append(
                f"data.{name}: no record among the first {len(records)} of {files[0]} has field `{field}` "
                f"(fields there: {', '.join(fields[:12])})"
            )
    return problems


def unknown_characters(prompts: list[Prompt], tokenizer) -> str | None:
    """One line when the prompts hold characters a `chars`-style tokenizer would silently read as <pad>."""
    unk = unknown_id(tokenizer)
    if unk is None:
        return None
    counts = [(p.ids.count(unk), p.source) for p in prompts]
    bad = [(n, source) for n, source in counts if n]
    if not bad:
        return None
    return (f"data.train_path: {sum(n for n, _ in bad)} characters in {len(bad)} prompts are outside the `chars` "
            f"tokenizer's alphabet (e.g. {bad[0][1]}); it would read them as <pad>: remove them, or give "
            f"model.tokenizer / teacher.tokenizer a tokenizer that has them")


class PromptSampler:
    """Endless deterministic stream of prompt batches: a fresh shuffle per epoch.

    The whole state is (epoch, position), so a resumed run continues exactly.
    """

    def __init__(self, prompts: list[Prompt], seed: int):
        self.prompts = prompts
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Prompt]:
        batch = []
        while len(batch) < n:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._shuffle(self.epoch)
            batch.append(self.prompts[self._order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffle(self.epoch)
