"""A user environment that misbehaves on purpose (for tests/reliability/test_third_round_agent.py).

`agent.env: misbehaving_env:Misbehaving` with `agent.env_args: {fault: NAME}` is the `lookup` environment
with one fault:

  system_exit   the tool raises SystemExit(0) (a library calling sys.exit inside the tool)
  none_result   the tool returns None
  int_result    the tool returns an int
  hang          the tool never returns (sleeps until the process ends)
  score_raises  score() raises RuntimeError
  score_nan     score() returns Score(nan)
  score_inf     score() returns Score(inf)
  score_none    score() returns None
  init_raises   the constructor raises RuntimeError (not TypeError: the options fit)
  init_exit     the constructor raises SystemExit(3)

The module is imported by name: pytest puts its folder on sys.path (a subprocess needs it on PYTHONPATH).
"""

from __future__ import annotations

import math
import sys
import time

from agent.env import Score
from agent.lookup import LookupEnv

FAULTS = ("", "system_exit", "none_result", "int_result", "hang", "score_raises", "score_nan", "score_inf",
          "score_none", "init_raises", "init_exit")


class Misbehaving(LookupEnv):
    name = "misbehaving"

    def __init__(self, fault: str = "", num_tasks: int = 40, seed: int = 0):
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}")
        if fault == "init_raises":
            raise RuntimeError("the catalogue server is down")
        if fault == "init_exit":
            sys.exit(3)
        super().__init__(num_tasks=num_tasks, seed=seed)
        self.fault = fault

    def call(self, state, name, arguments):
        if self.fault == "system_exit":
            sys.exit(0)
        if self.fault == "hang":
            while True:
                time.sleep(60)
        result = super().call(state, name, arguments)
        if self.fault == "none_result":
            return None
        if self.fault == "int_result":
            return int(result)
        return result

    def score(self, task, state, final_text):
        if self.fault == "score_raises":
            raise RuntimeError("the grader crashed")
        if self.fault == "score_nan":
            return Score(math.nan)
        if self.fault == "score_inf":
            return Score(math.inf)
        if self.fault == "score_none":
            return None
        return super().score(task, state, final_text)
