"""The OPD training loop: rollout -> teacher side -> token stats -> tip selection -> loss -> update -> log.

`train(cfg)` reads top to bottom as the algorithm does; `run_update` is one
optimiser update (its micro-batches: student forward, selection, loss,
backward, then the step). The set-up lives in opd.setup, multi-process
plumbing in opd.distributed, checkpoints in opd.checkpoint, evaluation and the
summary in opd.evaluation, the per-micro-batch step in opd.step.
"""

from __future__ import annotations

import contextlib
import math
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lm.models import rows
from lm.rollout import Rollouts, derive_seed
from lm.served import TeacherUnavailable
from lm.teacher import TeacherSide
from opd.checkpoint import latest_checkpoint, run_directory, save
from opd.config import Config
from opd.distributed import (backward_fn, clip_gradients, close_process_group, gather_fn, global_mean, global_sum,
                             shard_places)
from opd.engine import rollout_gap, sync_engine
from opd.errors import RunError
from opd.evaluation import finish, keeping_training, print_summary, read_summary, run_eval, run_initial_evals
from opd.lock import RunLock
from opd.rewards import reward_weights
from opd.setup import Run, setup
from opd.step import (MicroBatch, combine, denominator, diagnostics, dump_tokens, fold_running_range, gather_stats,
                      student_microbatch)
from opd.tracking import writing


def train(cfg: Config, config_paths: list[str] = (), prepared: dict[str, str] | None = None,
          started: float | None = None) -> Path:
    """Run OPD as configured; returns the run directory. `prepared` maps prepared model names (`demo:student`)
    to their checkpoints (opd.cli.prepare); `started` is when the job began (the summary's wall time)."""
    stop = install_stop_handler()  # first: a signal while loading or evaluating at step 0 stops cleanly too
    try:
        with RunLock(run_directory(cfg, config_paths)) as lock:  # the directory is this run's until it ends
            run = setup(cfg, config_paths, prepared or {}, started, lock)
            with contextlib.closing(run.teacher):  # a served teacher's replicas stop with the run, however it ends
                return run_steps(run, stop)
    finally:
        close_process_group()  # several processes: before the interpreter's exit, not during it


def run_steps(run: Run, stop: StopFlag) -> Path:
    """The run's steps from where it stands (0, or the resumed step), its evaluations and checkpoints."""
    cfg, tc = run.cfg, run.cfg.train
    if run.step >= run.total_steps and (run.run_dir / "summary.json").is_file():
        return already_finished(run)
    consecutive_skips, first_step = 0, run.step + 1
    if stop_now(run, stop, run.step, first_step):  # signalled during set-up
        return run.run_dir
    if run.step == 0 and (cfg.eval.at_start or cfg.eval.teacher):
        run_initial_evals(run)
        if stop_now(run, stop, 0, first_step):
            return run.run_dir
    for step in range(first_step, run.total_steps + 1):
        t_step = time.perf_counter()
        reset_peak_memory(run.accelerator.device)
        # 1. rollout: this process's share of the step's prompts, sampled by the student from the run's
        # source (opd.sources: single-turn responses, or conversations with an environment's tools)
        rollouts, row_ids, route_ids, rewards, source_metrics = rollout(run, step)
        t_generate = time.perf_counter() - t_step
        # the engine's log-probs vs the student's, before any update
        gap = rollout_gap(run.student, run.student_head(), rollouts, tc.micro_batch_size, cfg.opd.chunk_size,
                          run.accelerator)
        run.engine.sleep()  # GPU vLLM: its memory goes to training until the sync
        # 2. rewards (optional): verifiable reward (or environment score) per rollout, softmax sample weights
        weights = reward_weights(rewards, cfg.opd.reward_beta, run.accelerator)
        # 3. teacher side of every micro-batch (phase 1), then the student's optimiser updates (phase 2)
        t0 = time.perf_counter()
        updates = split_updates(rollouts, torch.ones(len(rollouts)) if weights is None else weights, row_ids, tc,
                                run.accelerator.device, route_ids)
        per_update = teacher_then_updates(run, updates, step)
        sync_engine(run.engine, run.policy.lm)  # the next rollout (and any evaluation) samples from the updated student
        # 4. log, evaluate, checkpoint
        metrics = step_metrics(run, per_update, rewards, rollouts, t_generate, time.perf_counter() - t0, t_step)
        metrics.update(gap)
        metrics.update(source_metrics)
        consecutive_skips = consecutive_skips + 1 if metrics["opd/skipped_updates"] == len(updates) else 0
        run.step = step
        log_now = step % cfg.logging.log_every == 0 or step == run.total_steps
        if cfg.eval.every and step % cfg.eval.every == 0 and step != run.total_steps:
            with keeping_training(run, f"step_{step:06d}", metrics if log_now else None):
                metrics.update(run_eval(run, f"step_{step:06d}"))
        if log_now:
            run.log.log(step, metrics)
        run.progress(metrics)
        if consecutive_skips >= tc.max_consecutive_skips:
            raise RunError(f"stopped: {consecutive_skips} consecutive steps skipped for non-finite loss or gradients "
                           f"(last good checkpoint: {latest_checkpoint(run.run_dir) or 'none'})")
        if stop_now(run, stop, step, first_step):
            return run.run_dir
        if tc.save_every and step % tc.save_every == 0:
            save(run)
    # saved before the final evaluation, which may fail; not again when resumed from this very step
    if tc.save_final and run.step >= first_step and (not tc.save_every or run.step % tc.save_every):
        save(run)
    if cfg.eval.at_end:
        with keeping_training(run, "final"):  # logged once: evaluated again after a failure or a summary moved aside
            run.log.log(run.step, run_eval(run, "final"), replace=True)
    finish(run)
    return run.run_dir


def run_update(run: Run, micro: list[MicroBatch], sides: list[TeacherSide], step: int, u: int) -> dict:
    """One optimiser update over this process's micro-batches `micro`; returns its metrics."""
    acc, st, cfg = run.accelerator, run.settings, run.cfg
    z = global_sum(acc, denominator(micro, st))  # the update's global loss denominator, before any forward
    loss_scale = loss_scale_for(acc, z)
    loss_sum, stats_list, selections = 0.0, [], []
    for j, mb in enumerate(micro):
        # Selection draws are seeded by the scope's global place, not by process: the micro-batch's place
        # in the update (shares are equal), or the rollout's place in the step (scope="sequence").
        place = acc.process_index * len(micro) + j

        def generator_for(key: tuple, place=place) -> torch.Generator:
            where = (step, u, place) if key[0] == "microbatch" else (step, *key)
            return torch.Generator().manual_seed(derive_seed(cfg.train.seed, "select", *where))

        last = j == len(micro) - 1
        sync = contextlib.nullcontext() if last else acc.no_sync(run.student)
        with sync, acc.autocast():
            stats, sel, value = student_microbatch(run.student, run.student_head(), run.teacher.head, mb, sides[j], st,
                                                   loss_scale, generator_for, run.selector_state, backward_fn(acc, last))
        run.policy.add_embedding_grads()
        loss_sum += value
        stats_list.append(stats)
        selections.append(sel)
    grad_norm = clip_gradients(acc, run.student, cfg.optim.grad_clip)
    # Decided from global sums, so every process skips the same updates. Non-finite: NaN/Inf in
    # logits, loss or gradients. Empty: no token kept anywhere (a zero gradient would still move
    # AdamW's weights through its momentum and weight decay).
    nonfinite = not math.isfinite(grad_norm) or global_sum(acc, float(not math.isfinite(loss_sum))) > 0
    empty = global_sum(acc, float(sum(int(s.mask.sum()) for s in selections))) == 0
    if not (nonfinite or empty):
        run.optimizer.step()
        run.scheduler.step()
        if st.select_options["normalize"] == "running":  # once per update, from all processes' tokens
            fold_running_range(run.selector_state, stats_list, st.select_options["momentum"], gather_fn(acc))
    run.optimizer.zero_grad(set_to_none=True)
    metrics = update_metrics(run, stats_list, selections, micro, loss_sum, z, grad_norm, nonfinite, step)
    metrics["opd/empty_updates"] = int(empty and not nonfinite)
    return metrics


# ----------------------------------------------------------------------------
# the pieces of a step


def teacher_then_updates(run: Run, updates: list[list[MicroBatch]], step: int) -> list[dict]:
    """Every micro-batch of the step sent to the teacher at once (a served side arrives while the student works
    on the earlier ones), then the updates; a served teacher with no replica left stops the run in one line."""
    try:
        sides = [run.teacher.score(micro) for micro in updates]
        return [run_update(run, micro, sides[u], step, u) for u, micro in enumerate(updates)]
    except TeacherUnavailable as exc:
        raise RunError(f"stopped: {exc} (last good checkpoint: {latest_checkpoint(run.run_dir) or 'none'})") from None


def rollout(run: Run, step: int) -> tuple[Rollouts, torch.Tensor, torch.Tensor, list[float] | None, dict]:
    """This process's rollouts of the step's prompts, each rollout's global place in the step (prompt place x
    rollout.n + j: the same whatever the process count), each rollout's teacher (Teacher.route), their rewards (None: not graded) and the source's metrics (agent/... agentic)."""
    cfg, acc = run.cfg, run.accelerator
    batch = run.sampler.next_batch(cfg.train.prompts_per_step)
    places = shard_places(len(batch), cfg.train.mini_batch_size or len(batch), acc.process_index, acc.num_processes)
    prompts = [batch[i] for i in places]
    # Seeded per prompt by its place in the global step batch, not by process: the rollouts are
    # then the same whatever the number of processes (tests/distributed compare 1 and 2).
    seeds = [derive_seed(cfg.train.seed, "rollout", step, i) for i in places]
    row_ids = torch.tensor([place * cfg.rollout.n + j for place in places for j in range(cfg.rollout.n)])
    # each rollout's teacher: its prompt's data source's (teacher.routes), 0 with one teacher
    route_ids = torch.tensor([run.teacher.route(p.data_source) for p in prompts for _ in range(cfg.rollout.n)],
                             dtype=torch.long)
    rollouts, rewards, metrics = run.source.rollout(run.engine, prompts, seeds, run.sampling)
    return rollouts, row_ids, route_ids, rewards, metrics


def split_updates(rollouts: Rollouts, weights: torch.Tensor, row_ids: torch.Tensor, tc,
                  device, route_ids: torch.Tensor | None = None) -> list[list[MicroBatch]]:
    """This process's rollouts -> optimiser updates -> micro-batches (padding trimmed per micro-batch) on
    `device`; `tc` the train section (prompts per step, mini- and micro-batch sizes); `route_ids` each row's
    teacher (several teachers), kept on the CPU."""
    n_rows = len(rollouts)
    n_updates = tc.prompts_per_step // (tc.mini_batch_size or tc.prompts_per_step)
    per_update = math.ceil(n_rows / n_updates)
    updates = []
    for u in range(n_updates):
        rows = list(range(u * per_update, min(n_rows, (u + 1) * per_update)))
        micro = []
        for k in range(0, len(rows), tc.micro_batch_size):
            idx = torch.tensor(rows[k:k + tc.micro_batch_size])
            att = rollouts.attention_mask[idx]
            cols = att.any(0).nonzero().squeeze(1)
            lo, hi = int(cols.min()), int(cols.max()) + 1
            micro.append(MicroBatch(
                input_ids=rollouts.input_ids[idx, lo:hi].to(device),
                attention_mask=att[:, lo:hi].to(device),
                response_mask=rollouts.response_mask[idx, lo:hi].to(device),
                sample_weight=weights[idx].to(device),
                sequence_ids=row_ids[idx].to(device),  # step-unique, the same whatever the process count
                route_ids=None if route_ids is None else route_ids[idx],
            ))
        updates.append(micro)
    return updates


def loss_scale_for(acc, z: float) -> float:
    """1/Z, times what the gradient reduction divides by (DDP and DeepSpeed average over processes)."""
    if z <= 0:
        return 0.0
    return acc.num_processes / z


def update_metrics(run: Run, stats_list, selections, micro, loss_sum, z, grad_norm, skipped, step: int) -> dict:
    """opd/... and tip/... metrics of one update, over every process's tokens; the token dump."""
    cfg, acc = run.cfg, run.accelerator
    stats, sel = combine(stats_list, selections)
    vocab = min(rows(run.student_head()), run.teacher.vocab)
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
    metrics.update(teacher_metrics(run, stats, sel, micro))
    if cfg.tip.dump_tokens and acc.is_main_process:
        token_ids = torch.cat([mb.input_ids[:, 1:][mb.positions()] for mb in micro]).cpu()
        gen = torch.Generator().manual_seed(derive_seed(cfg.train.seed, "dump", step))
        places = torch.cat([mb.response_positions() for mb in micro]).cpu()
        with writing(run.run_dir / "tokens.jsonl", step):
            dump_tokens(run.run_dir / "tokens.jsonl", stats, sel, token_ids, lambda i: run.tokenizer.decode([int(i)]),
                        cfg.tip, gen, step=step, response_positions=places)
    return metrics


def teacher_metrics(run: Run, stats, sel, micro: list[MicroBatch]) -> dict:
    """Several teachers (teacher.routes): each one's tokens, kept tokens and mean reverse KL(student || teacher)
    per token over its tokens, over every process; {} with one teacher."""
    names = run.teacher.names
    if not names:
        return {}
    acc, out = run.accelerator, {}
    route = torch.cat([mb.route_ids[:, None].expand_as(mb.positions().cpu())[mb.positions().cpu()] for mb in micro])
    for r, name in enumerate(names):
        mine = route == r
        n = global_sum(acc, float(mine.sum()))
        out[f"teacher/{name}/num_tokens"] = n
        out[f"teacher/{name}/num_kept"] = global_sum(acc, float(sel.mask[mine].sum()))
        out[f"teacher/{name}/reverse_kl"] = global_sum(acc, float(stats.divergence[mine].sum())) / max(n, 1.0)
    return out


def step_metrics(run: Run, per_update: list[dict], rewards, rollouts: Rollouts, t_generate: float, t_train: float,
                 t_step: float) -> dict:
    """The step's line of metrics.jsonl: its updates merged, plus rollout, timing and memory figures."""
    acc = run.accelerator
    metrics = merge_updates(per_update)
    metrics.update({
        "opd/lr": run.scheduler.get_last_lr()[0],
        "opd/accuracy": global_mean(acc, rewards) if rewards is not None else None,
        "opd/response_length": global_mean(acc, rollouts.response_mask.sum(1).float()),
        "timing/generate_s": t_generate, "timing/train_s": t_train,
        "timing/step_s": time.perf_counter() - t_step,
        **memory_metrics(acc.device),
    })
    # the teacher's figures: the wait of this process, the sides every process received
    metrics.update(run.teacher.take_metrics())
    for key in [k for k in metrics if k.endswith("payload_mb")]:
        metrics[key] = global_sum(acc, metrics[key])
    return {k: v for k, v in metrics.items() if v is not None}


def merge_updates(per_update: list[dict]) -> dict:
    """Token-weighted means over the updates of one step (counts summed)."""
    if len(per_update) == 1:
        return dict(per_update[0])
    sums = ("opd/num_tokens", "opd/num_kept", "opd/skipped_updates", "opd/empty_updates", "opd/empty_microbatches",
            "tip/num_tokens", "tip/num_kept")
    out = {}
    for key in per_update[0]:
        values = [m[key] for m in per_update]
        # a teacher's own figures (teacher.routes) weigh by that teacher's tokens
        count = key.rsplit("/", 1)[0] + "/num_tokens" if key.startswith("teacher/") else "opd/num_tokens"
        weights = [max(m.get(count, 0.0), 1e-9) for m in per_update]
        summed = key in sums or key.endswith(("/num_tokens", "/num_kept"))
        out[key] = sum(values) if summed else sum(w * v for w, v in zip(weights, values)) / sum(weights)
    return out


def reset_peak_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_metrics(device) -> dict:
    if device.type == "cuda":
        return {"perf/max_memory_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    # CPU: the process's peak resident set size so far (ru_maxrss is in KiB on Linux)
    return {"perf/max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


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


def stop_now(run: Run, stop: StopFlag, step: int, first_step: int) -> bool:
    """After a signal (to any process) or train.max_steps_per_run steps: checkpoint, say so, and stop."""
    acc, tc = run.accelerator, run.cfg.train
    signalled = global_sum(acc, float(stop.requested)) > 0  # a signal to one process stops them all
    limited = tc.max_steps_per_run and step - first_step + 1 >= tc.max_steps_per_run and step < run.total_steps
    if not (signalled or limited):
        return False
    if step >= first_step:
        save(run)
        done = "checkpoint saved; rerun the same command to resume"
    elif step == 0:  # stopped in set-up or in the step-0 evaluations
        done = "nothing trained yet, no checkpoint written; rerun the same command to start again"
    else:
        done = f"nothing trained since the checkpoint of step {step}; rerun the same command to resume"
    why = "by signal" if signalled else f"after train.max_steps_per_run={tc.max_steps_per_run} steps"
    acc.print(f"stopped {why} at step {step}; {done}")
    run.log.close()
    return True


def already_finished(run: Run) -> Path:
    """Rerunning a finished run: nothing is re-evaluated, re-saved or rewritten."""
    summary = read_summary(run.run_dir) if run.accelerator.is_main_process else None  # a damaged one: one line
    run.accelerator.print(f"{run.run_dir} already finished at step {run.step}; nothing to train. Its result:")
    if summary is not None:
        print_summary(summary, when="when it ran")
    run.accelerator.print("Raise train.steps to train further, or set train.run_name=NEW for a fresh run.")
    if run.bar is not None:
        run.bar.close()
    run.log.close()
    return run.run_dir
