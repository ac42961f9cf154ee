"""``score="tova-decay"``: pooled TOVA with a memory, ``s <- max(a, decay * s)``.

:class:`~sinkcache.scores.tova_pooled.PooledTOVAScorer` replaces every score at every forward, so a
token the prompt's last query attended to (a pass key, when the prompt ends with the question) is
evicted as soon as one decode query looks elsewhere — typically while the answer is being written.
kvpress's ``TOVAPress`` avoids that by scoring once at prefill and never evicting while decoding
(its cache grows). Here the budget holds while decoding, and a token keeps the larger of what the
newest query gives it and its decayed old score: a strong score fades by ``decay`` per forward
instead of vanishing, so a token must be ignored by several queries in a row before it goes.
``decay=0`` is ``tova-pooled``; ``decay=1`` keeps the largest attention ever received.
"""

from __future__ import annotations

import torch

from .base import Scorer
from .tova_pooled import pool_over_heads


class DecayedTOVAScorer(Scorer):
    name = "tova-decay"
    queries = 1

    def __init__(self, decay: float = 0.9) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay={decay!r} must be a number in [0, 1]")
        self.decay = float(decay)

    def update(self, score, attn, n_queries, pos, seen, q_len):
        # A pad query gave attn 0 everywhere: the row's scores only decay.
        return torch.maximum(pool_over_heads(attn, pos), score * self.decay)

    def __repr__(self) -> str:
        return f"DecayedTOVAScorer(decay={self.decay})"
