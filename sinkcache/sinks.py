"""Which cached tokens are attention sinks (kept at full precision, never evicted).

A sink selector is a small object with one method, :meth:`SinkSelector.mark`, that a cache layer
calls on a block of columns it is about to compress (or, for eviction, on tokens as they enter).
It returns a boolean mask ``[B, H or 1, C]``. Selectors see the shared :class:`TokenContext`
(padding and token ids) and, for ``"auto"``, the attention each key has received.
"""

from __future__ import annotations

import unicodedata
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterable

import torch

from .context import TokenContext

SINK_MODES = ("none", "first", "punct", "auto")


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


class NoSinks(SinkSelector):
    """No sink protection: the plain KIVI / plain-window baselines."""

    name = "none"

    def __init__(self) -> None:
        super().__init__(n_first=0, max_sinks=0)

    def mark(self, layer_idx, cols, ctx, keys, attention=None):
        return torch.zeros(keys.shape[0], 1, cols.numel(), dtype=torch.bool, device=keys.device)


class FirstSinks(SinkSelector):
    """The first ``n_first`` real tokens of each sequence (StreamingLLM's sinks)."""

    name = "first"

    def __init__(self, n_first: int = 1) -> None:
        super().__init__(n_first=n_first, max_sinks=n_first)

    def mark(self, layer_idx, cols, ctx, keys, attention=None):
        return self.first_mask(cols, ctx, keys.shape[0])


class PunctSinks(SinkSelector):
    """First token(s) plus *every* punctuation/newline token: the blunt class-based baseline."""

    name = "punct"
    needs_ids = True

    def __init__(self, punct_ids: Iterable[int], n_first: int = 1, max_sinks: int | None = None) -> None:
        super().__init__(n_first=n_first, max_sinks=max_sinks)
        self.punct_ids = torch.tensor(sorted(set(int(i) for i in punct_ids)), dtype=torch.long)

    def mark(self, layer_idx, cols, ctx, keys, attention=None):
        first = self.first_mask(cols, ctx, keys.shape[0])
        ids = ctx.ids_at(cols, keys.shape[0])
        if ids is None or self.punct_ids.numel() == 0:
            return first
        pad = ctx.pad_counts(keys.shape[0], cols.device)
        real = (cols.view(1, -1) >= pad.view(-1, 1)).unsqueeze(1)
        is_punct = torch.isin(ids.to(keys.device), self.punct_ids.to(keys.device)).unsqueeze(1)
        return first | (is_punct & real)


def _is_punct_text(text: str) -> bool:
    stripped = text.strip()
    if not stripped:
        # Pure whitespace: newlines act as delimiters, spaces/tabs do not.
        return "\n" in text
    return all(unicodedata.category(ch)[0] in ("P", "S") for ch in stripped)


_PUNCT_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def punctuation_token_ids(tokenizer) -> list[int]:
    """Ids of tokens that decode to punctuation/symbols only, or to whitespace containing a newline.

    Works for any Hugging Face tokenizer; one pass over the vocabulary (a few seconds for 256k on a
    busy CPU), remembered per tokenizer object (and vocabulary size) after the first call.
    """
    try:
        hit = _PUNCT_CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable
        hit = None
    if hit is not None and hit[0] == len(tokenizer):
        return list(hit[1])
    ids = _punctuation_token_ids(tokenizer)
    try:
        _PUNCT_CACHE[tokenizer] = (len(tokenizer), tuple(ids))
    except TypeError:
        pass
    return ids


def _punctuation_token_ids(tokenizer) -> list[int]:
    vocab_size = len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = []
    toks = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    for i, tok in enumerate(toks):
        if tok is None or i in special:
            continue
        text = tokenizer.convert_tokens_to_string([tok])
        if _is_punct_text(text):
            ids.append(i)
    return ids
