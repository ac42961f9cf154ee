"""``score="vatp"``: pooled TOVA weighted by each token's value norm (Guo et al., 2024, "Attention
Score is not All You Need for Token Importance Indicator in KV Cache Reduction: Value Also Matters").

What a held token adds to the attention output is its weight times its value vector, so a token that
draws attention but holds a tiny value writes almost nothing. VATP scores ``attn * ||v||_1``. Its
known failure is the attention sink: sinks draw much attention and hold small values, so VATP alone
would evict them. A sink-aware cache keeps its sinks whatever the score says, which is why the two
fit. Per kv-head ``attn * ||v||_1`` (the newest query's attention, as ``tova``), then pooled over the
heads that hold each column, as ``tova-pooled``.
"""

from __future__ import annotations

import torch

from .base import Scorer
from .tova_pooled import pool_over_heads


class VATPScorer(Scorer):
    name = "vatp"
    queries = 1
    one_set_per_layer = True

    weighs_tokens = True

    def token_weight(self, values: torch.Tensor) -> torch.Tensor:
        # [B, H, q, D] -> [B, H, q]: a held value never changes, so its norm is taken once, on arrival
        return values.float().abs().sum(-1)

    def update(self, score, attn, n_queries, pos, seen, q_len):
        return pool_over_heads(attn, pos)
