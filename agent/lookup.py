"""`lookup`: the small tool-using environment of the tests and the CPU demo.

A task is `ab+cd`: two keys whose values (two-digit numbers, different for every task) only the tool `get`
returns. The worked solution looks both up, one call per turn, then adds them with a written carry trace:

    user       ab+cd
    assistant  <tool_call>{"name":"get","arguments":{"k":"ab"}}</tool_call>
    tool       47
    assistant  <tool_call>{"name":"get","arguments":{"k":"cd"}}</tool_call>
    tool       85
    assistant  47+85:7+5+0=12,4+8+1=13>132

Without the tool the answer is a guess (about 1 in 180), so a model must call it, read the results and
do the arithmetic; the score is 1 for the right sum, else 0, with the share of the two keys looked up
logged as a sub-score (`looked_up`).
"""

from __future__ import annotations

import hashlib
import json
import string

from agent.env import Environment, Score, Task, ToolError

TOOL = {"type": "function", "function": {
    "name": "get", "description": "The value of a key.",
    "parameters": {"type": "object", "properties": {"k": {"type": "string", "description": "a two-letter key"}},
                   "required": ["k"]}}}

ALPHABET = string.ascii_lowercase + string.digits + "+:=,>" + '{}":_<>/' + "\n"
"""Every character a lookup conversation uses (with the chat format's own tokens)."""


def _number(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class LookupEnv(Environment):
    """`num_tasks` tasks drawn from `seed`; values differ per task, so nothing can be memorised across tasks."""

    name = "lookup"

    def __init__(self, num_tasks: int = 2000, seed: int = 0):
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be at least 1, got {num_tasks}")
        self.num_tasks = num_tasks
        self.seed = seed

    def tasks(self) -> list[Task]:
        out, seen = [], set()
        i = 0
        while len(out) < self.num_tasks:
            a, b = self._key(i, 0), self._key(i, 1)
            i += 1
            if a == b or (a, b) in seen:
                continue
            seen.add((a, b))
            values = {a: 10 + _number(self.seed, a, b, "value", 0) % 90, b: 10 + _number(self.seed, a, b, "value", 1) % 90}
            out.append(Task(id=f"{a}+{b}", messages=({"role": "user", "content": f"{a}+{b}"},), data=values))
        return out

    def _key(self, i: int, which: int) -> str:
        n = _number(self.seed, "key", i, which)
        return string.ascii_lowercase[n % 26] + string.ascii_lowercase[(n // 26) % 26]

    def tools(self, task: Task) -> list[dict]:
        return [TOOL]

    def start(self, task: Task) -> dict:
        return {"values": task.data, "looked_up": set()}

    def call(self, state: dict, name: str, arguments: dict) -> str:
        if name != "get":
            raise ToolError(f"unknown tool {name!r} (tools: get)")
        if set(arguments) != {"k"} or not isinstance(arguments["k"], str):
            raise ToolError('get takes one argument, {"k": "<key>"}')
        key = arguments["k"]
        if key not in state["values"]:
            raise ToolError(f"no key {key!r}")
        state["looked_up"].add(key)
        return str(state["values"][key])

    def score(self, task: Task, state: dict, final_text: str) -> Score:
        a, b = task.id.split("+")
        answer = final_text.rsplit(">", 1)[-1].strip()
        right = answer.isdigit() and int(answer) == task.data[a] + task.data[b]
        return Score(float(right), {"looked_up": len(state["looked_up"] & {a, b}) / 2})


def worked_solution(task: Task) -> tuple[list[str], list[str]]:
    """The assistant turns and the tool results of the demo's worked solution of `task`."""
    a, b = task.id.split("+")
    x, y = task.data[a], task.data[b]
    calls = [f"<tool_call>{json.dumps({'name': 'get', 'arguments': {'k': k}}, separators=(',', ':'))}</tool_call>"
             for k in (a, b)]
    steps, carry = [], 0
    for dx, dy in zip(reversed(str(x)), reversed(str(y))):
        value = int(dx) + int(dy) + carry
        steps.append(f"{dx}+{dy}+{carry}={value:02d}")
        carry = value // 10
    return calls + [f"{x}+{y}:" + ",".join(steps) + f">{x + y}"], [str(x), str(y)]
