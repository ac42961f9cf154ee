"""Recomputing what an attention module computes, from its input, in forward hooks.

Both runtime hook users — the sink detector (:mod:`sinkcache.sinks.auto`) and the attention
scorers' observer (:mod:`sinkcache.scores.observe`) — need the queries and keys a decoder layer's
attention used, and sdpa/flash attention return no weights. These helpers rebuild them from the
module's ``hidden_states`` and ``position_embeddings`` (``q_proj``/``k_proj``, QK-norm, RoPE), so no
transformers code is patched.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The RoPE partner of ``x`` ``[..., D]``: its two halves swapped, the first negated."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary embedding; ``x`` ``[B, H, T, D]``, cos/sin ``[B, T, D]``."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


# The last (cos, sin, w) seen by :func:`rope_last` and its tables: every observed layer of one
# forward gets the same ``position_embeddings`` objects, so the tables are built once per forward.
_ROPE_MEMO: list = [None]


def _version(t: torch.Tensor) -> int | None:
    """``t``'s in-place edit counter; ``None`` for an inference-mode tensor, which keeps none."""
    try:
        return t._version
    except RuntimeError:
        return None


def _rope_tables(cos: torch.Tensor, sin: torch.Tensor, w: int, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of the last ``w`` positions ``[B, 1, w, D]``, the sign of
    :func:`rotate_half` folded into ``sin``'s first half, both times ``scale`` if given."""
    key = (cos, sin, w, scale, _version(cos), _version(sin))  # the version: an in-place edit is a new table
    m = _ROPE_MEMO[0]
    if m is not None and m[0][0] is cos and m[0][1] is sin and m[0][2:] == key[2:]:
        return m[1]
    h = cos.shape[-1] // 2
    c, s = cos[:, -w:].unsqueeze(1), sin[:, -w:]
    s = torch.cat((-s[..., :h], s[..., h:]), dim=-1).unsqueeze(1)
    tables = (c, s) if scale is None else (c * scale, s * scale)
    _ROPE_MEMO[0] = (key, tables)
    return tables


def rope_last(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """:func:`apply_rope` for ``x`` ``[B, H, w, D]`` at the last ``w`` positions of ``cos``/``sin``
    ``[B, T, D]``, bit-identical to it: ``rotate_half(x) * sin`` is ``roll(x) * (sign * sin)``
    exactly (a negation commutes with rounding). Three ops per call instead of six, with the
    tables shared by the layers of a forward (a decode step's query RoPE was ~2% of an int2 step).
    ``scale``: also multiply by it (folded into the tables, so free; equal to the unfused
    product up to float rounding, not bit for bit)."""
    c, s = _rope_tables(cos, sin, x.shape[2], scale)
    return x * c + x.roll(x.shape[-1] // 2, -1) * s


def attention_modules(model) -> list[tuple[int, Any]]:
    """``(layer_idx, attention module)`` for every decoder layer that projects q/k separately."""
    out = []
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if idx is not None and hasattr(module, "q_proj") and hasattr(module, "k_proj"):
            out.append((int(idx), module))
    return out


def project_qk(
    module, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries of the last ``w`` positions ``[B, Hq, w, D]`` and keys of all ``[B, Hk, T, D]``,
    post-norm and post-RoPE, float32 (what the attention module computes)."""
    b, t, _ = hidden_states.shape
    d = module.head_dim
    q = module.q_proj(hidden_states[:, -w:]).view(b, w, -1, d).transpose(1, 2)
    k = module.k_proj(hidden_states).view(b, t, -1, d).transpose(1, 2)
    if getattr(module, "q_norm", None) is not None:
        q = module.q_norm(q)
    if getattr(module, "k_norm", None) is not None:
        k = module.k_norm(k)
    q = apply_rope(q, cos[:, -w:], sin[:, -w:])
    k = apply_rope(k, cos, sin)
    return q.float(), k.float()


def project_k(module, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Keys ``[B, Hk, T, D]``, post-norm and post-RoPE, float32."""
    b, t, _ = hidden_states.shape
    k = module.k_proj(hidden_states).view(b, t, -1, module.head_dim).transpose(1, 2)
    if getattr(module, "k_norm", None) is not None:
        k = module.k_norm(k)
    return apply_rope(k, cos, sin).float()


def project_q(
    module,
    hidden_states: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    w: int,
    projected: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Queries of the last ``w`` positions ``[B, Hq, w, D]``, post-norm and post-RoPE, float32.

    ``projected``: ``q_proj``'s own output for those positions ``[B, w, Hq * D]``, when a hook
    caught it (saves recomputing the projection). ``scale``: queries come multiplied by it (e.g.
    the attention's softmax scale, folded into the RoPE tables at no cost)."""
    b = hidden_states.shape[0]
    d = module.head_dim
    if projected is None:
        projected = module.q_proj(hidden_states[:, -w:])
    q = projected.view(b, w, -1, d).transpose(1, 2)
    if getattr(module, "q_norm", None) is not None:
        q = module.q_norm(q)
    return rope_last(q, cos, sin, scale).float()


#: Attribute where the ``q_proj`` hook leaves a one-token forward's projected query for the module.
_CAUGHT_Q = "_sinkcache_q"


def catch_q(proj, args, output) -> None:
    """A forward hook for ``q_proj``: keep a decode step's projected query for the hooks that
    measure attention, so they do not project it a second time (one more weight read per layer)."""
    # Decode steps only (one token: tiny); any longer forward clears it, so a caught query is
    # always this forward's own. Longer forwards recompute their (few observed) queries.
    setattr(proj, _CAUGHT_Q, output if output.dim() == 3 and output.shape[1] == 1 else None)


def caught_query(module: Any, hs: torch.Tensor) -> torch.Tensor | None:
    """This one-token forward's projected query ``[B, 1, Hq * D]``, when :func:`catch_q` caught it
    for this batch; else ``None``."""
    caught = getattr(module.q_proj, _CAUGHT_Q, None) if hs.shape[1] == 1 else None
    return None if caught is None or caught.shape[0] != hs.shape[0] else caught


def layer_keys(layer: Any, t: int) -> torch.Tensor | None:
    """The post-RoPE keys ``[B, Hk, t, D]`` (float32) that the last forward of ``t`` tokens gave
    ``layer``, when it still holds them exactly (see ``CompressingLayer.newest_keys``); else ``None``."""
    newest = getattr(layer, "newest_keys", None)
    k = newest(t) if newest is not None else None
    return None if k is None else k.float()


class CacheHooks:
    """Forward hooks on every attention module of a model that act for *one* cache.

    The cache is held by weak reference: a forward with another cache (or none) is ignored, and once
    the cache is gone the hooks remove themselves. Subclasses implement :meth:`on_forward`, called
    after the module ran (so after the layer's ``update``) with its ``hidden_states`` ``[B, q,
    hidden]`` and ``position_embeddings`` ``(cos, sin)`` (``None`` when the module was not given them).
    """

    _handles: list

    def attach(self, model: Any, cache: Any) -> None:
        """Install the hooks on ``model``'s attention modules, acting for ``cache`` only."""
        ref = weakref.ref(cache)
        self._handles = list(getattr(self, "_handles", []))
        for idx, module in attention_modules(model):
            self._handles.append(module.register_forward_hook(self._hook_for(idx, ref), with_kwargs=True))

    def _hook_for(self, idx: int, ref: Any):
        def hook(module, args, kwargs, output):
            cache = ref()
            if cache is None:
                self.detach()
                return None
            if kwargs.get("past_key_values") is not cache or idx >= len(cache.layers):
                return None
            hs = kwargs.get("hidden_states", args[0] if args else None)
            with torch.no_grad():
                self.on_forward(idx, module, cache, hs, kwargs.get("position_embeddings"))
            return None

        return hook

    def on_forward(self, idx: int, module: Any, cache: Any, hs: torch.Tensor | None, pe: Any) -> None:
        raise NotImplementedError

    def detach(self) -> None:
        """Remove the hooks."""
        for h in getattr(self, "_handles", []):
            h.remove()
        self._handles = []
