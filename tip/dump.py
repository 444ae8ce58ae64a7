"""A dump of individual tokens for inspection (paper appendix B.4), one JSON object per line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from tip.selectors import Selection
from tip.stats import TokenStats


def _num(x: float) -> float:
    # 6 significant digits: readable, and tiny divergences (1e-8 nats) keep their size
    return float(f"{x:.6g}")


def _top(ids: torch.Tensor, probs: torch.Tensor, decode: Callable[[int], str]) -> list[list]:
    return [[decode(int(i)), _num(float(p))] for i, p in zip(ids[:5].tolist(), probs[:5].tolist())]


def token_records(
    stats: TokenStats,
    selection: Selection,
    quadrants: torch.Tensor,
    token_ids: torch.Tensor,
    decode: Callable[[int], str],
    n: int,
    generator: torch.Generator | None = None,
    step: int = 0,
    response_positions: torch.Tensor | None = None,
) -> list[dict]:
    """Records of n tokens picked at random (all N, in stats order, when n >= N).

    stats, selection, quadrants (N,), token_ids (N,) and response_positions (N,)
    describe the same tokens; response_positions is each token's place in its
    rollout's response (0 = the first generated token). decode maps one token id
    to its text. Each record has: step, rollout (the stats' sequence id: the
    rollout's index in the step), response_position (when given), token, entropy,
    divergence, forward_divergence, teacher_entropy, quadrant, kept, weight, and
    student_top5 / teacher_top5 ([[text, prob], ...]) when stats carry top-k ids.
    """
    total = len(stats)
    checked = [("selection", selection.mask), ("quadrants", quadrants), ("token_ids", token_ids)]
    if response_positions is not None:
        checked.append(("response_positions", response_positions))
    for label, t in checked:
        if t.shape[0] != total:
            raise ValueError(f"token_records: {label} has {t.shape[0]} tokens but stats have {total}")
    if n < 0:
        raise ValueError(f"token_records: n must be >= 0, got {n}")
    if n >= total:
        picked = torch.arange(total)
    else:
        device = generator.device if generator is not None else torch.device("cpu")
        picked = torch.randperm(total, generator=generator, device=device)[:n].sort().values.cpu()

    cpu = stats.subset(picked.to(stats.entropy.device)).to("cpu")
    mask = selection.mask[picked.to(selection.mask.device)].tolist()
    weights = selection.weights[picked.to(selection.weights.device)].tolist()
    quads = quadrants[picked.to(quadrants.device)].tolist()
    ids = token_ids[picked.to(token_ids.device)].tolist()
    places = None if response_positions is None else response_positions[picked.to(response_positions.device)].tolist()
    seqs, h, d, d_fwd, h_t = (t.tolist() for t in (cpu.sequence_ids, cpu.entropy, cpu.divergence, cpu.forward_divergence, cpu.teacher_entropy))
    records = []
    for j in range(len(picked)):
        record = {
            "step": int(step),
            "rollout": int(seqs[j]),
            **({} if places is None else {"response_position": int(places[j])}),
            "token": decode(int(ids[j])),
            "entropy": _num(h[j]),
            "divergence": _num(d[j]),
            "forward_divergence": _num(d_fwd[j]),
            "teacher_entropy": _num(h_t[j]),
            "quadrant": int(quads[j]),
            "kept": bool(mask[j]),
            "weight": _num(float(weights[j])),
        }
        if cpu.has_top:
            record["student_top5"] = _top(cpu.student_top_ids[j], cpu.student_top_probs[j], decode)
            record["teacher_top5"] = _top(cpu.teacher_top_ids[j], cpu.teacher_top_probs[j], decode)
        records.append(record)
    return records


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Append one JSON line per record to `path` (created with its folder if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
