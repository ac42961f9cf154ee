"""Attention-based sink detection at runtime (``sinks="auto"``).

Forward hooks on the attention modules (no change to transformers code, works with sdpa) recompute
the queries of the last ``obs_window`` positions of a multi-token forward (the prefill) and score
the keys of that forward against them: O(obs_window * n) per layer instead of O(n^2). A key is a
sink of a (row, kv-head) when the mean attention it receives from those queries, averaged over
the query heads sharing that kv-head, is at least ``threshold``. The first ``n_first`` real tokens
are always sinks. Tokens that arrive one at a time while decoding get only the first-token rule.

The hook runs *after* the layer's ``update``; that is why layers compress one forward late
(``CompressingLayer.compress``): by then the attention of the forward a token arrived in is known.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from .context import TokenContext
from .sinks import FirstSinks, SinkSelector

#: Default mean attention (from the observation window) that makes a key a sink. Chosen on
#: smollm2-135m, see docs/sinks.md.
DEFAULT_THRESHOLD = 0.05
DEFAULT_OBS_WINDOW = 32


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary embedding; ``x`` ``[B, H, T, D]``, cos/sin ``[B, T, D]``."""
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def attention_modules(model) -> list[tuple[int, Any]]:
    """``(layer_idx, attention module)`` for every decoder layer that projects q/k separately."""
    out = []
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if idx is not None and hasattr(module, "q_proj") and hasattr(module, "k_proj"):
            out.append((int(idx), module))
    return out


def received_attention(
    module,
    hidden_states: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    obs_window: int,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean attention each key of this forward receives from its last ``obs_window`` queries.

    ``valid``: optional ``[B, T]`` bool, False for left padding: pad keys get no attention and
    pad queries do not count in the mean.
    Returns ``[B, kv_heads, T]`` (query heads averaged within their GQA group).
    """
    b, t, _ = hidden_states.shape
    d = module.head_dim
    w = min(obs_window, t)
    q = module.q_proj(hidden_states[:, -w:]).view(b, w, -1, d).transpose(1, 2)
    k = module.k_proj(hidden_states).view(b, t, -1, d).transpose(1, 2)
    if getattr(module, "q_norm", None) is not None:
        q = module.q_norm(q)
    if getattr(module, "k_norm", None) is not None:
        k = module.k_norm(k)
    q = _rope(q, cos[:, -w:], sin[:, -w:])
    k = _rope(k, cos, sin)
    hq, hk = q.shape[1], k.shape[1]
    q = q.view(b, hk, hq // hk, w, d).float()
    scores = torch.einsum("bgrwd,bgtd->bgrwt", q, k.float()) * module.scaling
    causal = torch.arange(t, device=q.device).view(1, t) > torch.arange(t - w, t, device=q.device).view(w, 1)
    scores = scores.masked_fill(causal, float("-inf"))
    if valid is None:
        return scores.softmax(-1).mean(dim=(2, 3))
    scores = scores.masked_fill(~valid.view(b, 1, 1, 1, t), float("-inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)  # a pad query sees only pads: all -inf -> no weight
    qw = valid[:, -w:].to(probs.dtype).view(b, 1, 1, w, 1)
    return (probs * qw).sum(3).mean(2) / qw.sum(3).clamp_min(1).view(b, 1, 1)


class AutoSinks(SinkSelector):
    """First token(s) plus keys measured to draw at least ``threshold`` attention."""

    name = "auto"
    needs_attention = True

    def __init__(
        self,
        n_first: int = 1,
        max_sinks: int | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        obs_window: int = DEFAULT_OBS_WINDOW,
    ) -> None:
        super().__init__(n_first=n_first, max_sinks=max_sinks)
        if not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"threshold={threshold!r} must be in (0, 1]")
        if isinstance(obs_window, bool) or not isinstance(obs_window, int) or obs_window < 1:
            raise ValueError(f"obs_window={obs_window!r} must be an integer >= 1")
        self.threshold = float(threshold)
        self.obs_window = obs_window
        # layer_idx -> (first column, [B, kv_heads, T] attention received)
        self.observed: dict[int, tuple[int, torch.Tensor]] = {}
        self._handles: list = []

    def attach(self, model, cache) -> None:
        """Install observation hooks on ``model``'s attention modules, acting for ``cache`` only."""
        ref = weakref.ref(cache)
        mods = attention_modules(model)
        for idx, module in mods:
            self._handles.append(module.register_forward_hook(self._make_hook(idx, ref), with_kwargs=True))

    def _make_hook(self, idx: int, ref):
        def hook(module, args, kwargs, output):
            cache = ref()
            if cache is None:
                self.detach()
                return None
            if kwargs.get("past_key_values") is not cache:
                return None
            hs = kwargs.get("hidden_states", args[0] if args else None)
            pe = kwargs.get("position_embeddings")
            if hs is None or pe is None or hs.shape[1] < 2:
                return None
            start = cache.get_seq_length(idx) - hs.shape[1] if idx < len(cache.layers) else 0
            cols = torch.arange(start, start + hs.shape[1], device=hs.device)
            valid = cols.view(1, -1) >= cache.ctx.pad_counts(hs.shape[0], hs.device).view(-1, 1)
            with torch.no_grad():
                att = received_attention(module, hs, pe[0], pe[1], self.obs_window, valid)
            self.observed[idx] = (start, att)
            return None

        return hook

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self) -> None:
        self.observed.clear()

    # The observations are per row: they follow the cache's batch operations.
    def reorder(self, idx: torch.Tensor) -> None:
        self.observed = {k: (s, a.index_select(0, idx.to(a.device))) for k, (s, a) in self.observed.items()}

    def repeat_interleave(self, repeats: int) -> None:
        self.observed = {k: (s, a.repeat_interleave(repeats, dim=0)) for k, (s, a) in self.observed.items()}

    def mark(self, layer_idx, cols, ctx: TokenContext, keys, attention=None):
        first = self.first_mask(cols, ctx, keys.shape[0])
        obs = self.observed.get(layer_idx)
        if obs is None:
            return first
        start, att = obs
        rel = cols.to(att.device) - start
        inside = (rel >= 0) & (rel < att.shape[-1])
        if not bool(inside.any()) or att.shape[0] != keys.shape[0]:
            return first
        a = torch.zeros(keys.shape[0], att.shape[1], cols.numel(), device=keys.device)
        a[:, :, inside] = att[:, :, rel[inside]].to(keys.device)
        pad = ctx.pad_counts(keys.shape[0], cols.device)
        real = (cols.view(1, -1) >= pad.view(-1, 1)).unsqueeze(1)
        return first | ((a >= self.threshold) & real)

    def __repr__(self) -> str:
        return (
            f"AutoSinks(n_first={self.n_first}, max_sinks={self.max_sinks}, threshold={self.threshold}, "
            f"obs_window={self.obs_window})"
        )


def make_auto_sinks(n_first: int, max_sinks: int | None, model: Any, tokenizer: Any) -> SinkSelector:
    """``sinks="auto"``: attention-measured sinks when the model is attached, else the first token(s)."""
    if model is None or not attention_modules(model):
        sel = FirstSinks(n_first)
        sel.name = "auto"  # reported as what the user asked for; behaves as "first" (documented)
        if max_sinks is not None:
            sel.max_sinks = max_sinks  # keep the budget check honest about what was asked for
        return sel
    return AutoSinks(n_first=n_first, max_sinks=max_sinks)
