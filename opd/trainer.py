"""The OPD training loop: rollout -> teacher side -> token stats -> tip selection -> loss -> update -> log.

`train(cfg)` reads top to bottom as the algorithm does; `setup` and the small
helpers below it carry the details (run directory, models, data, optimiser,
checkpoints, evaluation).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opd import checkpoint as ckpt
from opd.config import Config, save_config, to_dict
from opd.data import PromptSampler, load_prompts
from opd.models import PolicyModel, check_tokenizers, load_model, load_tokenizer, save_pretrained
from opd.rewards import reward_fn, reward_weights
from opd.rollout import Rollouts, sample
from opd.step import (MicroBatch, StepSettings, combine, denominator, diagnostics, dump_records, gather_stats,
                      head_weight, new_selector_state, render_pictures, student_microbatch, teacher_side)
from opd.tracking import MetricsLog, truncate_jsonl


class RunError(Exception):
    """A problem that ends the run with one clear line (no traceback)."""


def train(cfg: Config, config_paths: list[str] = ()) -> Path:
    """Run OPD as configured; returns the run directory."""
    run = setup(cfg, config_paths)
    acc, st, tc = run.accelerator, run.settings, cfg.train
    if run.step >= run.total_steps and (run.run_dir / "summary.json").is_file():
        # rerunning a finished run must not re-evaluate, re-save or rewrite its results
        acc.print(f"{run.run_dir} already finished at step {run.step}; nothing to do (raise train.steps to train further)")
        if run.bar is not None:
            run.bar.close()
        run.log.close()
        return run.run_dir
    if run.step == 0 and (cfg.eval.at_start or cfg.eval.teacher):
        run_initial_evals(run)
    stop = install_stop_handler()
    consecutive_skips, first_step = 0, run.step + 1
    for step in range(first_step, run.total_steps + 1):
        t_step = time.perf_counter()
        reset_peak_memory(acc.device)
        # 1. rollout: this process's share of the step's prompts, sampled by the student
        batch = run.sampler.next_batch(tc.prompts_per_step)
        places = shard_places(len(batch), tc.mini_batch_size or len(batch), acc.process_index, acc.num_processes)
        prompts = [batch[i] for i in places]
        t0 = time.perf_counter()
        # Seeded per prompt by its place in the global step batch, not by process: the rollouts are
        # then the same whatever the number of processes (tests/distributed compare 1 and 2).
        rollouts = sample(
            run.policy.lm, [p.ids for p in prompts], pad_token_id=run.tokenizer.pad_token_id,
            eos_token_id=run.eos_ids, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
            top_k=cfg.rollout.top_k, max_new_tokens=cfg.rollout.max_new_tokens, n=cfg.rollout.n,
            batch_size=cfg.rollout.batch_size, synced_gpus=run.zero3 and acc.num_processes > 1,
            prompt_seeds=[derive_seed(tc.seed, "rollout", step, i) for i in places],
        )
        t_generate = time.perf_counter() - t0
        # 2. rewards (optional): verifiable reward per rollout, softmax sample weights
        rewards = run.reward(run.tokenizer, rollouts, [prompts[i].answer for i in rollouts.prompt_index.tolist()])
        weights = reward_weights(rewards, cfg.opd.reward_beta, acc)
        if weights is None:
            weights = torch.ones(len(rollouts))
        # 3. teacher side for every micro-batch of the step (phase 1), then the student updates (phase 2)
        t0 = time.perf_counter()
        updates = split_updates(rollouts, weights, step, cfg, acc)
        cached = teacher_phase(run, updates)
        step_metrics: list[dict] = []
        for u, micro in enumerate(updates):
            z = global_sum(acc, denominator(micro, st))
            loss_scale = loss_scale_for(acc, z, len(micro))
            loss_sum, stats_list, selections = 0.0, [], []
            selector_before = run.selector_state.state_dict()
            for j, mb in enumerate(micro):
                # seeded by the micro-batch's place in the update (shares are equal), not by process
                gen = torch.Generator().manual_seed(
                    derive_seed(tc.seed, "select", step, u, acc.process_index * len(micro) + j))
                sync = contextlib.nullcontext() if j == len(micro) - 1 else acc.no_sync(run.student)
                with sync, acc.autocast(), gathered(run.student_head() if st.loss_impl == "fused" else None):
                    stats, sel, value = student_microbatch(
                        run.student, run.student_head(), run.teacher_head, mb, cached[u][j], st,
                        loss_scale, gen, run.selector_state, backward_fn(run, last=j == len(micro) - 1),
                    )
                loss_sum += value
                stats_list.append(stats)
                selections.append(sel)
            grad_norm = clip_gradients(run, cfg.optim.grad_clip)
            # Decided from global sums, so every process skips the same updates. Non-finite: NaN/Inf in
            # logits, loss or gradients. Empty: no token kept anywhere (a zero gradient would still move
            # AdamW's weights through its momentum and weight decay).
            nonfinite = not math.isfinite(grad_norm) or global_sum(acc, float(not math.isfinite(loss_sum))) > 0
            empty = global_sum(acc, float(sum(int(s.mask.sum()) for s in selections))) == 0
            if nonfinite:
                run.selector_state.load_state_dict(selector_before)  # NaN must not poison running min/max
            if not (nonfinite or empty):
                run.optimizer.step()
                run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            step_metrics.append(update_metrics(run, stats_list, selections, micro, loss_sum, z, grad_norm, nonfinite))
            step_metrics[-1]["opd/empty_updates"] = int(empty and not nonfinite)
        t_train = time.perf_counter() - t0
        # 4. log, evaluate, checkpoint
        metrics = merge_updates(step_metrics)
        consecutive_skips = consecutive_skips + 1 if metrics["opd/skipped_updates"] == len(updates) else 0
        metrics.update({
            "opd/lr": run.scheduler.get_last_lr()[0],
            "opd/accuracy": global_mean(acc, rewards) if rewards is not None else None,
            "opd/response_length": global_mean(acc, rollouts.response_mask.sum(1).float()),
            "timing/generate_s": t_generate, "timing/train_s": t_train,
            "timing/step_s": time.perf_counter() - t_step,
            **memory_metrics(acc.device),
        })
        metrics = {k: v for k, v in metrics.items() if v is not None}
        run.step = step
        if cfg.eval.every and step % cfg.eval.every == 0 and step != run.total_steps:
            metrics.update(run_eval(run, f"step_{step:06d}"))
        if step % cfg.logging.log_every == 0 or step == run.total_steps:
            run.log.log(step, metrics)
        run.progress(metrics)
        if consecutive_skips >= tc.max_consecutive_skips:
            raise RunError(
                f"stopped: {consecutive_skips} consecutive steps skipped for non-finite loss or gradients "
                f"(last good checkpoint: {ckpt.latest_checkpoint(run.run_dir) or 'none'})"
            )
        signalled = global_sum(acc, float(stop.requested)) > 0  # a signal to one process stops them all
        if signalled or (tc.max_steps_per_run and step - first_step + 1 >= tc.max_steps_per_run
                         and step < run.total_steps):
            save(run)
            why = "by signal" if signalled else f"after train.max_steps_per_run={tc.max_steps_per_run} steps"
            acc.print(f"stopped {why} at step {step}; checkpoint saved; rerun the same command to resume")
            run.log.close()
            return run.run_dir
        if tc.save_every and step % tc.save_every == 0:
            save(run)
    if cfg.eval.at_end:
        run.log.log(run.step, run_eval(run, "final"))
    if tc.save_final and (not tc.save_every or run.step % tc.save_every):
        save(run)
    finish(run)
    return run.run_dir


# ----------------------------------------------------------------------------
# set-up


@dataclass
class Run:
    cfg: Config
    accelerator: object
    run_dir: Path
    tokenizer: object
    policy: PolicyModel  # unwrapped student
    student: object  # the prepared (possibly wrapped) PolicyModel
    teacher: object
    teacher_head: torch.Tensor | None
    optimizer: object
    scheduler: object
    sampler: PromptSampler
    val_prompts: list
    log: MetricsLog
    settings: StepSettings
    selector_state: object
    reward: object
    eos_ids: list[int]
    total_steps: int
    step: int = 0
    zero3: bool = False  # DeepSpeed ZeRO-3: the student's weights are sharded over the processes
    teacher_engine: object = None  # the teacher's ZeRO-3 inference engine (owns its sharding hooks), or None
    bar: object = None
    started: float = field(default_factory=time.time)
    evals: dict = field(default_factory=dict)

    def student_head(self) -> torch.Tensor:
        return head_weight(self.policy.lm)

    def progress(self, metrics: dict) -> None:
        if self.bar is not None:
            tokens = metrics.get("opd/num_tokens", 0)
            self.bar.set_postfix(loss=f"{metrics.get('opd/loss', float('nan')):.4f}",
                                 tok_s=f"{tokens / max(metrics['timing/step_s'], 1e-9):.0f}")
            self.bar.update(1)


def setup(cfg: Config, config_paths=()) -> Run:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    use_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise RunError("train.device=cuda but no CUDA device is visible")
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    bf16 = use_cuda and torch.cuda.is_bf16_supported() and cfg.model.dtype == "auto"
    # Without a GPU, a multi-process launch needs the gloo backend named explicitly (NOTES.md).
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if launched and not use_cuda else []
    # accelerate drops DeepSpeed when told to use the CPU; DeepSpeed itself runs on CPUs (gloo), so a
    # DeepSpeed launch never asks for cpu=True.
    wants_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    acc = Accelerator(cpu=not use_cuda and not wants_deepspeed, mixed_precision="bf16" if bf16 else "no",
                      kwargs_handlers=handlers)
    ds_plugin = acc.state.deepspeed_plugin  # None unless launched with a DeepSpeed accelerate config
    if wants_deepspeed and ds_plugin is None:
        raise RunError("the launch asked for DeepSpeed but accelerate turned it off (ACCELERATE_USE_CPU=true or "
                       "--cpu do that): launch DeepSpeed configs without them, also on a CPU-only machine")
    zero3 = ds_plugin is not None and ds_plugin.zero_stage == 3
    if ds_plugin is not None:
        fill_deepspeed_config(ds_plugin.deepspeed_config, cfg)
    check_even_split(cfg, acc.num_processes)
    run_dir = prepare_run_dir(cfg, config_paths, acc)
    resolve_demo_paths(cfg, acc)

    tokenizer = load_tokenizer(cfg.model)
    teacher_tok = load_tokenizer(cfg.teacher)
    # data before models: a bad record refused with its file and line costs seconds, not a model load
    train_prompts, val_prompts, report = load_prompts(cfg.data, tokenizer, seed=cfg.train.seed,
                                                      need_answers=cfg.opd.reward_beta > 0)
    acc.print(f"data: {report.summary()}; {len(val_prompts)} held out")
    device = acc.device

    def build(mc, tok, trainable: bool, sharded: bool):
        # With zero3_init_flag models are loaded already sharded (zero.Init); a replicated teacher must not be.
        # A random-init model (no path: tests, benchmarks) is built whole and sharded by DeepSpeed after:
        # zero.Init would draw other initial weights than a single process does.
        whole = zero3 and not (sharded and mc.path)
        with built_whole(ds_plugin) if whole else contextlib.nullcontext():
            return load_model(mc, tok, device, trainable=trainable)

    # The student trains in float32 under bf16 autocast on GPU ('auto'); the teacher is stored in bf16.
    student_lm = build(cfg.model if cfg.model.dtype != "auto" else _with(cfg.model, dtype="float32"),
                       tokenizer, trainable=True, sharded=True)
    teacher = build(cfg.teacher, teacher_tok, trainable=False, sharded=cfg.opd.teacher_zero3)
    try:
        check_tokenizers(tokenizer, teacher_tok, rows(student_lm.get_output_embeddings().weight),
                         rows(teacher.get_output_embeddings().weight))
    except ValueError as exc:
        raise RunError(str(exc)) from None

    steps_per_epoch = math.ceil(len(train_prompts) / cfg.train.prompts_per_step)
    total_steps = cfg.train.steps or cfg.train.epochs * steps_per_epoch
    mini = cfg.train.mini_batch_size or cfg.train.prompts_per_step
    updates_per_step = cfg.train.prompts_per_step // mini

    policy = PolicyModel(student_lm)
    student, optimizer = acc.prepare(policy, build_optimizer(policy, cfg))
    # Built on the prepared optimizer and not handed to accelerate: its scheduler wrapper would step
    # num_processes times per update, and DeepSpeed may replace the optimizer (offload: DeepSpeedCPUAdam).
    scheduler = build_scheduler(optimizer, cfg, total_steps * updates_per_step)
    teacher_engine = zero3_inference_engine(teacher, acc) if zero3 and cfg.opd.teacher_zero3 else None

    st = StepSettings(
        loss_impl=cfg.opd.loss_impl, loss_type=cfg.opd.loss_type, beta=cfg.opd.beta, chunk_size=cfg.opd.chunk_size,
        selector=cfg.tip.selector, ratio=cfg.tip.ratio, scope=cfg.tip.scope,
        select_options={"normalize": cfg.tip.normalize, "momentum": cfg.tip.momentum,
                        "importance_weighting": cfg.tip.importance_weighting},
        topk=5 if cfg.tip.dump_tokens else 0,
    )
    eos = tokenizer.eos_token_id
    gen_eos = getattr(getattr(student_lm, "generation_config", None), "eos_token_id", None)
    eos_ids = sorted({eos, *([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))} - {None})
    teacher_head = head_weight(teacher) if cfg.opd.loss_impl == "fused" else None
    if teacher_head is not None and teacher_engine is not None:
        with gathered(teacher_head):  # one full copy of the frozen head, not a gather per micro-batch
            teacher_head = teacher_head.detach().clone()
    elif teacher_head is not None and cfg.opd.offload_teacher and use_cuda:
        teacher_head = teacher_head.detach().clone()  # stays on the GPU while the backbone is offloaded
    run = Run(
        cfg=cfg, accelerator=acc, run_dir=run_dir, tokenizer=tokenizer, policy=policy, student=student,
        teacher=teacher, teacher_head=teacher_head, optimizer=optimizer, scheduler=scheduler,
        sampler=PromptSampler(train_prompts, cfg.train.seed), val_prompts=val_prompts,
        log=MetricsLog(run_dir, cfg.logging, to_dict(cfg), enabled=acc.is_main_process),
        settings=st, selector_state=new_selector_state(), reward=reward_fn(cfg.opd.reward, cfg.eval.grade_timeout_s),
        eos_ids=eos_ids, total_steps=total_steps, zero3=zero3, teacher_engine=teacher_engine,
    )
    resume(run)
    if cfg.logging.progress_bar and acc.is_main_process:
        from tqdm.auto import tqdm

        run.bar = tqdm(total=total_steps, initial=run.step, desc="opd", dynamic_ncols=True)
    return run


def _with(mc, **changes):
    import dataclasses

    return dataclasses.replace(mc, **changes)


def prepare_run_dir(cfg: Config, config_paths, acc) -> Path:
    """The run directory: new, or an existing run with a compatible config (rules in opd.preflight.check_run_dir)."""
    from opd.preflight import check_run_dir, run_directory

    problems = check_run_dir(cfg, config_paths)  # [] on all but the main process
    if global_sum(acc, float(bool(problems))) > 0:
        raise RunError(problems[0] if problems else "the main process refused the run directory (its error says why)")
    run_dir = run_directory(cfg, config_paths)
    saved = run_dir / "config.yaml"
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, saved)
    acc.wait_for_everyone()
    return run_dir


def resolve_demo_paths(cfg: Config, acc) -> None:
    """`demo:teacher` / `demo:student` name the demo pair, prepared (or reused) on first use."""
    if not (cfg.model.path.startswith("demo:") or cfg.teacher.path.startswith("demo:")):
        return
    from demo.prepare import prepare_pair

    settings = dict(cfg.demo)
    cache = Path(settings.pop("cache_dir", ".cache/demo"))
    if acc.is_main_process:
        paths = prepare_pair(settings, cache, log=acc.print)
    acc.wait_for_everyone()
    if not acc.is_main_process:
        paths = prepare_pair(settings, cache, log=lambda *a: None)
    pair = {"demo:teacher": str(paths[0]), "demo:student": str(paths[1])}
    for mc in (cfg.model, cfg.teacher):
        if mc.path.startswith("demo:"):
            if mc.path not in pair:
                raise RunError(f"unknown demo model {mc.path!r} (known: demo:teacher, demo:student)")
            mc.path = pair[mc.path]


def build_optimizer(policy, cfg: Config):
    decay, no_decay = [], []
    for name, p in policy.named_parameters():
        if p.requires_grad:
            # no decay on norms and biases; ds_shape: a ZeRO-3 shard built by zero.Init is a flat (n,) tensor
            (no_decay if len(getattr(p, "ds_shape", p.shape)) < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)


def lr_factor(update: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimiser update `update` (0-based): linear warm-up then cosine/constant."""
    if warmup and update < warmup:
        return (update + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (update - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg: Config, total_updates: int):
    o = cfg.optim
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda u: lr_factor(u, total_updates, o.warmup_steps, o.schedule, o.min_lr_ratio)
    )


# ----------------------------------------------------------------------------
# several processes: DDP and DeepSpeed ZeRO (configs/accelerate/, docs/scale_out.md)


def fill_deepspeed_config(ds_config: dict, cfg: Config) -> None:
    """Write the settings the run config owns into the DeepSpeed config, before accelerate reads it.

    The engine must not accumulate on its own (the trainer marks each update's last micro-batch) and
    must clip at optim.grad_clip; ZeRO-3 gathers full weights on save (the HF checkpoint).
    A DeepSpeed file that sets one of these to something else is refused rather than silently overridden.
    """
    wanted = {"train_micro_batch_size_per_gpu": cfg.train.micro_batch_size, "gradient_accumulation_steps": 1,
              "gradient_clipping": cfg.optim.grad_clip}
    for key, value in wanted.items():
        have = ds_config.get(key, "auto")
        if have != "auto" and have != value:
            raise RunError(f"the DeepSpeed config sets {key}={have}, but this run needs {value} (from the run config); "
                           f"set it to \"auto\" in the DeepSpeed file")
        ds_config[key] = value
    ds_config.pop("train_batch_size", None)  # derived by accelerate from the three above
    ds_config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True


def check_even_split(cfg: Config, world: int) -> None:
    """Every process must run the same number of micro-batches (ZeRO-3 forwards and ZeRO-2
    reductions are collective): the step's prompts must split evenly over the processes."""
    mini = cfg.train.mini_batch_size or cfg.train.prompts_per_step
    for key, value in (("train.prompts_per_step", cfg.train.prompts_per_step), ("train.mini_batch_size", mini)):
        if value % world:
            raise RunError(f"{key} = {value} must be divisible by the {world} processes (each takes an equal share)")


@contextlib.contextmanager
def built_whole(ds_plugin):
    """Models built inside are whole, not sharded by zero.Init. accelerate's own
    zero3_init_context_manager(enable=False) leaves transformers' DeepSpeed config, and so zero.Init, on."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(ds_plugin.dschf)


def deepspeed_engine(acc):
    """The student's DeepSpeed engine, or None without DeepSpeed."""
    wrapped = getattr(acc, "deepspeed_engine_wrapped", None)
    return wrapped.engine if wrapped is not None else None


def rows(weight: torch.Tensor) -> int:
    """Rows of a (V, d) matrix, also when ZeRO-3 holds only this process's shard of it."""
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def gathered(*params):
    """Context in which ZeRO-3 sharded parameters hold their full values (read-only); a no-op otherwise.

    The fused loss uses the LM head matrices directly, outside the modules' forward, where ZeRO-3
    would gather them: gradients reaching a gathered head are reduced to its shards as usual.
    """
    sharded = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not sharded:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(sharded, modifier_rank=None)


def zero3_inference_engine(teacher, acc):
    """Shard the frozen teacher over the processes (ZeRO-3, no optimizer); `teacher` keeps working as a
    module: its forward gathers each layer's weights as it goes. Returns the engine (keep it alive)."""
    import copy

    import deepspeed

    ds = copy.deepcopy(acc.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        ds.pop(key, None)
    ds["zero_optimization"].pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=teacher, config=ds)
    engine.eval()
    return engine


def backward_fn(run: Run, last: bool):
    """The backward of one micro-batch; `last`: the update's final one.

    Under DeepSpeed this replaces accelerator.backward, whose wrapper calls engine.step() after
    every backward (an optimiser step per micro-batch) and whose engine divides the loss by its
    gradient_accumulation_steps. Here the loss already carries 1/Z, only the last micro-batch is
    an accumulation boundary, and clip_gradients takes the update's one step.
    """
    engine = deepspeed_engine(run.accelerator)
    if engine is None:
        return run.accelerator.backward

    def backward(loss):
        engine.set_gradient_accumulation_boundary(last)
        engine.backward(loss, scale_wrt_gas=False)

    return backward


# ----------------------------------------------------------------------------
# the pieces of a step


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts, stable across runs and Python versions."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def shard_places(n: int, mini: int, rank: int, world: int) -> list[int]:
    """This process's places in the step's batch of `n` prompts: every update's `mini` prompts split into
    `world` contiguous blocks, block `rank` of each. The updates then hold the prompts a single process
    would use, and, when a block is a whole number of micro-batches, so do the micro-batches (which
    micro-batch-scoped selection ranks together), whatever the process count."""
    share = mini // world
    return [u * mini + rank * share + i for u in range(n // mini) for i in range(share)]


def split_updates(rollouts: Rollouts, weights: torch.Tensor, step: int, cfg: Config, acc) -> list[list[MicroBatch]]:
    """This process's rollouts -> optimiser updates -> micro-batches (padding trimmed per micro-batch)."""
    n_rows = len(rollouts)
    n_updates = cfg.train.prompts_per_step // (cfg.train.mini_batch_size or cfg.train.prompts_per_step)
    per_update = math.ceil(n_rows / n_updates)
    base = acc.process_index * 1_000_000  # step-unique sequence ids across processes
    updates = []
    for u in range(n_updates):
        rows = list(range(u * per_update, min(n_rows, (u + 1) * per_update)))
        micro = []
        for k in range(0, len(rows), cfg.train.micro_batch_size):
            idx = torch.tensor(rows[k:k + cfg.train.micro_batch_size])
            att = rollouts.attention_mask[idx]
            cols = att.any(0).nonzero().squeeze(1)
            lo, hi = int(cols.min()), int(cols.max()) + 1
            micro.append(MicroBatch(
                input_ids=rollouts.input_ids[idx, lo:hi].to(acc.device),
                attention_mask=att[:, lo:hi].to(acc.device),
                response_mask=rollouts.response_mask[idx, lo:hi].to(acc.device),
                sample_weight=weights[idx].to(acc.device),
                sequence_ids=(idx + base).to(acc.device),
            ))
        updates.append(micro)
    return updates


def teacher_phase(run: Run, updates: list[list[MicroBatch]]) -> list[list[torch.Tensor]]:
    """Phase 1: the teacher side of every micro-batch; the teacher backbone may be offloaded after."""
    cfg = run.cfg
    device = run.accelerator.device
    cache_device = torch.device("cpu") if cfg.opd.teacher_cache_device == "cpu" else device
    offload = cfg.opd.offload_teacher and device.type == "cuda" and run.teacher_engine is None
    if offload:
        run.teacher.to(device)
    cached = [[teacher_side(run.teacher, mb, cfg.opd.loss_impl, cache_device) for mb in micro] for micro in updates]
    if offload:
        run.teacher.to("cpu")
        torch.cuda.empty_cache()
    return cached


def loss_scale_for(acc, z: float, n_micro: int) -> float:
    """1/Z, times what the gradient reduction divides by (DDP and DeepSpeed average over processes)."""
    if z <= 0:
        return 0.0
    return acc.num_processes / z


def global_sum(acc, value: float) -> float:
    if acc.num_processes == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=acc.device)
    return float(acc.reduce(t, reduction="sum"))


def global_mean(acc, values: list[float] | torch.Tensor) -> float:
    values = torch.as_tensor(values, dtype=torch.float64)
    total = global_sum(acc, float(values.sum()))
    count = global_sum(acc, float(values.numel()))
    return total / max(count, 1.0)


def clip_gradients(run: Run, max_norm: float) -> float:
    """The global gradient norm before clipping; gradients clipped to `max_norm` (0 = off).

    Under DeepSpeed the engine clips inside its optimiser step, so the update's one step happens
    here (DeepSpeed itself skips it, on every process, when the norm is not finite); the loop's
    optimizer.step() and zero_grad() are then no-ops (accelerate's DeepSpeedOptimizerWrapper).
    """
    engine = deepspeed_engine(run.accelerator)
    if engine is not None:
        engine.step()
        norm = engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)
    params = [p for p in run.student.parameters() if p.requires_grad]
    if max_norm > 0:
        norm = run.accelerator.clip_grad_norm_(params, max_norm)
    else:
        norm = run.accelerator.clip_grad_norm_(params, float("inf"))
    return float(norm)


def update_metrics(run: Run, stats_list, selections, micro, loss_sum, z, grad_norm, skipped) -> dict:
    cfg, acc = run.cfg, run.accelerator
    stats, sel = combine(stats_list, selections)
    vocab = min(rows(run.student_head()), rows(run.teacher.get_output_embeddings().weight))
    n_tokens = global_sum(acc, len(stats))
    metrics = {
        "opd/loss": global_sum(acc, loss_sum) / z if z > 0 else 0.0,
        "opd/entropy": global_sum(acc, float(stats.entropy.sum()) * math.log(vocab)) / max(n_tokens, 1.0),
        "opd/grad_norm": grad_norm,
        "opd/num_tokens": n_tokens,
        "opd/num_kept": global_sum(acc, float(sel.mask.sum())),
        "opd/skipped_updates": int(skipped),
        # micro-batches that kept no token (Poisson sampling can keep none): they add nothing, the update goes on
        "opd/empty_microbatches": global_sum(acc, float(sum(not bool(s.mask.any()) for s in selections))),
        **diagnostics(*gather_stats(stats, sel, gather_fn(acc)), cfg.tip),  # over all processes' tokens
    }
    if cfg.tip.dump_tokens and acc.is_main_process:
        token_ids = torch.cat([mb.input_ids[:, 1:][mb.positions()] for mb in micro]).cpu()
        gen = torch.Generator().manual_seed(derive_seed(cfg.train.seed, "dump", run.step))
        decode = lambda i: run.tokenizer.decode([int(i)])
        records = dump_records(stats, sel, token_ids, decode, cfg.tip, gen, step=run.step + 1)
        with open(run.run_dir / "tokens.jsonl", "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
    return metrics


def merge_updates(per_update: list[dict]) -> dict:
    """Token-weighted means over the updates of one step (counts summed)."""
    if len(per_update) == 1:
        return dict(per_update[0])
    sums = ("opd/num_tokens", "opd/num_kept", "opd/skipped_updates", "opd/empty_updates", "opd/empty_microbatches",
            "tip/num_tokens", "tip/num_kept")
    weights = [max(m.get("opd/num_tokens", 0.0), 1e-9) for m in per_update]
    out = {}
    for key in per_update[0]:
        values = [m[key] for m in per_update]
        out[key] = sum(values) if key in sums else sum(w * v for w, v in zip(weights, values)) / sum(weights)
    return out


def reset_peak_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_metrics(device) -> dict:
    if device.type == "cuda":
        return {"perf/max_memory_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    # CPU: the process's peak resident set size so far (ru_maxrss is in KiB on Linux)
    return {"perf/max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


# ----------------------------------------------------------------------------
# evaluation, checkpoints, stopping


def run_eval(run: Run, name: str, model=None) -> dict:
    from eval.runner import evaluate, flat_metrics

    cfg, acc = run.cfg, run.accelerator
    if not cfg.eval.benchmarks:
        return {}
    summary = evaluate(
        model if model is not None else run.policy.lm, run.tokenizer, cfg.eval.benchmarks, cfg.eval,
        run.run_dir / "eval" / name, seed=cfg.train.seed, step=run.step, chat_template=cfg.data.chat_template,
        enable_thinking=cfg.data.enable_thinking, system_prompt=cfg.data.system_prompt,
        shard=(acc.process_index, acc.num_processes), gather=gather_fn(acc),
    )
    run.evals[name] = summary
    return flat_metrics(summary)


def gather_fn(acc):
    if acc.num_processes == 1:
        return None
    from accelerate.utils import gather_object

    return lambda items: gather_object([items])


def run_initial_evals(run: Run) -> None:
    if run.cfg.eval.teacher:
        teacher_metrics = run_eval(run, "teacher", model=run.teacher)
        run.log.log(0, {k.replace("val/", "val_teacher/"): v for k, v in teacher_metrics.items()})
    if run.cfg.eval.at_start:
        run.log.log(0, run_eval(run, "step_000000"))


# A DeepSpeed run's checkpoint also holds the engine state (every process's shard of the optimizer
# state and fp32 master weights) in this folder, as DeepSpeed's save_checkpoint writes it.
ENGINE_DIR, ENGINE_TAG = "deepspeed", "state"


def save(run: Run) -> None:
    acc = run.accelerator
    engine = deepspeed_engine(acc)
    failed = None
    acc.wait_for_everyone()
    # Every process first: ZeRO-3 gathers the full weights onto the main process, and each DeepSpeed
    # process writes its shard of the engine state into a staging folder the main process then moves in.
    weights = acc.get_state_dict(run.student)
    staged = ckpt.checkpoint_dir(run.run_dir) / f".tmp-engine-{ckpt.PREFIX}{run.step:06d}"
    if engine is not None:
        if acc.is_main_process and staged.exists():
            shutil.rmtree(staged)
        acc.wait_for_everyone()
        engine.save_checkpoint(str(staged), tag=ENGINE_TAG, save_latest=False)
        acc.wait_for_everyone()
    if acc.is_main_process:
        state = {
            "step": run.step, "sampler": run.sampler.state_dict(),
            "selector_state": run.selector_state.state_dict(), "torch_rng": None,
            "wall_time_s": time.time() - run.started,
            "num_processes": acc.num_processes, "deepspeed": engine is not None,
        }
        lm_weights = {k.removeprefix("lm."): v for k, v in weights.items()}  # PolicyModel keys -> the HF model's

        def write(d: Path) -> None:
            save_pretrained(acc.unwrap_model(run.student).lm, run.tokenizer, d, state_dict=lm_weights)
            if engine is not None:
                staged.rename(d / ENGINE_DIR)

        try:
            ckpt.save_checkpoint(
                run.run_dir, run.step, write, None if engine is not None else run.optimizer.state_dict(),
                run.scheduler.state_dict(), state, run.cfg.train.keep_last,
            )
        except Exception as exc:  # disk full, quota, permissions: whatever the writer raised
            failed = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    acc.wait_for_everyone()
    if global_sum(acc, float(failed is not None)) > 0:
        raise RunError(f"checkpoint at step {run.step} could not be written ({failed or 'on the main process'}); "
                       f"last good checkpoint: {ckpt.latest_checkpoint(run.run_dir) or 'none'}")


def resume(run: Run) -> None:
    if run.cfg.train.resume != "auto":
        return
    latest = ckpt.latest_checkpoint(run.run_dir)
    if latest is None:
        run.log.truncate_after(0)
        if run.accelerator.is_main_process:
            truncate_jsonl(run.run_dir / "tokens.jsonl", 0)
        return
    from safetensors.torch import load_file

    state = ckpt.load_trainer_state(latest)
    engine = deepspeed_engine(run.accelerator)
    if engine is not None or (latest / ENGINE_DIR).is_dir():
        resume_engine(run, engine, latest, state)
    else:
        weights = {}
        for file in sorted(latest.glob("*.safetensors")):
            weights.update(load_file(str(file)))
        missing, unexpected = run.policy.lm.load_state_dict(weights, strict=False)
        missing = [m for m in missing if not (run.policy.lm.config.tie_word_embeddings and "lm_head" in m)]
        if missing or unexpected:
            raise RunError(f"checkpoint {latest} does not match the student (missing {missing[:3]}, unexpected {unexpected[:3]})")
        run.optimizer.load_state_dict(ckpt.load_torch_state(latest, "optimizer.pt"))
    run.scheduler.load_state_dict(ckpt.load_torch_state(latest, "scheduler.pt"))
    run.sampler.load_state_dict(state["sampler"])
    run.selector_state.load_state_dict(state["selector_state"])
    run.step = state["step"]
    run.started = time.time() - state.get("wall_time_s", 0.0)
    run.log.truncate_after(run.step)
    if run.accelerator.is_main_process:
        truncate_jsonl(run.run_dir / "tokens.jsonl", run.step)
    run.accelerator.print(f"resumed from {latest} (step {run.step})")


def resume_engine(run: Run, engine, latest: Path, state: dict) -> None:
    """Weights, fp32 master weights and optimizer state from a DeepSpeed checkpoint (same process count)."""
    saved_world = state.get("num_processes", 1)
    if engine is None:
        raise RunError(f"checkpoint {latest} was written under DeepSpeed by {saved_world} processes: resume it with the "
                       f"same DeepSpeed accelerate config and process count (its weights alone load with from_pretrained)")
    if not (latest / ENGINE_DIR).is_dir():
        raise RunError(f"checkpoint {latest} was written without DeepSpeed: resume it without DeepSpeed, "
                       f"or choose another train.run_name to start a new run")
    if saved_world != run.accelerator.num_processes:
        raise RunError(f"checkpoint {latest} holds the DeepSpeed state of {saved_world} processes, this run has "
                       f"{run.accelerator.num_processes}: resume with --num_processes {saved_world}")
    path, _ = engine.load_checkpoint(str(latest / ENGINE_DIR), tag=ENGINE_TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise RunError(f"DeepSpeed found no engine state in {latest / ENGINE_DIR}")


@dataclass
class StopFlag:
    requested: bool = False


def install_stop_handler() -> StopFlag:
    """SIGTERM/SIGINT (preemption, Ctrl-C): finish the current step, checkpoint, exit cleanly."""
    flag = StopFlag()

    def handler(signum, frame):
        if flag.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        flag.requested = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    return flag


def finish(run: Run) -> None:
    acc = run.accelerator
    if run.bar is not None:
        run.bar.close()
    if acc.is_main_process:
        summary = build_summary(run)
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        print_summary(summary)
        if run.cfg.tip.plots:
            try:
                render_pictures(run.run_dir)
            except Exception as exc:  # pictures are a convenience; never lose a finished run to them
                acc.print(f"tip plots not written: {exc}")
    run.log.close()


def _first_mean(summary: dict | None) -> float | None:
    if not summary or not summary.get("benchmarks"):
        return None
    return next(iter(summary["benchmarks"].values()))["mean@k"]


def build_summary(run: Run) -> dict:
    evals = run.evals
    before = evals.get("step_000000")
    return {
        "teacher_accuracy": _first_mean(evals.get("teacher")),
        "student_accuracy_before": _first_mean(before),
        "student_accuracy_after": _first_mean(evals.get("final")),
        "wall_time_s": time.time() - run.started,
        "steps": run.step,
        "benchmarks": {name: s.get("benchmarks", {}) for name, s in evals.items()},
    }


def print_summary(summary: dict) -> None:
    rows = [("teacher", summary["teacher_accuracy"]), ("student before", summary["student_accuracy_before"]),
            ("student after", summary["student_accuracy_after"])]
    if all(v is None for _, v in rows):
        return
    print("\n  model            accuracy (mean@k, %)")
    for name, value in rows:
        print(f"  {name:<16} {'—' if value is None else f'{value:6.1f}'}")
    print(f"  wall time {summary['wall_time_s']:.0f} s\n")
