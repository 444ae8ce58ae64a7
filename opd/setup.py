"""The set-up of a run: run directory, rollout source, models and the teacher, optimiser and schedule, resumed state.

`setup(cfg)` returns the `Run` that `opd.trainer.train` drives; nothing here
runs a training step or prepares a model (the demo pairs are made by the one
preparation step before it, opd.cli.prepare).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from lm.config import DEFAULT_TEACHER, OneTeacherConfig
from lm.gguf import gguf_path
from lm.models import head_weight, load_model, rows
from lm.served import RayTeacher, TeacherUnavailable
from lm.teacher import LocalTeacher, RoutedTeacher, Teacher
from lm.tokenizers import check_tokenizers, load_tokenizer
from opd.checkpoint import check_run_dir, check_same_data, holds_run, resume, run_directory
from opd.config import Config, save_config, to_dict
from opd.data import PromptSampler, prompts_digest
from opd.distributed import built_whole, global_max, global_sum, make_accelerator, zero3_inference_engine
from opd.engine import build_engine, rollout_sampling
from opd.errors import RunError, loading
from opd.lock import RunLock
from opd.policy import PolicyModel
from opd.sources import RolloutSource, build_source, unrouted
from opd.step import LOSS_IMPLS, SelectorState, StepSettings, new_selector_state
from opd.tracking import MetricsLog, writing


@dataclass
class Run:
    """Everything a running training job holds; `step` is the last finished step."""

    cfg: Config
    accelerator: Accelerator
    run_dir: Path
    tokenizer: PreTrainedTokenizerBase
    policy: PolicyModel  # the unwrapped student
    student: torch.nn.Module  # the prepared PolicyModel (wrapped by DDP / DeepSpeed when launched so)
    teacher: Teacher  # scores the step's micro-batches (lm.teacher): phase 1 of the step
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    source: RolloutSource  # where rollouts come from: prompts or tasks, held-out part, rollout and reward
    sampler: PromptSampler  # the step's prompts, drawn from source.prompts
    log: MetricsLog
    settings: StepSettings
    selector_state: SelectorState
    total_steps: int
    step: int = 0
    engine: object = None  # the rollout engine (lm.engines: HF generate or a colocated vLLM), built after resuming
    sampling: object = None  # lm.engines.Sampling of the training rollouts
    bar: tqdm | None = None
    started: float = field(default_factory=time.time)
    evals: dict[str, dict] = field(default_factory=dict)  # evaluation name -> eval summary
    data_hash: str = ""  # opd.data.prompts_digest of source.prompts, recorded in every checkpoint

    def student_head(self) -> torch.Tensor:
        return head_weight(self.policy.lm)

    def progress(self, metrics: dict) -> None:
        if self.bar is not None:
            tokens = metrics.get("opd/num_tokens", 0)
            self.bar.set_postfix(loss=f"{metrics.get('opd/loss', float('nan')):.4f}",
                                 tok_s=f"{tokens / max(metrics['timing/step_s'], 1e-9):.0f}")
            self.bar.update(1)


def setup(cfg: Config, config_paths=(), prepared: dict[str, str] | None = None, started: float | None = None,
          lock: RunLock | None = None) -> Run:
    """Build the run: accelerator, run directory, data, models, optimiser; resume if a checkpoint exists.
    `prepared`: prepared model names -> checkpoint directories (opd.cli.prepare: the demo pairs); `lock`: the
    run directory's lock as the caller took it (opd.lock), refused here on every process when another run holds it."""
    started = started or time.time()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    acc = make_accelerator(cfg)
    ds_plugin = acc.state.deepspeed_plugin
    zero3 = ds_plugin is not None and ds_plugin.zero_stage == 3
    run_dir = prepare_run_dir(cfg, config_paths, acc, lock)
    given = copy.deepcopy(cfg)  # what config.yaml records: `demo:teacher`, not this machine's cache path
    use_prepared(cfg, prepared or {})

    with loading("model.tokenizer", cfg.model.tokenizer or model_name(cfg.model)):
        tokenizer = load_tokenizer(cfg.model)
    with loading("teacher.tokenizer", cfg.teacher.tokenizer or model_name(cfg.teacher)):
        teacher_tok = load_tokenizer(cfg.teacher)
    # data before models: a bad record refused with its file and line costs seconds, not a model load
    source = build_source(cfg, tokenizer, run_dir, acc)
    data_hash = prompts_digest(source.prompts)
    if cfg.train.resume == "auto":  # refused before any model loads
        check_same_data(run_dir, data_hash, *(("agent.env", cfg.agent.env) if cfg.agent.env
                                              else ("data.train_path", cfg.data.train_path)))
    routes = "".join(f"; teacher of {name!r}: {model_name(tc)}" for name, tc in cfg.teacher.routes.items())
    acc.print(f"models: student {model_name(cfg.model)}, teacher {model_name(cfg.teacher)}{routes}")
    student_lm, teacher = load_pair(cfg, tokenizer, teacher_tok, acc, zero3, run_dir,
                                    frozenset(p.data_source for p in source.prompts))

    total_steps = cfg.train.steps or cfg.train.epochs * math.ceil(len(source.prompts) / cfg.train.prompts_per_step)
    updates_per_step = cfg.train.prompts_per_step // (cfg.train.mini_batch_size or cfg.train.prompts_per_step)
    # embedding_rows: one process without DeepSpeed (nothing else hooks the gradients; see PolicyModel)
    policy = PolicyModel(student_lm, group=cfg.opd.length_groups, embedding_rows=acc.distributed_type == DistributedType.NO,
                         same_calls=same_calls(acc, zero3))
    student, optimizer = acc.prepare(policy, build_optimizer(policy, cfg.optim))
    # Built on the prepared optimizer and not handed to accelerate: its scheduler wrapper would step
    # num_processes times per update, and DeepSpeed may replace the optimizer (offload: DeepSpeedCPUAdam).
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps * updates_per_step)
    run = Run(
        cfg=cfg, accelerator=acc, run_dir=run_dir, tokenizer=tokenizer, policy=policy, student=student,
        teacher=teacher,
        optimizer=optimizer, scheduler=scheduler, source=source, sampler=PromptSampler(source.prompts, cfg.train.seed),
        log=MetricsLog(run_dir, cfg.logging, to_dict(cfg), enabled=acc.is_main_process),
        settings=step_settings(cfg), selector_state=new_selector_state(),
        total_steps=total_steps, started=started, data_hash=data_hash,
    )
    resume(run)
    run.engine = build_engine(policy.lm, cfg.rollout, cfg.data.max_prompt_length + source.response_budget, run_dir,
                              acc, zero3)
    vocab_limit = min(rows(head_weight(student_lm)), teacher.vocab)  # sampled ids the teacher can score
    run.sampling = rollout_sampling(cfg.rollout, eos_ids(tokenizer, student_lm), tokenizer.pad_token_id, vocab_limit)
    if acc.is_main_process and not (run.step >= total_steps and (run_dir / "summary.json").is_file()):
        with writing(run_dir / "config.yaml"):  # a no-op rerun of a finished run changes no file
            save_config(given, run_dir / "config.yaml")
    if cfg.logging.progress_bar and acc.is_main_process and run.step < total_steps:
        run.bar = tqdm(total=total_steps, initial=run.step, desc="opd", dynamic_ncols=True)
    return run


def model_name(mc) -> str:
    """How the run's log names a model: its GGUF file, its path, or its random-init architecture."""
    if mc.gguf_file:
        return f"{gguf_path(mc)} (GGUF)"
    return mc.path or mc.arch + " (random init)"


def load_pair(cfg: Config, tokenizer, teacher_tok, acc: Accelerator, zero3: bool, run_dir: Path,
              sources: frozenset = frozenset()):
    """(student, teacher): the student on the run's device, the teacher in this process or served
    (teacher.placement); with teacher.routes the teachers of the data sources in `sources` (those of the
    training prompts) behind one RoutedTeacher. Every teacher's tokenizer is checked against the student's."""
    ds_plugin = acc.state.deepspeed_plugin

    def build(mc, tok, trainable: bool, sharded: bool):
        # With zero3_init_flag models are loaded already sharded (zero.Init); a replicated teacher must not be.
        # A random-init model (no path: tests, benchmarks) is built whole and sharded by DeepSpeed after:
        # zero.Init would draw other initial weights than a single process does.
        whole = zero3 and not (sharded and (mc.path or mc.gguf_file))
        with built_whole(ds_plugin) if whole else contextlib.nullcontext():
            return load_model(mc, tok, acc.device, trainable=trainable)

    # The student trains in float32 under bf16 autocast on GPU ('auto'); the teacher is stored in bf16.
    student_mc = cfg.model if cfg.model.dtype != "auto" else dataclasses.replace(cfg.model, dtype="float32")
    with loading("model.gguf_file" if cfg.model.gguf_file else "model.path", model_name(cfg.model)):
        student_lm = build(student_mc, tokenizer, trainable=True, sharded=True)
    teachers = {}
    for name, key, tc in teacher_sections(cfg, sources, zero3):
        tok = teacher_tok if name == DEFAULT_TEACHER else tokenizer_of(key, tc)
        if tc.placement == "ray":
            teachers[name] = served_teacher(tc, acc, run_dir, key, group=cfg.opd.length_groups)
        else:
            with loading(f"{key}.gguf_file" if tc.gguf_file else f"{key}.path", model_name(tc)):
                teacher_lm = build(tc, tok, trainable=False, sharded=cfg.opd.teacher_zero3)
            sharded = zero3 and cfg.opd.teacher_zero3
            teachers[name] = local_teacher(teacher_lm, cfg.opd, acc.device,
                                           zero3_inference_engine(teacher_lm, acc) if sharded else None,
                                           same_calls(acc, sharded))
        try:
            check_tokenizers(tokenizer, tok, rows(student_lm.get_output_embeddings().weight), teachers[name].vocab)
        except ValueError as exc:
            raise RunError(f"{key}: {exc}" if name != DEFAULT_TEACHER else str(exc)) from None
    teacher = RoutedTeacher(teachers, DEFAULT_TEACHER) if cfg.teacher.routes else teachers[DEFAULT_TEACHER]
    return student_lm, teacher


def teacher_sections(cfg: Config, sources: frozenset, zero3: bool) -> list[tuple[str, str, OneTeacherConfig]]:
    """(name, config key, section) of every teacher the run loads: each route whose data source the training
    prompts have (a route naming none is refused), and the teacher: section's own when a prompt has no route
    (or eval.teacher evaluates it)."""
    routes = cfg.teacher.routes
    for problem in unrouted(cfg, set(sources)):
        raise RunError(problem)
    if routes and zero3 and cfg.opd.teacher_zero3:
        raise RunError("teacher.routes: several teachers cannot be ZeRO-3-sharded over the processes (a process "
                       "whose micro-batches hold no rollout of a source would leave the others waiting in that "
                       "teacher's forward); set opd.teacher_zero3: false or serve them (placement: ray)")
    default = not routes or sources - set(routes) or cfg.eval.teacher
    return [(key.removeprefix("teacher.routes.") if key != "teacher" else DEFAULT_TEACHER, key, tc)
            for key, tc in cfg.teacher.sections() if key != "teacher" or default]


def tokenizer_of(key: str, tc: OneTeacherConfig):
    with loading(f"{key}.tokenizer", tc.tokenizer or model_name(tc)):
        return load_tokenizer(tc)


def local_teacher(model, oc, device: torch.device, engine, same_calls=None) -> LocalTeacher:
    """The teacher in this process, returning what `opd.loss_impl` reads (oc: the opd section); `engine` is its
    ZeRO-3 inference engine when it is sharded over the processes (`same_calls` then agrees the forward calls)."""
    cache_device = torch.device("cpu") if oc.teacher_cache_device == "cpu" else device
    return LocalTeacher(model, reads=LOSS_IMPLS[oc.loss_impl].reads, device=device, cache_device=cache_device,
                        offload=oc.offload_teacher, engine=engine, group=oc.length_groups, same_calls=same_calls)


def same_calls(acc: Accelerator, sharded: bool):
    """For a ZeRO-3-sharded model in length groups: every process's number of forward calls from this one's (the
    maximum; lm.length_groups); None otherwise."""
    return functools.partial(global_max, acc) if sharded else None


def served_teacher(tc, acc: Accelerator, run_dir: Path, key: str = "teacher", group: bool = False) -> RayTeacher:
    """A teacher on a pool of Ray actors (`key`.ray). The run directory records the weights hash of the teacher it
    started with (teacher.json; a route's: teacher-<source digest>.json); a rerun whose replicas hold another
    teacher is refused."""
    name = "teacher.json" if key == "teacher" else f"teacher-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"
    record = run_dir / name
    recorded = json.loads(record.read_text())["fingerprint"] if record.is_file() and holds_run(run_dir) else None
    served_mc = dataclasses.replace(tc, gguf_cache_dir=str(Path(tc.gguf_cache_dir).resolve()))
    try:
        teacher = RayTeacher(served_mc, tc.ray, acc.device, process_index=acc.process_index,
                             num_processes=acc.num_processes, share=shared(acc), recorded=recorded, log=acc.print,
                             key=key, group=group)
    except TeacherUnavailable as exc:
        raise RunError(str(exc)) from None
    if acc.is_main_process and recorded is None:
        with writing(record):
            tmp = record.with_name(f".{record.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps({"config_key": key, "fingerprint": teacher.fingerprint,
                                       "replicas": teacher.replicas}, indent=1))
            os.replace(tmp, record)
    return teacher


def shared(acc: Accelerator):
    """obj -> process 0's obj on every process (a no-op for one process)."""
    if acc.num_processes == 1:
        return lambda obj: obj
    return lambda obj: broadcast_object_list([obj], from_process=0)[0]


def step_settings(cfg: Config) -> StepSettings:
    return StepSettings(
        loss_impl=cfg.opd.loss_impl, loss_type=cfg.opd.loss_type, beta=cfg.opd.beta, chunk_size=cfg.opd.chunk_size,
        selector=cfg.tip.selector, ratio=cfg.tip.ratio, scope=cfg.tip.scope,
        select_options={"normalize": cfg.tip.normalize, "momentum": cfg.tip.momentum,
                        "importance_weighting": cfg.tip.importance_weighting},
        topk=cfg.tip.dump_topk if cfg.tip.dump_tokens else 0,
    )


def eos_ids(tokenizer, model) -> list[int]:
    """The ids that end a response: the tokenizer's EOS and the model's generation_config EOS ids."""
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return sorted({tokenizer.eos_token_id, *([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))} - {None})


def prepare_run_dir(cfg: Config, config_paths, acc, lock: RunLock | None = None) -> Path:
    """The run directory: new, or an existing run with a compatible config (rules in opd.checkpoint.check_run_dir),
    that no other run holds (`lock`)."""
    held = lock is not None and lock.problem
    problems = [lock.problem] if held else check_run_dir(cfg, config_paths)  # [] on all but the main process
    if global_sum(acc, float(bool(problems))) > 0:
        raise RunError(problems[0] if problems else "the main process refused the run directory (its error says why)")
    run_dir = run_directory(cfg, config_paths)
    saved = run_dir / "config.yaml"
    if acc.is_main_process:
        # An existing run's config.yaml is rewritten once it is resumed (setup), not before: a rerun
        # of a finished run changes no file. A start that failed before its first step left no run.
        with writing(saved):
            run_dir.mkdir(parents=True, exist_ok=True)
            if not holds_run(run_dir):
                save_config(cfg, saved)
    acc.wait_for_everyone()
    return run_dir


def use_prepared(cfg: Config, prepared: dict[str, str]) -> None:
    """Model paths naming a prepared model (`demo:teacher`, ...) -> the checkpoint the preparation step made."""
    for section, mc in (("model", cfg.model), ("teacher", cfg.teacher)):
        if mc.path.startswith("demo:"):
            if mc.path not in prepared:
                raise RunError(f"{section}.path: {mc.path} names a prepared model, made by train.py's preparation "
                               "step (opd.cli.prepare) or `python -m demo.prepare`; it was not run")
            mc.path = prepared[mc.path]


def build_optimizer(policy, oc):
    """AdamW over the trainable parameters (`oc` the optim section), no decay on norms and biases."""
    decay, no_decay = [], []
    for name, p in policy.named_parameters():
        if p.requires_grad:
            # no decay on norms and biases; ds_shape: a ZeRO-3 shard built by zero.Init is a flat (n,) tensor
            (no_decay if len(getattr(p, "ds_shape", p.shape)) < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": oc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all parameters, no per-step temporaries the size of the gradients (the step's memory
    # peak at 100% retention was AdamW's, not the loss's); the same update up to float rounding
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps, fused=fused or None)


def lr_factor(update: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimiser update `update` (0-based): linear warm-up then cosine/constant."""
    if warmup and update < warmup:
        return (update + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (update - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, o, total_updates: int):
    """Warm-up then cosine/constant over `total_updates` optimiser updates (`o` the optim section)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda u: lr_factor(u, total_updates, o.warmup_steps, o.schedule, o.min_lr_ratio)
    )
