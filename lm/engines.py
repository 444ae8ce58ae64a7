"""Rollout engines: what samples the student's responses. One small interface, two engines.

    engine.generate(prompts, prompt_seeds, sampling) -> Rollouts
    engine.sync(named_params)   the trainer's current weights, pushed into the engine in place
    engine.sleep()              free the engine's memory while the student trains (sync wakes it)

`HFEngine` runs transformers `generate` on the trained model itself (nothing to
sync, `Rollouts.logprobs` is None). `lm.vllm_engine.VLLMEngine` is a vLLM engine
colocated in the training process, with its own copy of the weights. Both seed
the j-th response to a prompt by `row_seed(prompt seed, j)`: a prompt's rollouts
depend on its seed and the weights, not on its batch, process or process count.
The two engines draw differently (different samplers), each reproducibly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

import torch

from lm.rollout import Rollouts, sample


@dataclass(frozen=True)
class Sampling:
    """How responses are drawn; `vocab_limit`: ids >= it are never sampled (None = no limit); `min_new_tokens`:
    no EOS before that many response tokens (0 = off)."""

    temperature: float
    top_p: float
    top_k: int  # 0 = off
    max_new_tokens: int
    n: int
    eos_ids: tuple[int, ...]
    pad_token_id: int
    vocab_limit: int | None = None
    min_new_tokens: int = 0


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], prompt_seeds: list[int], sampling: Sampling) -> Rollouts: ...

    def sync(self, named_params: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def sleep(self) -> None: ...


class HFEngine:
    """transformers `generate` on the model being trained (lm.rollout.sample).

    `batch_size`: prompts per generate call (0 = all at once); `synced_gpus`: keep every
    process generating until all are done (ZeRO-3 sharded weights need all of them).
    """

    def __init__(self, model, batch_size: int = 0, synced_gpus: bool = False):
        self.model = model
        self.batch_size = batch_size
        self.synced_gpus = synced_gpus

    def generate(self, prompts: list[list[int]], prompt_seeds: list[int], sampling: Sampling) -> Rollouts:
        return sample(
            self.model, prompts, pad_token_id=sampling.pad_token_id, eos_token_id=list(sampling.eos_ids),
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_new_tokens=sampling.max_new_tokens, n=sampling.n, batch_size=self.batch_size,
            synced_gpus=self.synced_gpus, prompt_seeds=prompt_seeds, vocab_limit=sampling.vocab_limit,
            min_new_tokens=sampling.min_new_tokens,
        )

    def sync(self, named_params: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to do: the engine samples from the trained model itself."""

    def sleep(self) -> None:
        """Nothing to free: the engine holds no memory of its own between rollouts."""
