"""Feeding attention scorers: forward hooks that measure what each held token was attended.

A hook on every attention module runs after the module (so after the layer's ``update``: the
layer then holds its old tokens and this forward's, none evicted yet, since layers compress one
forward late). It recomputes the queries of the forward's last ``w`` positions from the module's
input (``q_proj``, QK-norm, RoPE; works with sdpa, which returns no weights), takes their softmax
over the held keys with the causal and padding masks the model used, and hands the layer
``[B, kv_heads, T]`` attention summed over the observed queries and averaged over each kv group's
query heads (GQA). The layer's scorer turns that into scores.
"""

from __future__ import annotations

from typing import Any

import torch

from ..attention import CacheHooks, attention_modules, catch_q, caught_query, project_q

#: Queries per chunk when a scorer reads every query of a long forward (bounds the score matrix).
QUERY_CHUNK = 256


def attention_received(
    q: torch.Tensor,
    keys: torch.Tensor,
    key_pos: torch.Tensor,
    q_cols: torch.Tensor,
    pad: torch.Tensor,
    scaling: float,
    newest: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention the queries ``q`` ``[B, Hq, w, D]`` (at columns ``q_cols`` ``[w]``) give the held
    keys ``keys`` ``[B, Hk, T, D]`` (at columns ``key_pos`` ``[B, Hk, T]``).

    ``newest``: the caller guarantees the last query is the newest column, at or after every held
    key (true for a forward's own queries), so a single query needs no causal mask.

    A query sees keys at columns <= its own and not in its row's left padding (``pad`` ``[B]``);
    pad queries do not count. Returns ``(attn [B, Hk, T] summed over queries and averaged over each
    kv group's query heads, n_queries [B])``, float32.
    """
    b, hq, w, d = q.shape
    hk, t = keys.shape[1], keys.shape[2]
    kf = keys.float()
    if w == 1:
        return _one_query(q.view(b, hk, hq // hk, d), kf, key_pos, q_cols, pad, scaling, newest)
    kp = key_pos.long()
    pad_l = pad.long().view(b, 1, 1)
    key_ok = kp >= pad_l  # [B, Hk, T]
    q_ok = q_cols.view(1, w) >= pad.long().view(b, 1)  # [B, w]
    attn = torch.zeros(b, hk, t, dtype=torch.float32, device=keys.device)
    for lo in range(0, w, QUERY_CHUNK):
        hi = min(w, lo + QUERY_CHUNK)
        qg = q[:, :, lo:hi].reshape(b, hk, hq // hk, hi - lo, d)
        s = torch.einsum("bgrwd,bgtd->bgrwt", qg, kf) * scaling
        ok = key_ok.unsqueeze(2) & (kp.unsqueeze(2) <= q_cols[lo:hi].view(1, 1, -1, 1))  # [B, Hk, w', T]
        s = s.masked_fill(~ok.unsqueeze(2), float("-inf"))
        p = s.softmax(-1).nan_to_num(0.0)  # a pad query sees nothing: no weight
        qw = q_ok[:, lo:hi].to(p.dtype).view(b, 1, 1, hi - lo, 1)
        attn += (p * qw).sum(3).mean(2)
    return attn, q_ok.sum(-1)


def _one_query(
    qg: torch.Tensor, kf: torch.Tensor, key_pos: torch.Tensor, q_col: torch.Tensor, pad: torch.Tensor, scaling: float,
    newest: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_received` for one query (every decode step, TOVA at prefill): the same masks
    in 3-d, without the query-chunk loop. ``qg`` ``[B, Hk, r, D]`` (query heads grouped per kv head)."""
    b = qg.shape[0]
    hidden = key_pos < pad.view(b, 1, 1)  # [B, Hk, T]: a pad key
    if not newest:
        hidden = hidden | (key_pos > q_col.view(1, 1, 1))  # or after the query
    s = torch.matmul(qg, kf.transpose(-1, -2)).mul_(scaling)  # [B, Hk, r, T]
    s.masked_fill_(hidden.unsqueeze(2), float("-inf"))
    attn = s.softmax(-1).mean(2)
    q_ok = q_col.view(1) >= pad  # [B]: a pad query (an all-pad row) gives no weight
    return attn.mul_(q_ok.view(b, 1, 1)).nan_to_num_(0.0), q_ok.long()


class AttentionObserver(CacheHooks):
    """Hooks that feed the attention scorers of ``cache``'s evicting layers (one per cache).

    Besides the attention modules' hooks, a hook on each ``q_proj`` keeps a decode step's projected
    query, so the hot path does not project it a second time."""

    def attach(self, model: Any, cache: Any) -> None:
        super().attach(model, cache)
        for _, module in attention_modules(model):
            self._handles.append(module.q_proj.register_forward_hook(catch_q))

    def on_forward(self, idx, module, cache, hs, pe) -> None:
        layer = cache.layers[idx]
        scorer = getattr(layer, "scorer", None)
        if scorer is None or not scorer.needs_attention or not layer.is_initialized:
            return
        if hs is None or pe is None:
            raise RuntimeError(
                f"score={scorer.name!r} needs the attention module's hidden_states and position_embeddings; "
                f"{type(module).__name__} does not pass them (use score='keynorm')"
            )
        observe_layer(layer, module, hs, pe[0], pe[1], cache.ctx)


def observe_layer(layer: Any, module: Any, hs: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: Any) -> None:
    """Measure one forward of ``layer`` (an evicting layer holding this forward's tokens) and update
    its scores. ``hs`` ``[B, q, hidden]`` is the attention module's input."""
    q_len = hs.shape[1]
    w = q_len if layer.scorer.queries is None else min(layer.scorer.queries, q_len)
    q = project_q(module, hs, cos, sin, w, projected=caught_query(module, hs))
    q_cols = torch.arange(layer.seen - w, layer.seen, device=hs.device)
    pad = ctx.pad_counts(hs.shape[0], hs.device)
    attn, nq = attention_received(q, layer.keys, layer.pos, q_cols, pad, module.scaling, newest=True)
    layer.observe_attention(attn, nq, q_len)
