"""Several processes: accelerate, DDP and DeepSpeed ZeRO plumbing (configs/accelerate/, docs/scale_out.md).

Everything the loop needs to run the same update on 1 or N processes: the
accelerator, global sums and gathers, the student's DeepSpeed engine and its
backward/step, ZeRO-3 parameter gathering, and how a step's prompts are shared.
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, gather_object
from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

from opd.config import Config
from opd.errors import RunError


def make_accelerator(cfg: Config) -> Accelerator:
    """The run's Accelerator."""
    use_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise RunError("train.device=cuda but no CUDA device is visible")
    mp = cfg.train.mixed_precision
    bf16 = mp == "bf16" or (mp == "auto" and use_cuda and torch.cuda.is_bf16_supported() and cfg.model.dtype == "auto")
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
    if ds_plugin is not None:
        fill_deepspeed_config(ds_plugin.deepspeed_config, cfg)
    check_even_split(cfg, acc.num_processes)
    return acc


def close_process_group() -> None:
    """Shut this process's process group down (a no-op for one process). Left to the interpreter's exit, gloo's
    threads can still be running when their objects are destroyed, and the process aborts ("terminate called
    without an active exception", SIGABRT: seen in 2 of ~12 runs of the two-process tests on 2 CPU cores)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(ds_plugin.dschf)


def deepspeed_engine(acc):
    """The student's DeepSpeed engine, or None without DeepSpeed."""
    wrapped = getattr(acc, "deepspeed_engine_wrapped", None)
    return wrapped.engine if wrapped is not None else None


def zero3_inference_engine(teacher, acc):
    """Shard the frozen teacher over the processes (ZeRO-3, no optimizer); `teacher` keeps working as a
    module: its forward gathers each layer's weights as it goes. Returns the engine (keep it alive)."""
    import deepspeed  # optional: only DeepSpeed launches get here

    ds = copy.deepcopy(acc.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        ds.pop(key, None)
    ds["zero_optimization"].pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=teacher, config=ds)
    engine.eval()
    return engine


def backward_fn(acc, last: bool):
    """The backward of one micro-batch; `last`: the update's final one.

    Under DeepSpeed this replaces accelerator.backward, whose wrapper calls engine.step() after
    every backward (an optimiser step per micro-batch) and whose engine divides the loss by its
    gradient_accumulation_steps. Here the loss already carries 1/Z, only the last micro-batch is
    an accumulation boundary, and clip_gradients takes the update's one step.
    """
    engine = deepspeed_engine(acc)
    if engine is None:
        return acc.backward

    def backward(loss):
        engine.set_gradient_accumulation_boundary(last)
        engine.backward(loss, scale_wrt_gas=False)

    return backward


def shard_places(n: int, mini: int, rank: int, world: int) -> list[int]:
    """This process's places in the step's batch of `n` prompts: every update's `mini` prompts split into
    `world` contiguous blocks, block `rank` of each. The updates then hold the prompts a single process
    would use, and, when a block is a whole number of micro-batches, so do the micro-batches (which
    micro-batch-scoped selection ranks together), whatever the process count."""
    share = mini // world
    return [u * mini + rank * share + i for u in range(n // mini) for i in range(share)]


def global_max(acc, value: int) -> int:
    """The largest of every process's `value` (an int)."""
    if acc.num_processes == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.long, device=acc.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t)


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


def gather_fn(acc):
    if acc.num_processes == 1:
        return None
    return lambda items: gather_object([items])


def clip_gradients(acc, model, max_norm: float) -> float:
    """The global gradient norm before clipping; gradients clipped to `max_norm` (0 = off).

    Under DeepSpeed the engine clips inside its optimiser step, so the update's one step happens
    here (DeepSpeed itself skips it, on every process, when the norm is not finite); the loop's
    optimizer.step() and zero_grad() are then no-ops (accelerate's DeepSpeedOptimizerWrapper).
    """
    engine = deepspeed_engine(acc)
    if engine is not None:
        engine.step()
        norm = engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)
    params = [p for p in model.parameters() if p.requires_grad]
    return float(acc.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))
