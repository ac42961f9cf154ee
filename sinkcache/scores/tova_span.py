"""``score="tova-span"``: pooled TOVA whose scores are max-pooled over neighbouring held tokens.

An answer the model must copy (a pass key, a number, a name) is several tokens long, and the newest
query may attend to only one of them. Max-pooling each score over ``kernel`` neighbouring held
tokens (as SnapKV pools its window's attention) keeps the tokens around a peak with it, so a span is
kept or evicted whole. Scores are ``tova-pooled``'s, pooled per kv-head along the held tokens (in
column order; after evictions, neighbours are the nearest tokens still held).
"""

from __future__ import annotations

import torch.nn.functional as F

from .base import Scorer
from .tova_pooled import pool_over_heads


class SpanTOVAScorer(Scorer):
    name = "tova-span"
    queries = 1
    one_set_per_layer = True

    def __init__(self, kernel: int = 5) -> None:
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel={kernel!r} must be an odd integer >= 1")
        self.kernel = kernel

    def update(self, score, attn, n_queries, pos, seen, q_len):
        s = pool_over_heads(attn, pos)
        if self.kernel == 1:
            return s
        b, h, t = s.shape
        return F.max_pool1d(s.reshape(b * h, 1, t), self.kernel, stride=1, padding=self.kernel // 2).view(b, h, t)

    def __repr__(self) -> str:
        return f"SpanTOVAScorer(kernel={self.kernel})"
