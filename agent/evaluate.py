"""Agents on held-out tasks: k conversations per task, scored by the environment (fractional scores).

`AgentBenchmark` is what `eval.runner.evaluate` runs beside the math benchmarks; it returns one record per
task with its k samples, and eval.metrics turns them into Avg@k (mean score over samples and tasks) and
Best@k (mean over tasks of the best of the k scores).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from agent.env import Task
from agent.rollout import Agent
from lm.engines import Sampling


@dataclass
class AgentBenchmark:
    name: str
    agent: Agent
    tasks: list[Task]

    def run(self, engine, k: int, sampling: Sampling, seed: int, rank: int, world: int, any_live=None) -> list[dict]:
        """This process's share of the tasks (rank, rank + world, ...), k conversations each."""
        mine = list(range(rank, len(self.tasks), world))
        tasks = [self.tasks[i] for i in mine]
        # seeded by (seed, benchmark, task): the same samples whatever the process count
        seeds = [zlib.crc32(f"{seed}/{self.name}/{t.id}".encode()) for t in tasks]
        out = self.agent.run(engine, tasks, seeds, k, sampling, any_live)
        tok = self.agent.tokenizer
        results = []
        for t, (i, task) in enumerate(zip(mine, tasks)):
            convs = out.conversations[t * k:(t + 1) * k]
            results.append({"index": i, "id": task.id, "answer": "", "samples": [{
                "sample": j,
                "score": c.score.value,
                "parts": c.score.parts,
                "conversation": tok.decode(c.ids[c.prompt_length:]),
                "response": c.last_text,
                "length": sum(c.student),
                "truncated": c.capped,
                "turns": c.turns,
                "tool_calls": c.tool_calls,
                "tool_errors": c.tool_errors,
                "score_error": c.score_error,
            } for j, c in enumerate(convs)]})
        return results
