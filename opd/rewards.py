"""Verifiable rewards of rollouts, and reward-weighted distillation weights (spec §1).

A reward is a function (response_text, gold_answer) -> bool | float. Built in:
`math` (eval.grader.grade, math-verify) and `demo` (the demo task's verifier).
Any other `module:function` path is imported, so users plug in their own.
"""

from __future__ import annotations

import importlib

import torch

BUILTIN = {"math": "eval.grader:grade", "demo": "demo.task:grade"}


def load_reward(name: str):
    target = BUILTIN.get(name, name)
    if ":" not in target:
        raise ValueError(f"unknown reward {name!r} (built in: {', '.join(BUILTIN)}; or give module:function)")
    module, func = target.split(":", 1)
    return getattr(importlib.import_module(module), func)


def reward_fn(name: str, timeout_s: float):
    """A callable (tokenizer, rollouts, answers) -> list[float] | None (None when no answers are known)."""
    grade = None

    def score(tokenizer, rollouts, answers: list[str]):
        nonlocal grade
        if not answers or not all(a != "" for a in answers):
            return None
        if grade is None:
            grade = load_reward(name)
        texts = tokenizer.batch_decode(rollouts.response_ids(), skip_special_tokens=True)
        kwargs = {"timeout_s": timeout_s} if name == "math" else {}
        return [float(grade(text, answer, **kwargs)) for text, answer in zip(texts, answers)]

    return score


def reward_weights(rewards: list[float] | None, beta: float, acc) -> torch.Tensor | None:
    """Per-rollout weights softmax(r / beta) * n over the global batch (mean 1); ones when off.

    Returns None when the caller should use ones (no reward weighting); the
    caller knows the batch size.
    """
    if rewards is None or beta <= 0:
        return None
    local = torch.tensor(rewards, dtype=torch.float64, device=acc.device)
    everyone = acc.gather(local) if acc.num_processes > 1 else local
    weights = torch.softmax(everyone / beta, dim=0) * everyone.numel()
    start = sum(acc.gather(torch.tensor([local.numel()], device=acc.device))[: acc.process_index].tolist()) \
        if acc.num_processes > 1 else 0
    return weights[start:start + local.numel()].float().cpu()
