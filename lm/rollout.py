"""Student rollouts: sample responses to prompts with HF `generate`.

`sample` is the one function the loop (and evaluation) calls; a faster engine
(vLLM, SGLang) can replace it as long as it returns the same `Rollouts`.
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
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_length: int
    prompt_index: torch.Tensor
    truncated: torch.Tensor

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
        )

    def to(self, device) -> "Rollouts":
        return Rollouts(
            self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device),
            self.prompt_length, self.prompt_index.to(device), self.truncated.to(device),
        )


class RowwiseSampler(LogitsProcessor):
    """Draws each row's next token from that row's own generator, so a row's response
    does not depend on which rows share its batch, its process or its generate call.

    generate runs custom processors before its own temperature / top-k / top-p, so this
    one applies them itself (transformers' warpers) and generate is then given none.
    Gumbel-max: argmax(scores - log E), E ~ Exp(1) per vocabulary entry, is a draw from
    softmax(scores). The returned scores keep only the drawn token, so generate's own
    multinomial then picks it with probability 1.
    """

    def __init__(self, seeds: list[int], device, temperature: float, top_k: int, top_p: float):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.warpers = LogitsProcessorList(
            ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
            + ([TopKLogitsWarper(top_k)] if top_k else [])
            + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = self.warpers(input_ids, scores.float())
        # One draw per row per decoding step, finished rows included: a row's t-th token
        # always uses its generator's t-th draw.
        noise = torch.stack([torch.empty(scores.shape[1], device=scores.device).exponential_(generator=g)
                             for g in self.generators])
        choice = (scores - noise.log()).argmax(-1, keepdim=True)
        return torch.full_like(scores, float("-inf")).scatter_(1, choice, 0.0)


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
) -> Rollouts:
    """Sample `n` responses per prompt (prompts given as token id lists).

    The draw is fixed by `seed` alone (the global RNG is left untouched), so
    the same seed reproduces the same rollouts on the same device.
    `prompt_seeds` (one per prompt) instead gives every response its own
    generator (RowwiseSampler): the responses to a prompt then depend only on
    its seed and the model, not on the batch it was sampled in, so a run split
    over any number of processes samples what a single process would.
    `synced_gpus`: keep generating until every process is done (ZeRO-3, whose
    sharded layers need all processes in every forward).
    `vocab_limit`: ids >= it are never sampled (a student whose embedding has more
    rows than the teacher's must not sample ids the teacher cannot score).
    """
    if prompt_seeds is not None and len(prompt_seeds) != len(prompts):
        raise ValueError(f"prompt_seeds has {len(prompt_seeds)} seeds for {len(prompts)} prompts")
    device = next(model.parameters()).device
    eos = _eos_list(eos_token_id)
    rows = [p for p in prompts for _ in range(n)]
    index = [i for i in range(len(prompts)) for _ in range(n)]
    seeds = None if prompt_seeds is None else [row_seed(prompt_seeds[i], j) for i in range(len(prompts)) for j in range(n)]
    batch_size = batch_size * n if batch_size else len(rows)
    rowwise = seeds is not None and temperature > 0  # RowwiseSampler then applies temperature, top-k, top-p
    gen_cfg = GenerationConfig(
        do_sample=temperature > 0,
        temperature=(1.0 if rowwise else temperature) if temperature > 0 else None,
        top_p=(1.0 if rowwise else top_p) if temperature > 0 else None,
        top_k=(0 if rowwise else top_k) if temperature > 0 else None,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id,
        eos_token_id=eos or None,
        use_cache=True,
    )
    was_training = model.training
    model.eval()
    prompt_len = max(len(p) for p in rows)
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
                    processors.append(RowwiseSampler(seeds[start:start + batch_size], device, temperature, top_k, top_p))
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
    resp_len = max(1, max(len(r) for r in responses))
    total = prompt_len + resp_len
    input_ids = torch.full((len(rows), total), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), total), dtype=torch.long)
    response_mask = torch.zeros((len(rows), total), dtype=torch.long)
    for r, (p, resp) in enumerate(zip(rows, responses)):
        input_ids[r, prompt_len - len(p):prompt_len] = torch.tensor(p)
        attention[r, prompt_len - len(p):prompt_len] = 1
        if resp:
            input_ids[r, prompt_len:prompt_len + len(resp)] = torch.tensor(resp)
            attention[r, prompt_len:prompt_len + len(resp)] = 1
            response_mask[r, prompt_len:prompt_len + len(resp)] = 1
    return Rollouts(
        input_ids=input_ids, attention_mask=attention, response_mask=response_mask,
        prompt_length=prompt_len, prompt_index=torch.tensor(index, dtype=torch.long),
        truncated=torch.tensor(truncated, dtype=torch.bool),
    )
