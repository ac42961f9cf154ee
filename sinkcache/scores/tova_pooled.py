"""``score="tova-pooled"``: TOVA as its paper and kvpress's ``TOVAPress`` define it, the newest
query's attention *averaged over all heads* of the layer, so a layer keeps one set of tokens.

:class:`~sinkcache.scores.tova.TOVAScorer` keeps a set per kv-head. Pooling trades that freedom
for a less noisy score (every query head votes). Heads can still hold different tokens (measured
sinks are per kv-head), so the pool is taken per *column*: a token's score is the mean attention
it received over the kv-heads that hold it.
"""

from __future__ import annotations

import torch

from .base import Scorer


def pool_over_heads(x: torch.Tensor, pos: torch.Tensor, seen: int) -> torch.Tensor:
    """Per-column mean over kv-heads of ``x`` ``[B, H, T]``, where ``pos`` ``[B, H, T]`` is each
    slot's column (``< seen``); returned at every slot that holds the column, ``[B, H, T]``."""
    b = x.shape[0]
    col = pos.long().reshape(b, -1)
    flat = x.reshape(b, -1)
    total = flat.new_zeros(b, seen).scatter_add_(1, col, flat)
    heads = flat.new_zeros(b, seen).scatter_add_(1, col, torch.ones_like(flat))
    return (total / heads.clamp_min(1)).gather(1, col).view_as(x)


class PooledTOVAScorer(Scorer):
    name = "tova-pooled"
    queries = 1

    def update(self, score, attn, n_queries, pos, seen, q_len):
        # attn is already averaged over each kv group's query heads; with equal groups, the mean
        # over kv-heads is the mean over all query heads (kvpress: attn_weights.mean(1)).
        return pool_over_heads(attn, pos, seen)
