"""The environments by name: `agent.env: NAME` (built in) or `module:Class` (a user's own class), and the one
place an Agent (an environment with a chat format and caps) is built: the trainer, `python -m eval --env`, the
agentic demo and `train.py --check` all come here. A new environment is one entry in `registry()`."""

from __future__ import annotations

import importlib

from agent.calls import PARSERS
from agent.deepplanning.env import TravelEnv
from agent.env import Environment
from agent.lookup import LookupEnv
from agent.rollout import Agent, Caps


class AgentError(ValueError):
    """Why an agent cannot be built, one line; `key` names the `agent:` setting at fault (env, env_args,
    tool_format), so each caller can say it in its own words (agent.env_args, --env-args)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


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
    except ValueError:  # the class refusing an option's value: its own words
        raise
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a constructor's SystemExit is a bug of the class, not a stop
        raise ValueError(f"{name} could not be built ({type(exc).__name__}{_detail(exc)})") from None


def _detail(exc: BaseException) -> str:
    text = str(exc).strip()
    return f": {text.splitlines()[0]}" if text else ""


def build_env(name: str, options: dict) -> Environment:
    """The environment `name` built with `options` and checked (env.check(): its task files, databases, ...).

    AgentError: key "env" when it cannot be built (unknown name, options it refuses), key "env_args" with the
    first problem env.check() finds.
    """
    try:
        env = load_env(name, options)
    except ValueError as exc:  # load_env's own, or the class refusing its options
        raise AgentError("env", str(exc)) from None
    try:
        problems = env.check()
    except (KeyboardInterrupt, AgentError):
        raise
    except BaseException as exc:  # as for the constructor
        raise AgentError("env_args", f"{name}: check() raised {type(exc).__name__}{_detail(exc)}") from None
    if problems:
        raise AgentError("env_args", problems[0])
    return env


def build_agent(env_name: str, env_args: dict, tokenizer, tool_format: str, caps: Caps,
                enable_thinking: bool) -> Agent:
    """The environment `env_name` (built with `env_args`, checked) with the tokenizer's chat format, the
    tool-call parser `tool_format` (agent.calls.PARSERS) and the conversation caps. AgentError (one line)
    when it cannot be built."""
    env = build_env(env_name, env_args)
    if tool_format not in PARSERS:
        raise AgentError("tool_format", f"unknown tool format {tool_format!r} (known: {', '.join(sorted(PARSERS))})")
    if not getattr(tokenizer, "chat_template", None):
        raise AgentError("env", "the tokenizer has no chat template (tool messages are rendered with it)")
    return Agent(env, tokenizer, PARSERS[tool_format], caps, enable_thinking=enable_thinking, name=env_name)
