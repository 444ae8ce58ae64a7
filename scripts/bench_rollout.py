"""Rollout speed: the HF engine and vLLM on the same model, prompts and length distribution; one weight sync.

    python scripts/bench_rollout.py                      # CPU: Qwen3 shape, 4 layers x 256, real vocabulary, fp32
    python scripts/bench_rollout.py --preset qwen3-4b    # GPU: Qwen3-4B shape, random weights, bf16, 64 x <= 2048
    python scripts/bench_rollout.py --engines hf         # without vLLM installed

Random weights, so lengths are made variable on purpose: a set of `--stop-share`
of the vocabulary counts as end-of-sequence ids for both engines, which makes
response lengths roughly geometric (mean about 1 / stop-share, cut at
--max-new-tokens), as real rollouts vary; prompt lengths are uniform in
[--prompt-min, --prompt-max]. Both engines get the same prompts, per-prompt seeds
and sampling settings (T=1). tokens/s = generated tokens / wall time of one
generate call over all prompts (after a small warm-up call). "sync" is one full
weight push from the HF model into the engine (median of 3). No asserts on time:
it prints what it measures. On tiny models vLLM's fixed per-step overhead can
dominate; on CPU it has no paged-attention or CUDA-graph advantage to show.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from lm.config import ModelConfig  # noqa: E402
from lm.engines import HFEngine, Sampling  # noqa: E402
from lm.models import load_model  # noqa: E402
from lm.vllm_engine import build_vllm_engine  # noqa: E402

PRESETS = {
    # name: model shape (hidden, layers, heads, kv_heads, intermediate, vocab), dtype, prompts, max new tokens
    "cpu": ((256, 4, 4, 2, 768, 151936), "float32", 16, 128),
    "qwen3-4b": ((2560, 36, 32, 8, 9728, 151936), "bfloat16", 64, 2048),
    "tiny": ((64, 2, 2, 1, 128, 1000), "float32", 4, 16),  # smoke test of the script itself
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--engines", default="hf,vllm", help="comma list of hf, vllm")
    p.add_argument("--prompts", type=int, default=0, help="prompts (0 = the preset's)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0 = the preset's")
    p.add_argument("--stop-share", type=float, default=0.0, help="share of the vocabulary that ends a response; "
                   "0 = 2 / max-new-tokens (mean length about half the maximum)")
    p.add_argument("--prompt-min", type=int, default=16)
    p.add_argument("--prompt-max", type=int, default=256)
    p.add_argument("--hf-batch", type=int, default=0, help="HF engine: prompts per generate call (0 = all)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--json", default="", help="also write the table as JSON here")
    return p.parse_args(argv)


def build(args):
    (hidden, layers, heads, kv, inter, vocab), dtype, n_prompts, max_new = PRESETS[args.preset]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mc = ModelConfig(arch="qwen3", hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                     intermediate_size=inter, vocab_size=vocab, dtype=dtype)
    model = load_model(mc, None, device, trainable=False)
    n_prompts, max_new = args.prompts or n_prompts, args.max_new_tokens or max_new
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(args.prompt_min, args.prompt_max))]
               for _ in range(n_prompts)]
    share = args.stop_share or min(1.0, 2.0 / max_new)
    stop = tuple(sorted(rng.sample(range(vocab), max(1, int(share * vocab)))))
    sampling = Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new, n=1, eos_ids=stop,
                        pad_token_id=0)
    return model, device, prompts, sampling


def timed(engine, prompts, sampling) -> dict:
    seeds = list(range(1000, 1000 + len(prompts)))
    engine.generate(prompts[:2], seeds[:2], Sampling(**{**sampling.__dict__, "max_new_tokens": 4}))  # warm-up
    sync_device()
    start = time.perf_counter()
    out = engine.generate(prompts, seeds, sampling)
    sync_device()
    seconds = time.perf_counter() - start
    tokens = int(out.response_mask.sum())
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
            "mean_len": tokens / len(out), "truncated": float(out.truncated.float().mean())}


def sync_device():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    model, device, prompts, sampling = build(args)
    rows = []
    for name in args.engines.split(","):
        started = time.perf_counter()
        if name == "hf":
            engine = HFEngine(model, batch_size=args.hf_batch)
        else:
            engine = build_vllm_engine(
                model, Path(tempfile.mkdtemp()) / "model", dtype=next(model.parameters()).dtype,
                max_model_len=args.prompt_max + sampling.max_new_tokens, device=device, num_processes=1,
                gpu_memory_utilization=args.gpu_memory_utilization, cpu_kv_cache_gb=4, sleep=False, enforce_eager=False)
            engine.sync(model.named_parameters())
        row = {"engine": name, "start_s": time.perf_counter() - started, **timed(engine, prompts, sampling)}
        if name == "vllm":
            row["sync_s"] = statistics.median(sync_time(engine, model) for _ in range(3))
        rows.append(row)
    print_table(args, rows, len(prompts), sampling.max_new_tokens)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


def sync_time(engine, model) -> float:
    sync_device()
    start = time.perf_counter()
    engine.sync(model.named_parameters())
    sync_device()
    return time.perf_counter() - start


def print_table(args, rows, n_prompts, max_new):
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"\npreset {args.preset} ({where}): {n_prompts} prompts x up to {max_new} new tokens")
    print(f"{'engine':<8} {'start s':>8} {'tokens':>8} {'mean len':>9} {'trunc%':>7} {'gen s':>8} {'tok/s':>9} {'sync s':>7}")
    base = next((r["tok_s"] for r in rows if r["engine"] == "hf"), None)
    for r in rows:
        sync = f"{r['sync_s']:.3f}" if "sync_s" in r else "—"
        ratio = f"  ({r['tok_s'] / base:.1f}x hf)" if base and r["engine"] != "hf" else ""
        print(f"{r['engine']:<8} {r['start_s']:>8.1f} {r['tokens']:>8} {r['mean_len']:>9.1f} "
              f"{100 * r['truncated']:>7.1f} {r['seconds']:>8.1f} {r['tok_s']:>9.1f} {sync:>7}{ratio}")


if __name__ == "__main__":
    main()
