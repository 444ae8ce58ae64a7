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

    group: forwards in length groups (lm.length_groups) when rows are asked for; same_calls: under ZeRO-3, every
    process's number of forward calls from this one's (lm.length_groups.states).

    embedding_rows: the input embedding's gradient is added after each backward (add_embedding_grads), from
    the rows its lookups used, instead of by autograd, whose embedding backward builds a dense (V, d) gradient
    and adds it to the weight's: with a tied LM head that is a second (V, d) buffer at the end of every backward
    (the peak of a small student's step). Only where nothing else hooks the gradients (one process, no DeepSpeed:
    DDP would reduce the weight's gradient before the rows are in) and the embedding is a plain nn.Embedding.
    """

    def __init__(self, lm, group: bool = False, embedding_rows: bool = False, same_calls=None):
        super().__init__()
        self.lm = lm
        self.group = group
        self.same_calls = same_calls
        # accelerate sizes DeepSpeed's "auto" buckets from model.config.hidden_size
        self.config = lm.config
        self._lookups: list[tuple[torch.Tensor, torch.Tensor]] = []  # (ids, output leaf) since the last backward
        self.embedding_rows = embedding_rows and plain_embedding(lm.get_input_embeddings())
        if self.embedding_rows:
            lm.get_input_embeddings().register_forward_hook(self._lookup_leaf)

    def forward(self, input_ids, attention_mask, hidden: bool, positions=None):
        """positions (B, L-1) bool: the rows (N, ·) at those positions (column j predicts token j+1), from
        forwards in length groups when self.group; None: every position of the padded batch, (B, L, ·)."""
        if positions is None:
            out = backbone(self.lm)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.last_hidden_state if hidden else self._logits(out.last_hidden_state)
        rows, where = states(self.lm, input_ids, attention_mask, self.group, self.same_calls)
        index = where[:, :-1][positions]
        # The reference path forms the logits of every forward position, then takes the response rows (as the
        # upstream implementation does); the fused path never forms logits here.
        return rows[index] if hidden else self._logits(rows)[index]

    def _lookup_leaf(self, module, args, out):
        """The lookup's output as a leaf of the autograd graph (the weight's part of the graph is dropped)."""
        if not (torch.is_grad_enabled() and module.weight.requires_grad):
            return None
        leaf = out.detach().requires_grad_()
        self._lookups.append((args[0], leaf))
        return leaf

    def add_embedding_grads(self) -> None:
        """Adds the embedding lookups' gradients (since the last call) to the weight's gradient, as autograd
        would: rows of equal ids summed in float32, the sum rounded once to the weight's dtype and added; ids
        equal to padding_idx add nothing. Lookups that no backward reached add nothing."""
        lookups, self._lookups = self._lookups, []
        done = [(ids.reshape(-1), leaf.grad.reshape(-1, leaf.shape[-1])) for ids, leaf in lookups
                if leaf.grad is not None]
        if not done:
            return
        embedding = self.lm.get_input_embeddings()
        weight = embedding.weight
        ids, grads = (torch.cat(parts) for parts in zip(*done))
        if embedding.padding_idx is not None:
            keep = ids != embedding.padding_idx
            ids, grads = ids[keep], grads[keep]
        unique, inverse = torch.unique(ids, return_inverse=True)
        sums = torch.zeros(len(unique), grads.shape[1], dtype=torch.float32, device=grads.device)
        sums.index_add_(0, inverse, grads.float())
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, unique, sums.to(weight.grad.dtype))

    def _logits(self, states):
        head = self.lm.get_output_embeddings()  # called as a module: ZeRO-3 gathers its weight
        with torch.autocast(device_type=states.device.type, enabled=False):
            return head(states.to(head.weight.dtype)).float()


def plain_embedding(module) -> bool:
    """A torch.nn.Embedding whose output is its weight's rows: no subclass (Gemma's scales its output), no
    max_norm (renormalises the weight in the forward), no gradient scaled by frequency, no sparse gradient."""
    return (type(module) is torch.nn.Embedding and module.max_norm is None and not module.scale_grad_by_freq
            and not module.sparse)
