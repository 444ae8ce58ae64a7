"""The environment interface (the registry of environments is agent.registry).

An environment is a plain Python class:

    env = Env(**options)            options: the `agent.env_args` mapping of the config
    env.tasks() -> list[Task]       every task it holds (the trainer splits them, seeded, by task id)
    env.tools(task) -> list[dict]   the task's tools as OpenAI function schemas (rendered by the chat template)
    env.start(task) -> state        a fresh, isolated state for one conversation on the task
    env.call(state, name, arguments) -> str
                                    runs one tool call and returns what the model reads (a string); raises
                                    ToolError for a bad call (unknown tool, wrong arguments, failed lookup):
                                    its message is what the model reads
    env.score(task, state, final_text) -> Score
                                    the final answer (the last assistant turn's text, thinking removed)
                                    scored: a finite number in [0, 1], with any sub-scores (finite numbers) to log
    env.check() -> list[str]        problems found before a run starts (missing files), one line each

A tool bug never ends a run. A call that raises anything else (SystemExit and KeyboardInterrupt raised by the
tool included), returns anything but a string (None, a number, a dict: no conversion), or has not returned
after `agent.tool_timeout_s` seconds is shown to the model as `Error: tool ... failed / returned NoneType, not
a string / did not return within ...`, counted in agent/tool_errors, and said once on stderr as a
`warning:` line naming the environment. Each call runs on a fresh daemon thread: a hung call is abandoned,
not killed (it may still change its conversation's state if it ever returns), and an environment must not
rely on objects bound to one thread (an sqlite3 connection made in start()). A real Ctrl-C still stops the run.

A score() that raises, or returns anything but a Score with a finite value in [0, 1] and finite parts (NaN,
inf, 1.5, None), scores that conversation 0 with no parts, counted in agent/score_errors, with one `warning:`
line: an invalid score is never used as a reward (a NaN reward would skip every reward-weighted update).
A constructor that raises anything (ValueError, RuntimeError, SystemExit, ...) is one `error:` line naming the
environment and its exception. `Task.messages` are the opening messages (system and user); the tools are
handed to the chat template separately.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ToolError(Exception):
    """A tool call the environment refuses; str(exc) is the message the model is shown."""


@dataclass(frozen=True)
class Task:
    id: str
    messages: tuple[dict, ...]  # the opening messages: {"role": "system"|"user", "content": str}
    data: Any = None  # the environment's own description of the task


@dataclass
class Score:
    value: float  # in [0, 1]
    parts: dict[str, float] = field(default_factory=dict)  # sub-scores, logged as agent/score/<name>


class Environment:
    """Base class with the defaults an environment may keep."""

    name = "environment"

    def tasks(self) -> list[Task]:
        raise NotImplementedError

    def tools(self, task: Task) -> list[dict]:
        return []

    def start(self, task: Task) -> Any:
        return {}

    def call(self, state: Any, name: str, arguments: dict) -> str:
        raise ToolError(f"unknown tool {name!r}")

    def score(self, task: Task, state: Any, final_text: str) -> Score:
        raise NotImplementedError

    def check(self) -> list[str]:
        return []


def final_text(text: str) -> str:
    """An assistant turn's answer: its text after any thinking block, stripped."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    return text.strip()
