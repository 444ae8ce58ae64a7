"""The demo task: multi-digit times one-digit multiplication with a written carry trace.

A problem is `4738*7`; the worked solution multiplies digit by digit from the
right, writing each partial product with the incoming carry, then the answer:

    8*7+0=56,3*7+5=26,7*7+2=51,4*7+5=33>33166

Why this task: every answer is checkable exactly, and each solution is a chain of
small steps where one wrong carry silently corrupts the rest, so the student's
mistakes are concentrated on a few decisive tokens (the carries and the digits after
them), which is what token selection is about. Its size fits a CPU: a 0.53M-parameter
teacher (2 layers x 128) learns it to ~99% in 600 supervised steps (about a minute on
2 cores), while a 0.13M-parameter student (2 x 64) stopped after 280 steps answers
only ~10-20% correctly (20% on this commit; the early stop meets float rounding that varies with the machine), confidently (low entropy on most tokens), and has the capacity
to learn the rest. The trace makes the steps local: each step needs one digit of the
problem, the multiplier and the previous carry, which small models learn reliably.
"""

from __future__ import annotations

import hashlib
import random

from lm.tokenizers import char_tokenizer

NAME = "multiplication"
"""`data.train_path: demo:multiplication` names this task."""

DIGITS = 4
"""Digits of the multiplicand; the multiplier is one digit in 2..9."""

ALPHABET = "0123456789*+=,>"
"""Every character a prompt or a worked solution uses."""

ANSWER_MARK = ">"
"""Separates the worked steps from the final answer."""

EVAL_SHARE = 10
"""One problem in EVAL_SHARE (by hash of its text) is held out for evaluation."""


def solution(a: int, b: int) -> str:
    """The worked solution of `a*b`: one `digit*b+carry=product` step per digit, then `>answer`."""
    steps, carry = [], 0
    for digit in reversed(str(a)):
        value = int(digit) * b + carry
        # two digits always, so the carry is the first character of every product
        steps.append(f"{digit}*{b}+{carry}={value:02d}")
        carry = value // 10
    return ",".join(steps) + ANSWER_MARK + str(a * b)


def _is_eval(prompt: str) -> bool:
    """Hash split: the same problem text always lands on the same side, whatever the seed."""
    return int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % EVAL_SHARE == 0


def _draw(rng: random.Random, digits: int) -> tuple[int, int]:
    return rng.randrange(10 ** (digits - 1), 10 ** digits), rng.randrange(2, 10)


def _check_digits(digits: int) -> None:
    if not isinstance(digits, int) or not 2 <= digits <= 12:
        raise ValueError(f"digits must be an integer in 2..12, got {digits!r}")


def train_records(n: int, seed: int, *, digits: int = DIGITS) -> list[dict]:
    """`n` training problems (keys prompt, answer, solution), drawn with replacement.

    Never an evaluation problem: those are removed by the hash split of `eval_problems`.
    """
    _check_digits(digits)
    rng = random.Random(f"train-{digits}-{seed}")
    records = []
    while len(records) < n:
        a, b = _draw(rng, digits)
        prompt = f"{a}*{b}"
        if _is_eval(prompt):
            continue
        records.append({"prompt": prompt, "answer": str(a * b), "solution": solution(a, b)})
    return records


def eval_problems(n: int, seed: int, *, digits: int = DIGITS) -> list[dict]:
    """`n` distinct held-out problems (keys id, prompt, answer), disjoint from every `train_records`."""
    _check_digits(digits)
    pool = 9 * 10 ** (digits - 1) * 8
    if n > pool // EVAL_SHARE // 2:
        raise ValueError(f"eval_problems: n = {n} is too many for {digits}-digit problems (at most {pool // EVAL_SHARE // 2})")
    rng = random.Random(f"eval-{digits}-{seed}")
    seen: set[str] = set()
    problems = []
    while len(problems) < n:
        a, b = _draw(rng, digits)
        prompt = f"{a}*{b}"
        if prompt in seen or not _is_eval(prompt):
            continue
        seen.add(prompt)
        problems.append({"id": prompt, "prompt": prompt, "answer": str(a * b)})
    return problems


def extract_answer(response_text: str) -> str | None:
    """The final answer of a response: the digits after its last `>`, or None.

    Decoding may leave special tokens (`<eos>`, `<|end|>`) in the text; everything
    from the first `<` on is ignored, since the task alphabet has no `<`.
    """
    if not isinstance(response_text, str):
        return None
    text = response_text.split("<", 1)[0]
    if ANSWER_MARK not in text:
        return None
    answer = text.rsplit(ANSWER_MARK, 1)[1].strip()
    return answer if answer.isdigit() and answer.isascii() else None


def grade(response_text: str, answer: str) -> bool:
    """True when the response's final answer equals `answer` (as an integer); never raises."""
    got = extract_answer(response_text)
    try:
        return got is not None and int(got) == int(str(answer).strip())
    except ValueError:
        return False


def tokenizer():
    """The character tokenizer of the task (pad=0, eos=1, role markers, then ALPHABET)."""
    return char_tokenizer(ALPHABET)
