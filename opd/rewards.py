"""Verifiable rewards of rollouts, and reward-weighted distillation weights (spec §1).

A reward is a function (response_text, gold_answer) -> bool | float. Built in:
`math` (eval.grader.grade, math-verify) and `demo` (the demo task's verifier).
Any other `module:function` path is imported, so users plug in their own.
"""

from __future__ import annotations

import importlib

import torch

from demo import task as demo_task
from eval import grader
from opd.errors import first_line

BUILTIN = {"math": grader.grade, "demo": demo_task.grade}


def load_reward(name: str):
    """A built-in reward by name, or a user's `module:function` (a config naming one runs that module's code)."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ValueError(f"unknown reward {name!r} (built in: {', '.join(BUILTIN)}; or give module:function)")
    module, func = name.split(":", 1)
    return getattr(importlib.import_module(module), func)


def check_reward(name: str) -> list[str]:
    """opd.reward names a built-in or an importable module:function; importing runs that module's code,
    which is what the run would do at its first graded rollout anyway (a config naming one is code)."""
    module, _, func = name.partition(":")
    try:
        reward = load_reward(name)
    except ValueError as exc:
        return [f"opd.reward: {exc}"]
    except AttributeError:
        return [f"opd.reward: module {module} has no function {func}"]
    except Exception as exc:  # ImportError, or whatever importing the module raised
        return [f"opd.reward: cannot import module {module} ({type(exc).__name__}: {first_line(exc)})"]
    if not callable(reward):
        return [f"opd.reward: {name} is not a function"]
    return []


def benchmark_grader(name: str):
    """The reward as an evaluation grader: grade(response_text, answer, timeout_s) -> bool, and its answer extractor."""
    grade = load_reward(name)
    if name == "math":
        return (lambda text, answer, timeout_s: bool(grade(text, answer, timeout_s=timeout_s))), grader.extract_answer
    extract = demo_task.extract_answer if name == "demo" else (lambda text: text.strip() or None)
    return (lambda text, answer, timeout_s: bool(grade(text, answer))), extract


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
