"""``score="h2o"``: heavy hitters, the attention a token has accumulated over every query since it
arrived (Zhang et al., 2023, "H2O").

Prefill sums the attention of *all* prompt queries (computed in chunks of queries, O(n^2) once);
each decode step adds its query's attention. Older tokens have been seen by more queries, so the
score favours them; the protected recent window offsets that, as in H2O.
"""

from __future__ import annotations

from .base import Scorer


class H2OScorer(Scorer):
    name = "h2o"
    queries = None

    def update(self, score, attn, n_queries, pos, seen, q_len):
        return score + attn
