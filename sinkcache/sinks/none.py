"""``sinks="none"``: no token is protected (plain KIVI, plain recent window)."""

from __future__ import annotations

import torch

from .base import SinkSelector


class NoSinks(SinkSelector):
    """No sink protection: the plain KIVI / plain-window baselines."""

    name = "none"

    def __init__(self) -> None:
        super().__init__(n_first=0, max_sinks=0)

    def mark(self, layer_idx, cols, ctx, keys, attention=None):
        return torch.zeros(keys.shape[0], 1, cols.numel(), dtype=torch.bool, device=keys.device)
