"""``score="snapkv"``: mean attention from an observation window of recent queries (Li et al.,
2024, "SnapKV").

At prefill the last ``window`` prompt queries score every key (mean over them), then a max-pool
over neighbouring columns (``kernel``) keeps the tokens around a peak together, as SnapKV does.
SnapKV itself compresses only the prompt; a cache that evicts while decoding needs comparable
scores for generated tokens, so at decode each score becomes the running mean over the (at most
``window``) queries that came after its token: ``s += (a - s) / min(seen - pos, window)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Scorer


class SnapKVScorer(Scorer):
    name = "snapkv"

    def __init__(self, window: int = 32, kernel: int = 7) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window={window!r} must be an integer >= 1")
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel={kernel!r} must be an odd integer >= 1")
        self.queries = window
        self.window = window
        self.kernel = kernel

    def update(self, score, attn, n_queries, pos, seen, q_len):
        nq = n_queries.clamp_min(1).view(-1, 1, 1).to(attn.dtype)
        if q_len > 1:  # a multi-token forward (prefill, a scored continuation): SnapKV's own rule
            mean = attn / nq
            if self.kernel > 1:
                b, h, t = mean.shape
                mean = F.max_pool1d(mean.reshape(b * h, 1, t), self.kernel, stride=1, padding=self.kernel // 2).view(b, h, t)
            return mean
        count = (seen - pos.to(torch.float32)).clamp(1, self.window)
        return score + (attn / nq - score) / count

    def __repr__(self) -> str:
        return f"SnapKVScorer(window={self.window}, kernel={self.kernel})"
