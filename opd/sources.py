"""Where rollouts come from: one protocol for single-turn prompts and agentic tasks.

The loop asks a `RolloutSource` for its training prompts (which `opd.data.PromptSampler` samples), its
held-out part (evaluated as val/heldout/...), the rollouts of a step's prompts with their rewards, and the
response budget the rollout engine must fit. Two sources ship:

    PromptSource   single-turn OPD: prompts from data.train_path, one response each, graded by opd.reward
    AgentSource    agentic OPD (opd.agentic): an environment's tasks, multi-turn conversations, its scores

`source_kind(cfg)` is the one place that looks at agent.env to choose; `build_source` builds the run's
source once, `check_source` is what `opd.preflight` runs for it. A new environment is registered in
agent/registry.py and never opens opd/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from accelerate import Accelerator

from agent.evaluate import AgentBenchmark
from eval.benchmarks import Benchmark, Problem
from lm.engines import Sampling
from lm.rollout import Rollouts
from lm.tokenizers import load_tokenizer
from opd.agentic import AgentSource
from opd.config import Config
from opd.data import DataError, Prompt, check_data, load_prompts, unknown_characters
from opd.errors import RunError, loading
from opd.rewards import benchmark_grader, reward_fn


class RolloutSource(Protocol):
    """What the training loop needs from where its rollouts come from."""

    prompts: list[Prompt]  # the training prompts or tasks; Prompt.source names the record or the task id
    heldout: Benchmark | AgentBenchmark | None  # the held-out part, evaluated as val/heldout/... (eval.heldout)
    response_budget: int  # tokens after the prompt a rollout may take (the engine's max_model_len adds the prompt's)
    best_of_k: bool  # fractional scores (an environment's): the summary shows Best@k beside the mean

    def rollout(self, engine, prompts: list[Prompt], seeds: list[int],
                sampling: Sampling) -> tuple[Rollouts, list[float] | None, dict]:
        """This process's rollouts of `prompts` (sampling.n each, rows (B*n, T), prompt-major; seeds: one per
        prompt), the reward of each rollout (B*n floats; None: not graded) and the source's metrics over every
        process ({} single-turn, agent/... agentic)."""
        ...

    @classmethod
    def build(cls, cfg: Config, tokenizer, run_dir: Path, acc: Accelerator) -> RolloutSource:
        """The run's source, built once, before any model loads; RunError / DataError (one line) on a problem."""
        ...

    @staticmethod
    def check(cfg: Config, notes: list | None = None, deep: bool = False) -> list[str]:
        """Problems found before anything loads, one line each, each starting with its config key; `deep`
        (train.py --check) reads everything, and `notes` receives a summary line."""
        ...


class PromptSource:
    """Single-turn OPD: prompts from data.train_path (data.val_ratio or data.val_path held out), one sampled
    response each, graded by opd.reward against the record's answer."""

    best_of_k = False

    def __init__(self, prompts: list[Prompt], heldout: Benchmark | None, tokenizer, reward, response_budget: int):
        self.prompts, self.heldout, self.tokenizer, self.reward = prompts, heldout, tokenizer, reward
        self.response_budget = response_budget  # rollout.max_new_tokens

    @classmethod
    def build(cls, cfg: Config, tokenizer, run_dir: Path, acc: Accelerator) -> PromptSource:
        """The data set read, encoded and split (the held-out part as a benchmark); the reward function."""
        with loading("data.train_path", cfg.data.train_path):
            train, val, report = load_prompts(cfg.data, tokenizer, seed=cfg.train.seed,
                                              need_answers=cfg.opd.reward_beta > 0)
        unknown = unknown_characters(train + val, tokenizer)
        if unknown:
            raise RunError(unknown)
        acc.print(f"data: {report.summary()}: {len(train)} for training, {len(val)} held out")
        return cls(train, heldout_benchmark(cfg, val, acc), tokenizer,
                   reward_fn(cfg.opd.reward, cfg.eval.grade_timeout_s), cfg.rollout.max_new_tokens)

    @staticmethod
    def check(cfg: Config, notes: list | None = None, deep: bool = False) -> list[str]:
        """Data paths exist and the head of each local file has the configured fields; `deep` reads and encodes
        the whole data set with the student's tokenizer (not for the demo pair, whose tokenizer is made on
        first use; a tokenizer that does not load is preflight's to report)."""
        need_answers = cfg.opd.reward_beta > 0
        problems = check_data(cfg.data, need_answers)
        demo = cfg.model.path.startswith("demo:") or cfg.teacher.path.startswith("demo:")
        if problems or not deep or demo:
            return problems
        try:
            tokenizer = load_tokenizer(cfg.model)
        except Exception:  # preflight's tokenizer check says why, with its key
            return problems
        try:
            train, val, report = load_prompts(cfg.data, tokenizer, seed=cfg.train.seed, need_answers=need_answers)
        except DataError as exc:
            return [f"data.train_path: {exc}"]
        except Exception as exc:
            return [f"data.train_path: {exc}".splitlines()[0]]
        unknown = unknown_characters(train + val, tokenizer)
        if notes is not None:
            notes.append(f"data: {report.summary()}: {len(train)} for training, {len(val)} held out")
        return ([unknown] if unknown else []) + unrouted(cfg, {p.data_source for p in train})

    def rollout(self, engine, prompts: list[Prompt], seeds: list[int],
                sampling: Sampling) -> tuple[Rollouts, list[float] | None, dict]:
        """One engine call; each response graded against its prompt's answer (None when answers are missing)."""
        rollouts = engine.generate([p.ids for p in prompts], seeds, sampling)
        answers = [prompts[i].answer for i in rollouts.prompt_index.tolist()]
        return rollouts, self.reward(self.tokenizer, rollouts, answers), {}


def heldout_benchmark(cfg: Config, prompts: list[Prompt], acc: Accelerator) -> Benchmark | None:
    """The held-out training prompts as a benchmark (formatted as in training, graded by opd.reward), or None."""
    if not (prompts and cfg.eval.heldout):
        return None
    if any(not p.answer for p in prompts):
        acc.print(f"note: the {len(prompts)} held-out prompts are not evaluated: some have no answer "
                  f"(data.answer_key = {cfg.data.answer_key!r})")
        return None
    grade, extract = benchmark_grader(cfg.opd.reward)
    problems = tuple(Problem(id=p.source, prompt="", answer=p.answer, ids=tuple(p.ids)) for p in prompts)
    return Benchmark("heldout", problems, grade=grade, extract=extract)


def unrouted(cfg: Config, sources: set[str]) -> list[str]:
    """teacher.routes naming a data source no training prompt has (a misspelt source would otherwise quietly
    leave its prompts to the default teacher): one line for the first."""
    missing = sorted(set(cfg.teacher.routes) - sources)
    if not missing:
        return []
    found = ", ".join(repr(s) for s in sorted(sources)[:8]) or "none"
    return [f"teacher.routes.{missing[0]}: no training prompt has the data source {missing[0]!r} "
            f"(data.source_key = {cfg.data.source_key!r}; sources found: {found})"]


def source_kind(cfg: Config) -> type[RolloutSource]:
    """The source the config names: an environment's tasks (agent.env) or prompt data (data.train_path).
    The one place that looks at agent.env to choose."""
    return AgentSource if cfg.agent.env else PromptSource


def build_source(cfg: Config, tokenizer, run_dir: Path, acc: Accelerator) -> RolloutSource:
    """The run's rollout source, built once (opd.setup)."""
    return source_kind(cfg).build(cfg, tokenizer, run_dir, acc)


def check_source(cfg: Config, notes: list | None = None, deep: bool = False) -> list[str]:
    """The configured source's checks before a run (opd.preflight)."""
    return source_kind(cfg).check(cfg, notes, deep)
