"""Multi-turn, tool-using rollouts: conversations built incrementally, batched across conversations (SPEC §6).

Every live conversation advances one assistant turn per engine call (`lm.engines`: HF `generate` or vLLM,
the same `generate(prompts, prompt_seeds, sampling)` call as single-turn OPD). A conversation is one token
sequence: the student's tokens are kept verbatim, and only each new tool message is rendered by the chat
template and appended (re-rendering the history would drop Qwen3's earlier thinking blocks, so the tokens
would no longer be the student's). `response_mask` is 1 exactly on the student's tokens.

Seeds: the j-th conversation on a task whose seed is s draws its t-th turn with the engine seed
derive_seed(row_seed(s, j), t): a conversation depends on its seed, the weights and the environment only, not on
its batch, its process or the other conversations.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import threading
from dataclasses import dataclass, field

import torch

from agent.calls import Call
from agent.config import AgentConfig
from agent.env import Environment, Score, Task, ToolError, final_text
from lm.engines import Sampling
from lm.rollout import Rollouts, derive_seed, row_seed


@dataclass(frozen=True)
class Caps:
    max_turns: int  # assistant turns
    max_response_tokens: int  # every token after the opening prompt (student, tool results, template glue)
    max_tool_response_tokens: int  # one tool result is cut to this many tokens
    tool_timeout_s: float = AgentConfig.tool_timeout_s  # one tool call; then it is abandoned (a tool error)


class Chat:
    """Renders what comes after a student turn: the template's glue, the tool messages, the next turn's opening.

    Read off the chat template itself: a reference conversation [user, assistant, tool...] is rendered
    with the next turn opened, and everything after the assistant's content is what the template puts
    there (its end-of-turn token, which the student generated itself, is dropped). Only these new tokens
    are appended to a conversation; earlier turns are never re-rendered.
    """

    SENTINEL = "ASSISTANTCONTENTENDSHERE"

    def __init__(self, tokenizer, tools: list[dict], enable_thinking: bool):
        self.tokenizer = tokenizer
        self.tools = tools or None
        self.enable_thinking = enable_thinking
        eos = tokenizer.eos_token_id
        self._eos_text = tokenizer.decode([eos]) if eos is not None else ""

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=self.tools, tokenize=False,
                                                  add_generation_prompt=generation_prompt,
                                                  enable_thinking=self.enable_thinking)

    def prompt(self, messages: list[dict]) -> list[int]:
        """The opening prompt (system with the tools, user), the first assistant turn opened."""
        return self.tokenizer(self._render(list(messages), True), add_special_tokens=False)["input_ids"]

    def tool_turn(self, results: list[str]) -> list[int]:
        """Token ids appended after a student turn that ended with its end-of-turn token."""
        messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": self.SENTINEL}]
        full = self._render(messages + [{"role": "tool", "content": r} for r in results], True)
        at = full.rfind(self.SENTINEL)
        if at < 0:
            raise ValueError("the chat template does not show an assistant message's content; "
                             "tool messages cannot be appended after a student turn")
        text = full[at + len(self.SENTINEL):]
        if self._eos_text and text.startswith(self._eos_text):
            text = text[len(self._eos_text):]
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def cut(self, text: str, max_tokens: int) -> tuple[str, bool]:
        """A tool result cut to `max_tokens` tokens (and whether it was cut)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            return text, False
        return self.tokenizer.decode(ids[:max_tokens]), True


@dataclass
class Conversation:
    task: Task
    seed: int
    state: object
    chat: Chat
    ids: list[int]  # the whole conversation, prompt first
    student: list[int]  # 1 where the student generated the token
    prompt_length: int
    logprobs: list[float] = field(default_factory=list)  # per token; 0 outside the student's turns
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    tool_results_cut: int = 0
    capped: bool = False
    done: bool = False
    last_text: str = ""
    score: Score | None = None
    score_error: str = ""  # why the environment's score was refused (then the score is 0)

    def budget(self, caps: Caps) -> int:
        return caps.max_response_tokens - (len(self.ids) - self.prompt_length)

    def append(self, tokens: list[int], by_student: bool, logprobs: list[float] | None = None) -> None:
        self.ids += tokens
        self.student += [int(by_student)] * len(tokens)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(tokens)


@dataclass
class AgentRollouts:
    """The conversations of one batch as `Rollouts` (prompt_index: which task), and each one's record."""

    rollouts: Rollouts
    conversations: list[Conversation]

    def scores(self) -> list[float]:
        return [c.score.value for c in self.conversations]


def run_call(env: Environment, state, call: Call, timeout_s: float) -> tuple[str, bool, str]:
    """(the tool message, whether it is an error, the environment's fault or ""). Nothing a tool does ends the run.

    A bad call (unreadable, or refused with ToolError) is the model's error. The environment's fault is a tool
    that raises anything else (SystemExit and KeyboardInterrupt too: on the tool's own thread they are the
    tool's), returns something other than a string, or does not return within `timeout_s`: the model reads it
    as an error as well, and the caller warns the user. The call runs on a fresh daemon thread; a hung one is
    abandoned, not killed (Python cannot kill a thread), and may still change `state` if it ever returns.
    """
    if call.error:
        return f"Error: {call.error}", True, ""
    box: dict = {}
    done = threading.Event()

    def work():
        try:
            box["result"] = env.call(state, call.name, call.arguments)
        except BaseException as exc:  # everything raised on this thread is the tool's own doing
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=work, name=f"tool:{call.name}", daemon=True).start()
    if not done.wait(timeout_s):  # a real Ctrl-C arrives on this (the main) thread and propagates from here
        fault = f"tool {call.name!r} did not return within {timeout_s:g} s (agent.tool_timeout_s)"
        return f"Error: {fault}", True, fault
    exc = box.get("error")
    if isinstance(exc, ToolError):
        return f"Error: {exc}", True, ""
    if exc is not None:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        fault = f"tool {call.name!r} failed ({type(exc).__name__}{': ' + detail if detail else ''})"
        return f"Error: {fault}", True, fault
    result = box["result"]
    if not isinstance(result, str):
        fault = f"tool {call.name!r} returned {type(result).__name__}, not a string"
        return f"Error: {fault}", True, fault
    return result, False, ""


def checked_score(score) -> tuple[Score, str]:
    """(the score, "") for a Score whose value and parts are finite numbers, the value in [0, 1]; otherwise
    (Score(0.0), why): an invalid score counts as 0 and is counted (agent/score_errors), never silently."""
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    if not isinstance(score, Score):
        return Score(0.0), f"score() returned {type(score).__name__}, not a Score"
    if not number(score.value) or not 0.0 <= score.value <= 1.0:
        return Score(0.0), f"score() returned the value {score.value!r}, not a finite number in [0, 1]"
    if not isinstance(score.parts, dict) or not all(isinstance(k, str) and number(v) for k, v in score.parts.items()):
        return Score(0.0), f"score() returned the parts {score.parts!r}, not names with finite numbers"
    return Score(float(score.value), {k: float(v) for k, v in score.parts.items()}), ""


class Agent:
    """An environment with the chat format and caps its conversations follow: what the trainer and the
    evaluation hold. `prompt(task)` is a task's opening prompt ids; `run(...)` its conversations."""

    def __init__(self, env: Environment, tokenizer, parse, caps: Caps, enable_thinking: bool, name: str = ""):
        self.env, self.tokenizer, self.parse, self.caps = env, tokenizer, parse, caps
        self.enable_thinking = enable_thinking
        self.name = name or type(env).__name__  # as the user named it (agent.env), for warnings
        self._chats: dict[str, Chat] = {}
        self._warned: set[str] = set()

    def warn(self, kind: str, fault: str, counted_in: str) -> None:
        """One `warning:` line per kind of environment fault and process: the run goes on, the fault is counted."""
        if kind not in self._warned:
            self._warned.add(kind)
            print(f"warning: agent.env {self.name}: {fault}; counted in {counted_in} (said once)", file=sys.stderr,
                  flush=True)

    def chat(self, task: Task) -> Chat:
        tools = self.env.tools(task)
        key = json.dumps(tools, sort_keys=True)
        if key not in self._chats:
            self._chats[key] = Chat(self.tokenizer, tools, self.enable_thinking)
        return self._chats[key]

    def prompt(self, task: Task) -> list[int]:
        return self.chat(task).prompt(list(task.messages))

    def run(self, engine, tasks: list[Task], task_seeds: list[int], n: int, sampling: Sampling,
            any_live=None) -> AgentRollouts:
        """`n` conversations per task, all advanced together one turn per engine call, then scored.

        sampling.max_new_tokens caps one turn; self.caps bound the conversation. `any_live(bool) -> bool`
        (several processes): whether any process still has a live conversation; a process without one
        keeps calling the engine on a 1-token dummy so that lockstep engines (ZeRO-3 generate) stay in step.
        """
        convs = [Conversation(task, row_seed(seed, j), self.env.start(task), self.chat(task), list(p), [0] * len(p),
                              len(p), [0.0] * len(p))
                 for task, p, seed in zip(tasks, [self.prompt(t) for t in tasks], task_seeds) for j in range(n)]
        eos, caps, with_logprobs = set(sampling.eos_ids), self.caps, False
        for turn in range(caps.max_turns):
            live = [c for c in convs if not c.done]
            if any_live is not None and not any_live(bool(live)):
                break
            if not live:
                if any_live is not None and convs:  # others still generate: take part in their calls
                    engine.generate([convs[0].ids], [0], dataclasses.replace(sampling, n=1, max_new_tokens=1))
                    continue
                break
            longest = min(sampling.max_new_tokens, max(c.budget(caps) for c in live))
            out = engine.generate([c.ids for c in live], [derive_seed(c.seed, "turn", turn) for c in live],
                                  dataclasses.replace(sampling, n=1, max_new_tokens=longest))
            new_logprobs = _response_logprobs(out)
            with_logprobs = new_logprobs is not None
            for i, (c, tokens) in enumerate(zip(live, out.response_ids())):
                tokens = tokens[:min(sampling.max_new_tokens, c.budget(caps))]
                c.append(tokens, True, None if new_logprobs is None else new_logprobs[i][:len(tokens)])
                c.turns += 1
                _after_turn(c, tokens, eos, self, last_turn=turn == caps.max_turns - 1)
        for c in convs:
            if not c.done:  # live after the last turn: only possible when the loop ended early
                c.capped = True
            c.score, c.score_error = self.score(c)
        return AgentRollouts(assemble(convs, tasks, sampling.pad_token_id, with_logprobs), convs)

    def score(self, c: Conversation) -> tuple[Score, str]:
        """The environment's score of a finished conversation, checked (checked_score); a score() that raises
        (anything but a real Ctrl-C) scores 0 too. Either is counted and warned about, never silent."""
        try:
            score, error = checked_score(self.env.score(c.task, c.state, final_text(c.last_text)))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit from a scorer is its bug, not a stop request
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            score, error = Score(0.0), f"score() raised {type(exc).__name__}{': ' + detail if detail else ''}"
        if error:
            self.warn("score", f"{error}; the conversation scores 0", "agent/score_errors")
        return score, error


def _after_turn(c: Conversation, tokens: list[int], eos: set[int], agent: Agent, last_turn: bool) -> None:
    """Parse the turn; run its tool calls and append their messages, or end the conversation."""
    chat, caps = c.chat, agent.caps
    c.last_text = chat.tokenizer.decode(tokens, skip_special_tokens=True)
    if not tokens or tokens[-1] not in eos:  # cut by the turn or conversation token cap
        c.done = c.capped = True
        return
    calls = agent.parse(c.last_text)
    if not calls:
        c.done = True  # the final answer
        return
    if last_turn:
        c.done = c.capped = True  # the turn cap: scored as it stands
        return
    results = []
    for call in calls:
        text, error, fault = run_call(agent.env, c.state, call, caps.tool_timeout_s)
        if fault:
            agent.warn(fault.split(" (")[0], f"{fault}; shown to the model as a tool error", "agent/tool_errors")
        text, was_cut = chat.cut(text, caps.max_tool_response_tokens)
        c.tool_calls += 1
        c.tool_errors += int(error)
        c.tool_results_cut += int(was_cut)
        results.append(text)
    glue = chat.tool_turn(results)
    if len(glue) >= c.budget(caps):  # no room left for the tool results and another turn
        c.done = c.capped = True
        return
    c.append(glue, False)


def _response_logprobs(out: Rollouts) -> list[list[float]] | None:
    if out.logprobs is None:
        return None
    return [[lp for lp, m in zip(row, mask) if m] for row, mask in
            zip(out.logprobs.tolist(), out.response_mask.tolist())]


def assemble(convs: list[Conversation], tasks: list[Task], pad_token_id: int, with_logprobs: bool) -> Rollouts:
    """Conversations as `Rollouts`: the opening prompt left-padded to a common width, the rest after it;
    response_mask 1 on the student's tokens only, attention 1 on every real token."""
    task_index = {id(t): i for i, t in enumerate(tasks)}
    prompt_len = max(c.prompt_length for c in convs)
    tail = max(1, max(len(c.ids) - c.prompt_length for c in convs))
    shape = (len(convs), prompt_len + tail)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    attention = torch.zeros(shape, dtype=torch.long)
    response = torch.zeros(shape, dtype=torch.long)
    logprobs = torch.zeros(shape, dtype=torch.float32) if with_logprobs else None
    for r, c in enumerate(convs):
        lo, hi = prompt_len - c.prompt_length, prompt_len - c.prompt_length + len(c.ids)
        input_ids[r, lo:hi] = torch.tensor(c.ids)
        attention[r, lo:hi] = 1
        response[r, lo:hi] = torch.tensor(c.student)
        if logprobs is not None:
            logprobs[r, lo:hi] = torch.tensor(c.logprobs)
    return Rollouts(input_ids=input_ids, attention_mask=attention, response_mask=response, prompt_length=prompt_len,
                    prompt_index=torch.tensor([task_index[id(c.task)] for c in convs]),
                    truncated=torch.tensor([c.capped for c in convs]), logprobs=logprobs)


def metrics(convs: list[Conversation]) -> dict[str, float]:
    """Per-batch sums (turns, calls, errors, tokens, caps) and maxima: the caller averages over conversations
    of all processes (agent/turns_mean = agent/turns_sum / agent/conversations)."""
    return {
        "agent/conversations": float(len(convs)),
        "agent/turns_sum": float(sum(c.turns for c in convs)),
        "agent/turns_max": float(max((c.turns for c in convs), default=0)),
        "agent/tool_calls": float(sum(c.tool_calls for c in convs)),
        "agent/tool_errors": float(sum(c.tool_errors for c in convs)),
        "agent/tool_results_cut": float(sum(c.tool_results_cut for c in convs)),
        "agent/student_tokens": float(sum(sum(c.student[c.prompt_length:]) for c in convs)),
        "agent/tool_tokens": float(sum(len(c.ids) - c.prompt_length - sum(c.student) for c in convs)),
        "agent/capped": float(sum(c.capped for c in convs)),
        "agent/score_sum": float(sum(c.score.value for c in convs if c.score is not None)),
        "agent/score_errors": float(sum(bool(c.score_error) for c in convs)),
    }
