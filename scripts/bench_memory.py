"""Memory and speed of one OPD training step: loss_impl x retention.

    python scripts/bench_memory.py                 # the NOTES shape on CPU (Qwen3 vocab, hidden 256, 2 layers)
    python scripts/bench_memory.py --json out.json
    python scripts/bench_memory.py --preset qwen3-4b --seq 8192 --response 6144 --batch 1   # GPU, random weights
    python scripts/bench_memory.py --preset head2048 --batch 1 --seq 1024 --response 512 --variants fused:1.0,fused:0.5,fused:0.2
                                                   # a realistic LM head (d 2048, Qwen vocab) on CPU: 2 layers

Each variant runs in a fresh process: one warm-up step (allocates the (fused) AdamW
state), then one measured step. "extra memory" is the peak during the measured
step above what the process held with both models loaded (so it includes the
optimiser state): CPU peak RSS (VmHWM, reset through /proc/self/clear_refs),
CUDA torch.cuda.max_memory_allocated. "score+select" is the share of the step
spent computing token statistics (also those the fused loss kernel forms on
the side for stats-free selectors) and choosing tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESETS = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "notes": (256, 2, 4, 2, 512, 151936),
    "tiny": (32, 1, 4, 2, 64, 1000),  # smoke test of the script itself
    "qwen3-4b": (2560, 36, 32, 8, 9728, 151936),
    "qwen3-1.7b": (2048, 28, 16, 8, 6144, 151936),
    # Qwen3-1.7B's LM head and layer widths with 2 layers: the head's cost as in a real model, on a CPU
    "head2048": (2048, 2, 16, 8, 6144, 151936),
}
VARIANTS = [("reference", 1.0), ("reference", 0.5), ("reference", 0.2), ("fused", 1.0), ("fused", 0.5), ("fused", 0.2)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="notes", choices=sorted(PRESETS), help="model shape (random weights)")
    p.add_argument("--batch", type=int, default=2, help="sequences per step")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--response", type=int, default=1536, help="response tokens per sequence")
    p.add_argument("--selector", default="soft_or", help="tip selector used below 100%% retention")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--variants", default="", help="comma list like fused:0.5,reference:1.0 (default: all six)")
    p.add_argument("--json", default="", help="also write the table as JSON here")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_cpu_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def worker(args) -> dict:
    import torch

    import tip
    import opd.losses as losses
    import opd.step as step
    from lm.config import ModelConfig
    from opd.config import OptimConfig
    from opd.policy import PolicyModel
    from opd.setup import build_optimizer
    from lm.models import load_model
    from lm.models import head_weight
    from lm.teacher import LocalTeacher
    from opd.step import LOSS_IMPLS, MicroBatch, StepSettings, denominator, student_microbatch

    impl, ratio = args.worker.split(":")
    ratio = float(ratio)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    hidden, layers, heads, kv, inter, vocab = PRESETS[args.preset]
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    mc = ModelConfig(arch="qwen3", hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                     intermediate_size=inter, vocab_size=vocab, dtype=dtype,
                     gradient_checkpointing=args.gradient_checkpointing)

    class NoTok:  # random-weight models need no tokenizer
        pad_token_id, eos_token_id, bos_token_id = 0, 1, None

    student = PolicyModel(load_model(mc, NoTok, device, trainable=True))
    teacher = load_model(ModelConfig(**{**mc.__dict__, "init_seed": 1}), NoTok, device, trainable=False)
    opt = build_optimizer(student, OptimConfig(lr=1e-6))  # the trainer's optimiser (fused AdamW)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (args.batch, args.seq), generator=g)
    resp = torch.zeros(args.batch, args.seq, dtype=torch.long)
    resp[:, args.seq - args.response:] = 1
    mb = MicroBatch(ids.to(device), torch.ones_like(ids).to(device), resp.to(device),
                    torch.ones(args.batch, device=device), torch.arange(args.batch, device=device))
    selector = "all" if ratio >= 1.0 else args.selector
    st = StepSettings(loss_impl=impl, loss_type="reverse_kl", beta=0.5, chunk_size=args.chunk_size,
                      selector=selector, ratio=ratio, scope="microbatch",
                      select_options={"normalize": "minmax", "momentum": 0.9, "importance_weighting": False})

    scoring = {"s": 0.0, "depth": 0}

    def timed(fn):
        def wrapper(*a, **k):
            scoring["depth"] += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                scoring["depth"] -= 1
                if scoring["depth"] == 0:
                    sync()
                    scoring["s"] += time.perf_counter() - t0
        return wrapper

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # statistics the fused loss kernel forms on the side (stats-free selectors) count as scoring too: the four
    # sums, both exps included (an over-count: for reverse KL these sums are the loss's own value)
    losses.block_sums = timed(losses.block_sums)
    losses.row_stats = timed(losses.row_stats)
    step.token_stats = timed(step.token_stats)
    tip.select = timed(tip.select)

    def one_step():
        cached = LocalTeacher(teacher, reads=LOSS_IMPLS[impl].reads, device=device, cache_device=device).score([mb])[0]
        z = denominator([mb], st)
        gen = torch.Generator().manual_seed(0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and dtype == "float32"):
            student_microbatch(student, head_weight(student.lm), head_weight(teacher), mb, cached, st, 1.0 / z, lambda key: gen,
                               tip.RunningMinMax(), lambda loss: loss.backward())
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
    else:
        base = _vm_kib("VmRSS") * 1024
    one_step()  # warm-up: allocates the optimiser state
    scoring["s"] = 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_cpu_peak()
    t0 = time.perf_counter()
    one_step()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _vm_kib("VmHWM") * 1024
    return {"impl": impl, "ratio": ratio, "selector": selector, "extra_gib": (peak - base) / 2**30,
            "step_s": seconds, "score_select_share": scoring["s"] / seconds, "device": str(device),
            "dtype": dtype, "memory": "max_memory_allocated" if device.type == "cuda" else "peak RSS"}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    variants = [(v.split(":")[0], float(v.split(":")[1])) for v in args.variants.split(",") if v] or VARIANTS
    passthrough = [f"--preset={args.preset}", f"--batch={args.batch}", f"--seq={args.seq}",
                   f"--response={args.response}", f"--selector={args.selector}", f"--chunk-size={args.chunk_size}",
                   f"--device={args.device}", f"--dtype={args.dtype}"]
    if args.gradient_checkpointing:
        passthrough.append("--gradient-checkpointing")
    rows = []
    print(f"shape: {args.preset}, batch {args.batch} x {args.seq} tokens ({args.response} response), "
          f"chunk {args.chunk_size}, selector {args.selector}", flush=True)
    for impl, ratio in variants:
        out = subprocess.run([sys.executable, __file__, *passthrough, "--worker", f"{impl}:{ratio}"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{impl}@{ratio:.0%} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  done {impl}@{ratio:.0%}: {rows[-1]['extra_gib']:.2f} GiB, {rows[-1]['step_s']:.1f} s", flush=True)
    ref = next((r for r in rows if r["impl"] == "reference" and r["ratio"] == 1.0), rows[0])
    for r in rows:
        r["memory_ratio"] = r["extra_gib"] / ref["extra_gib"]
        r["time_ratio"] = r["step_s"] / ref["step_s"]
    print(f"\n| variant | kept | extra memory ({rows[0]['memory']}) | vs reference@100% | step time | vs reference@100% | score+select |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['ratio']:.0%} | {r['extra_gib']:.2f} GiB | {r['memory_ratio']:.2f} | "
              f"{r['step_s']:.2f} s | {r['time_ratio']:.2f} | {r['score_select_share']:.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
