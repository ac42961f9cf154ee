"""Attention-aware bit allocation: the tokens that draw attention get more bits.

Under 2-bit quantization the error that hurts is on the keys and values attention actually reads.
Keeping the first token exact (a sink) fixes the largest of them; :class:`Refinement` spends a fixed
extra share of bytes on the next ones. When a block of ``group_size`` tokens leaves the exact
window, the ``share`` of it that drew the most attention from the last :data:`OBS_QUERIES` queries
is *refined*: besides its ``bits``-wide codes it stores ``Refinement.bits`` more bits of the
residual inside the base grid step (:func:`sinkcache.quant.quantize_residual`), so a refined int2
token is quantized like int4 with the base group's scales. Sinks stay exact and are never refined.

The cost is fixed and known up front: per refined token and kv head ``2 * head_dim * bits / 8``
bytes of codes plus its column. Which tokens get them is read from attention:

* ``score="attention"`` (needs ``model=``): hooks keep the post-RoPE queries of the last
  :data:`OBS_QUERIES` positions of each compressed layer while a flush is near (SnapKV's
  observation window); at the flush their softmax over every held key, summed and averaged over
  each kv group's query heads, ranks the block's tokens.
* ``score="keynorm"``: the smallest key norms (query-free, no hooks; the eviction proxy).

Measured on held-out text in docs/sinks.md ("Sinks that pay").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .attention import CacheHooks, attention_modules, catch_q, caught_query, project_q
from .quant import check_bits

#: Queries whose attention ranks a block at its flush (the last positions before it).
OBS_QUERIES = 32
REFINE_SCORES = ("attention", "keynorm")


@dataclass(frozen=True)
class Refinement:
    """Refine ``share`` of every quantized block (per row and kv head) with ``bits`` more bits,
    choosing the tokens by ``score`` (``"attention"`` or ``"keynorm"``)."""

    share: float
    bits: int = 2
    score: str = "attention"

    def __post_init__(self) -> None:
        s = self.share
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < float(s) <= 1.0:
            raise ValueError(f"refine share={s!r} must be a number in (0, 1] (the fraction of each quantized block refined)")
        check_bits(self.bits)
        if self.score not in REFINE_SCORES:
            raise ValueError(f"refine score={self.score!r} is unknown; allowed: {', '.join(REFINE_SCORES)}")

    @property
    def needs_attention(self) -> bool:
        return self.score == "attention"

    def count(self, block: int) -> int:
        """Tokens refined per (row, kv head) in a block of ``block`` tokens."""
        return min(block, int(round(self.share * block)))


def make_refinement(refine: float | Refinement | None) -> Refinement | None:
    """``None``/``0`` -> no refinement; a number -> ``Refinement(share=number)``; an object as is."""
    if refine is None or isinstance(refine, Refinement):
        return refine
    if not isinstance(refine, bool) and isinstance(refine, (int, float)) and refine == 0:
        return None
    return Refinement(refine)  # validates


class RecentQueries(CacheHooks):
    """Hooks that keep, per compressed layer, the post-RoPE queries of the last :data:`OBS_QUERIES`
    positions while that layer's next flush is near (``layer.wants_queries()``)."""

    def attach(self, model: Any, cache: Any) -> None:
        super().attach(model, cache)
        # A decode step's projected query, caught from q_proj so it is not projected twice.
        for _, module in attention_modules(model):
            self._handles.append(module.q_proj.register_forward_hook(catch_q))

    def on_forward(self, idx: int, module: Any, cache: Any, hs: torch.Tensor | None, pe: Any) -> None:
        layer = cache.layers[idx]
        wants = getattr(layer, "wants_queries", None)
        if wants is None or not wants():
            return
        if hs is None or pe is None:
            raise RuntimeError(
                f"refine score='attention' needs the attention module's hidden_states and position_embeddings; "
                f"{type(module).__name__} does not pass them (use refine score='keynorm')"
            )
        w = min(OBS_QUERIES, hs.shape[1])
        layer.push_queries(project_q(module, hs, pe[0], pe[1], w, projected=caught_query(module, hs)), float(module.scaling))
