"""The third reliability round (tracker issue 26), items 5-8: user environments that misbehave.

The contract (agent/env.py): a tool returns a string; anything it does wrong (raises anything, SystemExit
included; returns a non-string; does not return within agent.tool_timeout_s) becomes a tool message starting
`Error:` that the model reads, counted in agent/tool_errors, and the run goes on. score() returns a Score whose
value is a finite number in [0, 1]; anything else (it raises, returns something else, NaN, inf) scores the
conversation 0, counted in agent/score_errors, with one warning line naming the environment. An environment
that cannot be built is one `error:` line naming it and its exception, exit 2.

The faults come from tests/reliability/misbehaving_env.py (the `lookup` environment with one fault; pytest puts
its folder on sys.path). Runs go through the real CLIs (train.py's and `python -m eval`'s main, in process) with a scripted engine: its first turn of every conversation
looks a key up, its second answers, so every conversation makes one tool call.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from agent.calls import hermes
from agent.env import Score
from agent.rollout import Agent, Caps
from conftest import read_metrics, write_config
from eval import cli as eval_cli
from lm.engines import Sampling
from lm.rollout import assemble
from lm.tokenizers import chat_char_tokenizer
from misbehaving_env import Misbehaving
from opd import cli
import opd.setup

TOK = chat_char_tokenizer()
TINY = {"arch": "llama", "tokenizer": "chat_chars", "hidden_size": 32, "num_layers": 1, "num_heads": 2,
        "num_kv_heads": 1, "intermediate_size": 64}
ENV = "misbehaving_env:Misbehaving"


def script(prompt_text: str) -> str:
    """The k-th assistant turn: first look the first key up, then answer."""
    task = prompt_text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    if "<tool_response>" not in prompt_text:
        return '<tool_call>{"name":"get","arguments":{"k":"%s"}}</tool_call>' % task.split("+")[0]
    return f"{task}:>0"


class Scripted:
    """Answers every prompt with script(text) and its end-of-turn token; anything else is the real engine's."""

    def __init__(self, inner=None):
        self.inner = inner

    def generate(self, prompts, prompt_seeds, s):
        responses = [(TOK(script(TOK.decode(p)), add_special_tokens=False)["input_ids"] + [TOK.eos_token_id])
                     [:s.max_new_tokens] for p in prompts]
        return assemble(prompts, list(range(len(prompts))), responses, [False] * len(prompts), TOK.pad_token_id)

    def __getattr__(self, name):  # sync, sleep, ...
        return getattr(self.inner, name)


@pytest.fixture
def scripted(monkeypatch):
    real = opd.setup.build_engine
    monkeypatch.setattr(opd.setup, "build_engine", lambda *a, **k: Scripted(real(*a, **k)))


def config(tmp_path: Path, fault: str, **sections) -> Path:
    cfg = {
        "model": dict(TINY), "teacher": {**TINY, "init_seed": 1},
        "agent": {"env": ENV, "env_args": {"fault": fault, "num_tasks": 20}, "max_turns": 3,
                  "max_response_tokens": 120, "max_tool_response_tokens": 8, "eval_tasks": 2},
        "rollout": {"max_new_tokens": 48, "n": 2},
        "train": {"steps": 2, "prompts_per_step": 2, "micro_batch_size": 4, "output_dir": str(tmp_path / "runs"),
                  "save_every": 1, "seed": 5, "run_name": "run"},
        "eval": {"every": 0, "at_start": False, "at_end": False, "k": 1, "max_new_tokens": 48},
        "logging": {"progress_bar": False},
        "tip": {"plots": False},
        "optim": {"lr": 1e-3},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return write_config(tmp_path / "agent.yaml", cfg)


def run(tmp_path, capsys, fault, *overrides, **sections):
    capsys.readouterr()
    code = cli.main(["--config", str(config(tmp_path, fault, **sections)), *overrides])
    out = capsys.readouterr()
    return code, out.out, out.err


def steps_of(tmp_path) -> list[dict]:
    return [m for m in read_metrics(tmp_path / "runs" / "run") if "opd/loss" in m]


def conversation(env, tool_timeout_s: float = 5.0):
    caps = Caps(3, 200, 50, tool_timeout_s=tool_timeout_s)
    agent = Agent(env, TOK, hermes, caps, enable_thinking=False)
    sampling = Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=80, n=1, eos_ids=(TOK.eos_token_id,),
                        pad_token_id=TOK.pad_token_id)
    return agent.run(Scripted(), env.tasks()[:1], [0], 1, sampling).conversations[0]


def warnings_of(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


# ----------------------------------------------------------------------------
# 5: a tool raising SystemExit


def test_a_tool_raising_system_exit_is_a_tool_error():
    c = conversation(Misbehaving("system_exit"))
    assert (c.tool_calls, c.tool_errors) == (1, 1)
    assert "Error: tool 'get' failed (SystemExit" in TOK.decode(c.ids)


def test_a_tool_raising_system_exit_never_ends_the_run(tmp_path, capsys, scripted):
    # 5: the run ended with exit 0, silently, in step 1, without a checkpoint
    code, out, err = run(tmp_path, capsys, "system_exit")
    assert code == 0, err
    steps = steps_of(tmp_path)
    assert len(steps) == 2 and all(m["agent/tool_errors"] == m["agent/tool_calls"] == 4 for m in steps)
    assert (tmp_path / "runs" / "run" / "checkpoints" / "step_000002").is_dir()
    warned = warnings_of(err)
    assert len(warned) == 1 and ENV in warned[0] and "SystemExit" in warned[0], err


def test_a_real_interrupt_inside_a_tool_is_not_swallowed(monkeypatch):
    # the main thread's KeyboardInterrupt (Ctrl-C while a tool runs) still stops the run
    import threading
    original, calls = threading.Event.wait, []

    def wait(self, timeout=None):
        if timeout != 5.0:  # Thread.start's own wait
            return original(self, timeout)
        calls.append(timeout)
        raise KeyboardInterrupt  # what SIGINT raises in the main thread while it waits for the tool
    monkeypatch.setattr(threading.Event, "wait", wait)
    with pytest.raises(KeyboardInterrupt):
        conversation(Misbehaving("hang"))
    assert calls == [5.0]


# ----------------------------------------------------------------------------
# 6: score() raising, the constructor raising


def test_a_score_that_raises_scores_zero_and_is_counted(tmp_path, capsys, scripted):
    # 6: a traceback (exit 1) in step 1
    code, out, err = run(tmp_path, capsys, "score_raises", opd={"reward_beta": 0.5})
    assert code == 0, err
    steps = steps_of(tmp_path)
    assert len(steps) == 2
    assert all(m["agent/score_errors"] == 4 and m["agent/score_mean"] == 0 for m in steps)
    warned = warnings_of(err)
    assert len(warned) == 1 and ENV in warned[0] and "RuntimeError: the grader crashed" in warned[0], err


@pytest.mark.parametrize("fault,cause", [("init_raises", "RuntimeError: the catalogue server is down"),
                                         ("init_exit", "SystemExit: 3")])
def test_a_constructor_that_raises_is_one_error_line(tmp_path, capsys, fault, cause):
    # 6: RuntimeError was reported as "cannot read its files"; SystemExit ended train.py with exit 3, silently
    code, out, err = run(tmp_path, capsys, fault)
    assert code == 2 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        f"error: agent.env: {ENV} could not be built ({cause})"], err
    assert not (tmp_path / "runs").exists()


def test_a_constructor_that_raises_is_one_error_line_in_the_evaluation_cli(tmp_path, capsys):
    # 6: `python -m eval --env` printed a traceback. The environment is built before the weights are read:
    # an empty model directory is enough.
    code = eval_cli.main(["--model", str(tmp_path), "--tokenizer", "chat_chars", "--env", ENV, "--env-args",
                          json.dumps({"fault": "init_raises"}), "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.splitlines() == [f"error: --env: {ENV} could not be built (RuntimeError: the catalogue server is down)"]
    assert not (tmp_path / "eval").exists()


# ----------------------------------------------------------------------------
# 7: a tool that never returns


def test_a_hung_tool_times_out_as_a_tool_error():
    t0 = time.monotonic()
    c = conversation(Misbehaving("hang"), tool_timeout_s=0.2)
    assert time.monotonic() - t0 < 10
    assert (c.tool_calls, c.tool_errors) == (1, 1)
    assert "Error: tool 'get' did not return within 0.2 s" in TOK.decode(c.ids)


def test_a_hung_tool_does_not_hang_training(tmp_path, capsys, scripted):
    # 7: training hung for ever in step 1
    code, out, err = run(tmp_path, capsys, "hang", "agent.tool_timeout_s=0.1")
    assert code == 0, err
    steps = steps_of(tmp_path)
    assert len(steps) == 2 and all(m["agent/tool_errors"] == 4 for m in steps)
    assert len(warnings_of(err)) == 1 and "did not return within 0.1 s" in err


@pytest.mark.parametrize("value,message", [("0", "must be greater than 0"), ("-1", "must be greater than 0"),
                                           (".nan", "not a finite number"), ("abc", "")])
def test_tool_timeout_is_validated(tmp_path, capsys, value, message):
    code, out, err = run(tmp_path, capsys, "", f"agent.tool_timeout_s={value}")
    assert code == 2 and "agent.tool_timeout_s" in err and message in err, err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------
# 8: tool results that are not strings; scores that are not finite numbers in [0, 1]


@pytest.mark.parametrize("fault,kind", [("none_result", "NoneType"), ("int_result", "int")])
def test_a_tool_returning_a_non_string_is_a_tool_error(fault, kind):
    c = conversation(Misbehaving(fault))
    assert (c.tool_calls, c.tool_errors) == (1, 1)
    text = TOK.decode(c.ids)
    assert f"Error: tool 'get' returned {kind}, not a string" in text and "None" not in text.replace("NoneType", "")


def test_a_tool_returning_none_is_counted_in_training(tmp_path, capsys, scripted):
    # 8: shown to the model as "None", not counted
    code, out, err = run(tmp_path, capsys, "none_result")
    assert code == 0, err
    assert all(m["agent/tool_errors"] == 4 for m in steps_of(tmp_path))
    assert len(warnings_of(err)) == 1 and "returned NoneType, not a string" in err


@pytest.mark.parametrize("fault,cause", [("score_nan", "the value nan, not a finite number in [0, 1]"),
                                         ("score_inf", "the value inf, not a finite number in [0, 1]"),
                                         ("score_none", "returned NoneType, not a Score")])
def test_an_invalid_score_is_zero_and_counted_never_silent(tmp_path, capsys, scripted, fault, cause):
    # 8: a NaN score with reward weighting skipped every update without a word
    code, out, err = run(tmp_path, capsys, fault, opd={"reward_beta": 0.5})
    assert code == 0, err
    steps = steps_of(tmp_path)
    assert len(steps) == 2
    for m in steps:
        assert m["agent/score_errors"] == 4 and m["agent/score_mean"] == 0 and math.isfinite(m["opd/loss"])
        assert m["opd/skipped_updates"] == 0
    warned = warnings_of(err)
    assert len(warned) == 1 and ENV in warned[0] and cause in warned[0], err


@pytest.mark.parametrize("score", [Score(math.nan), Score(1.5), Score(-0.1), Score(0.5, {"p": math.inf}),
                                   Score("1"), 0.5, None])
def test_score_contract(score):
    class Fixed(Misbehaving):
        def score(self, task, state, final_text):
            return score
    c = conversation(Fixed())
    assert c.score == Score(0.0) and c.score_error


def test_a_valid_score_is_kept():
    class Fixed(Misbehaving):
        def score(self, task, state, final_text):
            return Score(1, {"p": 0.25})
    c = conversation(Fixed())
    assert c.score == Score(1.0, {"p": 0.25}) and not c.score_error and c.tool_errors == 0


def test_invalid_scores_are_counted_in_the_evaluation_summary(tmp_path, capsys, scripted):
    # 8: the held-out evaluation averaged the scores it was given without a word
    code, out, err = run(tmp_path, capsys, "score_nan", eval={"at_end": True}, train={"steps": 1})
    assert code == 0, err
    final = json.loads((tmp_path / "runs" / "run" / "eval" / "final" / "summary.json").read_text())
    heldout = final["benchmarks"]["heldout"]
    assert heldout["score_errors"] == 2 and heldout["avg@k"] == 0
    samples = [json.loads(line) for line in (tmp_path / "runs" / "run" / "eval" / "final" / "samples.jsonl")
               .read_text().splitlines()]
    assert all("not a finite number in [0, 1]" in s["score_error"] for s in samples if s["benchmark"] == "heldout")
