"""`python -m eval`: evaluate a checkpoint on benchmarks from the command line.

    python -m eval --model Qwen/Qwen3-4B --benchmarks math500,aime24,aime25 --k 16 --out runs/eval/qwen3-4b
    python -m eval --model runs/x/final --benchmarks math500=data/math500.jsonl --max-problems 50
    python -m eval --model runs/x/checkpoints/step_000200 --env lookup --split runs/x/split.json --k 4
    python -m eval --gguf-file models/SmolLM2-135M-Instruct.Q4_1.gguf --benchmarks demo --k 1

Sampling options left out keep the defaults of `opd.config.EvalConfig`. The
model loads through transformers (bfloat16 on a GPU that supports it,
float32 otherwise). Bad input (an unknown benchmark, a missing file, an
out-of-range option) ends with a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import torch

from agent.config import AgentConfig
from agent.evaluate import AgentBenchmark
from agent.registry import AgentError, build_agent
from agent.rollout import Caps
from eval.benchmarks import BenchmarkError, load_benchmark, parse_spec
from eval.config import EvalConfig
from eval.runner import evaluate, prompt_format
from lm.config import ModelConfig
from lm.gguf import check_gguf, gguf_path
from lm.models import load_model
from lm.tokenizers import load_tokenizer
from lm.vllm_engine import MISSING, build_vllm_engine, vllm_available

# command-line flag -> EvalConfig field
_CFG_FLAGS = {
    "k": "k",
    "temperature": "temperature",
    "top_p": "top_p",
    "max_new_tokens": "max_new_tokens",
    "max_problems": "max_problems",
    "batch_size": "batch_size",
    "grade_timeout": "grade_timeout_s",
    "instruction": "instruction",
    "instruction_separator": "instruction_separator",
}


def build_parser() -> argparse.ArgumentParser:
    help_of = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(EvalConfig)}
    defaults = EvalConfig()
    p = argparse.ArgumentParser(prog="python -m eval", description="mean@k / pass@k / maj@k evaluation of a causal LM.")
    p.add_argument("--model", default="", help="local checkpoint directory or hub id (with --gguf-file: the file's directory)")
    p.add_argument("--gguf-file", default="", help="a GGUF checkpoint: a file name inside --model, or its path without --model; "
                   "de-quantised once and cached (same as model.gguf_file)")
    p.add_argument("--gguf-cache-dir", default=ModelConfig.gguf_cache_dir, help="where de-quantised GGUF checkpoints are kept")
    p.add_argument("--tokenizer", default="", help="tokenizer path or hub id (default: the model's)")
    p.add_argument("--benchmarks", default="",
                   help="comma-separated: math500, aime24, aime25, dapo, demo, NAME=PATH.jsonl or PATH.jsonl")
    agent_defaults = AgentConfig()
    p.add_argument("--env", default="", help="an agent environment (lookup, deepplanning_travel or module:Class): "
                   "Avg@k / Best@k of multi-turn tool-using conversations on its tasks")
    p.add_argument("--env-args", default="{}", help='the environment\'s options as JSON, e.g. \'{"task_file": "..."}\'')
    p.add_argument("--split", default="",
                   help="a training run's split.json: evaluate its held-out tasks (default: every task of --env)")
    p.add_argument("--max-turns", type=int, default=agent_defaults.max_turns, help="assistant turns per conversation at most")
    p.add_argument("--max-response-tokens", type=int, default=agent_defaults.max_response_tokens,
                   help="tokens after the opening prompt at most (student turns, tool results, template glue)")
    p.add_argument("--max-tool-response-tokens", type=int, default=agent_defaults.max_tool_response_tokens,
                   help="a tool result is cut to this many tokens")
    p.add_argument("--tool-timeout-s", type=float, default=agent_defaults.tool_timeout_s,
                   help="seconds one tool call may take; then it is a tool error and its thread is abandoned, not killed")
    p.add_argument("--k", type=int, help=f"{help_of['k']} (default {defaults.k})")
    p.add_argument("--temperature", type=float, help=f"{help_of['temperature']} (default {defaults.temperature})")
    p.add_argument("--top-p", type=float, help=f"{help_of['top_p']} (default {defaults.top_p})")
    p.add_argument("--max-new-tokens", type=int, help=f"{help_of['max_new_tokens']} (default {defaults.max_new_tokens})")
    p.add_argument("--max-problems", type=int, help=f"{help_of['max_problems']} (default {defaults.max_problems})")
    p.add_argument("--batch-size", type=int, help=f"{help_of['batch_size']} (default {defaults.batch_size})")
    p.add_argument("--grade-timeout", type=float, help=f"{help_of['grade_timeout_s']}, seconds (default {defaults.grade_timeout_s})")
    p.add_argument("--instruction", help=f"{help_of['instruction']} (default {defaults.instruction!r})")
    p.add_argument("--instruction-separator", help=f"{help_of['instruction_separator']} (default {defaults.instruction_separator!r}; "
                   "a blank line is $'\\n\\n' in bash)")
    p.add_argument("--out", default="", help="output directory (default: runs/eval/<model name>): new, or one an "
                   "earlier evaluation wrote; a file or a training run's directory is refused")
    p.add_argument("--seed", type=int, default=0, help="fixes the samples")
    p.add_argument("--system-prompt", default="", help="optional system message")
    p.add_argument("--no-chat-template", action="store_true", help="feed the raw prompt text instead of the chat template")
    p.add_argument("--enable-thinking", action="store_true", help="passed to chat templates that understand it (Qwen3)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype; auto = bfloat16 on a GPU that supports it, else float32")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda when available")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code to run")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                   help="hf: transformers generate; vllm: a vLLM engine holding the loaded weights (README, 'Rollouts on vLLM')")
    p.add_argument("--max-model-len", type=int, default=0,
                   help="vllm: prompt + response tokens at most (default: --max-new-tokens + 2048)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.8, help="vllm on a GPU: share of its memory the engine takes")
    return p


def eval_config(args: argparse.Namespace) -> EvalConfig:
    """EvalConfig defaults with the flags that were given; range problems raise ValueError (one line)."""
    cfg = EvalConfig()
    fields = {f.name: f for f in dataclasses.fields(EvalConfig)}
    for flag, name in _CFG_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        meta = fields[name].metadata
        if "min" in meta and value < meta["min"]:
            raise ValueError(f"--{flag.replace('_', '-')} = {value} is below the minimum {meta['min']}")
        if "max" in meta and value > meta["max"]:
            raise ValueError(f"--{flag.replace('_', '-')} = {value} is above the maximum {meta['max']}")
        setattr(cfg, name, value)
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    specs = [s.strip() for s in args.benchmarks.split(",") if s.strip()]
    try:
        if not specs and not args.env:
            raise BenchmarkError("give --benchmarks or an agent --env")
        if not args.model and not args.gguf_file:
            raise ValueError("give --model (a checkpoint directory or hub id) or --gguf-file")
        gguf_problems = check_gguf("model", model_config(args))  # the file and its header, before any load
        if gguf_problems:
            raise ValueError(gguf_problems[0].replace("model.gguf_file", "--gguf-file").replace("model.path", "--model"))
        env_args = agent_options(args)
        for spec in specs:
            parse_spec(spec)
        cfg = eval_config(args)
        model_path = Path(args.model).expanduser()
        if args.model.startswith((".", "/", "~")) and not model_path.exists():
            raise ValueError(f"model directory not found: {model_path}")
        out = Path(args.out or default_out(args)).expanduser()
        check_out(out)
        # Problems before weights: a hub or file problem should not wait for a 70B load.
        for spec in specs:
            load_benchmark(spec, cfg.max_problems, prompt_format(cfg))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.engine == "vllm" and not vllm_available():
        print(f"error: {MISSING.replace('rollout.engine=vllm', '--engine vllm')}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    mc = model_config(args)
    name = str(gguf_path(mc) or args.model)
    try:
        tokenizer = load_tokenizer(mc)
    except (OSError, ValueError) as exc:
        return cannot_load(name, exc)
    try:  # the agent (its environment's files, a --split) before the weights: a typo must not wait for a load
        specs += [agent_benchmark(args, env_args, tokenizer)] if env_args is not None else []
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        model = load_model(mc, tokenizer, device, trainable=False)
    except (OSError, ValueError) as exc:
        return cannot_load(name, exc)
    engine = vllm_engine(model, args, cfg, device, out) if args.engine == "vllm" else None
    evaluate(
        model, tokenizer, specs, cfg, out, seed=args.seed, chat_template=not args.no_chat_template,
        enable_thinking=args.enable_thinking, system_prompt=args.system_prompt, engine=engine,
    )
    print(f"wrote {Path(out) / 'summary.json'} and {Path(out) / 'samples.jsonl'}")
    return 0


def default_out(args: argparse.Namespace) -> Path:
    label = Path(args.gguf_file).stem if args.gguf_file else args.model.strip("/")
    return Path("runs") / "eval" / re.sub(r"[^A-Za-z0-9_.\-]+", "_", label)


def training_run(path: Path) -> bool:
    """Whether `path` is a directory train.py made (its config, and its log or checkpoints)."""
    return (path / "config.yaml").is_file() and ((path / "metrics.jsonl").is_file() or (path / "checkpoints").is_dir())


def check_out(out: Path) -> None:
    """`--out` is new, or a directory an earlier `python -m eval` wrote (rewritten); never a file, a training
    run directory, or an evaluation a training run wrote: those are the run's own record. ValueError (one line)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory (new, or one an evaluation wrote)")
    if training_run(out):
        raise ValueError(f"--out {out} is a training run directory (its summary.json is the run's); "
                         f"give a directory of its own, e.g. {out / 'eval' / 'mine'}")
    written = [name for name in ("summary.json", "samples.jsonl") if (out / name).exists()]
    run = next((p for p in out.parents if training_run(p)), None)
    if written and run is not None:
        raise ValueError(f"--out {out} holds an evaluation of training run {run} ({written[0]}); "
                         "give a new directory")


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(path=args.model, tokenizer=args.tokenizer, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                       gguf_file=args.gguf_file, gguf_cache_dir=args.gguf_cache_dir)


def cannot_load(model: str, exc: Exception) -> int:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"error: could not load model {model!r}: {first}", file=sys.stderr)
    return 2


def agent_options(args: argparse.Namespace) -> dict | None:
    """The --env environment's options (None without --env); ValueError (one line) for bad flags."""
    if not args.env:
        return None
    try:
        options = json.loads(args.env_args)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--env-args is not JSON ({exc.msg})") from None
    if not isinstance(options, dict):
        raise ValueError("--env-args must be a JSON object")
    for flag in ("max_turns", "max_response_tokens", "max_tool_response_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0 < args.tool_timeout_s <= 86400:  # also refuses nan
        raise ValueError("--tool-timeout-s must be greater than 0 and at most 86400 seconds")
    return options


def agent_benchmark(args: argparse.Namespace, env_args: dict, tokenizer) -> AgentBenchmark:
    """The environment's tasks (or a run's held-out ones, --split) as a benchmark named after the environment.
    ValueError (one line, naming the flag) when the agent cannot be built or the split does not fit."""
    caps = Caps(args.max_turns, args.max_response_tokens, args.max_tool_response_tokens, args.tool_timeout_s)
    try:
        agent = build_agent(args.env, env_args, tokenizer, "hermes", caps, args.enable_thinking)
    except AgentError as exc:
        raise ValueError(f"--{exc.key.replace('_', '-')}: {exc}") from None
    tasks = agent.env.tasks()
    name = "heldout" if args.split else args.env.replace(":", "_")
    if args.split:
        try:
            wanted = json.loads(Path(args.split).read_text())["heldout"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"--split {args.split}: not a run's split.json ({type(exc).__name__})") from None
        by_id = {t.id: t for t in tasks}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise ValueError(f"--split {args.split}: task {missing[0]!r} is not among the environment's tasks")
        tasks = [by_id[i] for i in wanted]
    return AgentBenchmark(name, agent, tasks)


def vllm_engine(model, args: argparse.Namespace, cfg: EvalConfig, device: torch.device, out: str):
    """A vLLM engine holding `model`'s weights (built from its config, then synced: the checkpoint is read once)."""
    longest = args.max_model_len or cfg.max_new_tokens + 2048
    engine = build_vllm_engine(
        model, Path(out) / "vllm_model", dtype=next(model.parameters()).dtype,
        max_model_len=min(longest, getattr(model.config, "max_position_embeddings", longest)), device=device,
        num_processes=1, gpu_memory_utilization=args.gpu_memory_utilization, cpu_kv_cache_gb=4, sleep=False,
        enforce_eager=False,
    )
    engine.sync(model.named_parameters())
    return engine
