"""Forwards in length groups (lm.length_groups) against one padded forward, on the benchmark pair.

    python scripts/bench_length_groups.py                                   # 8 rows, responses of 20-256 tokens
    python scripts/bench_length_groups.py --responses 64,64,12,30,64,25,40,33

One micro-batch laid out as lm.rollout assembles rollouts (left-padded chat prompts of the real demo's held-out
set, right-padded responses of the given lengths, random response tokens): the teacher's no-grad forward and
the student's forward and backward to its final hidden states at the response positions, padded and grouped in
turn, `--repeats` times; the first repeat of each is a warm-up. Prints the slots each layout computes and the
median and minimum seconds. The pair is bench_peers.py's (SmolLM2-135M-Instruct teacher, a 10-layer student cut
from it), prepared on first use, or `--pair DIR`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--responses", default="256,20,40,256,60,30,100,256", help="response tokens of each row")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pair", default="", help="directory with teacher/ and student/ (default: bench_peers' pair)")
    args = p.parse_args(argv)
    try:
        args.lengths = [int(n) for n in args.responses.split(",")]
    except ValueError:
        p.error(f"--responses: {args.responses!r} is not a comma list of integers")
    if not args.lengths or min(args.lengths) < 1 or args.repeats < 2:
        p.error("--responses needs positive lengths and --repeats at least 2")
    return args


def batch(tokenizer, lengths: list[int]):
    import torch

    from demo import real_task

    records = real_task.records(real_task.HELDOUT_NAME)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
               for r in records[:len(lengths)]]
    left, width = max(map(len, prompts)), max(map(len, prompts)) + max(lengths)
    low = min(100, len(tokenizer) // 2)  # past the special tokens, in a real vocabulary
    ids = torch.randint(low, len(tokenizer), (len(lengths), width), generator=torch.Generator().manual_seed(0))
    att = torch.zeros_like(ids)
    response = torch.zeros_like(ids)
    for r, (p, n) in enumerate(zip(prompts, lengths)):
        ids[r, left - len(p):left] = torch.tensor(p)
        att[r, left - len(p):left + n] = 1
        response[r, left:left + n] = 1
    return ids, att, response[:, 1:].bool()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm.length_groups import plan, states_at

    torch.set_num_threads(args.threads)
    if args.pair:
        teacher_dir, student_dir = Path(args.pair) / "teacher", Path(args.pair) / "student"
    else:
        sys.path.insert(0, str(REPO / "scripts"))
        from bench_peers import KEEP_LAYERS
        from demo.real_prepare import prepare_real_pair

        teacher_dir, student_dir = prepare_real_pair({"keep_layers": KEEP_LAYERS}, log=print)
    load = dict(dtype=torch.float32, attn_implementation="sdpa")
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), **load).eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(str(student_dir), **load).train()
    ids, att, pos = batch(AutoTokenizer.from_pretrained(str(student_dir)), args.lengths)
    groups = plan(att) or []
    print(f"{len(args.lengths)} rows, responses {args.lengths}; padded {ids.numel()} slots, grouped "
          f"{sum(g.source.numel() for g in groups) or ids.numel()} slots in {max(1, len(groups))} group(s)")

    def once(group: bool) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            target = states_at(teacher, ids, att, pos, group)
        hidden = states_at(student, ids, att, pos, group)
        (hidden * target[:, :hidden.shape[1]]).sum().backward()
        student.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times = {False: [], True: []}
    for _ in range(args.repeats):  # interleaved
        for group in (False, True):
            times[group].append(once(group))
    print("| layout | median s | min s |\n|---|---|---|")
    for group, name in ((False, "padded"), (True, "length groups")):
        measured = times[group][1:]
        print(f"| {name} | {statistics.median(measured):.2f} | {min(measured):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
