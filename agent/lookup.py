"""Placeholder: the lookup demo environment is being written (issue 17)."""

from agent.env import Environment


class LookupEnv(Environment):
    name = "lookup"
