"""The agentic demo pair (demo/agent_prepare.py): its training conversations are the rollouts' own token
sequences, its settings are checked, and a prepared pair caches, reloads and keeps its chat tokenizer."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from agent.calls import hermes
from agent.lookup import LookupEnv, worked_solution
from agent.rollout import Agent, Caps
from demo import agent_prepare
from lm.engines import HFEngine, Sampling
from lm.rollout import assemble
from tests.agent.test_agent_rollout import spans

TINY = {"teacher_layers": 1, "teacher_hidden": 16, "teacher_heads": 2, "teacher_max_steps": 2,
        "student_layers": 1, "student_hidden": 8, "student_heads": 2, "student_max_steps": 1,
        "batch_size": 2, "warmup_steps": 1, "teacher_check_every": 2, "student_check_every": 1, "check_tasks": 2, "train_tasks": 8,
        "eval_tasks": 3, "eval_k": 1, "max_new_tokens": 8, "max_turns": 2, "max_response_tokens": 64}


class ScriptedEngine:
    """Replays each task's worked solution: finds the conversation's task by its user message and its turn by
    the tool responses so far, and answers with that turn's tokens and EOS."""

    def __init__(self, tok, tasks):
        self.tok = tok
        self.by_question = {t.messages[-1]["content"]: t for t in tasks}

    def generate(self, prompts, prompt_seeds, sampling):
        responses = []
        for ids in prompts:
            text = self.tok.decode(ids)
            question = re.search(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text).group(1)
            turns, _ = worked_solution(self.by_question[question])
            said = self.tok(turns[text.count("<tool_response>")], add_special_tokens=False)["input_ids"]
            responses.append(said + [self.tok.eos_token_id])
        return assemble(prompts, list(range(len(prompts))), responses, [False] * len(prompts), sampling.pad_token_id)


def test_training_conversations_are_the_tokens_the_rollouts_build():
    tok = agent_prepare.tokenizer()
    chat = agent_prepare.make_chat(tok)
    env = LookupEnv(num_tasks=6, seed=1)
    tasks = env.tasks()
    sampling = Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=64, n=1, eos_ids=(tok.eos_token_id,),
                        pad_token_id=tok.pad_token_id)
    agent = Agent(env, tok, hermes, Caps(max_turns=4, max_response_tokens=400, max_tool_response_tokens=16),
                  enable_thinking=False)
    out = agent.run(ScriptedEngine(tok, tasks), tasks, list(range(len(tasks))), 1, sampling)
    assert out.scores() == [1.0] * len(tasks)  # the replay is right, so it is a real, complete conversation
    for conv in out.conversations:
        ids, mask = agent_prepare.worked_conversation(chat, conv.task)
        assert ids == conv.ids and mask == conv.student
        assert conv.turns == 3 and conv.tool_calls == 2 and not conv.capped
    # the loss sees exactly the student's tokens: the three turns and their EOS
    ids, mask = agent_prepare.worked_conversation(chat, tasks[0])
    turns, _ = worked_solution(tasks[0])
    _, _, labels = agent_prepare.supervised_batch([(ids, mask)], tok.pad_token_id)
    taught = [t for t in labels[0].tolist() if t != -100]
    assert tok.decode(taught) == "<|im_end|>".join(turns) + "<|im_end|>"


def test_settings_are_validated_with_one_line_naming_the_key():
    for bad, needle in (({"teacher_step": 3}, "unknown config key `teacher_step`"),
                        ({"teacher_max_steps": "many"}, "`teacher_max_steps` must be an integer"),
                        ({"student_target": 1.5}, "`student_target` = 1.5 is above the maximum 1"),
                        ({"student_hidden": 10, "student_heads": 4}, "`student_hidden` = 10 must be a multiple"),
                        ({"env_seed": 0}, "`env_seed` = 0 must differ from `eval_env_seed`"),
                        ({"arch": "gpt2"}, "`arch` = 'gpt2' is not one of")):
        with pytest.raises(ValueError, match=re.escape(needle)):
            agent_prepare.agent_settings(bad)
    assert agent_prepare.agent_settings({"teacher_max_steps": "7"}).teacher_max_steps == 7
    key = agent_prepare.settings_key(agent_prepare.agent_settings(TINY))
    assert agent_prepare.settings_key(agent_prepare.agent_settings({**TINY, "num_threads": 1})) == key
    assert agent_prepare.settings_key(agent_prepare.agent_settings({**TINY, "env_seed": 2})) != key


def test_prepared_pair_caches_reloads_and_keeps_its_chat_tokenizer(tmp_path):
    logs = []
    teacher_dir, student_dir = agent_prepare.prepare_agent_pair({**TINY, "cache_dir": str(tmp_path)}, log=logs.append)
    assert teacher_dir.parent.name.startswith("agent-pair-")
    assert [p.name for p in tmp_path.iterdir()] == [teacher_dir.parent.name]  # no staging debris
    info = json.loads((teacher_dir.parent / "pair.json").read_text())
    assert info["teacher"]["steps"] == 2 and info["student"]["steps"] == 1
    assert info["eval_conversations"] == 3 and 0.0 <= info["student"]["score"] <= 1.0

    fresh = agent_prepare.tokenizer()
    chat = agent_prepare.make_chat(fresh)
    task = LookupEnv(num_tasks=1, seed=0).tasks()[0]
    ids, _ = agent_prepare.worked_conversation(chat, task)
    for path, hidden in ((teacher_dir, 16), (student_dir, 8)):
        tok = AutoTokenizer.from_pretrained(path)
        assert tok.get_vocab() == fresh.get_vocab() and tok.chat_template == fresh.chat_template
        assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<pad>")
        # the reloaded tokenizer renders and encodes a conversation exactly as the fresh one
        assert agent_prepare.worked_conversation(agent_prepare.make_chat(tok), task)[0] == ids
        assert tok.decode(ids, skip_special_tokens=True).count("<tool_call>") == 2  # tool tags are text, kept
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.hidden_size == hidden
        assert torch.isfinite(model(input_ids=torch.tensor([ids])).logits).all()

    weights = (student_dir / "model.safetensors").read_bytes()
    logs.clear()
    assert agent_prepare.prepare_agent_pair({**TINY, "cache_dir": str(tmp_path)}, log=logs.append) == (teacher_dir, student_dir)
    assert any("reusing" in line for line in logs) and not any("training" in line for line in logs)
    assert (student_dir / "model.safetensors").read_bytes() == weights


SMALL_PAIR = {"teacher_max_steps": 150, "student_max_steps": 60, "check_tasks": 4, "eval_tasks": 4, "eval_k": 1,
              "teacher_check_every": 1000, "student_check_every": 1000}


def test_agent_demo_job_end_to_end_and_real_rollouts_of_its_teacher(tmp_path, capsys):
    """configs/demo_agent.yaml shrunk to seconds (a briefly trained pair, 2 steps, 8 held-out tasks); then real
    conversations of the prepared teacher: the masked-in tokens are exactly its turns, the rest tool messages."""
    from opd import cli

    args = ["--config", "configs/demo_agent.yaml", *(f"agent_demo.{k}={v}" for k, v in SMALL_PAIR.items()),
            f"agent_demo.cache_dir={tmp_path / 'cache'}", f"train.output_dir={tmp_path / 'runs'}", "train.steps=2",
            "train.prompts_per_step=8", "agent.eval_tasks=8", "eval.k=1", "eval.every=0", "logging.progress_bar=false"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "demo_agent"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metric"] == "Avg@1 (agent score, %)" and "Avg@1 (agent score, %)   Best@1" in out
    for key in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after"):
        assert 0.0 <= summary[key] <= 100.0, key
    assert (run_dir / "split.json").is_file() and (run_dir / "tokens.jsonl").is_file()
    assert {p.name for p in (run_dir / "plots").iterdir()} >= {"hd_plane.png", "quadrant_shares.png"}

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["teacher"]["path"] == "demo:agent_teacher"
    teacher_dir = next((tmp_path / "cache").glob("agent-pair-*")) / "teacher"
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    env = LookupEnv(num_tasks=16)
    agent = Agent(env, tok, hermes, Caps(max_turns=4, max_response_tokens=400, max_tool_response_tokens=32), False)
    sampling = Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=64, n=1, eos_ids=(tok.eos_token_id,),
                        pad_token_id=tok.pad_token_id)
    convs = agent.run(HFEngine(model), env.tasks(), list(range(16)), 1, sampling).conversations
    assert sum(c.tool_calls for c in convs) >= 8  # it really uses the tool
    for c in convs:
        turns = spans(c.ids, c.student)
        assert len(turns) == c.turns
        said = [tok.decode(t) for t in turns]
        # every turn is what the model generated: each but a capped last one ends with its end-of-turn token
        assert all(s.endswith("<|im_end|>") for s in said[:-1])
        if c.tool_calls:
            assert "<tool_call>" in said[0]
        rest = [t for t, m in zip(c.ids[c.prompt_length:], c.student[c.prompt_length:]) if not m]
        assert tok.decode(rest).count("<tool_response>") == c.tool_calls
