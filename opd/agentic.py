"""Agentic OPD in the loop (SPEC §6): the environment's tasks are the prompts, the student's conversations the
rollouts. Everything after the rollout (teacher side, statistics, selection, loss) is the single-turn loop's,
run on the conversation with `response_mask` on the student's tokens only.

The train/held-out split is by task id, seeded by `agent.split_seed` (not the training seed, so every
method and seed sees the same split), and written to <run>/split.json; a resumed run must find the same.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from agent.calls import PARSERS
from agent.env import Task
from agent.evaluate import AgentBenchmark
from agent.registry import load_env
from agent.rollout import Agent, Caps, metrics as conversation_metrics
from lm.rollout import Rollouts
from opd.config import Config
from opd.data import Prompt
from opd.distributed import gather_fn, global_sum
from opd.errors import RunError
from opd.tracking import writing


def build_agent(cfg: Config, tokenizer) -> Agent:
    """The configured environment with the run's chat format and caps; RunError (one line) when it cannot be built."""
    ac = cfg.agent
    try:
        env = load_env(ac.env, ac.env_args)
    except ValueError as exc:
        raise RunError(f"agent.env: {exc}") from None
    problems = env.check()
    if problems:
        raise RunError(f"agent.env_args: {problems[0]}")
    caps = Caps(max_turns=ac.max_turns, max_response_tokens=ac.max_response_tokens,
                max_tool_response_tokens=ac.max_tool_response_tokens)
    if not getattr(tokenizer, "chat_template", None):
        raise RunError("agent.env: the tokenizer has no chat template (tool messages are rendered with it)")
    return Agent(env, tokenizer, PARSERS[ac.tool_format], caps, enable_thinking=cfg.data.enable_thinking)


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
        prompts.append(Prompt(ids=ids, answer="", source=task.id))
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


def agent_rollout(run, prompts: list[Prompt], seeds: list[int]) -> tuple[Rollouts, list[float], dict]:
    """The student's conversations on this process's tasks: rollouts, each one's score, agent/... metrics
    (over every process's conversations)."""
    acc = run.accelerator
    gather = gather_fn(acc)
    any_live = (lambda live: any(any(part) for part in gather([live]))) if gather is not None else None
    out = run.agent.run(run.engine, [run.tasks[p.source] for p in prompts], seeds, run.cfg.rollout.n, run.sampling,
                        any_live)
    local = conversation_metrics(out.conversations)
    total = {k: global_sum(acc, v) for k, v in local.items() if k != "agent/turns_max"}
    n = max(total.pop("agent/conversations"), 1.0)
    turns_max = max(max(part) for part in gather([local["agent/turns_max"]])) if gather else local["agent/turns_max"]
    parts = {}
    for name in sorted({k for c in out.conversations for k in c.score.parts}):
        parts[f"agent/score/{name}"] = global_sum(acc, sum(c.score.parts.get(name, 0.0) for c in out.conversations)) / n
    metrics = {
        "agent/turns_mean": total.pop("agent/turns_sum") / n, "agent/turns_max": turns_max,
        "agent/score_mean": total.pop("agent/score_sum") / n, **total, **parts,
    }
    return out.rollouts, out.scores(), metrics
