"""Forwards in length groups: a padded batch's rows regrouped by length, each group padded only to its longest row.

A batch of rollouts is left-padded prompts followed by right-padded responses (lm.rollout.Rollouts), as wide as
the longest prompt plus the longest response; with responses of varied length a fifth to a half of its (B, L)
positions can be padding, and the backbone pays for each of them (the teacher's forward, the student's forward
and backward). Here every row's real tokens (contiguous in its row) move to the row's start, the rows are sorted
by length and split into groups, and each group runs as its own right-padded batch as wide as its longest row.
Each row attends to itself only, as before; positions count from 0 at the row's first real token (rotary
embeddings depend on position differences only, so the function is the padded forward's; the rounding differs,
other matrix shapes).

The split is the cheapest one in padded slots, every group after the first charged CALL_SLOTS slots (another
forward call must pay for its fixed cost: on this project's CPU benchmark pair a call's overhead is about one
token's work; 64 leaves room for a GPU's kernel launches, unmeasured): a dynamic programme over the sorted
lengths.

Under DeepSpeed ZeRO-3 every forward call gathers each layer's weights from all processes (a collective), so every
process must make the same calls, forward and backward, while the number of groups depends on its rows: the caller
passes `same_calls` (this process's call count -> every process's: the maximum), and a process with fewer groups
makes the missing calls on one token, joined to the graph with weight 0 so its backward makes them too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lm.models import backbone

CALL_SLOTS = 64


def split(lengths: list[int]) -> list[list[int]]:
    """The groups (lists of row indices, shortest rows first, ties in row order) of rows with these lengths: the
    contiguous split of the sorted lengths with the fewest padded slots sum(len(group) * longest in group), each
    group after the first costing CALL_SLOTS more. Rows of length 0 are in no group."""
    order = sorted((r for r, n in enumerate(lengths) if n), key=lambda r: (lengths[r], r))
    if not order:
        return []
    best = [0] + [None] * len(order)  # best[j]: cheapest cost of the first j sorted rows
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):  # the last group is sorted rows i..j-1, as wide as row j-1
            cost = best[i] + (j - i) * lengths[order[j - 1]] + (CALL_SLOTS if i else 0)
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


@dataclass
class Group:
    """Rows of a padded (B, L) batch regrouped as one right-padded batch.

    rows      (n,)    the rows of the padded batch it holds
    source    (n, w)  flat index into the (B*L) batch of each of its slots; -1 on its padding
    """

    rows: torch.Tensor
    source: torch.Tensor

    def inputs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of the group; padding slots repeat the row's first token, masked."""
        real = self.source >= 0
        first = self.source[:, :1].expand_as(self.source)
        ids = input_ids.reshape(-1)[torch.where(real, self.source, first)]
        return ids, real.long()


def plan(attention_mask: torch.Tensor) -> list[Group] | None:
    """The groups of a padded batch (`split`), or None where they would not save a slot over the padded batch
    or a row's real tokens are not contiguous (then it runs padded)."""
    rows, width = attention_mask.shape
    real = attention_mask.bool()
    cols = torch.arange(width, device=real.device)
    lengths = real.sum(1).tolist()
    first = torch.where(real, cols, width).min(1).values.tolist()
    last = torch.where(real, cols, -1).max(1).values.tolist()
    if any(n and hi - lo + 1 != n for n, lo, hi in zip(lengths, first, last)):
        return None
    groups = split(lengths)
    if not groups or sum(len(g) * lengths[g[-1]] for g in groups) >= rows * width:
        return None
    out = []
    for members in groups:
        w = lengths[members[-1]]
        offsets = torch.arange(w)
        source = torch.stack([torch.where(offsets < lengths[r], r * width + first[r] + offsets, -1) for r in members])
        out.append(Group(torch.tensor(members, device=real.device), source.to(real.device)))
    return out


SameCalls = Callable[[int], int]


def states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, group: bool,
           same_calls: SameCalls | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's final hidden states (M, d), a row per forward position, and `where` (B, L): the row of each
    position of the padded batch (padding: -1 when grouped, a row that holds padding when not).

    group: run in length groups where that saves slots (`plan`); else, and where plan() declines, the padded
    forward of the whole (B, L) batch, as transformers runs it.
    same_calls: the number of forward calls every process makes, from this process's (ZeRO-3; see the module)."""
    groups = plan(attention_mask) if group else None
    run = backbone(model)
    made = len(groups) if groups else 1
    # agreed before any forward: under ZeRO-3 a forward's weight gathers are collectives too, and must pair up
    missing = same_calls(made) - made if same_calls is not None else 0
    if groups is None:
        out = run(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        where = torch.arange(out.shape[0] * out.shape[1], device=out.device).view(out.shape[:2])
        return _calls_made_up(run, input_ids, out.reshape(-1, out.shape[-1]), missing), where
    parts, where, offset = [], torch.full((input_ids.numel(),), -1, dtype=torch.long, device=input_ids.device), 0
    for g in groups:
        ids, mask = g.inputs(input_ids)
        out = run(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        parts.append(out.reshape(-1, out.shape[-1]))
        real = (g.source >= 0).reshape(-1)
        where[g.source.reshape(-1)[real]] = offset + real.nonzero().squeeze(1)
        offset += ids.numel()
    rows = parts[0] if len(parts) == 1 else torch.cat(parts)
    return _calls_made_up(run, input_ids, rows, missing), where.view(input_ids.shape)


def _calls_made_up(run, input_ids: torch.Tensor, rows: torch.Tensor, missing: int):
    """`rows`, after `missing` more forward calls (the ones other processes make beyond this one's): each on the
    batch's first token alone, its output added to the graph with weight 0 (where there is a graph), so the
    backward runs them too."""
    one = input_ids.reshape(-1)[:1].view(1, 1)
    for _ in range(missing):
        out = run(input_ids=one, attention_mask=torch.ones_like(one), use_cache=False).last_hidden_state
        if out.requires_grad:
            rows = rows + 0.0 * out.sum()
    return rows


def states_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
              group: bool, same_calls: SameCalls | None = None) -> torch.Tensor:
    """The final hidden states (N, d) at `positions` ((B, L-1) bool; column j is the state that predicts token
    j+1), in row-major order of the positions."""
    rows, where = states(model, input_ids, attention_mask, group, same_calls)
    return rows[where[:, :-1][positions]]
