"""Placeholder: the DeepPlanning travel environment is being written (issue 18)."""

from agent.env import Environment


class TravelEnv(Environment):
    name = "deepplanning_travel"
