"""Attention-based sink detection at runtime (``sinks="auto"``).

Forward hooks on the attention modules (no change to transformers code, works with sdpa) recompute
queries and keys from the module's input (``q_proj``/``k_proj``, QK-norm, RoPE) and measure the
attention each key receives. Only layers the cache compresses are observed (Gemma 3's sliding
layers are left alone).

* **Prefill** (a forward of two or more tokens): the last ``obs_window`` queries of the forward
  score every key of the forward: O(obs_window * n) per layer instead of O(n^2). The softmax also
  runs over a small *context* of older keys the detector keeps exactly: the first ``n_first``
  tokens, up to ``bank_size`` confirmed sinks and the ``context`` most recent earlier tokens, so
  that a chunked prompt is not scored as if each chunk were the whole sequence (without the first
  token in the denominator every share is inflated). A key is a sink of a (row, kv-head) when the
  attention it receives, averaged over the observed queries and over the query heads sharing the
  kv-head, is at least ``threshold`` and at least ``min_ratio`` times what uniform attention
  would give it (which only matters where queries see few keys, at the start of a prompt).
* **Decoding** (one token per forward): a newly generated punctuation/newline token (ids from the
  tokenizer, see :func:`sinkcache.sinks.punct.punctuation_token_ids`) becomes a *candidate*; each later
  query adds the attention it gives the candidate (same softmax over context + recent keys), and
  the candidate is confirmed as a sink if its mean is at least ``threshold`` when the layer
  compresses it. Other generated tokens are never sinks. Without a tokenizer there are no
  candidates.
* The first ``n_first`` real tokens are always sinks.

The hook runs *after* the layer's ``update``; that is why layers compress one forward late
(``CompressingLayer.compress``): by then the attention a token drew in the forward it arrived in is
known. Measurements wait per layer until the layer marks those columns, so a recent window of any
size works.

The softmax denominator leaves out older, non-sink tokens (they are compressed and the detector
does not read the cache), so shares are slight over-estimates; ``threshold`` was calibrated with
this definition (docs/sinks.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..attention import (
    CacheHooks,
    attention_modules,
    catch_q,
    caught_query,
    layer_keys,
    project_k,
    project_q,
    project_qk,
)
from ..context import TokenContext
from .base import SinkSelector
from .first import FirstSinks
from .punct import punctuation_token_ids

#: Default mean attention (from the observation window) that makes a key a sink. Chosen on the
#: calibration split of smollm2-135m (2-bit keys/values, window 0) as the threshold with the most
#: perplexity gained per extra byte over ``sinks="first"``: docs/sinks.md,
#: evals/results/sinks/calibration_smollm2-135m.json.
DEFAULT_THRESHOLD = 0.1
DEFAULT_OBS_WINDOW = 32
#: Recent earlier keys kept exactly for the softmax denominator (and to score decode candidates).
DEFAULT_CONTEXT = 64
#: Confirmed sinks kept exactly for the softmax denominator, per layer (the most recent ones).
DEFAULT_BANK = 64
#: A prefill key must also draw this many times the share uniform attention would give it (this
#: only binds where queries see few keys, e.g. the start of a prompt, where 1/n is large).
DEFAULT_MIN_RATIO = 4.0


# A decode column that is not a candidate (shared: callers only copy it).
_NO_CANDIDATE = torch.zeros(1, dtype=torch.bool)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    valid: torch.Tensor | None = None,
    ctx_k: torch.Tensor | None = None,
    ctx_ok: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean attention the ``w`` queries ``q`` ``[B, Hq, w, D]`` (the last ``w`` positions of the
    forward) give each key of the forward ``k`` ``[B, Hk, T, D]`` and of an optional older context
    ``ctx_k`` ``[B, Hk, M, D]`` (``ctx_ok`` ``[B, M]`` bool: usable), in one softmax.

    ``valid``: ``[B, T]`` bool, False for left padding: pad keys get no attention and pad queries
    do not count in the mean. Returns ``([B, Hk, T], [B, Hk, M] or None)``, query heads averaged
    within their GQA group.
    """
    b, hq, w, d = q.shape
    hk, t = k.shape[1], k.shape[2]
    qg = q.view(b, hk, hq // hk, w, d)
    scores = torch.einsum("bgrwd,bgtd->bgrwt", qg, k) * scaling
    causal = torch.arange(t, device=q.device).view(1, t) > torch.arange(t - w, t, device=q.device).view(w, 1)
    scores = scores.masked_fill(causal, float("-inf"))
    if valid is not None:
        scores = scores.masked_fill(~valid.view(b, 1, 1, 1, t), float("-inf"))
    m = 0
    if ctx_k is not None and ctx_k.shape[2]:
        m = ctx_k.shape[2]
        cs = torch.einsum("bgrwd,bgmd->bgrwm", qg, ctx_k) * scaling
        if ctx_ok is not None:
            cs = cs.masked_fill(~ctx_ok.view(b, 1, 1, 1, m), float("-inf"))
        scores = torch.cat([cs, scores], dim=-1)
    probs = scores.softmax(-1).nan_to_num(0.0)  # a pad query sees only pads: all -inf -> no weight
    if valid is None:
        rec = probs.mean(dim=(2, 3))
    else:
        qw = valid[:, -w:].to(probs.dtype).view(b, 1, 1, w, 1)
        rec = (probs * qw).sum(3).mean(2) / qw.sum(3).clamp_min(1).view(b, 1, 1)
    return rec[..., m:], (rec[..., :m] if m else None)


def uniform_share(t: int, w: int, valid: torch.Tensor | None, ctx_ok: torch.Tensor | None, batch: int) -> torch.Tensor:
    """``[B, 1, T]``: what :func:`window_attention` would give the forward's keys if every query
    spread its attention evenly over the keys it can see (short contexts give large shares)."""
    dev = valid.device if valid is not None else (ctx_ok.device if ctx_ok is not None else None)
    causal = torch.arange(t, device=dev).view(1, t) <= torch.arange(t - w, t, device=dev).view(w, 1)  # [w, T]
    vis = causal.view(1, w, t).expand(batch, w, t)
    if valid is not None:
        vis = vis & valid.view(batch, 1, t)
    n = vis.sum(-1, keepdim=True).float()  # [B, w, 1]
    if ctx_ok is not None:
        n = n + ctx_ok.sum(-1).float().view(batch, 1, 1)
    share = vis.float() / n.clamp_min(1)
    if valid is None:
        return share.mean(1).unsqueeze(1)
    qw = valid[:, -w:].float().view(batch, w, 1)
    return ((share * qw).sum(1) / qw.sum(1).clamp_min(1)).unsqueeze(1)


def received_attention(
    module,
    hidden_states: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    obs_window: int,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean attention each key of this forward receives from its last ``obs_window`` queries
    (softmax over this forward's keys only). ``valid``: see :func:`window_attention`.

    Returns ``[B, kv_heads, T]`` (query heads averaged within their GQA group).
    """
    w = min(obs_window, hidden_states.shape[1])
    q, k = project_qk(module, hidden_states, cos, sin, w)
    return window_attention(q, k, module.scaling, valid)[0]


@dataclass
class _LayerState:
    """What the detector keeps for one layer (all per-row tensors have the batch first)."""

    # measurements waiting for the layer to mark them: columns lo .. lo + n - 1
    lo: int = 0
    sum: torch.Tensor | None = None  # [B, Hk, n] summed attention shares
    cnt: torch.Tensor | None = None  # [n] how many measurements the sum holds (0: not measured)
    cand: torch.Tensor | None = None  # [n] bool: a decode-time candidate still collecting attention
    dec: torch.Tensor | None = None  # [n] bool: fed one token at a time (decoding)
    # exact keys of older tokens for the softmax denominator
    bank_k: torch.Tensor | None = None  # [B, Hk, S, D] first tokens + confirmed sinks
    bank_col: list[int] = field(default_factory=list)
    bank_ok: torch.Tensor | None = None  # [B, S]
    bank_first: list[bool] = field(default_factory=list)  # a first token (never dropped from the bank)
    ring_k: torch.Tensor | None = None  # [B, Hk, R, D] the most recent earlier tokens
    ring_col: list[int] = field(default_factory=list)
    ring_ok: torch.Tensor | None = None  # [B, R]
    # what the decode fast path knows without reading ``cand``: the newest decode candidate's
    # column, and whether some other path may have left a candidate open (then it reads ``cand``)
    last_cand: int = -(1 << 62)
    cand_unsure: bool = True
    # Preallocated storage behind the decode fast path, so a step writes one key and moves views
    # instead of concatenating (six ``torch.cat`` per layer per step before). ``ring_k``/``ring_ok``
    # and the measurement rows are views into these for as long as only the fast path (and, for
    # the rows, :meth:`AutoSinks.mark`) touched them; any other path assigns new tensors, and the
    # next fast step rebuilds the storage from them.
    ring_buf: torch.Tensor | None = None  # [B, Hk, 2 * context, D]
    ring_okbuf: torch.Tensor | None = None  # [B, 2 * context]; True from ring_end on
    ring_end: int = 0  # buffer column after the ring's newest key
    ring_view: torch.Tensor | None = None  # the ring_k this storage produced
    m_bufs: tuple | None = None  # (sum [B, Hk, cap], cnt [cap], cand [cap], dec [cap])
    m_end: int = 0  # buffer slot after the newest row; every slot from here on holds the defaults

    def end(self) -> int:
        return self.lo + (0 if self.cnt is None else int(self.cnt.numel()))

    def map_rows(self, fn) -> None:
        for name in ("sum", "bank_k", "bank_ok", "ring_k", "ring_ok"):  # not cnt/cand/dec: per column
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))


class AutoSinks(CacheHooks, SinkSelector):
    """First token(s) plus keys measured to draw at least ``threshold`` attention.

    Args:
        n_first: leading real tokens that are always sinks.
        max_sinks: cap per (row, kv-head, layer) (applied by the layer, in column order).
        threshold: mean attention share that makes a key a sink.
        obs_window: prefill queries that score the keys (the last ones of the forward); also how
            many decode queries a candidate collects at most.
        punct_ids: token ids that become candidates when generated (``None``: no decode-time
            detection); :func:`make_auto_sinks` fills them from the tokenizer.
        context: recent earlier keys kept exactly for the denominator.
        bank_size: confirmed sinks kept exactly for the denominator, per layer.
        min_ratio: a prefill key must also draw ``min_ratio`` times its uniform share.
    """

    name = "auto"
    needs_attention = True

    def __init__(
        self,
        n_first: int = 1,
        max_sinks: int | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        obs_window: int = DEFAULT_OBS_WINDOW,
        punct_ids: Any = None,
        context: int = DEFAULT_CONTEXT,
        bank_size: int = DEFAULT_BANK,
        min_ratio: float = DEFAULT_MIN_RATIO,
    ) -> None:
        super().__init__(n_first=n_first, max_sinks=max_sinks)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"threshold={threshold!r} must be in (0, 1]")
        for nm, v, lo in (("obs_window", obs_window, 1), ("context", context, 0), ("bank_size", bank_size, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{nm}={v!r} must be an integer >= {lo}")
        if isinstance(min_ratio, bool) or not isinstance(min_ratio, (int, float)) or min_ratio < 0:
            raise ValueError(f"min_ratio={min_ratio!r} must be a number >= 0")
        self.min_ratio = float(min_ratio)
        self.threshold = float(threshold)
        self.obs_window = obs_window
        self.context = context
        self.bank_size = bank_size
        self.punct_ids = (
            None if punct_ids is None else torch.tensor(sorted({int(i) for i in punct_ids}), dtype=torch.long)
        )
        self.needs_ids = self.punct_ids is not None
        self._punct_lut: torch.Tensor | None = None
        # The candidate test of the current forward, shared by its layers: (key, [T] bool).
        self._cand_memo: tuple[tuple, torch.Tensor, bool] | None = None
        # Decode tokens go through :meth:`_observe_step` and one-column marks through
        # :meth:`_mark_one` (same results, fewer ops); the general paths stay for prefill and
        # the states these do not cover. Tests switch it off to check that both give the same.
        self.fast_decode = True
        self.state: dict[int, _LayerState] = {}
        self._handles: list = []

    # ---- hooks (CacheHooks) -------------------------------------------------------------------------
    def attach(self, model: Any, cache: Any) -> None:
        super().attach(model, cache)
        # A decode step's projected query, caught from q_proj so it is not projected twice (the
        # second projection was ~7% of a smollm2 decode step: one more weight read per layer).
        for _, module in attention_modules(model):
            self._handles.append(module.q_proj.register_forward_hook(catch_q))

    def on_forward(self, idx, module, cache, hs, pe) -> None:
        if hs is None or pe is None:
            return
        layer = cache.layers[idx]
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "sink_count"):
            return  # a layer the cache does not compress: nothing to decide
        self.observe(idx, module, hs, pe[0], pe[1], cache.get_seq_length(idx) - hs.shape[1], cache.ctx, layer)

    def observe(
        self, idx: int, module, hs: torch.Tensor, cos, sin, start: int, ctx: TokenContext, layer: Any = None
    ) -> None:
        """Measure one forward of layer ``idx`` (``hs`` ``[B, T, D]``, its first column ``start``);
        ``layer``: the cache layer that forward updated (its exact recent keys are reused)."""
        b, t = hs.shape[0], hs.shape[1]
        st = self.state.get(idx)
        if st is None:
            st = self.state[idx] = _LayerState()
        elif st.cnt is not None and (st.sum is None or st.sum.shape[0] != b):
            st = self.state[idx] = _LayerState()  # batch changed without a batch op: start over
        self._truncate(st, start)  # columns >= start are being re-fed (crop, assisted decoding)
        if t == 1 and self.fast_decode and self._observe_step(module, hs, cos, sin, start, ctx, layer, st, b):
            return
        cols = torch.arange(start, start + t, device=hs.device)
        pad = ctx.pad_counts(b, hs.device)
        valid = cols.view(1, -1) >= pad.view(-1, 1)  # [B, T]
        w = min(self.obs_window, t)
        # (a copy: it is updated in place, per layer)
        cand_new = self._step_candidate(ctx, start, b, hs.device)[0].clone() if t == 1 else torch.zeros(t, dtype=torch.bool)
        pending = st.cand is not None and bool(st.cand.any())
        # The keys this forward gave the cache, when the layer still holds them exactly (its recent
        # window): the same post-RoPE keys, without recomputing k_proj, norm and RoPE.
        held = layer_keys(layer, t) if layer is not None else None
        if t == 1 and not pending and not bool(cand_new.any()) and start >= self.n_first + int(pad.max()):
            # a decode step with nothing to score: only keep its key for later denominators
            k = held if held is not None else project_k(module, hs, cos, sin)
            self._append(st, start, torch.zeros(b, k.shape[1], 1, device=hs.device), torch.zeros(1, dtype=torch.long),
                         cand_new, torch.ones(1, dtype=torch.bool))
            self._add_ring(st, k, start, valid)
            return
        if held is not None:
            q, k = project_q(module, hs, cos, sin, w), held
        else:
            q, k = project_qk(module, hs, cos, sin, w)
        ctx_k, ctx_ok, ctx_cols = self._context(st, b, k)
        new, old = window_attention(q, k, module.scaling, valid, ctx_k, ctx_ok)
        hk = k.shape[1]
        # decode-time candidates among the context keys collect this forward's attention
        if old is not None and st.cand is not None and st.sum is not None and st.cnt is not None and bool(st.cand.any()):
            rel = torch.tensor(ctx_cols, dtype=torch.long) - st.lo
            j = ((rel >= 0) & (rel < st.cand.numel())).nonzero().flatten()
            j = j[st.cand[rel[j]]]
            if j.numel():
                r = rel[j]
                st.sum[:, :, r.to(st.sum.device)] += old[:, :, j.to(old.device)].to(st.sum.device)
                st.cnt[r] += 1
                st.cand[r] &= st.cnt[r] < self.obs_window
        # this forward's keys
        if t >= 2:
            s_new = new
            if self.min_ratio > 0:
                uni = uniform_share(t, w, valid, ctx_ok, b).to(new.device)
                s_new = new * (new >= self.min_ratio * uni)
            c_new = torch.ones(t, dtype=torch.long)
            cand_new = torch.zeros(t, dtype=torch.bool)
        else:
            s_new = torch.zeros(b, hk, t, dtype=torch.float32, device=hs.device)
            c_new = torch.zeros(t, dtype=torch.long)
        self._append(st, start, s_new, c_new, cand_new, torch.full((t,), t == 1, dtype=torch.bool))
        # the context for later forwards
        real_idx = cols.view(1, -1) - pad.view(-1, 1)
        is_first = (real_idx >= 0) & (real_idx < self.n_first)  # [B, T]
        confirmed = (s_new >= self.threshold).any(1) & valid if t >= 2 else torch.zeros_like(valid)
        self._add_bank(st, k, cols, is_first, first=True)
        self._add_bank(st, k, cols, confirmed & ~is_first)
        self._add_ring(st, k, start, valid)
        st.cand_unsure = True  # this path may have opened or left open a candidate

    def _observe_step(
        self, module, hs: torch.Tensor, cos, sin, start: int, ctx: TokenContext, layer: Any, st: _LayerState, b: int
    ) -> bool:
        """One decode token, the common case, in few tensor ops; ``False`` (nothing done) where the
        general path of :meth:`observe` is needed.

        The same measurement as the general path: the new query's softmax over the bank, the ring
        and its own key; the pending candidates, which are always among the ring's newest
        ``obs_window`` columns (they collect at most ``obs_window`` queries, one per step), add
        their share. What it avoids: rebuilding the context from Python lists, index tensors,
        ``nonzero`` and the host reads that come with them, and the prefill-only masks.
        """
        if start < self.n_first + ctx.max_pad(b):
            return False  # a first token or a padded row is still arriving
        cand_new, is_cand = self._step_candidate(ctx, start, b, hs.device)
        # A decode candidate collects one query per step, so one generated within the last
        # obs_window columns may be open; older ones are closed unless another path ran since.
        pending = start - st.last_cand <= self.obs_window
        if not pending and st.cand_unsure:
            pending = st.cand is not None and bool(st.cand.any())
            st.cand_unsure = pending
        if pending and (st.cnt is None or st.cnt.numel() == 0):
            # the layer consumed the measurements (an evicting layer trims them as it decides): no
            # candidate is left to collect this query, so only the key is kept, as the general path does
            pending = False
        held = layer_keys(layer, 1) if layer is not None else None
        if pending:
            n = 0 if st.cnt is None else int(st.cnt.numel())
            ring_k, ring_ok, rc = st.ring_k, st.ring_ok, st.ring_col
            L = min(self.obs_window, len(rc), n)
            usable = (
                ring_k is not None and ring_ok is not None and L > 0 and ring_k.shape[0] == b
                and self.context >= self.obs_window  # every pending candidate is in the ring's tail
                and st.end() == start and rc[-1] == start - 1 and rc[-L] == start - L  # contiguous tail
                and (st.bank_k is None or st.bank_k.shape[0] == b)
            )
            if not usable:
                return False
            assert ring_k is not None and ring_ok is not None and st.sum is not None and st.cnt is not None and st.cand is not None
            if held is not None:
                # the query comes pre-multiplied by the softmax scale (folded into the RoPE tables)
                q = project_q(module, hs, cos, sin, 1, projected=caught_query(module, hs), scale=module.scaling)
                k = held
            else:
                q, k = project_qk(module, hs, cos, sin, 1)
                q = q * module.scaling
            hk, d = k.shape[1], k.shape[3]
            dup = bool(st.bank_col) and max(st.bank_col) >= rc[0]
            if dup:
                # a column in both the bank and the ring counts once (the general path drops the
                # ring's copy; here it is masked, which gives it the same zero weight)
                in_bank = set(st.bank_col)
                dup_t = torch.tensor([c in in_bank for c in rc], dtype=torch.bool, device=ring_ok.device)
            m_bank = 0 if st.bank_k is None else st.bank_k.shape[2]
            mask = dup or b > 1 or rc[0] < ctx.max_pad(b)
            r_old = ring_k.shape[2]
            ring_new, ring_ok = self._push_ring(st, k, start)  # [B, Hk, R + 1, D]: the ring, then k
            kk = ring_new if st.bank_k is None else torch.cat([st.bank_k, ring_new], 2)
            qg = q.view(b, hk, q.shape[1] // hk, d)  # [B, Hk, r, D]: the one query, per GQA group
            scores = torch.matmul(qg, kk.transpose(2, 3))  # [B, Hk, r, S + R + 1], scaled
            # One row whose ring starts after its padding: every bank and ring key is usable (a
            # bank column is only kept for the rows it is a sink of, and one row has it).
            if mask:
                if dup:
                    ring_ok = ring_ok & ~dup_t.view(1, -1)
                ok = ring_ok if st.bank_ok is None else torch.cat([st.bank_ok, ring_ok], 1)  # the new key is usable
                scores[..., : ok.shape[1]].masked_fill_(~ok.view(b, 1, 1, -1), float("-inf"))
            rec = scores.softmax(-1).mean(2)  # [B, Hk, S + R + 1]
            end = m_bank + r_old
            # the ring's newest L columns are measurements n-L .. n-1; only candidates collect
            m = st.cand[n - L :]
            st.sum[:, :, n - L :].addcmul_(rec[..., end - L : end], m.to(st.sum.device, st.sum.dtype))
            cnt = st.cnt[n - L :]
            cnt += m
            st.cand[n - L :] &= cnt < self.obs_window
        else:
            k = held if held is not None else project_k(module, hs, cos, sin)
            hk = k.shape[1]
            if self.context:
                self._push_ring(st, k, start)
        self._append_step(st, start, b, hk, is_cand, hs.device)
        if is_cand:
            st.last_cand = start
        return True

    def _push_ring(self, st: _LayerState, k: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Add decode column ``start``'s key ``k`` ``[B, Hk, 1, D]`` (every row real) to the ring.

        Returns the ring as it was followed by ``k``, ``[B, Hk, R + 1, D]`` (contiguous, a view), and
        the old ring's usable mask ``[B, R]``. Amortised O(1): the ring slides through a buffer of
        twice its size and moves to the front once every ``context`` steps."""
        c = self.context
        rk = st.ring_k
        r = 0 if rk is None else rk.shape[2]
        if rk is None or rk is not st.ring_view or st.ring_buf is None or st.ring_okbuf is None:
            b, hk, _, d = k.shape
            st.ring_buf = k.new_empty(b, hk, 2 * c, d)
            st.ring_okbuf = torch.ones(b, 2 * c, dtype=torch.bool, device=k.device)
            if r:
                assert rk is not None and st.ring_ok is not None
                st.ring_buf[:, :, :r] = rk
                st.ring_okbuf[:, :r] = st.ring_ok
            st.ring_end = r
        buf, okb, e = st.ring_buf, st.ring_okbuf, st.ring_end
        if e == buf.shape[2]:  # the buffer is full: the ring (r <= c columns) moves to its front
            buf[:, :, :r] = buf[:, :, e - r : e]
            okb[:, :r] = okb[:, e - r : e]
            okb[:, r:] = True
            e = r
        buf[:, :, e : e + 1] = k
        n = min(r + 1, c)
        st.ring_k = st.ring_view = buf[:, :, e + 1 - n : e + 1]
        st.ring_ok = okb[:, e + 1 - n : e + 1]
        st.ring_end = e + 1
        st.ring_col.append(start)
        if len(st.ring_col) > c:
            del st.ring_col[0]
        return buf[:, :, e - r : e + 1], okb[:, e - r : e]

    def _append_step(self, st: _LayerState, start: int, b: int, hk: int, is_cand: bool, device) -> None:
        """One unmeasured decode column (``cnt`` 0, decoded, a candidate if ``is_cand``) joins the
        measurement rows: the buffers hold those defaults from ``m_end`` on, so this moves four
        views (and writes the candidate flag). The rows are buffer slots ``[m_end - n, m_end)``;
        :meth:`mark` dropping decided rows from the front keeps them so (its slices are views of
        the same buffers), anything else (a general-path step, a truncation, a batch operation)
        makes the next step copy the rows into new buffers."""
        n = 0 if st.cnt is None else int(st.cnt.numel())
        bufs = st.m_bufs
        lo = st.m_end - n
        ok = (
            bufs is not None and st.m_end < bufs[1].numel() and bufs[0].shape[0] == b and bufs[0].shape[1] == hk
            and all(
                x is not None and x._base is buf and x.storage_offset() == lo
                for x, buf in zip((st.sum, st.cnt, st.cand, st.dec), bufs, strict=True)
            )
        )
        if not ok:
            cap = max(2 * (n + 1), 4 * self.obs_window)
            sb = torch.zeros(b, hk, cap, device=device)
            cb = torch.zeros(cap, dtype=torch.long)
            kb = torch.zeros(cap, dtype=torch.bool)
            db = torch.ones(cap, dtype=torch.bool)
            if n:
                assert st.sum is not None and st.cnt is not None and st.cand is not None and st.dec is not None
                sb[:, :, :n] = st.sum
                cb[:n], kb[:n], db[:n] = st.cnt, st.cand, st.dec
            st.m_bufs = bufs = (sb, cb, kb, db)
            st.m_end, lo = n, 0
        if n == 0:
            st.lo = start
        assert bufs is not None
        sb, cb, kb, db = bufs
        e = st.m_end
        if is_cand:
            kb[e] = True
        st.sum = sb[:, :, lo : e + 1]
        st.cnt, st.cand, st.dec = cb[lo : e + 1], kb[lo : e + 1], db[lo : e + 1]
        st.m_end = e + 1

    def _step_candidate(self, ctx: TokenContext, start: int, b: int, device) -> tuple[torch.Tensor, bool]:
        """Whether the one token at ``start`` is a candidate: ``([1] bool, as a Python bool)``,
        looked up once per forward (the tensor is shared: callers only copy it).

        Every observed layer of a forward asks about the same column: answered once per forward (the
        ids lookup and its copy to the host were ~2.5 ms of a 140 ms int2 step at 30 layers). Keyed by
        the forward's count, not by a column read off a tensor: that would be a sync on CUDA."""
        if self.punct_ids is None:
            return _NO_CANDIDATE, False
        key = (id(ctx), ctx.forwards, b)
        if self._cand_memo is None or self._cand_memo[0] != key or not ctx.forwards:
            cand = self._candidate_now(ctx, torch.arange(start, start + 1, device=device), b)
            self._cand_memo = (key, cand, bool(cand.any()))
        return self._cand_memo[1], self._cand_memo[2]

    def _candidate_now(self, ctx: TokenContext, cols: torch.Tensor, b: int) -> torch.Tensor:
        assert self.punct_ids is not None
        ids = ctx.ids_at(cols.cpu(), b)
        if ids is None:
            return torch.zeros(cols.numel(), dtype=torch.bool)
        if self._punct_lut is None:  # a lookup table: torch.isin costs ~0.8 ms per call at one id
            self._punct_lut = torch.zeros(int(self.punct_ids.max()) + 2, dtype=torch.bool)
            self._punct_lut[self.punct_ids] = True
        ids = ids.cpu().clamp(0, self._punct_lut.numel() - 1)  # ids past the table: its last (False) slot
        return self._punct_lut[ids].any(0)

    def _context(self, st: _LayerState, b: int, k: torch.Tensor):
        parts_k, parts_ok, cols = [], [], []
        if st.bank_k is not None and st.bank_ok is not None and st.bank_col:
            parts_k.append(st.bank_k)
            parts_ok.append(st.bank_ok)
            cols += st.bank_col
        if st.ring_k is not None and st.ring_ok is not None and st.ring_col:
            in_bank = set(st.bank_col)
            keep = [i for i, c in enumerate(st.ring_col) if c not in in_bank]
            if keep:
                ix = torch.tensor(keep, device=st.ring_k.device)
                parts_k.append(st.ring_k.index_select(2, ix))
                parts_ok.append(st.ring_ok.index_select(1, ix))
                cols += [st.ring_col[i] for i in keep]
        if not parts_k or parts_k[0].shape[0] != b:
            return None, None, []
        return torch.cat(parts_k, 2).to(k.device), torch.cat(parts_ok, 1).to(k.device), cols

    def _append(
        self, st: _LayerState, start: int, s: torch.Tensor, c: torch.Tensor, cand: torch.Tensor, dec: torch.Tensor
    ) -> None:
        if st.cnt is None or st.sum is None or st.cand is None or st.dec is None or st.cnt.numel() == 0:
            # copies: these are updated in place later, and callers may pass shared constants
            st.lo, st.sum, st.cnt, st.cand, st.dec = start, s, c.clone(), cand.clone(), dec.clone()
            return
        st.sum = torch.cat([st.sum, s.to(st.sum.device)], dim=2)
        st.cnt = torch.cat([st.cnt, c])
        st.cand = torch.cat([st.cand, cand])
        st.dec = torch.cat([st.dec, dec])

    def _add_bank(
        self, st: _LayerState, k: torch.Tensor, cols: torch.Tensor, rows_ok: torch.Tensor, first: bool = False
    ) -> None:
        """Add the columns some row has in ``rows_ok`` ``[B, T]`` (keys ``k``) to the bank."""
        take = rows_ok.any(0).nonzero().flatten()
        if take.numel() == 0 or (self.bank_size == 0 and not first):
            return
        kk, ok = k.index_select(2, take), rows_ok.index_select(1, take)
        new_cols = [int(cols[i]) for i in take.tolist()]
        if st.bank_k is None or st.bank_ok is None:
            st.bank_k, st.bank_ok, st.bank_col, st.bank_first = kk, ok, new_cols, [first] * len(new_cols)
        else:
            st.bank_k = torch.cat([st.bank_k, kk.to(st.bank_k.device)], 2)
            st.bank_ok = torch.cat([st.bank_ok, ok.to(st.bank_ok.device)], 1)
            st.bank_col = st.bank_col + new_cols
            st.bank_first = st.bank_first + [first] * len(new_cols)
        # keep the first tokens and the bank_size most recent others
        others = [i for i, f in enumerate(st.bank_first) if not f]
        if len(others) > self.bank_size:
            drop = set(others[: len(others) - self.bank_size])
            self._keep(st, "bank", [i for i in range(len(st.bank_col)) if i not in drop])

    @staticmethod
    def _keep(st: _LayerState, kind: str, keep: list[int]) -> None:
        kt, okt = getattr(st, f"{kind}_k"), getattr(st, f"{kind}_ok")
        ix = torch.tensor(keep, dtype=torch.long, device=kt.device)
        setattr(st, f"{kind}_k", kt.index_select(2, ix))
        setattr(st, f"{kind}_ok", okt.index_select(1, ix.to(okt.device)))
        setattr(st, f"{kind}_col", [getattr(st, f"{kind}_col")[i] for i in keep])
        if kind == "bank":
            st.bank_first = [st.bank_first[i] for i in keep]

    def _add_ring(self, st: _LayerState, k: torch.Tensor, start: int, valid: torch.Tensor) -> None:
        """The newest ``context`` keys of columns ``start ..`` (``k`` ``[B, Hk, T, D]``) join the ring."""
        if self.context == 0:
            return
        t = k.shape[2]
        n = min(self.context, t)
        kk, ok = k[:, :, -n:], valid[:, -n:]
        new_cols = list(range(start + t - n, start + t))  # consecutive columns: no host read
        if st.ring_k is None or st.ring_ok is None:
            st.ring_k, st.ring_ok, st.ring_col = kk, ok, new_cols
        else:
            st.ring_k = torch.cat([st.ring_k, kk], 2)[:, :, -self.context :]
            st.ring_ok = torch.cat([st.ring_ok, ok], 1)[:, -self.context :]
            st.ring_col = (st.ring_col + new_cols)[-self.context :]

    def _truncate(self, st: _LayerState, start: int) -> None:
        """Forget everything about columns >= ``start`` (they are being fed again)."""
        if st.cnt is not None and st.end() > start:
            keep = max(0, start - st.lo)
            assert st.sum is not None and st.cand is not None and st.dec is not None
            st.sum, st.cnt, st.cand, st.dec = st.sum[:, :, :keep], st.cnt[:keep], st.cand[:keep], st.dec[:keep]
        for kind in ("bank", "ring"):
            col = getattr(st, f"{kind}_col")
            if col and max(col) >= start:
                self._keep(st, kind, [i for i, c in enumerate(col) if c < start])

    def reset(self) -> None:
        self.state.clear()

    # The measurements are per row: they follow the cache's batch operations.
    def reorder(self, idx: torch.Tensor) -> None:
        for st in self.state.values():
            st.map_rows(lambda t: t.index_select(0, idx.to(t.device)))

    def repeat_interleave(self, repeats: int) -> None:
        for st in self.state.values():
            st.map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    @property
    def observed(self) -> dict[int, tuple[int, torch.Tensor]]:
        """Per layer: ``(first column, [B, Hk, n] measured shares)`` of the columns not yet marked."""
        out = {}
        for idx, st in self.state.items():
            if st.sum is not None and st.cnt is not None:
                out[idx] = (st.lo, st.sum / st.cnt.clamp_min(1).to(st.sum.device))
        return out

    # ---- the selector -----------------------------------------------------------------------------
    def received(self, layer_idx: int, cols: torch.Tensor, batch: int, heads: int, device) -> torch.Tensor:
        """``[B, Hk, C]`` measured attention share of ``cols`` (0 where nothing was measured)."""
        a = torch.zeros(batch, heads, cols.numel(), device=device)
        st = self.state.get(layer_idx)
        if st is None or st.sum is None or st.cnt is None or st.sum.shape[0] != batch or st.sum.shape[1] != heads:
            return a
        rel = cols.cpu() - st.lo
        inside = (rel >= 0) & (rel < st.cnt.numel())
        if not bool(inside.any()):
            return a
        r = rel[inside]
        est = st.sum[:, :, r.to(st.sum.device)] / st.cnt[r].clamp_min(1).to(st.sum.device)
        a[:, :, inside.to(device)] = est.to(device)
        return a

    def mark(self, layer_idx, cols, ctx: TokenContext, keys, attention=None):
        b, hk = keys.shape[0], keys.shape[1]
        st = self.state.get(layer_idx)
        if self.fast_decode and cols.numel() == 1 and st is not None and st.cnt is not None:
            marks = self._mark_one(st, int(cols[0]), ctx, b, keys.device)
            if marks is not None:
                return marks
        first = self.first_mask(cols, ctx, b).to(keys.device)
        if st is None or st.cnt is None:
            return first
        a = self.received(layer_idx, cols, b, hk, keys.device)
        pad = ctx.pad_counts(b, cols.device)
        real = (cols.view(1, -1) >= pad.view(-1, 1)).unsqueeze(1).to(keys.device)
        marks = first | ((a >= self.threshold) & real)
        # decode-time candidates confirmed now join the denominator bank
        rel = cols.cpu() - st.lo
        inside = (rel >= 0) & (rel < st.cnt.numel())
        if st.dec is not None and bool(inside.any()):
            was_dec = torch.zeros(cols.numel(), dtype=torch.bool)
            was_dec[inside] = st.dec[rel[inside]] & (st.cnt[rel[inside]] > 0)
            conf = (marks & ~first).any(1) & was_dec.to(keys.device).view(1, -1)  # [B, C]
            if bool(conf.any()):
                self._add_bank(st, keys.float(), cols, conf)
        # everything up to the last marked column is decided: drop its measurements
        self._drop_decided(st, int(cols.max()) + 1)
        return marks

    def _mark_one(self, st: _LayerState, col: int, ctx: TokenContext, b: int, device) -> torch.Tensor | None:
        """:meth:`mark` for one column that is no row's first token and not a decoded candidate
        (an evicting layer decides one column per step, as it leaves the recent window): a sink
        where its measured share reaches ``threshold`` (none if it was never measured), and its
        measurement row is dropped. ``None`` where the general path must decide. A few ops
        instead of ~30."""
        assert st.cnt is not None
        n = st.cnt.numel()
        rel = col - st.lo
        if col < self.n_first + ctx.max_pad(b):
            return None
        c = int(st.cnt[rel]) if 0 <= rel < n else 0
        if c > 0 and (st.dec is None or bool(st.dec[rel])):
            return None  # a measured decoded candidate: the general path also banks it if confirmed
        if c > 0:
            assert st.sum is not None
            marks = (st.sum[:, :, rel : rel + 1] / c >= self.threshold).to(device)  # [B, Hk, 1]
        else:
            marks = torch.zeros(b, 1, 1, dtype=torch.bool, device=device)
        self._drop_decided(st, col + 1)
        return marks

    @staticmethod
    def _drop_decided(st: _LayerState, end: int) -> None:
        """Drop the measurement rows of columns before ``end``: the layer has decided them. (Views
        of the same buffers, so :meth:`_append_step` keeps appending in place.)"""
        assert st.cnt is not None
        done = min(end - st.lo, st.cnt.numel())
        if done > 0 and st.sum is not None and st.cand is not None and st.dec is not None:
            st.sum, st.cnt, st.cand, st.dec = st.sum[:, :, done:], st.cnt[done:], st.cand[done:], st.dec[done:]
            st.lo += done

    def __repr__(self) -> str:
        return (
            f"AutoSinks(n_first={self.n_first}, max_sinks={self.max_sinks}, threshold={self.threshold}, "
            f"obs_window={self.obs_window}, min_ratio={self.min_ratio}, decode_candidates={self.punct_ids is not None})"
        )


def make_auto_sinks(n_first: int, max_sinks: int | None, model: Any, tokenizer: Any) -> SinkSelector:
    """``sinks="auto"``: attention-measured sinks when the model is attached, else the first token(s).

    With a tokenizer, generated punctuation/newline tokens are decode-time candidates."""
    if model is None or not attention_modules(model):
        sel = FirstSinks(n_first)
        sel.name = "auto"  # reported as what the user asked for; behaves as "first" (documented)
        if max_sinks is not None:
            sel.max_sinks = max_sinks  # keep the budget check honest about what was asked for
        return sel
    punct = punctuation_token_ids(tokenizer) if tokenizer is not None else None
    return AutoSinks(n_first=n_first, max_sinks=max_sinks, punct_ids=punct)
