"""The environments by name: `agent.env: NAME` (built in) or `module:Class` (a user's own class)."""

from __future__ import annotations

import importlib

from agent.deepplanning.env import TravelEnv
from agent.env import Environment
from agent.lookup import LookupEnv


def registry() -> dict[str, type]:
    """Built-in environments by name."""
    return {"lookup": LookupEnv, "deepplanning_travel": TravelEnv}


def load_env(name: str, options: dict) -> Environment:
    """The environment `name` (built in, or a user's `module:Class`) built with `options`.

    ValueError (one line) for an unknown name or options the class does not take.
    """
    known = registry()
    if name in known:
        cls = known[name]
    elif ":" in name:
        module, attr = name.split(":", 1)
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"agent.env {name!r} cannot be imported ({exc})") from None
    else:
        raise ValueError(f"unknown agent.env {name!r} (built in: {', '.join(sorted(known))}; or give module:Class)")
    try:
        return cls(**options)
    except TypeError as exc:
        raise ValueError(f"agent.env_args do not fit {name!r}: {exc}") from None
