"""The student as the training loop sees it: one module for DDP / DeepSpeed to wrap."""

from __future__ import annotations

import torch

from lm.length_groups import states
from lm.models import backbone


class PolicyModel(torch.nn.Module):
    """The student as DDP / DeepSpeed see it: one forward that returns final hidden
    states (B, L, d) for the fused loss, or logits (B, L, V) for the reference loss.

    The logits come from the LM head run with autocast off on the hidden states upcast
    to the head's dtype, so under bf16 autocast a float32 student still gives float32
    logits (the token statistics and divergences must not see bf16-rounded logits).

    Going through this module (not the inner backbone) keeps gradient
    synchronisation and ZeRO parameter gathering working.

    group: forwards in length groups (lm.length_groups) when rows are asked for (never under ZeRO-3).
    """

    def __init__(self, lm, group: bool = False):
        super().__init__()
        self.lm = lm
        self.group = group
        # accelerate sizes DeepSpeed's "auto" buckets from model.config.hidden_size
        self.config = lm.config

    def forward(self, input_ids, attention_mask, hidden: bool, positions=None):
        """positions (B, L-1) bool: the rows (N, ·) at those positions (column j predicts token j+1), from
        forwards in length groups when self.group; None: every position of the padded batch, (B, L, ·)."""
        if positions is None:
            out = backbone(self.lm)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.last_hidden_state if hidden else self._logits(out.last_hidden_state)
        rows, where = states(self.lm, input_ids, attention_mask, self.group)
        index = where[:, :-1][positions]
        # The reference path forms the logits of every forward position, then takes the response rows (as the
        # upstream implementation does); the fused path never forms logits here.
        return rows[index] if hidden else self._logits(rows)[index]

    def _logits(self, states):
        head = self.lm.get_output_embeddings()  # called as a module: ZeRO-3 gathers its weight
        with torch.autocast(device_type=states.device.type, enabled=False):
            return head(states.to(head.weight.dtype)).float()
