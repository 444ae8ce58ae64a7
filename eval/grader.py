"""Math answer grading: the last \\boxed{} of a response against a gold answer.

`grade` is both the evaluation judge and the verifiable reward of
reward-weighted distillation, so both see the same notion of "correct":

1. `extract_answer` takes the content of the last complete `\\boxed{...}` (or
   `\\fbox{...}`) in the response. No boxed answer means wrong: the prompts
   ask for one, and a truncated response usually has none.
2. `is_equivalent` compares that string with the gold answer using
   math-verify (LaTeX parsing to SymPy, then numeric/symbolic/set/interval/
   matrix comparison; units, degree signs, `x=` prefixes and thousands
   separators are normalised away), after a cheap exact-string check.

Time limit. math-verify's own timeouts use `signal.alarm`: whole seconds, and
only in the main thread (elsewhere it raises). We switch them off and put one
deadline around the whole comparison (both parses and the verification):

- in the main thread of a POSIX process, a `SIGALRM` timer (`setitimer`, so
  sub-second limits work) raises a private `BaseException` subclass, which
  math-verify's `except Exception` blocks let through; a timer the caller had
  armed is re-armed afterwards;
- in any other thread (a reward computed in a thread pool, an evaluation on
  a background thread), the comparison runs in a persistent worker process
  (spawn start method: forking a process that holds CUDA state or threads is
  unsafe). A worker that overruns is killed and replaced on the next call.
  Callers from several threads share the one worker, one answer at a time.

Either way an answer that runs out of time counts as wrong. A signal is only
delivered between Python bytecodes, so in the main-thread path one very long
C-level call (say a huge integer power) overruns the limit until it returns;
math-verify's own timeout has the same limit.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
# Spacing and sizing commands that never change a value; dropped before string comparison.
_NOISE = re.compile(r"\\left\b|\\right\b|\\displaystyle\b|\\[,;:! ]|\s+")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")


class _Deadline(BaseException):
    """Raised by the SIGALRM handler; a BaseException so library `except Exception` does not eat it."""


class _TimeoutWarningFilter(logging.Filter):
    # math-verify warns once that its timeout is off; here that is deliberate (see module docstring).
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_TimeoutWarningFilter())


# ----------------------------------------------------------------------------
# extraction


def _braced(text: str, start: int) -> str | None:
    """Content of the brace group opening at text[start] == '{', or None if it never closes.

    Escaped braces (`\\{`, `\\}`) are literal characters, not group delimiters.
    """
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None


def extract_answer(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}` / `\\fbox{...}` in `text`, stripped.

    `\\boxed 5` (no braces) gives the token after the command. A boxed group
    that never closes (a truncated response) is skipped in favour of an
    earlier complete one. None when there is no non-empty boxed answer.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer needs a string, got {type(text).__name__}")
    for match in reversed(list(_BOXED.finditer(text))):
        i = match.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            content = _braced(text, i)
        else:
            token = re.match(r"[^\s$]+", text[i:])
            content = token.group(0) if token else None
        if content is not None and content.strip():
            return content.strip()
    return None


def normalize_answer(answer: str) -> str:
    """A canonical string for exact matching and majority voting (not a value).

    Drops spacing/sizing commands, whitespace, enclosing `$`, a trailing
    period and degree signs; `\\dfrac`/`\\tfrac` become `\\frac`. Two answers
    with the same key are certainly equal; different keys may still be equal.
    """
    s = answer.strip().strip("$").strip()
    s = _NOISE.sub("", s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return s.rstrip(".")


# ----------------------------------------------------------------------------
# comparison


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str):
    from math_verify import LatexExtractionConfig, parse  # heavy (sympy, antlr): loaded on first grade

    # The gold answer is LaTeX by construction; boxing it makes math-verify take all of it.
    return parse("\\boxed{" + gold + "}", extraction_config=[LatexExtractionConfig()], parsing_timeout=None)


def _equivalent_unbounded(answer: str, gold: str) -> bool:
    """math-verify's judgement with no time limit (call through `is_equivalent`)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify  # heavy: on first grade

    predicted = parse(
        "\\boxed{" + answer + "}",
        extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
        parsing_timeout=None,
    )
    return bool(verify(_parse_gold(gold), predicted, timeout_seconds=None))


def is_equivalent(answer: str, gold: str, timeout_s: float | None = 5.0) -> bool:
    """Whether an extracted answer equals the gold answer (both LaTeX strings, no `\\boxed`).

    Not symmetric: `gold` is the reference (math-verify treats e.g. an
    equation in the gold answer differently). `timeout_s` bounds the whole
    comparison in seconds (None = no bound); running out counts as False.
    """
    if normalize_answer(answer) == normalize_answer(gold):
        return True
    if timeout_s is None:
        try:
            return _equivalent_unbounded(answer, gold)
        except Exception:  # what math-verify does not catch itself is an unparseable answer
            return False
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive or None, got {timeout_s}")
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        return _with_alarm(answer, gold, timeout_s)
    return _in_worker(answer, gold, timeout_s)


def grade(response_text: str, gold_answer: str, timeout_s: float | None = 5.0) -> bool:
    """True when the last boxed answer of `response_text` equals `gold_answer`.

    `gold_answer` is the bare answer (e.g. `\\frac{1}{2}`, `(3, \\pi/2)`, `204`).
    `timeout_s` (seconds) bounds the comparison; see the module docstring for
    how the limit is enforced in the main thread and elsewhere.
    """
    answer = extract_answer(response_text)
    if answer is None:
        return False
    return is_equivalent(answer, str(gold_answer), timeout_s)


def grade_string_match(response_text: str, gold_answer: str) -> bool:
    """A normalised exact string match: the last boxed answer and the gold answer have the same
    `normalize_answer` key. No math-verify, so `0.5` and `\\frac{1}{2}` differ.

    A stand-in for the reference implementation's string-match grading (not a copy of it), for
    telling grader differences from model differences (scripts/paper/upstream_diff.py --regrade).
    """
    answer = extract_answer(response_text)
    return answer is not None and normalize_answer(answer) == normalize_answer(str(gold_answer))


# ----------------------------------------------------------------------------
# time limits


def _raise_deadline(signum, frame):
    raise _Deadline()


def _with_alarm(answer: str, gold: str, timeout_s: float) -> bool:
    started = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, _raise_deadline)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        try:
            return _equivalent_unbounded(answer, gold)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Deadline:
        return False
    except Exception:  # what math-verify does not catch itself is an unparseable answer
        return False
    finally:
        # None: the old handler was installed outside Python; the default is the best we can restore.
        signal.signal(signal.SIGALRM, old_handler if old_handler is not None else signal.SIG_DFL)
        if old_delay > 0:
            remaining = max(old_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, old_interval)


_worker_lock = threading.Lock()
_worker = None  # (process, queue of its reply lines), started on first use
_WORKER_START_LIMIT_S = 120.0  # importing SymPy on a loaded machine; not billed to any answer


def serve_worker() -> None:
    """The grading worker's loop: one JSON [answer, gold] per stdin line, one JSON reply per stdout line.

    Replies are ["ok", bool] or ["error", text]. Anything else that writes to
    stdout (a stray print deep in a library) is sent to stderr instead, so it
    cannot corrupt the protocol.
    """
    import math_verify  # noqa: F401  heavy; imported before "ready" so start-up is not billed to an answer

    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    replies.write('"ready"\n')
    for line in sys.stdin:
        answer, gold = json.loads(line)
        try:
            reply = ["ok", _equivalent_unbounded(answer, gold)]
        except Exception as exc:  # an unparseable answer is wrong, not a crash
            reply = ["error", f"{type(exc).__name__}: {exc}"]
        replies.write(json.dumps(reply) + "\n")


def _start_worker():
    # A plain subprocess rather than multiprocessing: the spawn/forkserver start
    # methods re-import the caller's __main__ (a training script without a
    # __main__ guard would start again), and fork is unsafe once CUDA or
    # threads are running.
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from eval.grader import serve_worker; serve_worker()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env, cwd=root,
    )
    lines: queue.Queue = queue.Queue()

    def pump():  # a thread, so waiting for a reply can time out on any platform
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True, name="eval-grader-reader").start()
    try:
        ready = lines.get(timeout=_WORKER_START_LIMIT_S)
    except queue.Empty:
        ready = None
    if ready is None or ready.strip() != '"ready"':
        proc.kill()
        raise RuntimeError(
            f"the grading worker process ({sys.executable}) did not start within {_WORKER_START_LIMIT_S:.0f} s"
        )
    return proc, lines


def _stop_worker() -> None:
    global _worker
    if _worker is not None:
        proc, _ = _worker
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        _worker = None


def _in_worker(answer: str, gold: str, timeout_s: float) -> bool:
    global _worker
    with _worker_lock:
        if _worker is None or _worker[0].poll() is not None:
            _stop_worker()
            _worker = _start_worker()
            atexit.register(_stop_worker)
        proc, lines = _worker
        try:
            proc.stdin.write(json.dumps([answer, gold]) + "\n")
            proc.stdin.flush()
            line = lines.get(timeout=timeout_s)
            if line is not None:
                status, value = json.loads(line)
                return status == "ok" and bool(value)
        except (OSError, queue.Empty, ValueError):
            pass
        # Overran (or died): the worker may be stuck inside SymPy, so replace it.
        _stop_worker()
        return False
