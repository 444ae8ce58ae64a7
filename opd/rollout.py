"""Student rollouts: sample responses to prompts with HF `generate`.

`sample` is the one function the loop (and evaluation) calls; a faster engine
(vLLM, SGLang) can replace it as long as it returns the same `Rollouts`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig


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
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 256,
    n: int = 1,
    batch_size: int = 0,
    seed: int = 0,
    synced_gpus: bool = False,
) -> Rollouts:
    """Sample `n` responses per prompt (prompts given as token id lists).

    The draw is fixed by `seed` alone (the global RNG is left untouched), so
    the same seed reproduces the same rollouts on the same device.
    """
    device = next(model.parameters()).device
    eos = _eos_list(eos_token_id)
    rows = [p for p in prompts for _ in range(n)]
    index = [i for i in range(len(prompts)) for _ in range(n)]
    batch_size = batch_size * n if batch_size else len(rows)
    gen_cfg = GenerationConfig(
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=top_p if temperature > 0 else None,
        top_k=top_k if temperature > 0 else None,
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
                out = model.generate(
                    input_ids=ids.to(device), attention_mask=att.to(device),
                    generation_config=gen_cfg, synced_gpus=synced_gpus,
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
