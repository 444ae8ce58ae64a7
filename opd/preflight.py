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
import os
import re
import shutil
from pathlib import Path

from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError
from transformers import CONFIG_MAPPING

from demo import pairs as demo_pairs
from eval.benchmarks import check_specs
from eval.runner import prompt_format
from lm.config import ModelConfig, check_attention
from lm.gguf import check_gguf, gguf_path
from lm.models import parameter_count, safetensors_header, vocab_rows
from lm.tokenizers import TokenizerMismatch, check_tokenizers, load_tokenizer
from lm.served import check_placement
from lm.vllm_engine import check_engine
from opd.checkpoint import check_run_dir, run_directory
from opd.config import Config
from opd.errors import first_line, hub_unreachable
from opd.rewards import check_reward
from opd.sources import check_source
from opd.step import check_selector

def _is_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).expanduser().exists()


# ----------------------------------------------------------------------------
# models and tokenizers


def check_model(side: str, mc: ModelConfig) -> list[str]:
    """`side` is "model" or "teacher": the checkpoint directory (or hub id) and the tokenizer path."""
    problems = check_attention(side, mc)
    if mc.tokenizer not in ("", "chars") and _is_local(mc.tokenizer) and not Path(mc.tokenizer).expanduser().exists():
        problems.append(f"{side}.tokenizer: {mc.tokenizer} does not exist")
    if mc.gguf_file:  # `path` is then the GGUF file's directory (or empty), not a checkpoint
        return problems + check_gguf(side, mc)
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
    params = parameter_count(cfg.model)
    need = _checkpoint_bytes(cfg.model, params)
    if free < need:
        return [f"train.output_dir: {_size(free)} free on {probe}, one checkpoint of the student "
                f"({params:,} parameters, weights + AdamW state) needs about {_size(need)}"]
    return []


def _checkpoint_bytes(mc: ModelConfig, params: int) -> int:
    """Weights and AdamW's two moments, in the student's training dtype ('auto' trains in float32)."""
    element = 2 if mc.dtype in ("bfloat16", "float16") else 4
    return 3 * element * params


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ----------------------------------------------------------------------------
# the pair's tokenizers, and the entry point


def check_deep(cfg: Config, models_ok: bool = True) -> list[str]:
    """Read and compare both tokenizers (when the model paths are fine). No model weights are loaded."""
    if not models_ok:
        return []
    try:
        s_tok = load_tokenizer(cfg.model)
    except Exception as exc:  # any loader failure is reported as one line
        return [tokenizer_problem("model", cfg.model, "student", exc)]
    problems = []
    for key, tc in cfg.teacher.sections():
        try:
            t_tok = load_tokenizer(tc)
        except Exception as exc:
            problems.append(tokenizer_problem(key, tc, "teacher", exc))
            continue
        try:
            check_tokenizers(s_tok, t_tok, vocab_rows(cfg.model, len(s_tok)), vocab_rows(tc, len(t_tok)))
        except TokenizerMismatch as exc:
            at = exc.key(cfg.model, tc)
            problems.append(f"{at if key == 'teacher' or at.startswith('model.') else key + at[7:]}: {exc}")
    return problems


def tokenizer_problem(section: str, mc: ModelConfig, who: str, exc: Exception) -> str:
    name = mc.tokenizer or mc.path
    if mc.gguf_file and not mc.tokenizer:
        return f"{section}.gguf_file: cannot load the {who} tokenizer from {gguf_path(mc)} ({first_line(exc)})"
    if hub_unreachable(exc):
        return f"{section}.tokenizer: cannot reach the hub for {name}; give a local path"
    return f"{section}.tokenizer: cannot load the {who} tokenizer ({first_line(exc)})"


def check_served(cfg: Config) -> list[str]:
    """A served teacher returns final hidden states to the fused kernel, and is not in this process."""
    served = [key for key, tc in cfg.teacher.sections() if tc.placement == "ray"]
    if not served:
        return []
    problems = []
    if cfg.opd.loss_impl != "fused":
        problems.append(f"opd.loss_impl: a served teacher ({served[0]}.placement: ray) returns hidden states, which "
                        "only the fused loss reads; set opd.loss_impl: fused (the reference path stays local-only)")
    if cfg.eval.teacher and cfg.teacher.placement == "ray":
        problems.append("eval.teacher: evaluating the teacher needs it in this process; with teacher.placement: ray "
                        "set eval.teacher: false (or evaluate it with python -m eval)")
    return problems


def config_keys(problems: list[str]) -> set[str]:
    """The `section.key` names that config problems mention (so preflight does not report them twice)."""
    return {m for p in problems for m in re.findall(r"`([A-Za-z_]+\.[A-Za-z_.]+)`", p)}


def preflight(cfg: Config, paths=(), deep: bool = False, ignore=(), notes: list | None = None) -> list[str]:
    """Every problem found without loading model weights, one line each, each starting with its config key.

    ignore: config keys already reported (a partially valid config): problems about them are dropped.
    deep: the rollout source also reads everything it will train on (train.py --check): the whole data set,
    or the environment's tasks (opd.sources.check_source); `notes` receives its summary line.
    """
    model_problems = check_model("model", cfg.model)
    model_problems += [p for key, tc in cfg.teacher.sections() for p in check_model(key, tc)]
    source_problems = check_source(cfg, notes, deep)
    problems = model_problems + source_problems + check_output(cfg, paths) + check_run_dir(cfg, paths, ignore)
    # each subsystem's own check of its settings
    problems += check_selector(cfg.tip.selector) + check_reward(cfg.opd.reward) + check_engine(cfg.rollout.engine)
    problems += [p for key, tc in cfg.teacher.sections() for p in check_placement(tc.placement, key)]
    problems += check_served(cfg)
    # every benchmark read now, as the evaluations will read it: not at the first evaluation, hours in
    problems += check_specs(cfg.eval.benchmarks, cfg.eval.max_problems, prompt_format(cfg.eval))
    problems += demo_pairs.check(cfg.data.train_path, {"model": cfg.model.path, "teacher": cfg.teacher.path})
    demo = cfg.model.path.startswith("demo:") or cfg.teacher.path.startswith("demo:")
    if not demo:
        problems += check_deep(cfg, models_ok=not model_problems)
    return [p for p in problems if p.split(":", 1)[0] not in ignore]
