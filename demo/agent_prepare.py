"""Teacher and student of the agentic demo (the `lookup` tool environment), trained in a few CPU minutes and cached.

`prepare_agent_pair(settings)` trains a teacher (supervised on worked tool-using conversations, loss on
the assistant's tokens only) until it solves held-out tasks, and a smaller student stopped early, and
saves both as ordinary Hugging Face checkpoints, each with the Qwen3-format character tokenizer (its chat
template and special tokens included):

    <cache_dir>/agent-pair-<hash of the settings>/teacher/   config, safetensors weights, tokenizer
    <cache_dir>/agent-pair-<hash of the settings>/student/
    <cache_dir>/agent-pair-<hash of the settings>/pair.json  settings, scores, steps, timings

A training conversation is the token sequence agent.rollout.Agent.run builds at rollout time, token for
token: the opening prompt (Chat.prompt), then for each assistant turn its tokens and EOS, then after a
tool call the rendered tool message (Chat.tool_turn). The pair learns on LookupEnv(seed=env_seed) and is
measured on LookupEnv(seed=eval_env_seed), the distillation run's environment, with real multi-turn
rollouts (Agent.run, HFEngine, T=1.0): the values differ per task and per seed, so a score there is tool use.

Stopping: every `teacher_check_every` (`student_check_every`) steps a model is checked on tasks of the
training environment it never saw; the teacher stops once that score reaches `teacher_target`, the student
(deliberately under-trained) once it reaches `student_target`. The scores in pair.json are measured
afterwards on `eval_tasks` x `eval_k` conversations of the evaluation environment, and compared with what
the demo needs of them (TEACHER_FLOOR, STUDENT_BAND: `meets_spec` in pair.json, a warning when missed).

The pair is written to a temporary directory and renamed into place, so an interrupted preparation never
leaves half a pair; a later call with the same settings returns the cached pair at once.

    python -m demo.agent_prepare [--cache DIR] [key=value ...]

prints the measured scores.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from agent.env import Task
from agent.lookup import LookupEnv, worked_solution
from agent.registry import build_agent
from agent.rollout import Agent, Caps, Chat
from demo.agent_config import AgentDemoConfig, agent_pair_fields, check_agent_demo
from demo.prepare import cached_pair
from lm.config import ModelConfig
from lm.engines import HFEngine, Sampling
from lm.models import random_model_config
from lm.rollout import derive_seed
from lm.tokenizers import chat_char_tokenizer
from lm.typed import apply, parse_value

FORMAT = 1
"""Part of the cache key: bump it when a change here makes the same settings train a different pair."""

ENV = "lookup"

TEACHER_FLOOR = 0.92
"""The teacher's measured score must reach this: it is the upper bound a distilled student is compared with."""

STUDENT_BAND = (0.15, 0.45)
"""The student's measured score should lie here: clearly weaker than the teacher, yet with the format learned."""


def agent_settings(settings: dict | AgentDemoConfig | None = None) -> AgentDemoConfig:
    """Validated settings from a dict (YAML-typed or command-line text values); ValueError names every bad key."""
    if isinstance(settings, AgentDemoConfig):
        settings = dataclasses.asdict(settings)
    values = {k: parse_value(v) if isinstance(v, str) else v for k, v in dict(settings or {}).items()}
    s, problems = AgentDemoConfig(), []
    apply(s, values, "", {k: "agent demo settings" for k in values}, problems)
    problems += [] if problems else check_agent_demo(s)
    if problems:
        raise ValueError("; ".join(problems))
    return s


def settings_key(s: AgentDemoConfig) -> str:
    """Hash of everything that changes the trained pair (12 hex digits)."""
    data = agent_pair_fields(s)
    data["format"], data["env"] = FORMAT, ENV
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def tokenizer():
    """The pair's tokenizer: characters in Qwen3's chat format (EOS = <|im_end|>), saved with both models."""
    return chat_char_tokenizer()


def make_chat(tok) -> Chat:
    """The renderer of every lookup conversation (all lookup tasks share the one tool); no thinking blocks."""
    return Chat(tok, [dict(t) for t in LookupEnv(num_tasks=1).tools(None)], enable_thinking=False)


def build_model(s: AgentDemoConfig, side: str, tok):
    """A randomly initialised causal LM of the given side ("teacher" or "student"), fp32."""
    hidden, heads = getattr(s, f"{side}_hidden"), getattr(s, f"{side}_heads")
    mc = ModelConfig(arch=s.arch, hidden_size=hidden, num_layers=getattr(s, f"{side}_layers"), num_heads=heads,
                     num_kv_heads=heads, intermediate_size=s.mlp_ratio * hidden)
    cfg = random_model_config(mc, len(tok), tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed + (0 if side == "teacher" else 1))
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def conversation(chat: Chat, task: Task, turns: list[str], results: list[str]) -> tuple[list[int], list[int]]:
    """(ids, student mask) of a conversation as Agent.run builds it: prompt, then each turn's tokens and EOS,
    each followed (but the last) by the rendered tool message of its result; mask 1 on turn tokens and EOS."""
    if len(results) != len(turns) - 1:
        raise ValueError(f"{len(turns)} turns need {len(turns) - 1} tool results, got {len(results)}")
    tok = chat.tokenizer
    ids = chat.prompt(list(task.messages))
    mask = [0] * len(ids)
    for i, turn in enumerate(turns):
        said = tok(turn, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids, mask = ids + said, mask + [1] * len(said)
        if i < len(results):
            glue = chat.tool_turn([results[i]])
            ids, mask = ids + glue, mask + [0] * len(glue)
    return ids, mask


def worked_conversation(chat: Chat, task: Task) -> tuple[list[int], list[int]]:
    """The worked solution of a lookup task (agent.lookup.worked_solution) as a training conversation."""
    turns, results = worked_solution(task)
    return conversation(chat, task, turns, results)


def supervised_batch(rows: list[tuple[list[int], list[int]]], pad_token_id: int):
    """(input_ids, attention_mask, labels), each (B, T), right-padded; labels are -100 off the student's tokens."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        row = torch.tensor(ids)
        input_ids[r, :len(ids)] = row
        labels[r, :len(ids)] = torch.where(torch.tensor(mask, dtype=torch.bool), row, -100)
        attention[r, :len(ids)] = 1
    return input_ids, attention, labels


def caps(s: AgentDemoConfig) -> Caps:
    return Caps(max_turns=s.max_turns, max_response_tokens=s.max_response_tokens,
                max_tool_response_tokens=s.max_tool_response_tokens)


def lookup_agent(s: AgentDemoConfig, tok, num_tasks: int, seed: int) -> Agent:
    """The demo's environment (`lookup`, `num_tasks` tasks drawn with `seed`) with the demo's chat format and caps."""
    return build_agent(ENV, {"num_tasks": num_tasks, "seed": seed}, tok, "hermes", caps(s), enable_thinking=False)


def score(model, agent: Agent, tasks: list[Task], s: AgentDemoConfig, k: int, seed) -> dict:
    """Mean score of `k` conversations per task (real rollouts: Agent.run, HFEngine, T=1.0) and how they went."""
    tok = agent.tokenizer
    sampling = Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=s.max_new_tokens, n=1,
                        eos_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
    seeds = [derive_seed(seed, t.id) for t in tasks]
    out = agent.run(HFEngine(model), tasks, seeds, k, sampling)
    convs = out.conversations
    n = len(convs)
    return {"score": sum(out.scores()) / n, "conversations": n,
            "looked_up": sum(c.score.parts.get("looked_up", 0.0) for c in convs) / n,
            "turns": sum(c.turns for c in convs) / n, "tool_calls": sum(c.tool_calls for c in convs) / n,
            "tool_errors": sum(c.tool_errors for c in convs) / n, "capped": sum(c.capped for c in convs) / n}


def supervised_train(model, chat: Chat, s: AgentDemoConfig, side: str, train: list[Task], check: list[Task],
                     agent: Agent, log=print) -> dict:
    """AdamW on worked conversations (warm-up, then cosine to 5% of lr over `<side>_max_steps`), checked every
    `<side>_check_every` steps on `check`; stops once the check score reaches `<side>_target`. Returns what happened."""
    steps, lr, target, every = (getattr(s, f"{side}_{k}") for k in ("max_steps", "lr", "target", "check_every"))
    side_seed = s.seed + (0 if side == "teacher" else 1)
    order = list(range(len(train)))
    random.Random(f"agent-demo-{side_seed}").shuffle(order)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    pad = chat.tokenizer.pad_token_id
    start, checks, check_seconds, step, reached = time.time(), [], 0.0, 0, False
    model.train()
    while step < steps and not reached:
        warm = min(1.0, (step + 1) / max(1, s.warmup_steps))
        decay = 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * warm * decay
        picks = [order[(step * s.batch_size + i) % len(order)] for i in range(s.batch_size)]
        input_ids, attention, labels = supervised_batch([worked_conversation(chat, train[i]) for i in picks], pad)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % every == 0 or step == steps:
            t0 = time.time()
            result = score(model, agent, check, s, k=1, seed=("check", side_seed, step))
            check_seconds += time.time() - t0
            model.train()
            checks.append({"step": step, "loss": round(loss.item(), 4), "score": result["score"]})
            reached = result["score"] >= target
            log(f"agent demo: {side} step {step}/{steps} loss {loss.item():.4f} check score {result['score']:.1%} "
                f"(target {target:.0%}; {time.time() - start:.0f} s)")
    model.eval()
    return {"steps": step, "reached_target": reached, "checks": checks,
            "train_seconds": round(time.time() - start - check_seconds, 1), "check_seconds": round(check_seconds, 1)}


def save_tokenizer(tok, path: Path) -> None:
    """Save `tok` with a model and make sure it reloads as itself: vocabulary, specials and chat template."""
    tok.save_pretrained(path)
    back = AutoTokenizer.from_pretrained(path)
    for what, a, b in (("vocabulary", tok.get_vocab(), back.get_vocab()), ("chat template", tok.chat_template, back.chat_template),
                       ("eos token", tok.eos_token_id, back.eos_token_id), ("pad token", tok.pad_token_id, back.pad_token_id)):
        if a != b:
            raise RuntimeError(f"the tokenizer saved in {path} reloads with a different {what}")


def prepare_agent_pair(settings: dict | AgentDemoConfig | None, log=print) -> tuple[Path, Path]:
    """Train (or reuse from `settings.cache_dir`) the agent demo teacher and student; returns (teacher_dir, student_dir)."""
    s = agent_settings(settings)
    final = Path(s.cache_dir).expanduser() / f"agent-pair-{settings_key(s)}"
    return cached_pair(final, s.num_threads, lambda out: _train_pair(s, out, log), "agent demo", log)


def _train_pair(s: AgentDemoConfig, out: Path, log) -> dict:
    began = time.time()
    tok = tokenizer()
    chat = make_chat(tok)
    train_agent = lookup_agent(s, tok, s.train_tasks + s.check_tasks, s.env_seed)
    pool = train_agent.env.tasks()
    train, check = pool[:s.train_tasks], pool[s.train_tasks:]
    eval_agent = lookup_agent(s, tok, s.eval_tasks, s.eval_env_seed)
    evaluation = eval_agent.env.tasks()
    info: dict = {"settings": dataclasses.asdict(s), "env": ENV, "train_env_seed": s.env_seed,
                  "eval_env_seed": s.eval_env_seed, "eval_conversations": len(evaluation) * s.eval_k,
                  "load_average": list(os.getloadavg()), "torch_threads": torch.get_num_threads()}
    for side in ("teacher", "student"):
        model = build_model(s, side, tok)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"agent demo: training the {side} ({getattr(s, f'{side}_layers')} layers x {getattr(s, f'{side}_hidden')} "
            f"hidden, {n_params / 1e6:.2f}M parameters, at most {getattr(s, f'{side}_max_steps')} steps)")
        trained = supervised_train(model, chat, s, side, train, check, train_agent, log)
        t0 = time.time()
        measured = score(model, eval_agent, evaluation, s, k=s.eval_k, seed=("eval", s.seed))
        eval_seconds = time.time() - t0
        log(f"agent demo: {side} score {measured['score']:.1%} on {measured['conversations']} held-out conversations "
            f"at T=1.0 (keys looked up {measured['looked_up']:.0%}, {measured['tool_errors']:.2f} tool errors each; "
            f"{trained['steps']} steps, {trained['train_seconds']:.0f} s of training)")
        model.save_pretrained(out / side, safe_serialization=True)
        save_tokenizer(tok, out / side)
        info[side] = {**measured, **trained, "eval_seconds": round(eval_seconds, 1), "parameters": n_params}
    low, high = STUDENT_BAND
    info["meets_spec"] = {"teacher": info["teacher"]["score"] >= TEACHER_FLOOR,
                          "student": low <= info["student"]["score"] <= high}
    for side, ok in info["meets_spec"].items():
        if not ok:
            want = f"at least {TEACHER_FLOOR:.0%}" if side == "teacher" else f"between {low:.0%} and {high:.0%}"
            log(f"agent demo: WARNING: the {side} scores {info[side]['score']:.1%}, the demo needs {want} "
                f"(change {side}_max_steps or {side}_target)")
    info["prepare_seconds"] = round(time.time() - began, 1)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.agent_prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=None, help=f"cache directory (default {AgentDemoConfig.cache_dir}; same as cache_dir=DIR)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="settings: " + ", ".join(f.name for f in dataclasses.fields(AgentDemoConfig)))
    args = parser.parse_args(argv)
    settings = {}
    for text in args.overrides:
        if "=" not in text:
            parser.error(f"`{text}` is not of the form key=value")
        key, value = text.split("=", 1)
        settings[key.strip()] = value
    try:
        if args.cache is not None:
            settings["cache_dir"] = args.cache
        teacher_dir, _ = prepare_agent_pair(settings)
    except ValueError as exc:
        parser.error(str(exc))
    info = json.loads((teacher_dir.parent / "pair.json").read_text())
    for side in ("teacher", "student"):
        r = info[side]
        print(f"{side}: {r['score']:.1%} of {r['conversations']} held-out conversations at T=1.0 "
              f"(keys looked up {r['looked_up']:.0%}, {r['tool_calls']:.2f} tool calls and {r['tool_errors']:.2f} errors each; "
              f"{r['parameters']} parameters, {r['steps']} steps, {r['train_seconds']:.0f} s of training)")
    print(f"prepared in {info['prepare_seconds']:.0f} s; pair: {teacher_dir.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
