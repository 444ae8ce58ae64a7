"""Multi-turn rollouts (agent.rollout): the incremental token sequence, the student mask, tool errors, caps,
seeds, and the parser. The engine is either a scripted one (it replays given assistant turns, so the
conversation's content is known) or HF generate on a tiny random model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from agent.calls import hermes
from agent.env import Environment, Score, Task, ToolError
from agent.lookup import LookupEnv, worked_solution
from agent.rollout import Agent, Caps, Chat, metrics
from lm.engines import HFEngine, Sampling
from lm.rollout import assemble
from lm.tokenizers import chat_char_tokenizer

TOK = chat_char_tokenizer()
CAPS = Caps(max_turns=5, max_response_tokens=1000, max_tool_response_tokens=16)


def sampling(max_new_tokens=100) -> Sampling:
    return Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens, n=1,
                    eos_ids=(TOK.eos_token_id,), pad_token_id=TOK.pad_token_id)


class Scripted:
    """An engine that answers the k-th turn of a conversation with script(prompt text, k) (EOS appended unless
    the text ends with '~', which means: stop without EOS)."""

    def __init__(self, script):
        self.script = script
        self.calls = []

    def generate(self, prompts, prompt_seeds, s):
        self.calls.append(len(prompts))
        responses, truncated = [], []
        for p in prompts:
            text = TOK.decode(p)
            turn = self.script(text, text.count("<|im_start|>assistant") - 1)
            cut = turn.endswith("~")
            ids = TOK(turn.rstrip("~"), add_special_tokens=False)["input_ids"][:s.max_new_tokens]
            if not cut and len(ids) < s.max_new_tokens:
                ids.append(TOK.eos_token_id)
            responses.append(ids)
            truncated.append(cut)
        return assemble(prompts, list(range(len(prompts))), responses, truncated, TOK.pad_token_id)


def worked(env_tasks, think=""):
    by_id = {t.id: t for t in env_tasks}

    def script(text, turn):
        task = next(by_id[i] for i in by_id if f"user\n{i}<|im_end|>" in text)
        turns, _ = worked_solution(task)
        return (f"<think>\n{think} {turn}\n</think>\n\n" if think else "") + turns[turn]
    return script


def spans(row_ids, mask):
    """Maximal runs of masked-in tokens, as token lists."""
    out, cur = [], []
    for t, m in zip(row_ids, mask):
        if m:
            cur.append(t)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def test_masked_tokens_are_exactly_the_student_turns_and_the_rest_is_tool_messages():
    env = LookupEnv(num_tasks=6)
    tasks = env.tasks()
    agent = Agent(env, TOK, hermes, CAPS, enable_thinking=False)
    engine = Scripted(worked(tasks))
    out = agent.run(engine, tasks, [1, 2, 3, 4, 5, 6], 2, sampling())
    assert engine.calls == [12, 12, 12]  # all conversations advance together, one engine call per turn
    assert out.scores() == [1.0] * 12
    r = out.rollouts
    for row, c in enumerate(out.conversations):
        turns, results = worked_solution(c.task)
        ids = r.input_ids[row][r.attention_mask[row].bool()].tolist()
        mask = r.response_mask[row][r.attention_mask[row].bool()].tolist()
        assert [TOK.decode(s) for s in spans(ids, mask)] == [t + "<|im_end|>" for t in turns]
        # everything else after the prompt is what Chat.tool_turn renders for each result, in order
        chat = agent.chat(c.task)
        prompt = agent.prompt(c.task)
        assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])
        rest = [t for t, m in zip(ids[len(prompt):], mask[len(prompt):]) if not m]
        assert rest == chat.tool_turn([results[0]]) + chat.tool_turn([results[1]])
        assert c.turns == 3 and c.tool_calls == 2 and c.tool_errors == 0 and not c.capped
    m = metrics(out.conversations)
    assert m["agent/student_tokens"] == float(r.response_mask.sum())
    assert m["agent/tool_tokens"] == float(r.attention_mask.sum() - r.response_mask.sum()) - sum(
        c.prompt_length for c in out.conversations)


def test_incremental_sequence_keeps_thinking_that_rerendering_would_drop():
    env = LookupEnv(num_tasks=2)
    tasks = env.tasks()
    agent = Agent(env, TOK, hermes, CAPS, enable_thinking=True)
    out = agent.run(Scripted(worked(tasks, think="look")), tasks[:1], [7], 1, sampling())
    c = out.conversations[0]
    assert out.scores() == [1.0]
    turns, results = worked_solution(c.task)
    student_text = [TOK.decode(s) for s in spans(c.ids, c.student)]
    assert student_text == [f"<think>\nlook {k}\n</think>\n\n{t}<|im_end|>" for k, t in enumerate(turns)]
    # the same conversation re-rendered from messages by the chat template
    messages = list(c.task.messages)
    for k, t in enumerate(turns):
        messages.append({"role": "assistant", "content": f"<think>\nlook {k}\n</think>\n\n{t}"})
        if k < len(results):
            messages.append({"role": "tool", "content": results[k]})
    rerendered = TOK(TOK.apply_chat_template(messages, tools=env.tools(c.task), tokenize=False),
                     add_special_tokens=False)["input_ids"]
    assert rerendered != c.ids
    text = TOK.decode(rerendered)
    assert "look 0" not in text and "look 1" not in text and "look 2" in text  # earlier thinking dropped
    assert all(f"look {k}" in TOK.decode(c.ids) for k in range(3))


class Faulty(Environment):
    """One tool, `f(x: int)`, that fails in every way a tool can."""

    def tasks(self):
        return [Task("t", ({"role": "user", "content": "go"},))]

    def tools(self, task):
        return [{"type": "function", "function": {"name": "f", "parameters": {}}}]

    def start(self, task):
        return {"ok": 0}

    def call(self, state, name, arguments):
        if name != "f":
            raise ToolError(f"unknown tool {name!r}")
        if not isinstance(arguments.get("x"), int):
            raise ToolError("f needs an integer x")
        if arguments["x"] < 0:
            raise RuntimeError("negative")
        state["ok"] += 1
        return "fine"

    def score(self, task, state, final_text):
        return Score(0.5, {"ok_calls": float(state["ok"])})


def test_bad_tool_calls_become_error_messages_and_never_end_the_run():
    turns = ['<tool_call>{"name": "f", "arguments": {"x": 1</tool_call>',  # malformed JSON
             '<tool_call>{"name": "g", "arguments": {}}</tool_call>',  # unknown tool
             '<tool_call>{"name": "f", "arguments": {"x": "a"}}</tool_call>'  # wrong argument
             '<tool_call>{"name": "f", "arguments": {"x": -1}}</tool_call>',  # the tool raises
             '<tool_call>["f"]</tool_call><tool_call>{"name": "f", "arguments": {"x": 2}}</tool_call>',
             "done"]
    env = Faulty()
    agent = Agent(env, TOK, hermes, Caps(10, 2000, 200), enable_thinking=False)
    out = agent.run(Scripted(lambda text, k: turns[k]), env.tasks(), [0], 1, sampling(200))
    c = out.conversations[0]
    assert (c.turns, c.tool_calls, c.tool_errors, c.capped) == (5, 6, 5, False)
    assert c.score.value == 0.5 and c.score.parts == {"ok_calls": 1.0}
    text = TOK.decode(c.ids)
    assert "not valid JSON" in text and "unknown tool 'g'" in text and "f needs an integer x" in text
    assert "RuntimeError: negative" in text and "must be a JSON object" in text and "fine" in text


def test_turn_and_token_caps_end_a_conversation_which_is_scored_as_it_stands():
    env = Faulty()
    call = '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
    agent = Agent(env, TOK, hermes, Caps(3, 2000, 200), enable_thinking=False)
    c = agent.run(Scripted(lambda text, k: call), env.tasks(), [0], 1, sampling(200)).conversations[0]
    assert c.turns == 3 and c.capped and c.tool_calls == 2 and c.score.parts == {"ok_calls": 2.0}
    # the whole-conversation budget: the second turn is cut by it
    turn = len(TOK(call, add_special_tokens=False)["input_ids"]) + 1
    glue = len(Chat(TOK, env.tools(None), False).tool_turn(["fine"]))
    agent = Agent(env, TOK, hermes, Caps(10, turn + glue + 10, 200), enable_thinking=False)
    c = agent.run(Scripted(lambda text, k: call), env.tasks(), [0], 1, sampling(200)).conversations[0]
    assert c.capped and len(c.ids) - c.prompt_length == turn + glue + 10 and c.turns == 2 and c.tool_calls == 1
    # no room for the tool results after the first turn
    agent = Agent(env, TOK, hermes, Caps(10, turn + glue - 1, 200), enable_thinking=False)
    c = agent.run(Scripted(lambda text, k: call), env.tasks(), [0], 1, sampling(200)).conversations[0]
    assert c.capped and c.turns == 1 and len(c.ids) - c.prompt_length == turn
    # a turn cut by max_new_tokens (no end-of-turn token) ends the conversation
    c = agent.run(Scripted(lambda text, k: call), env.tasks(), [0], 1, sampling(10)).conversations[0]
    assert c.capped and c.turns == 1 and c.tool_calls == 0


def test_tool_results_are_cut_to_the_token_cap():
    class Long(Faulty):
        def call(self, state, name, arguments):
            return "x" * 100
    env = Long()
    agent = Agent(env, TOK, hermes, Caps(2, 2000, 7), enable_thinking=False)
    call = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    c = agent.run(Scripted(lambda text, k: call if k == 0 else "ok"), env.tasks(), [0], 1, sampling(200)).conversations[0]
    assert c.tool_results_cut == 1 and "<tool_response>\nxxxxxxx\n</tool_response>" in TOK.decode(c.ids)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=TOK.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


def test_real_rollouts_mask_only_generated_turns_and_a_conversation_does_not_depend_on_its_batch():
    env = LookupEnv(num_tasks=8)
    tasks = env.tasks()
    agent = Agent(env, TOK, hermes, Caps(3, 120, 16), enable_thinking=False)
    engine = HFEngine(tiny_model())
    out = agent.run(engine, tasks, list(range(8)), 2, sampling(40))
    alone = agent.run(engine, tasks[3:4], [3], 2, sampling(40))
    assert [c.ids for c in alone.conversations] == [c.ids for c in out.conversations[6:8]]
    for c in out.conversations:
        prompt = agent.prompt(c.task)
        assert c.ids[:len(prompt)] == prompt and sum(c.student[:len(prompt)]) == 0
        turns = spans(c.ids, c.student)
        assert len(turns) == c.turns and sum(c.student) == sum(map(len, turns))
        for t in turns[:-1]:  # every turn but the last ended with the end-of-turn token
            assert t[-1] == TOK.eos_token_id
        assert c.capped == (turns[-1][-1] != TOK.eos_token_id or c.turns == 3 and bool(hermes(TOK.decode(turns[-1]))))


@pytest.mark.parametrize("text,expected", [
    ('<tool_call>{"name": "get", "arguments": {"k": "ab"}}</tool_call>', [("get", {"k": "ab"}, "")]),
    ('a<tool_call>{"name":"x","arguments":{}}</tool_call>b<tool_call>{"name":"y","arguments":"{\\"z\\": 1}"}</tool_call>',
     [("x", {}, ""), ("y", {"z": 1}, "")]),
    ('<tool_call>{"name": "get", "arguments": {"k": </tool_call>', [("", {}, "not valid JSON")]),
    ('<tool_call>{"arguments": {}}</tool_call>', [("", {}, "JSON object")]),
    ('<tool_call>{"name": "g", "arguments": [1]}</tool_call>', [("g", {}, "arguments must be a JSON object")]),
    ('<tool_call>{"name": "g", "arguments": {}}', [("g", {}, "")]),  # unclosed at the end of the turn
    ('<think>\n<tool_call>{"name": "g", "arguments": {}}</tool_call>\n</think>\n\nno call', []),
    ("no call at all", []),
])
def test_hermes_parser(text, expected):
    calls = hermes(text)
    assert len(calls) == len(expected)
    for call, (name, args, error) in zip(calls, expected):
        assert call.name == name and call.arguments == args and (error in call.error if error else call.error == "")


def test_chat_glue_matches_the_template_and_refuses_a_template_that_hides_content():
    chat = Chat(TOK, LookupEnv().tools(None), enable_thinking=False)
    glue = TOK.decode(chat.tool_turn(["47"]))
    assert glue == "\n<|im_start|>user\n<tool_response>\n47\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    other = chat_char_tokenizer()
    other.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(ValueError, match="does not show an assistant message's content"):
        Chat(other, [], False).tool_turn(["x"])
    assert json.loads(json.dumps(LookupEnv().tools(None)))  # schemas are plain JSON
