"""``score="keynorm"``: keep the keys with the smallest L2 norm (Devoto et al., 2024).

Keys with small norms draw the most attention, so ``-||k||`` ranks tokens without any query: one
norm per arriving token, nothing per step, and it works without ``model=``.
"""

from __future__ import annotations

import torch

from .base import Scorer


class KeyNormScorer(Scorer):
    name = "keynorm"
    queries = 0

    def arrival(self, keys: torch.Tensor) -> torch.Tensor:
        return -keys.float().norm(dim=-1)

    def update(self, score, attn, n_queries, pos, seen, q_len):  # never called: it reads no attention
        return score
