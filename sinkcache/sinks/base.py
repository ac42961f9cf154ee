"""The sink-selector interface: which cached tokens are attention sinks (kept exact, never evicted).

A sink selector is a small object with one method, :meth:`SinkSelector.mark`, that a cache layer
calls on a block of columns it is about to compress (or, for eviction, on tokens as they enter).
It returns a boolean mask ``[B, H or 1, C]``. Selectors see the shared :class:`TokenContext`
(padding and token ids) and, for ``"auto"``, the attention each key has received.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..context import TokenContext


class SinkSelector(ABC):
    """Decides which tokens of a block are sinks.

    ``max_sinks`` caps sinks per (row, kv-head) in one layer; ``None`` means no cap (only allowed
    where nothing is evicted).
    """

    name: str = "?"
    needs_ids: bool = False
    needs_attention: bool = False

    def __init__(self, n_first: int = 1, max_sinks: int | None = None) -> None:
        if isinstance(n_first, bool) or not isinstance(n_first, int) or n_first < 0:
            raise ValueError(f"n_first={n_first!r} must be an integer >= 0")
        if max_sinks is not None and (isinstance(max_sinks, bool) or not isinstance(max_sinks, int) or max_sinks < 0):
            raise ValueError(f"max_sinks={max_sinks!r} must be None or an integer >= 0")
        if max_sinks is not None and max_sinks < n_first:
            raise ValueError(f"max_sinks={max_sinks} is smaller than n_first={n_first}; allowed: max_sinks >= n_first")
        self.n_first = n_first
        self.max_sinks = max_sinks

    def first_mask(self, cols: torch.Tensor, ctx: TokenContext, batch: int) -> torch.Tensor:
        """``[B, 1, C]``: the first ``n_first`` *real* tokens of each row (never a pad)."""
        pad = ctx.pad_counts(batch, cols.device)
        real_idx = cols.view(1, -1) - pad.view(-1, 1)
        return ((real_idx >= 0) & (real_idx < self.n_first)).unsqueeze(1)

    @abstractmethod
    def mark(
        self, layer_idx: int, cols: torch.Tensor, ctx: TokenContext, keys: torch.Tensor,
        attention: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sink mask for the block.

        Args:
            layer_idx: the layer asking.
            cols: ``[C]`` long, the block's columns.
            ctx: shared token context.
            keys: ``[B, H, C, D]`` the block's keys (post-RoPE).
            attention: ``[B, H, C]`` attention mass each key has received, if measured.
        Returns:
            ``[B, H or 1, C]`` bool.
        """

    # Selectors that keep per-row state (measured attention) override these; the cache calls them
    # alongside its own batch operations (beam search, batch select/repeat) and reset.
    def reorder(self, idx: torch.Tensor) -> None:
        return None

    def repeat_interleave(self, repeats: int) -> None:
        return None

    def reset(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_first={self.n_first}, max_sinks={self.max_sinks})"
