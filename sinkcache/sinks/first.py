"""``sinks="first"``: the first real token(s) of each row, StreamingLLM's prompt-independent sink."""

from __future__ import annotations

from .base import SinkSelector


class FirstSinks(SinkSelector):
    """The first ``n_first`` real tokens of each sequence (StreamingLLM's sinks)."""

    name = "first"

    def __init__(self, n_first: int = 1) -> None:
        super().__init__(n_first=n_first, max_sinks=n_first)

    def mark(self, layer_idx, cols, ctx, keys, attention=None):
        return self.first_mask(cols, ctx, keys.shape[0])
