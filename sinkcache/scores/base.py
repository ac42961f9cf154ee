"""The eviction-score interface: how much each held token is worth keeping.

An :class:`~sinkcache.layers.EvictingLayer` keeps, per (row, kv-head), a float32 score for every
token it holds (``[B, H, T]``, aligned with its keys). A scorer says what a token scores when it
arrives (:meth:`Scorer.arrival`) and, for scorers that read attention, how a forward's attention
changes the scores (:meth:`Scorer.update`). Eviction keeps the highest scores; sinks and the recent
window are protected by the layer whatever the scorer says.

Attention scorers (``needs_attention``) are fed by :class:`~sinkcache.scores.observe.AttentionObserver`,
forward hooks that recompute the queries of the last :attr:`Scorer.queries` positions of each
forward and take their softmax over the keys the layer holds (what the model attended, in float32).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Scorer(ABC):
    """Scores held tokens for eviction (higher is kept).

    ``queries``: how many of a forward's last queries an attention scorer reads (``None``: all of
    them); 0 for scorers that read no attention.
    """

    name: str = "?"
    queries: int | None = 0
    #: True for a scorer whose scores are equal across kv-heads whenever the heads hold the same
    #: columns (it pools over heads): with sinks marked alike for every head, such a layer keeps one
    #: token set, and :meth:`update` then gets ``pos`` ``[B, 1, T]`` (see the layer).
    one_set_per_layer: bool = False

    @property
    def needs_attention(self) -> bool:
        return self.queries != 0

    def arrival(self, keys: torch.Tensor) -> torch.Tensor:
        """Score of new tokens ``[B, H, q]`` float32 from their keys ``[B, H, q, D]`` (post-RoPE).

        Attention scorers start at 0: the forward the tokens arrive in scores them before any
        eviction can happen (layers compress one forward late)."""
        return torch.zeros(keys.shape[:3], dtype=torch.float32, device=keys.device)

    #: True for a scorer that weighs the attention a token draws by a factor fixed when the token
    #: arrives (:meth:`token_weight`). The layer then computes that factor once per token and keeps it
    #: beside the score (4 bytes per token and kv-head, counted in its memory), rather than recomputing it
    #: from every held token on every forward.
    weighs_tokens: bool = False

    def token_weight(self, values: torch.Tensor) -> torch.Tensor:
        """Factor ``[B, H, q]`` float32 of new tokens, from their values ``[B, H, q, D]``, that multiplies
        the attention they draw before :meth:`update` reads it (only when :attr:`weighs_tokens`)."""
        raise NotImplementedError(f"{type(self).__name__} weighs no tokens")

    @abstractmethod
    def update(
        self, score: torch.Tensor, attn: torch.Tensor, n_queries: torch.Tensor, pos: torch.Tensor, seen: int,
        q_len: int,
    ) -> torch.Tensor:
        """New scores after one forward.

        Args:
            score: ``[B, H, T]`` current scores of the held tokens (this forward's tokens included).
            attn: ``[B, H, T]`` attention each held token received in this forward, summed over the
                observed (non-pad) queries and averaged over the query heads of its kv group (times the
                token's :meth:`token_weight` for a scorer that weighs tokens).
            n_queries: ``[B]`` how many non-pad queries were observed per row.
            pos: ``[B, H, T]`` int32 column of each held token; ``[B, 1, T]`` when every kv-head holds
                the same columns (only for a scorer with :attr:`one_set_per_layer`).
            seen: tokens seen so far (the forward's last query is column ``seen - 1``).
            q_len: tokens in this forward (1 while decoding).
        Returns:
            ``[B, H, T]`` float32.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
