"""Held-out KL(student || teacher) per token on the student's own samples: the real demo's headline metric.

    python scripts/heldout_kl.py --teacher DIR --student NAME=DIR [NAME=DIR ...] [--prompts demo:instructions_heldout]

Each student samples one answer per held-out prompt at temperature 1.0 (seeded, at most --max-new-tokens), and the
reverse KL of every answer token is computed over the whole vocabulary by the training step's own statistics pass
(opd.step.token_stats); printed: mean KL per token (nats), mean student entropy, the Q3-style share of tokens
(low h, high δ by the medians) and the mean answer length.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.real_prepare import answers  # noqa: E402
from opd.data import read_records, LoadReport  # noqa: E402
from opd.step import token_stats  # noqa: E402


@torch.no_grad()
def measure(student, teacher, tokenizer, prompts: list[str], max_new_tokens: int, seed: int) -> dict:
    r = answers(student, tokenizer, prompts, max_new_tokens, seed)
    rows = r.response_mask[:, 1:].bool()
    s = student(input_ids=r.input_ids, attention_mask=r.attention_mask).logits[:, :-1][rows]
    t = teacher(input_ids=r.input_ids, attention_mask=r.attention_mask).logits[:, :-1][rows]
    seq = torch.arange(len(r)).unsqueeze(1).expand_as(rows)[rows]
    st = token_stats(s, t, seq, chunk_size=256)
    return {"kl_per_token": st.divergence.mean().item(), "entropy": st.entropy.mean().item(),
            "tokens": len(st), "mean_length": rows.sum().item() / len(r),
            "sample": tokenizer.decode(r.response_ids()[0], skip_special_tokens=True)}


def evaluate(teacher_dir, students: dict, prompts_path: str, max_new_tokens: int, seed: int) -> tuple[dict, list]:
    """{name: measure(...)} for every student (name -> checkpoint directory; the teacher's own directory scores the
    teacher itself), each printed as it is done; and the prompts."""
    prompts = [rec["prompt"] for rec, _ in read_records(prompts_path, "test", "error", LoadReport())]
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    results = {}
    for name, path in students.items():
        same = str(path) == str(teacher_dir)
        model = teacher if same else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        res = results[name] = measure(model, teacher, tokenizer, prompts, max_new_tokens, seed)
        print(f"{name:<22} KL {res['kl_per_token']:.4f} nats/token  h {res['entropy']:.3f}  "
              f"length {res['mean_length']:.1f}  ({res['tokens']} tokens)  e.g. {res['sample']!r}", flush=True)
    return results, prompts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", nargs="+", required=True, metavar="NAME=DIR")
    parser.add_argument("--prompts", default="demo:instructions_heldout")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    students = dict(spec.partition("=")[::2] for spec in args.student)
    results, prompts = evaluate(args.teacher, students, args.prompts, args.max_new_tokens, args.seed)
    if args.out:
        Path(args.out).write_text(json.dumps({"prompts": len(prompts), **results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
