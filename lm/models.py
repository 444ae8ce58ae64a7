"""Loading student and teacher: real checkpoints, or small random models for tests.

Real checkpoints go through `AutoModelForCausalLM.from_pretrained` exactly as a
70B run would. Random models are built from a transformers config of the named
architecture, so tests and benchmarks exercise the same model classes.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from lm.config import ModelConfig
from lm.gguf import dequantised, gguf_path, header, ready


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def random_model_config(mc: ModelConfig, vocab_size: int, tokenizer=None):
    """A transformers config for a small model of architecture `mc.arch`."""
    cls = {"qwen3": Qwen3Config, "qwen2": Qwen2Config, "llama": LlamaConfig}[mc.arch]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=mc.hidden_size,
        num_hidden_layers=mc.num_layers,
        num_attention_heads=mc.num_heads,
        num_key_value_heads=mc.num_kv_heads,
        intermediate_size=mc.intermediate_size,
        max_position_embeddings=32768,
        tie_word_embeddings=mc.tie_word_embeddings,
    )
    if mc.arch == "qwen3":
        kwargs["head_dim"] = mc.hidden_size // mc.num_heads
    if tokenizer is not None:
        kwargs.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.bos_token_id)
    return cls(**kwargs)


def vocab_rows(mc: ModelConfig, tokenizer_len: int) -> int:
    """The embedding rows a model will have, read without loading it: its local config.json's vocab_size (a GGUF
    file: its cached checkpoint's, else its header's), or a random model's (`vocab_size`, else the tokenizer's
    length)."""
    if mc.gguf_file and ready(mc) is None:
        return header(gguf_path(mc))[1]
    folder = ready(mc) or (Path(mc.path).expanduser() if mc.path else None)
    config_file = folder / "config.json" if folder is not None else None
    if config_file is not None and config_file.is_file():
        data = json.loads(config_file.read_text())
        return int(data.get("vocab_size") or data.get("text_config", {}).get("vocab_size") or tokenizer_len)
    return mc.vocab_size or tokenizer_len


def load_model(mc: ModelConfig, tokenizer, device: torch.device, *, trainable: bool):
    """Load (or build) a causal LM on `device`. A non-trainable model is frozen and in eval mode.
    A GGUF checkpoint is de-quantised on first use and loaded from its cache entry (lm.gguf)."""
    dtype = resolve_dtype(mc.dtype, device)
    path = str(dequantised(mc)) if mc.gguf_file else mc.path
    if path:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=mc.attn_implementation,
            trust_remote_code=mc.trust_remote_code,
        )
    else:
        vocab = mc.vocab_size or len(tokenizer)
        cfg = random_model_config(mc, vocab, tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mc.init_seed)
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=mc.attn_implementation)
    model.to(device)
    if trainable:
        model.train()
        if mc.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
    else:
        model.eval()
        model.requires_grad_(False)
    return model


def backbone(model):
    """The decoder stack whose `last_hidden_state` (final norm applied) feeds the LM head."""
    return getattr(model, model.base_model_prefix)


def head_weight(model) -> torch.Tensor:
    """The LM head matrix (V, d) that turns final hidden states into logits (read directly by the fused loss)."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("opd.loss_impl=fused needs an LM head without bias; use opd.loss_impl=reference")
    return head.weight


def rows(weight: torch.Tensor) -> int:
    """Rows of a (V, d) matrix, also when ZeRO-3 holds only this process's shard of it."""
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def gathered(*params):
    """Context in which ZeRO-3 sharded parameters hold their full values (read-only); a no-op otherwise.

    The fused loss uses the LM head matrices directly, outside the modules' forward, where ZeRO-3
    would gather them: gradients reaching a gathered head are reduced to its shards as usual.
    """
    sharded = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not sharded:
        return contextlib.nullcontext()
    import deepspeed  # optional: only ZeRO-3 parameters get here

    return deepspeed.zero.GatheredParameters(sharded, modifier_rank=None)


def save_pretrained(model, tokenizer, path: str | Path, state_dict: dict | None = None) -> None:
    """An ordinary HF checkpoint. `state_dict` replaces the model's own tensors (ZeRO-3: the
    gathered full weights, since the module itself then holds only this process's shard)."""
    model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(path)


CHARS_VOCAB = 102  # ids of the built-in character tokenizer (lm.tokenizers.char_tokenizer), for size estimates


def parameter_count(mc: ModelConfig) -> int:
    """The student's parameters: from its safetensors headers, or from the architecture of a random model.

    0 when unknown without loading anything (a hub id, the demo pair): the check is then skipped. A GGUF
    file's count comes from its header (the cached checkpoint holds as many, in float32).
    """
    if mc.gguf_file:
        try:
            return header(gguf_path(mc))[0]
        except Exception:  # opd.preflight.check_model reports an unreadable GGUF file
            return 0
    if not mc.path:
        vocab = mc.vocab_size or (CHARS_VOCAB if mc.tokenizer in ("", "chars") else 0)
        d, heads, kv, layers = mc.hidden_size, mc.num_heads, mc.num_kv_heads, mc.num_layers
        attention = 2 * d * d + 2 * d * (d // heads) * kv
        per_layer = attention + 3 * d * mc.intermediate_size + 2 * d
        return vocab * d * (1 if mc.tie_word_embeddings else 2) + layers * per_layer + d
    path = Path(mc.path).expanduser()
    if not path.is_dir():
        return 0
    count = 0
    for file in path.glob("*.safetensors"):
        try:
            tensors = safetensors_header(file)
        except (OSError, ValueError):
            continue  # opd.preflight.check_model reports it
        count += sum(math.prod(entry["shape"]) for entry in tensors.values())
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
