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


def pool_over_heads(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Per-column mean over kv-heads of ``x`` ``[B, H, T]``, where ``pos`` ``[B, H, T]`` is each
    slot's column (ascending along T, as held tokens are); returned at every slot that holds the
    column, ``[B, H, T]``. ``pos`` ``[B, 1, T]`` says every head holds the same columns.

    Each head's columns are looked up in every other head's (``searchsorted``): O(H^2 T log T) on
    what is held, nothing proportional to the stream length (no ``[B, seen]`` buffer per step).
    When the heads share their columns the pool is a plain mean (one op instead of ~12 per layer
    per step, ~4% of a smollm2 decode step).
    """
    b, h, t = x.shape
    if h == 1:
        return x
    if pos.shape[1] == 1:
        return x.mean(1, keepdim=True).expand(b, h, t)
    # [B, G, H, T]: head h's columns searched in head g's sorted columns.
    held = pos.unsqueeze(2).expand(b, h, h, t).reshape(-1, t)
    want = pos.unsqueeze(1).expand(b, h, h, t).reshape(-1, t)
    idx = torch.searchsorted(held, want).clamp_(max=t - 1)
    hit = held.gather(1, idx) == want
    got = x.unsqueeze(2).expand(b, h, h, t).reshape(-1, t).gather(1, idx) * hit
    # every column is held by its own head, so the count is >= 1
    return got.view(b, h, h, t).sum(1) / hit.view(b, h, h, t).sum(1)


class PooledTOVAScorer(Scorer):
    name = "tova-pooled"
    queries = 1
    one_set_per_layer = True

    def update(self, score, attn, n_queries, pos, seen, q_len):
        # attn is already averaged over each kv group's query heads; with equal groups, the mean
        # over kv-heads is the mean over all query heads (kvpress: attn_weights.mean(1)).
        return pool_over_heads(attn, pos)
