"""``sinks="punct"``: the first token(s) plus every punctuation/newline token, by token id."""

from __future__ import annotations

import unicodedata
import weakref
from collections.abc import Iterable

import torch

from .base import SinkSelector


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


def is_punct_text(text: str) -> bool:
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
        if is_punct_text(text):
            ids.append(i)
    return ids
