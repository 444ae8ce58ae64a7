"""Teacher and student of the demo task, trained here in a few CPU minutes and cached.

`prepare_pair(settings)` trains a teacher (supervised on worked
solutions, loss on response tokens only) and a smaller, under-trained student,
and saves both as ordinary Hugging Face checkpoints:

    <cache_dir>/pair-<hash of the settings>/teacher/   config, safetensors weights, tokenizer
    <cache_dir>/pair-<hash of the settings>/student/
    <cache_dir>/pair-<hash of the settings>/pair.json  settings, accuracies, timings

The pair is written to a temporary directory and renamed into place, so an
interrupted preparation never leaves half a pair; a later call with the same
settings returns the cached pair at once. From then on the two load like any
checkpoint, with AutoModelForCausalLM / AutoTokenizer.from_pretrained.

    python -m demo.prepare [--cache DIR] [key=value ...]

prints the measured accuracies (sampled at temperature 1.0, the paper's protocol).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import lm.chat
from demo import task
from demo.config import DemoConfig, check_demo, pair_fields
from lm.config import ModelConfig
from lm.models import random_model_config
from lm.rollout import sample
from lm.typed import apply, parse_value

FORMAT = 1
"""Part of the cache key: bump it when a change here makes the same settings train a different pair."""


def pair_settings(settings: dict | DemoConfig | None = None) -> DemoConfig:
    """Validated settings from a dict (YAML-typed or command-line text values); ValueError names every bad key."""
    if isinstance(settings, DemoConfig):
        settings = dataclasses.asdict(settings)
    values = {k: parse_value(v) if isinstance(v, str) else v for k, v in dict(settings or {}).items()}
    s, problems = DemoConfig(), []
    apply(s, values, "", {k: "demo settings" for k in values}, problems)
    problems += [] if problems else check_demo(s, prefix="")
    if problems:
        raise ValueError("; ".join(problems))
    return s


def settings_key(s: DemoConfig) -> str:
    """Hash of everything that changes the trained pair (12 hex digits)."""
    data = pair_fields(s)
    data["format"], data["digits"] = FORMAT, task.DIGITS
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def build_model(s: DemoConfig, side: str, tokenizer):
    """A randomly initialised causal LM of the given side ("teacher" or "student"), fp32."""
    hidden, heads = getattr(s, f"{side}_hidden"), getattr(s, f"{side}_heads")
    mc = ModelConfig(arch=s.arch, hidden_size=hidden, num_layers=getattr(s, f"{side}_layers"), num_heads=heads,
                     num_kv_heads=heads, intermediate_size=4 * hidden)
    cfg = random_model_config(mc, len(tokenizer), tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed + (0 if side == "teacher" else 1))
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids: the problem as a user message, chat template, assistant turn opened."""
    return lm.chat.encode_prompt(tokenizer, prompt, instruction="", separator="", system_prompt="", chat_template=True,
                                 enable_thinking=False)


def supervised_batch(tokenizer, records: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), each (B, T), right-padded; labels are -100 off the response.

    The response is the worked solution then EOS, so the model learns to stop.
    """
    rows = []
    for rec in records:
        prompt = encode_prompt(tokenizer, rec["prompt"])
        response = tokenizer(rec["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt + response, [-100] * len(prompt) + response))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, labs) in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        labels[r, :len(labs)] = torch.tensor(labs)
        attention[r, :len(ids)] = 1
    return input_ids, attention, labels


def supervised_train(model, tokenizer, s: DemoConfig, steps: int, lr: float, seed: int, log=print, name: str = "") -> float:
    """Train on worked solutions for `steps` AdamW steps (warm-up, then cosine to 5% of lr).

    Returns the wall-clock seconds spent.
    """
    records = task.train_records(steps * s.batch_size, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    model.train()
    start = time.time()
    for step in range(steps):
        warm = min(1.0, (step + 1) / max(1, s.warmup_steps))
        # a floor keeps the last steps useful; the small models here still learn late
        decay = 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * warm * decay
        input_ids, attention, labels = supervised_batch(tokenizer, records[step * s.batch_size:(step + 1) * s.batch_size])
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % max(1, steps // 5) == 0 or step + 1 == steps:
            log(f"demo: {name} step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    model.eval()
    return time.time() - start


def max_response_tokens(digits: int) -> int:
    """Length bound of a worked solution of `digits` digits, EOS included, with room for mistakes."""
    longest = task.solution(10 ** digits - 1, 9)
    return len(longest) + 8


def accuracy(model, tokenizer, problems: list[dict], *, temperature: float = 1.0, seed: int = 0) -> float:
    """Share of `problems` answered correctly, one sample each at `temperature` (0 = greedy)."""
    prompts = [encode_prompt(tokenizer, p["prompt"]) for p in problems]
    rollouts = sample(model, prompts, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=max_response_tokens(task.DIGITS), n=1,
                      batch_size=256, seed=seed)
    texts = tokenizer.batch_decode(rollouts.response_ids(), skip_special_tokens=True)
    return sum(task.grade(t, p["answer"]) for t, p in zip(texts, problems)) / len(problems)


def prepare_pair(settings: dict | DemoConfig | None, log=print) -> tuple[Path, Path]:
    """Train (or reuse from `settings.cache_dir`) the demo teacher and student; returns (teacher_dir, student_dir)."""
    s = pair_settings(settings)
    final = Path(s.cache_dir).expanduser() / f"pair-{settings_key(s)}"
    return cached_pair(final, s.num_threads, lambda out: _train_pair(s, out, log), "demo", log)


def cached_pair(final: Path, num_threads: int, train, what: str, log) -> tuple[Path, Path]:
    """The pair in `final` (teacher/, student/, pair.json), trained by `train(directory) -> info` when absent.

    Trained into a temporary sibling and renamed into place, so an interrupted preparation never leaves
    half a pair. Processes preparing pairs at once (the processes of one launch) take turns on a lock of
    the cache directory: one trains, the others then find its pair. `num_threads` (0 = as is) holds while
    training.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(final.parent, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed, also when the process dies
        if (final / "pair.json").is_file():
            log(f"{what}: reusing the prepared pair in {final}")
            return final / "teacher", final / "student"
        _train_into(final, num_threads, train)
    finally:
        os.close(lock)
    log(f"{what}: pair ready in {final}")
    return final / "teacher", final / "student"


def _train_into(final: Path, num_threads: int, train) -> None:
    threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        info = train(tmp)
        (tmp / "pair.json").write_text(json.dumps(info, indent=2) + "\n")
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        torch.set_num_threads(threads)


def _train_pair(s: DemoConfig, out: Path, log) -> dict:
    tokenizer = task.tokenizer()
    problems = task.eval_problems(s.eval_problems, s.seed)
    info: dict = {"settings": dataclasses.asdict(s), "task": "multiplication", "eval_problems": len(problems),
                  "load_average": list(os.getloadavg()), "torch_threads": torch.get_num_threads()}
    for side in ("teacher", "student"):
        model = build_model(s, side, tokenizer)
        steps, lr = getattr(s, f"{side}_steps"), getattr(s, f"{side}_lr")
        n_params = sum(p.numel() for p in model.parameters())
        log(f"demo: training the {side} ({getattr(s, f'{side}_layers')} layers x {getattr(s, f'{side}_hidden')} hidden, "
            f"{n_params / 1e6:.2f}M parameters, {steps} steps)")
        seconds = supervised_train(model, tokenizer, s, steps, lr, seed=s.seed + (0 if side == "teacher" else 1),
                                   log=log, name=side)
        sampled = accuracy(model, tokenizer, problems, temperature=1.0, seed=s.seed)
        greedy = accuracy(model, tokenizer, problems, temperature=0.0, seed=s.seed)
        log(f"demo: {side} accuracy {sampled:.1%} sampled at T=1.0, {greedy:.1%} greedy ({seconds:.0f} s of training)")
        model.save_pretrained(out / side, safe_serialization=True)
        tokenizer.save_pretrained(out / side)
        info[side] = {"accuracy_t1": sampled, "accuracy_greedy": greedy, "train_seconds": round(seconds, 1),
                      "parameters": n_params, "steps": steps}
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=None, help=f"cache directory (default {DemoConfig.cache_dir}; same as cache_dir=DIR)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="settings: " + ", ".join(f.name for f in dataclasses.fields(DemoConfig)))
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
        teacher_dir, _ = prepare_pair(settings)
    except ValueError as exc:
        parser.error(str(exc))
    info = json.loads((teacher_dir.parent / "pair.json").read_text())
    for side in ("teacher", "student"):
        print(f"{side}: {info[side]['accuracy_t1']:.1%} sampled at T=1.0, {info[side]['accuracy_greedy']:.1%} greedy "
              f"({info[side]['parameters']} parameters, {info[side]['steps']} steps)")
    print(f"pair: {teacher_dir.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
