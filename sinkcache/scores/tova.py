"""``score="tova"``: keep what the newest query attends to (Oren et al., 2024, "Transformers are
Multi-State RNNs").

Each forward replaces every held token's score with the attention the forward's *last* query gives
it: at prefill the last prompt token, at decode the token just generated. Scores are per kv-head
(the query heads of a GQA group averaged), per row.
"""

from __future__ import annotations

from .base import Scorer


class TOVAScorer(Scorer):
    name = "tova"
    queries = 1

    def update(self, score, attn, n_queries, pos, seen, q_len):
        # One query: its summed attention is the score (a row whose query was a pad got zeros).
        return attn
