"""Tool calls in the model's own format, parsed from an assistant turn's text; one parser per chat format.

    parse(text) -> list[Call]   every tool call of the turn, in order; a call that cannot be read is a
                                Call with `error` set (shown to the model as a tool error, counted)

`hermes` is Qwen3's (and Hermes / Qwen2.5's) format: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
possibly several per turn. A new format (Llama 3's JSON calls, ...) is a function added to PARSERS.
Text inside a thinking block is not parsed: a call the model only thought about is not made.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field


@dataclass
class Call:
    name: str = ""
    arguments: dict = field(default_factory=dict)
    error: str = ""  # why the call could not be read ("" = a well-formed call)


_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def hermes(text: str) -> list[Call]:
    """`<tool_call>{json}</tool_call>` blocks (an unclosed last block is read to the end of the turn)."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    calls = []
    for body in _HERMES.findall(text):
        try:
            obj = json.loads(body.strip())
        except json.JSONDecodeError as exc:
            calls.append(Call(error=f"the tool call is not valid JSON ({exc.msg} at character {exc.pos})"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append(Call(error='a tool call must be a JSON object {"name": ..., "arguments": {...}}'))
            continue
        args = obj.get("arguments", {})
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        if not isinstance(args, dict):
            calls.append(Call(name=obj["name"], error="the tool call's arguments must be a JSON object"))
            continue
        calls.append(Call(name=obj["name"], arguments=args))
    return calls


PARSERS = {"hermes": hermes}
"""Chat format -> parser (`agent.tool_format`)."""
