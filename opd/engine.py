"""The run's rollout engine (rollout.engine: hf | vllm): built, kept in sync with the student, checked.

The loop calls three things: `run.engine.generate` (in trainer.rollout), then
`rollout_gap` (the rollout/logprob_diff_* diagnostic) and `run.engine.sleep()`
before training, and `sync_engine` after the step's optimiser updates, so the
next rollout (and any evaluation in between) samples from the updated student.
"""

from __future__ import annotations

import time

import torch

from lm.engines import HFEngine, Sampling
from lm.models import gathered, resolve_dtype
from lm.rollout import Rollouts
from lm.vllm_engine import MISSING, build_vllm_engine, vllm_available
from opd.distributed import global_sum
from opd.errors import RunError
from opd.losses import head_logits


def build_engine(lm, rc, max_len: int, run_dir, acc, zero3: bool):
    """The rollout engine of the student `lm` (after its weights are final: resumed or not), `rc` the rollout
    section, `max_len` prompt + response tokens at most. A vLLM engine gets the student's weights at once."""
    if rc.engine == "hf":
        return HFEngine(lm, rc.batch_size, synced_gpus=zero3 and acc.num_processes > 1)
    if not vllm_available():
        raise RunError(MISSING)
    vc = rc.vllm
    engine = build_vllm_engine(
        lm, run_dir / "vllm_model" / f"rank{acc.process_index}", dtype=resolve_dtype(vc.dtype, acc.device),
        max_model_len=vc.max_model_len or max_len, device=acc.device, num_processes=acc.num_processes,
        gpu_memory_utilization=vc.gpu_memory_utilization, cpu_kv_cache_gb=vc.cpu_kv_cache_gb, sleep=vc.sleep,
        enforce_eager=vc.enforce_eager,
    )
    engine.sync(student_weights(lm))
    return engine


def rollout_sampling(rc, eos_ids: list[int], pad_token_id: int, vocab_limit: int) -> Sampling:
    """The training rollouts' sampling (`rc` the rollout section); `vocab_limit`: ids the teacher can score."""
    return Sampling(
        temperature=rc.temperature, top_p=rc.top_p, top_k=rc.top_k, max_new_tokens=rc.max_new_tokens, n=rc.n,
        eos_ids=tuple(eos_ids), pad_token_id=pad_token_id, vocab_limit=vocab_limit, min_new_tokens=rc.min_new_tokens,
    )


def student_weights(lm):
    """(HF name, full tensor) of every parameter of the student `lm`, one at a time: under ZeRO-3 each is
    gathered alone and copied out, so at most one full parameter is held beyond the shards.

    A tied LM head is sent under both its names (`lm_head.weight` too): vLLM's CPU build keeps its own packed
    copy of the head, which a sync of the embedding alone leaves stale (measured: SmolLM2, tied, 13 nats off
    after such a sync; 1e-6 with both names; tests/vllm_rollouts/test_vllm_real_model.py)."""
    for name, param in lm.named_parameters(remove_duplicate=False):
        with gathered(param):
            yield name, param.detach().clone() if hasattr(param, "ds_id") else param.detach()


def sync_engine(engine, lm) -> None:
    """After the step's optimiser updates: the engine takes the student's current weights."""
    engine.sync(student_weights(lm))


@torch.no_grad()
def rollout_gap(student, head: torch.Tensor, rollouts: Rollouts, micro_batch_size: int, chunk_size: int, acc) -> dict:
    """rollout/logprob_diff_mean and _max: |engine log p - trainer log p| of every sampled token, over
    all processes (nats). The trainer side is one extra no-grad student forward over the step's rollouts
    (micro-batch by micro-batch, LM head chunked), run before any update of the step: so the gap measures
    a stale or broken sync and precision differences, never the step's own updates. 0 on the HF path,
    which samples from the trained model itself (and then costs nothing). Its time: timing/logprob_check_s.
    `student`: the (wrapped) PolicyModel; `head` (V, d) its LM head."""
    if rollouts.logprobs is None:
        return {"rollout/logprob_diff_mean": 0.0, "rollout/logprob_diff_max": 0.0}
    started = time.perf_counter()
    total, count, biggest = 0.0, 0, 0.0
    for start in range(0, len(rollouts), micro_batch_size):
        part = rollouts.rows(list(range(start, min(len(rollouts), start + micro_batch_size)))).to(acc.device)
        pos = part.response_mask[:, 1:].bool()
        with acc.autocast():
            states = student(part.input_ids, part.attention_mask, hidden=True, positions=pos)
        tokens = part.input_ids[:, 1:][pos]
        diff = (sampled_logprobs(states, head, tokens, chunk_size) - part.logprobs[:, 1:][pos]).abs()
        total, count = total + float(diff.sum()), count + diff.numel()
        biggest = max(biggest, float(diff.max())) if diff.numel() else biggest
    worst = acc.gather(torch.tensor([biggest], device=acc.device)).max() if acc.num_processes > 1 else biggest
    return {"rollout/logprob_diff_mean": global_sum(acc, total) / max(global_sum(acc, count), 1.0),
            "rollout/logprob_diff_max": float(worst), "timing/logprob_check_s": time.perf_counter() - started}


def sampled_logprobs(states: torch.Tensor, head: torch.Tensor, tokens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """log softmax(states @ head.T)[token] per row (N,), float32, the LM head applied `chunk_size` rows at a time."""
    out = []
    with gathered(head):
        for i in range(0, states.shape[0], chunk_size):
            logits = head_logits(states[i:i + chunk_size], head, chunk_size)
            out.append(logits.gather(1, tokens[i:i + chunk_size, None])[:, 0] - torch.logsumexp(logits, dim=-1))
    return torch.cat(out) if out else states.new_zeros(0)
