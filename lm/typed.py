"""Typed settings from plain dicts: the one coercion and range-check system of the project.

A settings section is a dataclass whose fields carry their help text and range
in `metadata` ("help", "min", "max", "min_exclusive"; "nonfinite": True for a
float that may be NaN or infinite, which no other float may be; "pattern" and
"pattern_help" for a string that must match a regular expression; "choices" for
a string that must be a key of a registry, a dict read at check time, so names
registered later count). Every integer must fit in 64 bits; a setting that sizes
memory or threads also has a "max" no real run reaches, named in its help text
("at most 1,048,576"), so a slip of the keyboard is refused at --check, not met as
a MemoryError or an overflow once the run starts. `apply` fills one from a
dict (YAML, command line) and reports every problem as one line that names the
key and where its value came from; a `dict[str, Section]` field holds named
sections of one kind, each filled from its own defaults. `opd.config` builds the run config with it;
`demo.prepare` validates its own command line with it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Literal

import yaml


INT64 = (-2**63, 2**63 - 1)  # every integer setting lies in this range, whatever its own bounds


class ConfigError(Exception):
    """One or more configuration problems; `problems` holds one line each."""

    def __init__(self, problems: list[str], config: Any = None):
        self.problems = list(problems)
        self.config = config  # what could be built with the valid keys applied (None when nothing could)
        super().__init__("\n".join(self.problems))


def where(key: str, origin: dict[str, str]) -> str:
    return origin.get(key, "defaults")


def parse_value(raw: str) -> Any:
    """A command-line value read as a YAML scalar or list (`1e-3`, `true`, `[a, b]`); the text itself otherwise."""
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def apply(obj: Any, data: dict, prefix: str, origin: dict[str, str], problems: list[str]) -> None:
    """Set `data` onto the dataclass `obj` (nested dataclasses recursively), checking types and ranges.

    Every problem is appended to `problems` as one line naming the key and where it came from
    (`origin[key]`: a file, "command line", or "defaults" when absent).
    """
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            problems.append(f"{where(name, origin)}: unknown config key `{name}` (known here: {known})")
            continue
        hint = hints[key]
        if _section_map(hint):
            setattr(obj, key, apply_map(typing.get_args(hint)[1], value, name, origin, problems))
            continue
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                problems.append(f"{where(name, origin)}: `{name}` must be a mapping of keys")
                continue
            apply(getattr(obj, key), value, name + ".", origin, problems)
            continue
        try:
            setattr(obj, key, coerce(value, hint))
        except ValueError as exc:
            problems.append(f"{where(name, origin)}: `{name}` {exc}")
            continue
        meta = fields[key].metadata
        current = getattr(obj, key)
        for problem in check_value(current, meta):
            problems.append(f"{where(name, origin)}: `{name}` = {current!r} {problem}")


def _section_map(hint) -> bool:
    """`dict[str, Section]`: named sections of one kind (teacher.routes)."""
    args = typing.get_args(hint)
    return typing.get_origin(hint) is dict and len(args) == 2 and dataclasses.is_dataclass(args[1])


def apply_map(section: type, data: Any, name: str, origin: dict[str, str], problems: list[str]) -> dict:
    """A mapping of names to sections of type `section`, each built from its defaults and then `data[name]`."""
    if not isinstance(data, dict):
        problems.append(f"{where(name, origin)}: `{name}` must be a mapping of names to sections")
        return {}
    out = {}
    for key, value in data.items():
        inner = f"{name}.{key}"
        if not isinstance(key, str) or not key:
            problems.append(f"{where(name, origin)}: `{name}` names must be non-empty strings, got {key!r}")
        elif not isinstance(value, dict):
            problems.append(f"{where(inner, origin)}: `{inner}` must be a mapping of keys")
        else:
            out[key] = section()
            apply(out[key], value, inner + ".", origin, problems)
    return out


def check_value(current: Any, meta) -> list[str]:
    """What is wrong with a coerced value given its field's metadata (finite, range, pattern, choices)."""
    floats = current if isinstance(current, list) else [current]
    if not meta.get("nonfinite") and any(isinstance(v, float) and not math.isfinite(v) for v in floats):
        return ["is not a finite number"]
    if isinstance(current, str) and "pattern" in meta and not re.fullmatch(meta["pattern"], current):
        return [meta.get("pattern_help", f"does not match {meta['pattern']}")]
    if "choices" in meta and current not in meta["choices"]:  # a live registry (dict of names), read now
        return [f"is not one of: {', '.join(meta['choices'])}"]
    problems = []
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        if "min" in meta and current < meta["min"]:
            problems.append(f"is below the minimum {meta['min']}")
        if "max" in meta and current > meta["max"]:
            problems.append(f"is above the maximum {meta['max']}")
        if "min_exclusive" in meta and current <= meta["min_exclusive"]:
            problems.append(f"must be greater than {meta['min_exclusive']}")
    ints = [v for v in floats if isinstance(v, int) and not isinstance(v, bool)]
    if not problems and any(not INT64[0] <= v <= INT64[1] for v in ints):  # torch and numpy take no more
        problems.append("does not fit in a 64-bit integer")
    return problems


def coerce(value: Any, hint: Any) -> Any:
    """`value` as type `hint` (Literal, list, dict, bool, int, float, str); ValueError says why not."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            shown = ", ".join(repr(a) if a == "" else str(a) for a in allowed)
            raise ValueError(f"= {value!r} is not one of: {shown}")
        return value
    if origin in (list, typing.List):
        (inner,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"must be a list, got {value!r}")
        return [coerce(v, inner) for v in value]
    if hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads `1e-6` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"must be a string, got {value!r}")
        return "" if value is None else str(value)
    if isinstance(hint, types.UnionType):
        raise ValueError("has an unsupported type")
    return value
