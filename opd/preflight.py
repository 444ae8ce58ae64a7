"""Checks that run before any model loads, so a typo costs seconds, not a queue slot.

`preflight(cfg, paths)` returns one line per problem (all of them at once),
each starting with the config key it concerns. Both tokenizers are always read
and compared (seconds, where a mismatched teacher found after loading the
models costs minutes); `deep=True` (train.py --check) also reads the whole
data set. The run-directory rules
(`check_run_dir`) are the same ones the trainer applies when it starts.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError
from transformers import CONFIG_MAPPING

from agent.registry import load_env
from demo import pairs as demo_pairs
from eval.benchmarks import check_specs
from lm.config import ModelConfig, check_attention
from lm.tokenizers import TokenizerMismatch, check_tokenizers, load_tokenizer, unknown_id
from lm.vllm_engine import check_engine
from opd.checkpoint import check_run_dir, run_directory
from opd.config import Config
from opd.data import DataError, Prompt, field_value, load_prompts
from opd.errors import first_line, hub_unreachable
from opd.rewards import check_reward
from opd.step import check_selector

PEEK_RECORDS = 200  # records read from the head of a data file to catch misnamed fields early
CHARS_VOCAB = 102  # ids of the built-in character tokenizer (lm.tokenizers.char_tokenizer), for size estimates

def _is_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).expanduser().exists()


# ----------------------------------------------------------------------------
# models and tokenizers


def check_model(side: str, mc: ModelConfig) -> list[str]:
    """`side` is "model" or "teacher": the checkpoint directory (or hub id) and the tokenizer path."""
    problems = check_attention(side, mc)
    if mc.tokenizer not in ("", "chars") and _is_local(mc.tokenizer) and not Path(mc.tokenizer).expanduser().exists():
        problems.append(f"{side}.tokenizer: {mc.tokenizer} does not exist")
    if not mc.path or mc.path.startswith("demo:"):
        return problems
    if not _is_local(mc.path):
        if mc.path.count("/") != 1:
            return problems + [f"{side}.path: {mc.path!r} is neither an existing directory nor a hub id of the form owner/name"]
        return problems + _check_hub_model(side, mc.path)
    path = Path(mc.path).expanduser()
    if not path.is_dir():
        what = "is a file, not a checkpoint directory" if path.exists() else "does not exist"
        return problems + [f"{side}.path: {mc.path} {what}"]
    config_file = path / "config.json"
    if not config_file.is_file():
        return problems + [f"{side}.path: {mc.path} has no config.json (not a Hugging Face checkpoint directory)"]
    try:
        hf_config = json.loads(config_file.read_text())
    except (ValueError, OSError) as exc:
        return problems + [f"{side}.path: {config_file} is not readable JSON ({exc})"]
    if not any(any(path.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")):
        problems.append(f"{side}.path: {mc.path} holds no weights (*.safetensors or *.bin)")
    for file in sorted(path.glob("*.safetensors")):
        try:
            safetensors_header(file)
        except (OSError, ValueError) as exc:  # a cut-short download or copy: found here, not as a traceback mid-load
            problems.append(f"{side}.path: {file} {exc}")
            break
    if hf_config.get("auto_map") and not mc.trust_remote_code and not _known_model_type(hf_config.get("model_type")):
        problems.append(
            f"{side}.trust_remote_code: {mc.path} needs its own Python code (auto_map in config.json); "
            f"set {side}.trust_remote_code=true only if you trust that code"
        )
    return problems


def _known_model_type(model_type) -> bool:
    return model_type in CONFIG_MAPPING


def _check_hub_model(side: str, repo_id: str) -> list[str]:
    """A hub model is in the local cache, or its config.json can be fetched now (what loading would do first)."""
    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return []
    try:
        hf_hub_download(repo_id, "config.json")
    except Exception as exc:
        return [f"{side}.path: {_hub_problem(repo_id, exc)}"]
    return []


def _hub_problem(repo_id: str, exc: Exception) -> str:
    if hub_unreachable(exc):  # first: offline, the cache-miss error is an EntryNotFoundError too
        return f"cannot reach the hub for {repo_id} (and it is not in the local cache); give a local path"
    if isinstance(exc, GatedRepoError):
        return f"{repo_id} is a gated repository: accept its terms on the hub and log in (hf auth login)"
    if isinstance(exc, RepositoryNotFoundError):
        return f"{repo_id} is not a model repository on the hub (or a private one: log in)"
    if isinstance(exc, EntryNotFoundError):
        return f"{repo_id} has no config.json (not a transformers checkpoint)"
    return f"{repo_id}: {first_line(exc)}"


def _vocab_rows(mc: ModelConfig, tokenizer_len: int) -> int:
    if mc.path and _is_local(mc.path):
        cfg_file = Path(mc.path).expanduser() / "config.json"
        if cfg_file.is_file():
            data = json.loads(cfg_file.read_text())
            return int(data.get("vocab_size") or data.get("text_config", {}).get("vocab_size") or tokenizer_len)
    return mc.vocab_size or tokenizer_len


# ----------------------------------------------------------------------------
# data


def check_data(cfg: Config) -> list[str]:
    """Data paths exist, and the head of each local file has the configured fields."""
    problems = []
    for key in ("train_path", "val_path"):
        path = getattr(cfg.data, key)
        if not path or path.startswith(("hub:", "demo:")):
            continue
        if _is_local(path) or path.endswith((".jsonl", ".json", ".parquet")):
            local = Path(path).expanduser()
            if not local.exists():
                problems.append(f"data.{key}: {path} does not exist")
            else:
                problems += _peek_fields(key, local, cfg)
    return problems


def _data_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json", ".parquet"))
    return [path]


def _head_records(file: Path) -> tuple[list[dict], int]:
    """Up to PEEK_RECORDS records from the start of a file, and how many lines were not JSON objects."""
    if file.suffix == ".parquet":
        table = pq.ParquetFile(file).iter_batches(batch_size=PEEK_RECORDS)
        first = next(table, None)
        return (first.to_pylist() if first is not None else []), 0
    records, bad = [], 0
    with open(file, "rb") as fh:
        for raw in fh:
            if len(records) + bad >= PEEK_RECORDS:
                break
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except ValueError:  # UnicodeDecodeError is a ValueError too
                bad += 1
                continue
            if isinstance(rec, dict):
                records.append(rec)
            else:
                bad += 1
    return records, bad


def _peek_fields(key: str, path: Path, cfg: Config) -> list[str]:
    dc = cfg.data
    files = _data_files(path)
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
    if dc.answer_key and cfg.opd.reward_beta > 0:
        wanted.append(("answer_key", dc.answer_key))
    for name, field in wanted:
        if not any(field_value(r, field) is not None for r in records):
            fields = sorted({k for r in records for k in r})
            problems.append(
                f"data.{name}: no record among the first {len(records)} of {files[0]} has field `{field}` "
                f"(fields there: {', '.join(fields[:12])})"
            )
    return problems


# ----------------------------------------------------------------------------
# output and run directory


def check_output(cfg: Config, config_paths=()) -> list[str]:
    """The run directory (or the nearest existing folder above it) is writable and has room for a checkpoint."""
    out = Path(cfg.train.output_dir).expanduser()
    run_dir = out / run_directory(cfg, config_paths).name
    probe = run_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        if probe == run_dir:
            return []  # check_run_dir reports it
        return [f"train.output_dir: {out} cannot be created: {probe} is a file"]
    if not os.access(probe, os.W_OK | os.X_OK):
        if probe == run_dir:
            return [f"train.run_name: run directory {run_dir} is not writable"]
        return [f"train.output_dir: {out} is not writable" if probe == out
                else f"train.output_dir: {out} cannot be created: {probe} is not writable"]
    free = shutil.disk_usage(probe).free
    params = _parameter_count(cfg.model)
    need = _checkpoint_bytes(cfg.model, params)
    if free < need:
        return [f"train.output_dir: {_size(free)} free on {probe}, one checkpoint of the student "
                f"({params:,} parameters, weights + AdamW state) needs about {_size(need)}"]
    return []


def _checkpoint_bytes(mc: ModelConfig, params: int) -> int:
    """Weights and AdamW's two moments, in the student's training dtype ('auto' trains in float32)."""
    element = 2 if mc.dtype in ("bfloat16", "float16") else 4
    return 3 * element * params


def _parameter_count(mc: ModelConfig) -> int:
    """The student's parameters: from its safetensors headers, or from the architecture of a random model.

    0 when unknown without loading anything (a hub id, the demo pair): the check is then skipped.
    """
    if not mc.path:
        vocab = mc.vocab_size or (CHARS_VOCAB if mc.tokenizer in ("", "chars") else 0)
        d, heads, kv, layers = mc.hidden_size, mc.num_heads, mc.num_kv_heads, mc.num_layers
        attention = 2 * d * d + 2 * d * (d // heads) * kv
        per_layer = attention + 3 * d * mc.intermediate_size + 2 * d
        return vocab * d * (1 if mc.tie_word_embeddings else 2) + layers * per_layer + d
    path = Path(mc.path).expanduser()
    if not _is_local(mc.path) or not path.is_dir():
        return 0
    count = 0
    for file in path.glob("*.safetensors"):
        try:
            header = safetensors_header(file)
        except (OSError, ValueError):
            continue  # check_model reports it
        count += sum(math.prod(entry["shape"]) for entry in header.values())
    return count


def safetensors_header(file: Path) -> dict:
    """Tensor name -> {dtype, shape, data_offsets} from a .safetensors file's header, reading nothing else.

    ValueError (one line) when the header is unreadable or the file is shorter than its header says.
    """
    size = file.stat().st_size
    with open(file, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        raw = fh.read(length) if 8 <= size and length <= size - 8 else b""
    try:
        tensors = {k: v for k, v in json.loads(raw).items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise ValueError(f"is not a safetensors file, or its header is cut short ({size} bytes)") from None
    if 8 + length + end > size:
        raise ValueError(f"is cut short: {size} bytes where its header describes {8 + length + end}")
    return tensors


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ----------------------------------------------------------------------------
# selector, deep checks, and the entry point


def check_agent(cfg: Config, notes: list | None = None) -> list[str]:
    """agent.env builds with its agent.env_args, and the environment finds its files (env.check(): task file,
    databases, ...). `notes` receives the task count when all is well."""
    if not cfg.agent.env:
        return []
    try:
        env = load_env(cfg.agent.env, cfg.agent.env_args)
    except ValueError as exc:
        return [f"agent.env: {exc}"]
    try:
        problems = [f"agent.env_args: {line}" for line in env.check()]
        if not problems and notes is not None:
            tasks = len(env.tasks())
            notes.append(f"agent: {cfg.agent.env}: {tasks} tasks, {round(cfg.agent.heldout_ratio * tasks)} held out")
    except Exception as exc:  # a file that is there but unreadable (bad JSON, a missing field): one line
        problems = [f"agent.env_args: {cfg.agent.env} cannot read its files ({type(exc).__name__}: {first_line(exc)})"]
    return problems


def check_deep(cfg: Config, models_ok: bool = True, data_ok: bool = True, notes: list | None = None) -> list[str]:
    """Read and compare both tokenizers (when the model paths are fine), and the whole data set when `data_ok`.

    No model weights are loaded. `notes` receives the data summary line.
    """
    if not models_ok:
        return []
    try:
        s_tok = load_tokenizer(cfg.model)
    except Exception as exc:  # any loader failure is reported as one line
        return [tokenizer_problem("model", cfg.model, "student", exc)]
    problems = []
    try:
        t_tok = load_tokenizer(cfg.teacher)
    except Exception as exc:
        problems.append(tokenizer_problem("teacher", cfg.teacher, "teacher", exc))
    else:
        try:
            check_tokenizers(s_tok, t_tok, _vocab_rows(cfg.model, len(s_tok)), _vocab_rows(cfg.teacher, len(t_tok)))
        except TokenizerMismatch as exc:
            problems.append(f"{mismatch_key(cfg, exc.side)}: {exc}")
    if data_ok:
        try:
            train, val, report = load_prompts(cfg.data, s_tok, seed=cfg.train.seed, need_answers=cfg.opd.reward_beta > 0)
            unknown = unknown_characters(train + val, s_tok)
            problems += [unknown] if unknown else []
            if notes is not None:
                notes.append(f"data: {report.summary()}: {len(train)} for training, {len(val)} held out")
        except DataError as exc:
            problems.append(f"data.train_path: {exc}")
        except Exception as exc:
            problems.append(f"data.train_path: {exc}".splitlines()[0])
    return problems


def tokenizer_problem(section: str, mc: ModelConfig, who: str, exc: Exception) -> str:
    name = mc.tokenizer or mc.path
    if hub_unreachable(exc):
        return f"{section}.tokenizer: cannot reach the hub for {name}; give a local path"
    return f"{section}.tokenizer: cannot load the {who} tokenizer ({first_line(exc)})"


def mismatch_key(cfg: Config, side: str | None) -> str:
    """The key to fix for a tokenizer mismatch: the one model at fault (its path, or its random-init
    vocab_size), or teacher.path when the two tokenizers differ."""
    if side is None:
        return "teacher.path"
    section = "model" if side == "student" else "teacher"
    return f"{section}.path" if getattr(cfg, section).path else f"{section}.vocab_size"


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


def model_paths(cfg: Config) -> dict[str, str]:
    return {"model": cfg.model.path, "teacher": cfg.teacher.path}


def config_keys(problems: list[str]) -> set[str]:
    """The `section.key` names that config problems mention (so preflight does not report them twice)."""
    return {m for p in problems for m in re.findall(r"`([A-Za-z_]+\.[A-Za-z_.]+)`", p)}


def preflight(cfg: Config, paths=(), deep: bool = False, ignore=(), notes: list | None = None) -> list[str]:
    """Every problem found without loading model weights, one line each, each starting with its config key.

    ignore: config keys already reported (a partially valid config): problems about them are dropped.
    deep: also read the whole data set (train.py --check); an agentic run (agent.env) has none: its tasks are
    the environment's, which check_agent looks at.
    """
    model_problems = check_model("model", cfg.model) + check_model("teacher", cfg.teacher)
    data_problems = check_data(cfg)
    problems = model_problems + data_problems + check_output(cfg, paths) + check_run_dir(cfg, paths, ignore)
    # each subsystem's own check of its settings
    problems += check_selector(cfg.tip.selector) + check_reward(cfg.opd.reward) + check_engine(cfg.rollout.engine)
    problems += check_specs(cfg.eval.benchmarks) + demo_pairs.check(cfg.data.train_path, model_paths(cfg))
    problems += check_agent(cfg, notes=notes if deep else None)
    demo = cfg.model.path.startswith("demo:") or cfg.teacher.path.startswith("demo:")
    if not demo:
        data_ok = deep and not data_problems and not cfg.agent.env
        problems += check_deep(cfg, models_ok=not model_problems, data_ok=data_ok, notes=notes)
    return [p for p in problems if p.split(":", 1)[0] not in ignore]
