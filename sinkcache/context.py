"""What the cache knows about the token stream, shared by all of its layers.

``update()`` only receives key/value states. Token ids and the padding mask come from a forward
pre-hook on the model (installed when the cache is given ``model=``); per-key attention comes
from the sink detector's hooks. Layers read all of it from one :class:`TokenContext`.
"""

from __future__ import annotations

import torch


class TokenContext:
    """Per-sequence facts: padding, token ids, columns seen.

    A *column* is a token's index in the stream the model has been fed (the index into
    ``attention_mask``); with left padding a row's first real token sits at column ``pad[b]``.
    """

    def __init__(self) -> None:
        self.pad: torch.Tensor | None = None  # [B] long: leading pad columns per row
        self.ids: torch.Tensor | None = None  # [B, seen] long: token id of every column seen
        self.keep_ids = False
        # True once the cache watches the model's inputs (SinkCache(model=...)): only then is
        # ``pad`` the truth about padding rather than "never seen".
        self.sees_inputs = False
        # Forwards observed: lets per-forward facts that every layer asks for be computed once.
        self.forwards = 0

    def reset(self) -> None:
        self.pad = None
        self.ids = None

    def observe(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, past: int) -> None:
        """Record one forward's inputs. ``past`` = columns already in the cache before it."""
        self.forwards += 1
        if attention_mask is not None and attention_mask.dim() == 2:
            m = attention_mask.to(torch.long)
            # Leading zeros are left padding; a zero after the first one would be a hole we cannot represent.
            self.pad = (m.cumsum(-1) == 0).sum(-1)
        if self.keep_ids and input_ids is not None and input_ids.dim() == 2:
            ids = input_ids.detach().to(torch.long)
            if self.ids is None or past == 0:
                self.ids = ids
            else:
                self.ids = torch.cat([self.ids[:, :past], ids], dim=1)

    def max_pad(self, batch: int) -> int:
        """The most leading pad columns of any row, as a Python int, computed once per forward
        (every observed layer asks; one host read per forward instead of one per layer)."""
        key = (self.forwards, batch, id(self.pad))
        memo = getattr(self, "_max_pad_memo", None)
        if memo is None or memo[0] != key:
            value = 0 if self.pad is None or self.pad.shape[0] != batch or not self.pad.numel() else int(self.pad.max())
            memo = self._max_pad_memo = (key, value)
        return memo[1]

    def pad_counts(self, batch: int, device: torch.device) -> torch.Tensor:
        """``[B]`` leading pad columns (zeros if the padding mask was never seen)."""
        if self.pad is None or self.pad.shape[0] != batch:
            return torch.zeros(batch, dtype=torch.long, device=device)
        return self.pad.to(device)

    def ids_at(self, cols: torch.Tensor, batch: int) -> torch.Tensor | None:
        """Token ids ``[B, C]`` at columns ``cols`` ``[C]``, or None if unknown."""
        if self.ids is None or self.ids.shape[0] != batch or int(cols.max()) >= self.ids.shape[1]:
            return None
        return self.ids[:, cols.to(self.ids.device)]

    # Batch bookkeeping mirrors the layers' (beam search, num_return_sequences, contrastive search).
    def reorder(self, idx: torch.Tensor) -> None:
        if self.pad is not None:
            self.pad = self.pad.index_select(0, idx.to(self.pad.device))
        if self.ids is not None:
            self.ids = self.ids.index_select(0, idx.to(self.ids.device))

    def repeat_interleave(self, repeats: int) -> None:
        if self.pad is not None:
            self.pad = self.pad.repeat_interleave(repeats, dim=0)
        if self.ids is not None:
            self.ids = self.ids.repeat_interleave(repeats, dim=0)

    def crop(self, seen: int) -> None:
        if self.ids is not None:
            self.ids = self.ids[:, :seen]
