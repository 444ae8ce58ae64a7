"""Checks that run before any model loads, so a typo costs seconds, not a queue slot.

`preflight(cfg, paths)` returns one line per problem (all of them at once),
each starting with the config key it concerns. Both tokenizers are always read
and compared (seconds, where a mismatched teacher found after loading the
models costs minutes); the rollout source checks its own data or environment
(opd.sources), and with `deep=True` (train.py --check) reads all of it. The run-directory rules
(`check_run_dir`) are the same ones the trainer applies when it starts.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import yaml
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError
from transformers import CONFIG_MAPPING, AttentionInterface

from demo import task as demo_task
from eval.benchmarks import BenchmarkError, parse_spec
from lm.config import ModelConfig
from lm.tokenizers import TokenizerMismatch, check_tokenizers, load_tokenizer
from opd.checkpoint import holds_run
from opd.config import Config, drop_unused, to_dict
from opd.errors import first_line, hub_unreachable
from opd.rewards import load_reward
from opd.sources import check_source
from lm.vllm_engine import MISSING, vllm_available
from opd.step import known_selectors

CHARS_VOCAB = 102  # ids of the built-in character tokenizer (lm.tokenizers.char_tokenizer), for size estimates

# Keys that may change when a run is resumed; anything else must match the run's saved config.
# Where the run lives is not part of its identity: a moved or renamed run directory resumes.
RESUMABLE_CHANGES = ("train.output_dir", "train.run_name", "train.steps", "train.epochs", "train.save_every",
                     "train.keep_last", "train.on_existing", "train.resume", "train.save_final",
                     "train.max_consecutive_skips", "train.max_steps_per_run", "train.num_threads", "train.device",
                     "logging.", "eval.", "tip.dump_tokens", "tip.plots")


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


def check_attention(side: str, mc: ModelConfig) -> list[str]:
    """An attention implementation transformers knows (a hub kernel `owner/name` is taken on trust)."""
    known = ["eager", *sorted(AttentionInterface._global_mapping)]
    name = mc.attn_implementation
    if name in known or name.split("|")[-1] in known or "/" in name:
        return []
    return [f"{side}.attn_implementation: {name!r} is not an attention implementation (known: {', '.join(known)})"]


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
# output and run directory


def run_directory(cfg: Config, config_paths=()) -> Path:
    """<output_dir>/<run_name>; the run name defaults to the last config file's stem."""
    name = cfg.train.run_name or (Path(config_paths[-1]).stem if config_paths else "run")
    return Path(cfg.train.output_dir).expanduser() / name


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


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "demo":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_keys(saved: dict, cfg: Config, ignore=()) -> list[str]:
    """Keys (a.b) whose value differs between a run's saved config dict and `cfg`, resumable ones left out."""
    new = _flatten(to_dict(cfg))
    # a key the saved config lacks (added to the schema since) counts as its default
    old = _flatten(drop_unused(saved))
    old.update({k: v for k, v in _flatten(to_dict(Config())).items() if k in new and k not in old})
    return [k for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES) and k not in ignore]


def check_run_dir(cfg: Config, config_paths=(), ignore=()) -> list[str]:
    """Starting into an existing run directory resumes it or refuses; it never writes over something else.

    `ignore`: keys left out of the saved-config comparison (ones already reported as config errors).
    Only the main process of a multi-process launch judges: the others could find the directory
    half-made by it (the trainer tells them when the main process refuses).
    """
    if int(os.environ.get("RANK", "0")) > 0:
        return []
    run_dir = run_directory(cfg, config_paths)
    saved = run_dir / "config.yaml"
    if run_dir.exists() and not run_dir.is_dir():
        return [f"train.run_name: {run_dir} exists and is not a directory"]
    if not saved.is_file():
        if run_dir.is_dir() and any(run_dir.iterdir()):
            return [f"train.run_name: run directory {run_dir} is not empty but holds no run config; "
                    "refusing to write into it"]
        return []
    try:
        old = yaml.safe_load(saved.read_text()) or {}
        if not (isinstance(old, dict) and isinstance(old.get("train"), dict)):
            raise ValueError("not a run config written by train.py")
    except (yaml.YAMLError, ValueError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return [f"train.run_name: {saved} cannot be read ({first}); move the run directory aside or choose "
                "another train.run_name"]
    if not holds_run(run_dir):
        return []  # a start that failed before its first step left no run: the user's to start again into
    if cfg.train.on_existing == "refuse":
        return [f"train.on_existing: run directory {run_dir} already holds a run (train.on_existing=refuse); "
                "choose another train.run_name"]
    if cfg.train.resume == "never":
        return [f"train.resume: run directory {run_dir} already holds a run and train.resume=never; "
                "choose another train.run_name"]
    changed = changed_keys(old, cfg, ignore)
    if changed:
        return [f"train.run_name: run directory {run_dir} holds a run with a different config "
                f"({', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}); "
                "choose another train.run_name to start a new run"]
    return []


# ----------------------------------------------------------------------------
# selector, deep checks, and the entry point


def check_selector(cfg: Config) -> list[str]:
    known = known_selectors()
    if cfg.tip.selector not in known:
        return [f"tip.selector: unknown selector {cfg.tip.selector!r} (known: {', '.join(known)})"]
    return []


def check_reward(cfg: Config) -> list[str]:
    """opd.reward names a built-in or an importable module:function; importing runs that module's code,
    which is what the run would do at its first graded rollout anyway (a config naming one is code)."""
    name = cfg.opd.reward
    module, _, func = name.partition(":")
    try:
        reward = load_reward(name)
    except ValueError as exc:
        return [f"opd.reward: {exc}"]
    except AttributeError:
        return [f"opd.reward: module {module} has no function {func}"]
    except Exception as exc:  # ImportError, or whatever importing the module raised
        return [f"opd.reward: cannot import module {module} ({type(exc).__name__}: {first_line(exc)})"]
    if not callable(reward):
        return [f"opd.reward: {name} is not a function"]
    return []


def check_engine(cfg: Config) -> list[str]:
    """rollout.engine=vllm needs vLLM importable here: said before anything loads."""
    if cfg.rollout.engine == "vllm" and not vllm_available():
        return [f"rollout.engine: {MISSING}"]
    return []


def check_eval(cfg: Config) -> list[str]:
    """Benchmark names and files: a typo must not surface at the first evaluation, hours in."""
    if not cfg.eval.benchmarks:
        return []
    problems = []
    for spec in cfg.eval.benchmarks:
        try:
            parse_spec(spec)
        except BenchmarkError as exc:
            problems.append(f"eval.benchmarks: {exc}")
    return problems


DEMO_MODELS = ("demo:teacher", "demo:student", "demo:agent_teacher", "demo:agent_student")


def check_demo(cfg: Config) -> list[str]:
    """The demo task and model names, checked before anything is trained (the demo.* settings are typed config)."""
    problems = []
    if cfg.data.train_path.startswith("demo:") and cfg.data.train_path != f"demo:{demo_task.NAME}":
        problems.append(f"data.train_path: unknown demo task {cfg.data.train_path!r} "
                        f"(the demo task is demo:{demo_task.NAME})")
    for side, mc in (("model", cfg.model), ("teacher", cfg.teacher)):
        if mc.path.startswith("demo:") and mc.path not in DEMO_MODELS:
            problems.append(f"{side}.path: unknown demo model {mc.path!r} (known: {', '.join(DEMO_MODELS)})")
    return problems


def check_deep(cfg: Config, models_ok: bool = True) -> list[str]:
    """Read and compare both tokenizers (when the model paths are fine). No model weights are loaded."""
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


def config_keys(problems: list[str]) -> set[str]:
    """The `section.key` names that config problems mention (so preflight does not report them twice)."""
    return {m for p in problems for m in re.findall(r"`([A-Za-z_]+\.[A-Za-z_.]+)`", p)}


def preflight(cfg: Config, paths=(), deep: bool = False, ignore=(), notes: list | None = None) -> list[str]:
    """Every problem found without loading model weights, one line each, each starting with its config key.

    ignore: config keys already reported (a partially valid config): problems about them are dropped.
    deep: the rollout source also reads everything it will train on (train.py --check): the whole data set,
    or the environment's tasks (opd.sources.check_source); `notes` receives its summary line.
    """
    model_problems = check_model("model", cfg.model) + check_model("teacher", cfg.teacher)
    source_problems = check_source(cfg, notes, deep)
    problems = model_problems + source_problems + check_output(cfg, paths) + check_run_dir(cfg, paths, ignore)
    problems += check_selector(cfg) + check_reward(cfg) + check_engine(cfg) + check_eval(cfg) + check_demo(cfg)
    demo = cfg.model.path.startswith("demo:") or cfg.teacher.path.startswith("demo:")
    if not demo:
        problems += check_deep(cfg, models_ok=not model_problems)
    return [p for p in problems if p.split(":", 1)[0] not in ignore]
