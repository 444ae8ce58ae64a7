"""Agentic OPD in the loop (SPEC §6): the rollout source (opd.sources.RolloutSource) whose prompts are the
environment's tasks, whose rollouts are the student's conversations and whose rewards are the environment's
scores. Everything after the rollout (teacher side, statistics, selection, loss) is the single-turn loop's,
run on the conversation with `response_mask` on the student's tokens only. The agent itself is built by
agent.registry.build_agent; nothing here knows an environment by name.

The train/held-out split is by task id, seeded by `agent.split_seed` (not the training seed, so every
method and seed sees the same split), and written to <run>/split.json; a resumed run must find the same.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from accelerate import Accelerator

from agent.env import Task
from agent.evaluate import AgentBenchmark
from agent.registry import AgentError, build_agent, build_env
from agent.rollout import Agent, Caps, metrics as conversation_metrics
from lm.engines import Sampling
from lm.rollout import Rollouts
from opd.config import Config
from opd.data import Prompt
from opd.distributed import gather_fn, global_sum
from opd.errors import RunError, first_line, loading
from opd.tracking import writing


class AgentSource:
    """Rollouts from an environment (agent.env): its training tasks as prompts (Prompt.source = task id), the
    held-out tasks as the `heldout` AgentBenchmark, conversations as rollouts, scores in [0, 1] as rewards."""

    best_of_k = True  # fractional scores: the summary shows Best@k beside Avg@k

    def __init__(self, agent: Agent, prompts: list[Prompt], heldout: AgentBenchmark | None, tasks: dict[str, Task],
                 response_budget: int, acc: Accelerator):
        self.agent, self.prompts, self.heldout, self.tasks = agent, prompts, heldout, tasks
        self.response_budget = response_budget  # tokens after the opening prompt, the whole conversation
        self.acc = acc

    @classmethod
    def build(cls, cfg: Config, tokenizer, run_dir: Path, acc: Accelerator) -> AgentSource:
        """The agent, the seeded train/held-out split (written to <run>/split.json) and the training prompts."""
        with loading("agent.env", cfg.agent.env):
            agent = configured_agent(cfg, tokenizer)
            prompts, heldout, tasks, line = agent_prompts(agent, cfg, run_dir, acc.is_main_process)
        acc.print(f"tasks: {line}")
        return cls(agent, prompts, heldout, tasks, cfg.agent.max_response_tokens, acc)

    @staticmethod
    def check(cfg: Config, notes: list | None = None, deep: bool = False) -> list[str]:
        """agent.env builds with its agent.env_args and the environment finds its files (env.check(): task file,
        databases, ...); `deep` also reads its tasks, and `notes` receives their count."""
        try:
            env = build_env(cfg.agent.env, cfg.agent.env_args)
            if deep and notes is not None:
                tasks = len(env.tasks())
                notes.append(f"agent: {cfg.agent.env}: {tasks} tasks, {round(cfg.agent.heldout_ratio * tasks)} held out")
        except AgentError as exc:
            return [f"agent.{exc.key}: {exc}"]
        except Exception as exc:  # a file that is there but unreadable (bad JSON, a missing field): one line
            return [f"agent.env_args: {cfg.agent.env} cannot read its files ({type(exc).__name__}: {first_line(exc)})"]
        return []

    def rollout(self, engine, prompts: list[Prompt], seeds: list[int],
                sampling: Sampling) -> tuple[Rollouts, list[float], dict]:
        """The student's conversations on this process's tasks (sampling.n per task): rollouts, each one's score,
        agent/... metrics (over every process's conversations)."""
        acc = self.acc
        gather = gather_fn(acc)
        any_live = (lambda live: any(any(part) for part in gather([live]))) if gather is not None else None
        out = self.agent.run(engine, [self.tasks[p.source] for p in prompts], seeds, sampling.n, sampling, any_live)
        return out.rollouts, out.scores(), rollout_metrics(out.conversations, acc)


def configured_agent(cfg: Config, tokenizer) -> Agent:
    """The configured environment with the run's chat format and caps; RunError (one line, its key) when it
    cannot be built."""
    ac = cfg.agent
    caps = Caps(max_turns=ac.max_turns, max_response_tokens=ac.max_response_tokens,
                max_tool_response_tokens=ac.max_tool_response_tokens, tool_timeout_s=ac.tool_timeout_s)
    try:
        return build_agent(ac.env, ac.env_args, tokenizer, ac.tool_format, caps, cfg.data.enable_thinking)
    except AgentError as exc:
        raise RunError(f"agent.{exc.key}: {exc}") from None


def split_tasks(tasks: list[Task], ratio: float, seed: int) -> tuple[list[Task], list[Task]]:
    """(train, held out): a task is held out when the hash of (seed, its id) falls in the first `ratio`;
    the held-out count is round(ratio x tasks), the tasks with the smallest hashes."""
    ids = [t.id for t in tasks]
    if len(set(ids)) != len(ids):
        raise RunError("agent.env: task ids are not unique; the held-out split needs unique ids")
    rank = sorted(tasks, key=lambda t: hashlib.sha256(f"{seed}:{t.id}".encode()).hexdigest())
    n_held = round(ratio * len(tasks))
    held = {t.id for t in rank[:n_held]}
    return [t for t in tasks if t.id not in held], [t for t in tasks if t.id in held]


def record_split(run_dir: Path, cfg: Config, train: list[Task], heldout: list[Task], main: bool) -> None:
    """<run>/split.json: the environment, the seed and both id lists; a resumed run must reproduce it."""
    split = {"env": cfg.agent.env, "split_seed": cfg.agent.split_seed, "heldout_ratio": cfg.agent.heldout_ratio,
             "train": [t.id for t in train], "heldout": [t.id for t in heldout]}
    path = run_dir / "split.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            saved = None
        if saved != split:
            raise RunError(f"{path} holds another train/held-out split than this config and environment give; "
                           "the tasks or agent.split_seed changed (use a new train.run_name)")
        return
    if main:
        with writing(path):
            path.write_text(json.dumps(split, indent=1) + "\n")


def agent_prompts(agent: Agent, cfg: Config, run_dir: Path, main: bool):
    """(training prompts, held-out benchmark or None, tasks by id, a summary line)."""
    tasks = agent.env.tasks()
    if not tasks:
        raise RunError(f"agent.env: {cfg.agent.env} holds no tasks")
    train, heldout = split_tasks(tasks, cfg.agent.heldout_ratio, cfg.agent.split_seed)
    limit, long = cfg.data.max_prompt_length, []
    prompts = []
    for task in train:
        ids = agent.prompt(task)
        if len(ids) > limit:
            long.append(task.id)
            continue
        prompts.append(Prompt(ids=ids, answer="", source=task.id, data_source=cfg.agent.env))
    if long and cfg.data.long_prompts == "error":
        raise RunError(f"agent task {long[0]}: its opening prompt is over data.max_prompt_length={limit} tokens")
    if not prompts:
        raise RunError(f"agent.env: no training task left (of {len(train)}; {len(long)} over data.max_prompt_length)")
    record_split(run_dir, cfg, train, heldout, main)
    shown = heldout[:cfg.agent.eval_tasks] if cfg.agent.eval_tasks else heldout
    bench = AgentBenchmark("heldout", agent, shown) if shown and cfg.eval.heldout else None
    line = (f"{cfg.agent.env}: {len(tasks)} tasks, {len(train)} for training ({len(long)} skipped: prompt over "
            f"data.max_prompt_length), {len(heldout)} held out (split.json)")
    return prompts, bench, {t.id: t for t in tasks}, line


def rollout_metrics(conversations: list, acc: Accelerator) -> dict:
    """agent/... metrics of the step's conversations, over every process's."""
    gather = gather_fn(acc)
    local = conversation_metrics(conversations)
    total = {k: global_sum(acc, v) for k, v in local.items() if k != "agent/turns_max"}
    n = max(total.pop("agent/conversations"), 1.0)
    turns_max = max(max(part) for part in gather([local["agent/turns_max"]])) if gather else local["agent/turns_max"]
    parts = {}
    for name in sorted({k for c in conversations for k in c.score.parts}):
        parts[f"agent/score/{name}"] = global_sum(acc, sum(c.score.parts.get(name, 0.0) for c in conversations)) / n
    return {
        "agent/turns_mean": total.pop("agent/turns_sum") / n, "agent/turns_max": turns_max,
        "agent/score_mean": total.pop("agent/score_sum") / n, **total, **parts,
    }
