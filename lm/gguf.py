"""GGUF checkpoints (`model.gguf_file`, `teacher.gguf_file`): de-quantised once, then an ordinary checkpoint.

A GGUF file (llama.cpp's format, quantised) is de-quantised by transformers into float32 and written as a
Hugging Face checkpoint (config.json without a quantization_config, safetensors weights, the tokenizer with
its chat template) under

    <gguf_cache_dir>/<file stem>-<key>/        key: sha256 of (resolved path, size, mtime in ns)

From then on it loads through `lm.models.load_model` / `lm.tokenizers.load_tokenizer` as any checkpoint
does, and the rollout engines (HF, vLLM) see an ordinary model.

The key is the file's identity, not a hash of its contents: hashing a 40 GB file costs minutes at every
start, and a hash of only its header would give two files with the same layout and metadata (a fine-tune
quantised the same way) one cache entry and the wrong weights. Size and mtime change whenever the file is
rewritten; a copy elsewhere is de-quantised again (seconds to minutes, once).

The cache entry is written to a temporary sibling and renamed into place, so an interrupted de-quantisation
leaves nothing behind; processes of one launch take turns on a lock of the cache directory (one writes,
the others then find its entry). Float32 because de-quantised values (scale * q + min) are not exact in
16 bits; `model.dtype` casts at load as for any checkpoint.
"""

from __future__ import annotations

import copy
import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lm.config import ModelConfig

MAGIC = b"GGUF"
DONE = "gguf.json"  # written last in an entry: its source file and how long de-quantising took


def gguf_path(mc: ModelConfig) -> Path | None:
    """The GGUF file a model config names: `gguf_file` inside the directory `path`, or `gguf_file` itself when
    `path` is empty; None without `gguf_file`."""
    if not mc.gguf_file:
        return None
    file = Path(mc.gguf_file).expanduser()
    return Path(mc.path).expanduser() / file if mc.path else file


def check_gguf(side: str, mc: ModelConfig) -> list[str]:
    """One line per problem with `side`.gguf_file (side: "model" or "teacher"), reading only the file's header."""
    file = gguf_path(mc)
    if file is None:
        return []
    key = f"{side}.gguf_file"
    if mc.path and Path(mc.gguf_file).expanduser().is_absolute():
        return [f"{key}: {mc.gguf_file} is an absolute path; give the file name inside {side}.path, or leave {side}.path empty"]
    if mc.path and not Path(mc.path).expanduser().is_dir():
        return [f"{key}: {side}.path = {mc.path} must be the directory holding the file (or empty)"]
    if not file.is_file():
        return [f"{key}: {file} {'is not a file' if file.exists() else 'does not exist'}"]
    with open(file, "rb") as fh:
        magic = fh.read(4)
    if magic != MAGIC:
        return [f"{key}: {file} is not a GGUF file (it starts with {magic!r}, not {MAGIC!r})"]
    if not (cache_entry(file, mc.gguf_cache_dir) / DONE).is_file():
        if importlib.util.find_spec("gguf") is None:
            return [f"{key}: reading {file} needs the gguf package: pip install --no-deps -r requirements-real.txt "
                    "(README, 'Real models')"]
        try:
            header(file)
        except Exception as exc:  # the GGUF reader's errors (cut-short file, bad field) say what it found
            return [f"{key}: {file} has an unreadable GGUF header ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})"]
    return []


def cache_entry(file: Path, cache_dir: str) -> Path:
    """Where the de-quantised checkpoint of `file` is kept (whether or not it is there yet)."""
    real = file.expanduser().resolve()
    stat = real.stat()
    key = hashlib.sha256(f"{real}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / f"{real.stem}-{key}"


def ready(mc: ModelConfig) -> Path | None:
    """The de-quantised checkpoint of `mc`'s GGUF file when it is cached already, else None (nothing is written)."""
    file = gguf_path(mc)
    if file is None or not file.is_file():
        return None
    entry = cache_entry(file, mc.gguf_cache_dir)
    return entry if (entry / DONE).is_file() else None


def dequantised(mc: ModelConfig, log=print) -> Path:
    """The checkpoint directory of `mc`'s GGUF file, de-quantised and cached on first use."""
    file = gguf_path(mc)
    entry = cache_entry(file, mc.gguf_cache_dir)
    entry.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(entry.parent, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed, also when the process dies
        if not (entry / DONE).is_file():
            tmp = entry.parent / f".tmp-{entry.name}-{os.getpid()}"
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                log(f"de-quantising {file} into {entry} (once)")
                started = time.time()
                _dequantise(file, tmp)
                info = {"gguf_file": str(file.resolve()), "size": file.stat().st_size,
                        "mtime_ns": file.stat().st_mtime_ns, "seconds": round(time.time() - started, 1)}
                (tmp / DONE).write_text(json.dumps(info, indent=2) + "\n")
                tmp.rename(entry)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        os.close(lock)
    return entry


def _dequantise(file: Path, out: Path) -> None:
    """Write `file` as a float32 HF checkpoint (weights, config, generation config, tokenizer) into `out`."""
    quantised = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    # transformers refuses to save a model it loaded from GGUF: the same tensors in a plain model of its config
    config = copy.deepcopy(quantised.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = quantised.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


@functools.lru_cache(maxsize=8)
def _header(file: str, size: int, mtime_ns: int) -> tuple[int, int]:
    import gguf  # optional: only GGUF checkpoints need the reader (pip install gguf, requirements-real.txt)

    reader = gguf.GGUFReader(file)
    params = sum(int(t.n_elements) for t in reader.tensors)
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = int(embed.shape[-1]) if embed is not None else len(reader.fields["tokenizer.ggml.tokens"].data)
    return params, vocab


def header(file: Path) -> tuple[int, int]:
    """(parameters, embedding rows) of a GGUF file, read from its header (seconds; no weights de-quantised)."""
    stat = file.stat()
    return _header(str(file.resolve()), stat.st_size, stat.st_mtime_ns)


def tokenizer_source(mc: ModelConfig) -> tuple[str, dict]:
    """(name, from_pretrained keywords) of `mc`'s GGUF tokenizer: its cache entry when there is one, else the
    GGUF file itself (the same tokenizer: the entry holds it as saved from there), so checks never de-quantise."""
    entry = ready(mc)
    if entry is not None:
        return str(entry), {}
    file = gguf_path(mc)
    return str(file.parent), {"gguf_file": file.name}
