"""The student as the training loop sees it: one module for DDP / DeepSpeed to wrap."""

from __future__ import annotations

import torch

from lm.models import backbone


class PolicyModel(torch.nn.Module):
    """The student as DDP / DeepSpeed see it: one forward that returns final hidden
    states (B, L, d) for the fused loss, or logits (B, L, V) for the reference loss.

    The logits come from the LM head run with autocast off on the hidden states upcast
    to the head's dtype, so under bf16 autocast a float32 student still gives float32
    logits (the token statistics and divergences must not see bf16-rounded logits).

    Going through this module (not the inner backbone) keeps gradient
    synchronisation and ZeRO parameter gathering working.
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        # accelerate sizes DeepSpeed's "auto" buckets from model.config.hidden_size
        self.config = lm.config

    def forward(self, input_ids, attention_mask, hidden: bool):
        states = backbone(self.lm)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        if hidden:
            return states
        head = self.lm.get_output_embeddings()  # called as a module: ZeRO-3 gathers its weight
        with torch.autocast(device_type=states.device.type, enabled=False):
            return head(states.to(head.weight.dtype)).float()
