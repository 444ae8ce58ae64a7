"""Student rollouts with HF `generate`, and the `Rollouts` every engine returns.

`sample` is the HF path (the reference, and the engine of machines without
vLLM); `lm.engines` wraps it and the vLLM engine behind one interface. Both
seed every response by `row_seed(prompt seed, j)`, so a prompt's rollouts do
not depend on its batch, process or process count.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from transformers import (GenerationConfig, LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)


@dataclass
class Rollouts:
    """A batch of prompt+response rows.

    input_ids      (B, L)  left-padded prompt in columns [0, prompt_length), right-padded response after
    attention_mask (B, L)  1 on real tokens (prompt and response)
    response_mask  (B, L)  1 on tokens the student generated (EOS included), 0 on prompt and padding
    prompt_index   (B,)    which prompt of the input list each row answers
    truncated      (B,)    True when the response hit max_new_tokens without EOS
    logprobs       (B, L)  the engine's log-probability (nats, temperature 1) of each response token,
                           0 elsewhere; None when the engine is the trainer's own model (HF)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_length: int
    prompt_index: torch.Tensor
    truncated: torch.Tensor
    logprobs: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def response_ids(self) -> list[list[int]]:
        """Generated token ids per row (EOS included when produced)."""
        out = []
        for ids, mask in zip(self.input_ids.tolist(), self.response_mask.tolist()):
            out.append([t for t, m in zip(ids, mask) if m])
        return out

    def rows(self, index: torch.Tensor | list[int]) -> "Rollouts":
        index = torch.as_tensor(index, dtype=torch.long)
        return Rollouts(
            self.input_ids[index], self.attention_mask[index], self.response_mask[index],
            self.prompt_length, self.prompt_index[index], self.truncated[index],
            None if self.logprobs is None else self.logprobs[index],
        )

    def to(self, device) -> "Rollouts":
        return Rollouts(
            self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device),
            self.prompt_length, self.prompt_index.to(device), self.truncated.to(device),
            None if self.logprobs is None else self.logprobs.to(device),
        )


class RowwiseSampler(LogitsProcessor):
    """Draws each row's next token with that row's own counter-based uniform, so a row's response does
    not depend on which rows share its batch, its process or its generate call.

    The t-th token of the row seeded `s` is the inverse-CDF draw at u = uniform(s, t) from the row's
    warped distribution (temperature, top-k, top-p: transformers' warpers, applied here because
    generate runs custom processors before its own). One softmax, cumsum and searchsorted for all
    rows per token; the noise is one number per row (no per-row generator, no (B, V) noise). The
    returned scores keep only the drawn token, so generate runs greedy (do_sample=False) and picks it.
    """

    def __init__(self, seeds: list[int], prompt_width: int, temperature: float, top_k: int, top_p: float):
        self.seeds = seeds
        self.prompt_width = prompt_width
        self.warpers = LogitsProcessorList(
            ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
            + ([TopKLogitsWarper(top_k)] if top_k else [])
            + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = self.warpers(input_ids, scores.float())
        t = input_ids.shape[1] - self.prompt_width  # tokens generated so far: the counter
        u = torch.tensor([uniform(s, t) for s in self.seeds], dtype=torch.float64, device=scores.device)
        # float64: a float32 running sum over 150k entries drifts by up to ~1e-3
        cdf = torch.softmax(scores, dim=-1, dtype=torch.float64).cumsum(-1)
        choice = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=scores.shape[1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, choice, 0.0)


def uniform(seed: int, counter: int) -> float:
    """A uniform in (0, 1) fixed by (seed, counter): splitmix64 of seed + counter * golden ratio."""
    x = (seed + (counter + 1) * 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return ((x >> 11) + 0.5) * 2.0 ** -53


_MASK64 = (1 << 64) - 1


class VocabLimit(LogitsProcessor):
    """Never samples ids at or beyond `limit`: padded embedding rows that are not tokens (and that a
    teacher with fewer rows could not score)."""

    def __init__(self, limit: int):
        self.limit = limit

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[1] > self.limit:
            scores = scores.clone()
            scores[:, self.limit:] = float("-inf")
        return scores


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts, stable across runs and Python versions."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def row_seed(prompt_seed: int, j: int) -> int:
    """Seed of the j-th response to a prompt whose seed is `prompt_seed` (63 bits)."""
    digest = hashlib.sha256(f"{prompt_seed}:{j}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _eos_list(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    return [int(e) for e in eos_token_id] if isinstance(eos_token_id, (list, tuple)) else [int(eos_token_id)]


@torch.no_grad()
def sample(
    model,
    prompts: list[list[int]],
    *,
    pad_token_id: int,
    eos_token_id: int | list[int],
    temperature: float,
    top_p: float,
    top_k: int,
    max_new_tokens: int,
    n: int,
    batch_size: int,
    seed: int = 0,
    synced_gpus: bool = False,
    prompt_seeds: list[int] | None = None,
    vocab_limit: int | None = None,
    min_new_tokens: int = 0,
) -> Rollouts:
    """Sample `n` responses per prompt (prompts given as token id lists).

    The draw is fixed by `seed` alone (the global RNG is left untouched), so
    the same seed reproduces the same rollouts on the same device.
    `prompt_seeds` (one per prompt) instead gives every response its own
    counter-based draws (RowwiseSampler, seeded by row_seed): the responses to a prompt then depend only on
    its seed and the model, not on the batch it was sampled in, so a run split
    over any number of processes samples what a single process would.
    `synced_gpus`: keep generating until every process is done (ZeRO-3, whose
    sharded layers need all processes in every forward).
    `vocab_limit`: ids >= it are never sampled (a student whose embedding has more
    rows than the teacher's must not sample ids the teacher cannot score).
    `min_new_tokens`: no EOS id is sampled before that many response tokens (transformers' processor, which
    generate runs before the custom ones: the RowwiseSampler draws from the distribution without EOS).
    """
    if prompt_seeds is not None and len(prompt_seeds) != len(prompts):
        raise ValueError(f"prompt_seeds has {len(prompt_seeds)} seeds for {len(prompts)} prompts")
    device = next(model.parameters()).device
    eos = _eos_list(eos_token_id)
    rows = [p for p in prompts for _ in range(n)]
    index = [i for i in range(len(prompts)) for _ in range(n)]
    seeds = None if prompt_seeds is None else [row_seed(prompt_seeds[i], j) for i in range(len(prompts)) for j in range(n)]
    batch_size = batch_size * n if batch_size else len(rows)
    rowwise = seeds is not None and temperature > 0  # RowwiseSampler draws; generate then runs greedy
    sampled = temperature > 0 and not rowwise
    gen_cfg = GenerationConfig(
        do_sample=sampled,
        temperature=temperature if sampled else None,
        top_p=top_p if sampled else None,
        top_k=top_k if sampled else None,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens or None,
        pad_token_id=pad_token_id,
        eos_token_id=eos or None,
        use_cache=True,
    )
    was_training = model.training
    model.eval()
    responses: list[list[int]] = []
    truncated: list[bool] = []
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
                att = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, p in enumerate(chunk):
                    ids[r, width - len(p):] = torch.tensor(p)
                    att[r, width - len(p):] = 1
                processors = [VocabLimit(vocab_limit)] if vocab_limit is not None else []
                if rowwise:
                    processors.append(RowwiseSampler(seeds[start:start + batch_size], width, temperature, top_k, top_p))
                extra = {"logits_processor": LogitsProcessorList(processors)} if processors else {}
                out = model.generate(
                    input_ids=ids.to(device), attention_mask=att.to(device),
                    generation_config=gen_cfg, synced_gpus=synced_gpus, **extra,
                )
                for gen in out[:, width:].tolist():
                    resp, done = [], False
                    for t in gen:
                        resp.append(t)
                        if t in eos:
                            done = True
                            break
                    truncated.append(not done)
                    responses.append(resp)
    finally:
        model.train(was_training)
    return assemble(rows, index, responses, truncated, pad_token_id)


def assemble(rows: list[list[int]], index: list[int], responses: list[list[int]], truncated: list[bool],
             pad_token_id: int, logprobs: list[list[float]] | None = None) -> Rollouts:
    """`Rollouts` from each row's prompt ids, response ids (EOS included when produced) and, from an
    engine that reports them, the log-probabilities of the response tokens."""
    prompt_len = max(len(p) for p in rows)
    resp_len = max(1, max(len(r) for r in responses))
    total = prompt_len + resp_len
    input_ids = torch.full((len(rows), total), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), total), dtype=torch.long)
    response_mask = torch.zeros((len(rows), total), dtype=torch.long)
    engine_logprobs = None if logprobs is None else torch.zeros((len(rows), total), dtype=torch.float32)
    for r, (p, resp) in enumerate(zip(rows, responses)):
        input_ids[r, prompt_len - len(p):prompt_len] = torch.tensor(p)
        attention[r, prompt_len - len(p):prompt_len] = 1
        if resp:
            input_ids[r, prompt_len:prompt_len + len(resp)] = torch.tensor(resp)
            attention[r, prompt_len:prompt_len + len(resp)] = 1
            response_mask[r, prompt_len:prompt_len + len(resp)] = 1
            if engine_logprobs is not None:
                engine_logprobs[r, prompt_len:prompt_len + len(resp)] = torch.tensor(logprobs[r], dtype=torch.float32)
    return Rollouts(
        input_ids=input_ids, attention_mask=attention, response_mask=response_mask,
        prompt_length=prompt_len, prompt_index=torch.tensor(index, dtype=torch.long),
        truncated=torch.tensor(truncated, dtype=torch.bool), logprobs=engine_logprobs,
    )
