"""Per-layer compressed KV stores (``transformers`` ``CacheLayerMixin`` subclasses).

Two layer kinds cover the compressing policies:

* :class:`EvictingLayer` (``evict``): full-precision keys/values, at most ``budget`` tokens.
* :class:`QuantizedLayer` (``quantize``, ``hybrid``): a bit-packed body, a full-precision sink
  store and a full-precision recent window.

Both follow ``DynamicSlidingWindowLayer``'s contract: ``update`` returns everything attention needs
in this forward (held + new tokens), then stores less. ``get_seq_length`` counts tokens *seen*
(so positions keep increasing) and ``get_mask_sizes`` describes what ``update`` will return.

Keys are stored post-RoPE, so attention over a held subset is exact for the tokens held: no
re-rotation is needed to keep relative distances right.

**Left padding.** ``generate`` builds one mask for all layers and reads the padding mask at
``kv_idx + kv_offset``. Held tokens are always kept in column order, and a row keeps padding only
when it has fewer real tokens than the cache holds; pads then sit first, exactly where the mask
expects them. A row's sinks are its own first real tokens (see :class:`~sinkcache.sinks.SinkSelector`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from .context import TokenContext
from .policies import EvictPolicy, HybridPolicy, QuantizePolicy
from .quant import (
    QuantizedKeys,
    QuantizedValues,
    dequantize_keys,
    dequantize_values,
    quantize_keys,
    quantize_residual,
    quantize_values,
    residual_cells,
    unpack,
)
from .refine import OBS_QUERIES
from .rope import Rotary
from .sinks import SinkSelector

_BIG = 1e30  # priority of protected tokens (finite, so topk never sees NaN from inf - inf)
_EMPTY = torch.empty(0)  # placeholder for storage before the first update (never written to)


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t.gather(2, index)`` for ``t`` ``[B, H, T, ...]`` and ``index`` ``[B, H, n]``: ``[B, H, n, ...]``.

    Flattens (row, head, token) and copies whole rows with ``index_select``: a ``gather`` with the
    index expanded over ``head_dim`` reads one int64 per element and is ~8x slower at 1k tokens.
    """
    b, h, n_t = t.shape[:3]
    rest = t.shape[3:]
    base = torch.arange(b * h, device=index.device, dtype=index.dtype).view(b, h, 1) * n_t
    flat = (index + base).reshape(-1)
    return t.reshape(b * h * n_t, *rest).index_select(0, flat).view(b, h, index.shape[2], *rest)


def _keep_order(prio: torch.Tensor, n: int) -> torch.Tensor:
    """Column-sorted indices ``[B, H, n]`` of the ``n`` highest ``prio`` ``[B, H, T]``, ties to lower columns.

    Same result as a stable descending argsort cut at ``n`` and re-sorted. Decoding drops one token
    per step, and then the dropped column is just the last minimum, found without sorting (two
    sorts of ~1k elements per layer cost more than the attention itself).
    """
    t = prio.shape[-1]
    if t - n == 1 and not bool(torch.isnan(prio).any()):  # sort orders NaN first; keep its semantics
        cols = torch.arange(t, device=prio.device)
        low = prio == prio.amin(dim=-1, keepdim=True)
        drop = torch.where(low, cols, -1).amax(dim=-1, keepdim=True)  # last column among the minima
        keep = cols[:n]
        return keep + (keep >= drop).to(keep.dtype)
    return prio.argsort(dim=-1, descending=True, stable=True)[..., :n].sort(dim=-1).values


class CompressingLayer(CacheLayerMixin):
    """Shared bookkeeping: tokens seen, shape checks, batch ops over every per-row tensor."""

    is_sliding = False
    is_croppable = False  # eviction/quantization cannot be rolled back exactly in general
    _batched: tuple[str, ...] = ()

    def __init__(self, sinks: SinkSelector, ctx: TokenContext, layer_idx: int = -1) -> None:
        super().__init__()
        self.sinks = sinks
        self.ctx = ctx
        self.layer_idx = layer_idx
        self.seen = 0
        # Whether the sink selector has marked heads differently (a [B, H, C] mark rather than
        # [B, 1, C]); until it does, a layer whose scorer keeps one set per layer holds the same
        # columns in every head.
        self.marks_per_head = False
        self.shape: tuple[int, int, int] | None = None  # (batch, kv_heads, head_dim)
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None

    # ---- CacheLayerMixin contract -------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.shape = (b, h, d)
        self.dtype, self.device = key_states.dtype, key_states.device
        self._init_storage(b, h, d)
        self.is_initialized = True

    def _init_storage(self, b: int, h: int, d: int) -> None:
        raise NotImplementedError

    def _check(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.dim() != 4 or v.shape[:3] != k.shape[:3]:
            raise ValueError(
                f"layer {self.layer_idx}: expected keys/values [batch, kv_heads, seq, head_dim], got {tuple(k.shape)} / {tuple(v.shape)}"
            )
        if self.shape is not None:
            b, h, d = self.shape
            if (k.shape[0], k.shape[1], k.shape[3]) != (b, h, d) or v.shape[3] != d:
                raise ValueError(
                    f"layer {self.layer_idx}: this cache holds [batch={b}, kv_heads={h}, head_dim={d}] but got keys "
                    f"{tuple(k.shape)}: a cache cannot be reused with a different model or batch size (call cache.reset())"
                )
            if k.dtype != self.dtype:
                raise ValueError(f"layer {self.layer_idx}: cache holds {self.dtype} but got keys in {k.dtype}")

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def held(self) -> int:
        """Tokens stored right now (compression may still be pending)."""
        raise NotImplementedError

    def held_after_compress(self) -> int:
        """Tokens attention will see besides the new ones: what is held once pending compression runs."""
        raise NotImplementedError

    def newest_keys(self, t: int) -> torch.Tensor | None:
        """Post-RoPE keys ``[B, H, t, D]`` of the newest ``t`` tokens if this layer holds them exactly
        and in arrival order (right after ``update``), else ``None``. Forward hooks reuse them
        instead of recomputing ``k_proj`` and RoPE."""
        return None

    def compress(self) -> None:
        """Run pending compression. ``update`` calls it first, so tokens are compressed one forward
        after they arrive: sink detection can then use the attention they drew in that forward."""
        raise NotImplementedError

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self.held_after_compress()
        return held + query_length, self.seen - held

    def reset(self) -> None:
        for name in self._batched:
            setattr(self, name, _EMPTY)
        self.seen = 0
        self.marks_per_head = False
        self.shape = None
        self.is_initialized = False

    # ---- batch operations: every per-row tensor moves together ---------------------------------
    def _map_batched(self, fn) -> None:
        for name in self._batched:
            setattr(self, name, fn(getattr(self, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._map_batched(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._map_batched(lambda t: t[indices.to(t.device)])
            assert self.shape is not None
            self.shape = (int(getattr(self, self._batched[0]).shape[0]), self.shape[1], self.shape[2])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._map_batched(lambda t: t.repeat_interleave(repeats, dim=0))
            assert self.shape is not None
            self.shape = (self.shape[0] * repeats, self.shape[1], self.shape[2])

    def offload(self) -> None:
        if self.is_initialized:
            self._map_batched(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized:
            self._map_batched(lambda t: t.to(self.device, non_blocking=True))

    # ---- accounting ---------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes of every tensor this layer holds (codes, scales, zeros, full-precision parts, metadata)."""
        total = 0
        for name in self._batched:
            t = getattr(self, name)
            total += t.numel() * t.element_size()
        return total

    def dense_bytes(self) -> int:
        """What ``DynamicCache`` would hold for the tokens seen, in the model dtype."""
        if self.shape is None or self.dtype is None:
            return 0
        b, h, d = self.shape
        return 2 * b * h * self.seen * d * torch.empty((), dtype=self.dtype).element_size()

    def sink_count(self) -> float:
        """Mean number of sinks held per (row, kv-head)."""
        raise NotImplementedError

    def _mark_sinks(self, cols: torch.Tensor, keys: torch.Tensor, already: torch.Tensor | None) -> torch.Tensor:
        """``[B, H, C]`` sink mask for a block, capped at ``max_sinks`` per (row, head) given ``already`` ``[B, H]``."""
        b, h, c, _ = keys.shape
        marks = self.sinks.mark(self.layer_idx, cols, self.ctx, keys)
        if marks.shape[1] != 1:
            self.marks_per_head = True  # a shape, not a value: no host-device sync
        marks = marks.expand(b, h, c)
        cap = self.sinks.max_sinks
        if cap is not None:
            base = already if already is not None else torch.zeros(b, h, dtype=torch.long, device=keys.device)
            marks = marks & ((base.unsqueeze(-1) + marks.long().cumsum(-1)) <= cap)
        return marks

    def _pad_mask(self, cols: torch.Tensor, batch: int) -> torch.Tensor:
        """``[B, 1, C]`` True where a column is left padding for that row."""
        pad = self.ctx.pad_counts(batch, cols.device)
        return (cols.view(1, -1) < pad.view(-1, 1)).unsqueeze(1)

    def _crop_count(self, tokens_to_remove: int) -> int:
        """Validated number of newest tokens ``crop(tokens_to_remove)`` drops (0: nothing to do).

        transformers' assisted decoding passes a negative count ("remove this many")."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return 0
        if n > self.seen:
            raise ValueError(f"crop({tokens_to_remove}): only {self.seen} tokens were seen")
        return n


class EvictingLayer(CompressingLayer):
    """Full-precision store of at most ``budget`` tokens per (row, kv-head).

    Stored: keys/values ``[B, H, T, D]``, column ``pos`` ``[B, H, T]`` int32, eviction ``score``
    ``[B, H, T]`` float32 (from the policy's scorer, :mod:`sinkcache.scores`) and a ``sink`` flag
    ``[B, H, T]``; T <= budget after every update. A scorer that weighs tokens (``vatp``) adds their
    ``weight`` ``[B, H, T]`` float32, fixed on arrival.
    """

    _batched: tuple[str, ...] = ("keys", "values", "pos", "score", "sink")
    keys: torch.Tensor
    values: torch.Tensor

    def __init__(
        self,
        policy: EvictPolicy,
        sinks: SinkSelector,
        ctx: TokenContext,
        layer_idx: int = -1,
        rotary: Rotary | None = None,
    ) -> None:
        super().__init__(sinks, ctx, layer_idx)
        self.policy = policy
        # positions="shifted": keys are stored un-rotated and re-rotated to contiguous positions each step.
        self.rotary = rotary
        if policy.positions == "shifted" and rotary is None:
            raise ValueError("positions='shifted' needs the model's rotary embedding: pass model= to SinkCache")
        self.scorer = policy.scorer()
        if self.scorer.weighs_tokens:
            self._batched = type(self)._batched + ("weight",)
        self.keys = self.values = _EMPTY
        self.pos = self.score = self.sink = self.weight = _EMPTY
        self.marked = 0  # columns < marked have had their sink decision

    def _init_storage(self, b: int, h: int, d: int) -> None:
        dev = self.device
        self.keys = torch.empty(b, h, 0, d, dtype=self.dtype, device=dev)
        self.values = torch.empty(b, h, 0, d, dtype=self.dtype, device=dev)
        self.pos = torch.empty(b, h, 0, dtype=torch.int32, device=dev)
        self.score = torch.empty(b, h, 0, dtype=torch.float32, device=dev)
        self.sink = torch.empty(b, h, 0, dtype=torch.bool, device=dev)
        if self.scorer.weighs_tokens:
            self.weight = torch.empty(b, h, 0, dtype=torch.float32, device=dev)
        self.marked = 0

    def held(self) -> int:
        return self.keys.shape[2] if self.is_initialized else 0

    def sink_count(self) -> float:
        return float(self.sink.sum(-1).float().mean()) if self.sink.numel() else 0.0

    def held_after_compress(self) -> int:
        return min(self.held(), self.policy.budget)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self._check(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.compress()
        b, h, q, _ = key_states.shape
        cols = torch.arange(self.seen, self.seen + q, device=key_states.device, dtype=torch.int32)
        values = torch.cat([self.values, value_states], dim=2)
        if self.rotary is None:
            keys = torch.cat([self.keys, key_states], dim=2)
            self.keys = keys
        else:
            keys = self._shifted_keys(key_states, cols)
        self.values = values
        self.pos = torch.cat([self.pos, cols.view(1, 1, q).expand(b, h, q)], dim=2)
        self.score = torch.cat([self.score, self.scorer.arrival(key_states)], dim=2)
        self.sink = torch.cat([self.sink, torch.zeros(b, h, q, dtype=torch.bool, device=keys.device)], dim=2)
        if self.scorer.weighs_tokens:
            self.weight = torch.cat([self.weight, self.scorer.token_weight(value_states)], dim=2)
        self.seen += q
        return keys, values

    def newest_keys(self, t: int) -> torch.Tensor | None:
        # update() appends the new keys last and compresses only on the next update; shifted
        # positions store them un-rotated, so those must be recomputed.
        if self.rotary is not None or not self.is_initialized or t > self.keys.shape[2]:
            return None
        return self.keys[:, :, -t:]

    def observe_attention(self, attn: torch.Tensor, n_queries: torch.Tensor, q_len: int) -> None:
        """This forward's attention on the held tokens ``attn`` ``[B, H, T]`` (see
        :func:`sinkcache.scores.observe.attention_received`) updates their scores."""
        if self.scorer.weighs_tokens:
            attn = attn * self.weight
        # Every head holds the same columns while the scorer pools over heads and no sink was marked
        # for some heads only (eviction then picks the same tokens in every head): say so with
        # [B, 1, T] columns, and the scorer can pool with a plain mean.
        shared = self.scorer.one_set_per_layer and not self.marks_per_head
        pos = self.pos[:, :1] if shared else self.pos
        self.score = self.scorer.update(self.score, attn, n_queries, pos, self.seen, q_len)

    def _shifted_keys(self, key_states: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Store the new keys un-rotated; return held keys rotated to the positions just before them."""
        assert self.rotary is not None
        b, q = key_states.shape[0], key_states.shape[2]
        pad = self.ctx.pad_counts(b, key_states.device)
        true_pos = cols.long().view(1, q) - pad.view(b, 1)  # what generate() gave the model
        held = self.keys.shape[2]
        self.keys = torch.cat([self.keys, self.rotary.unrotate(key_states, true_pos)], dim=2)
        if held == 0:
            return key_states
        virt = true_pos[:, :1] - held + torch.arange(held, device=key_states.device).view(1, held)
        return torch.cat([self.rotary.rotate(self.keys[:, :, :held], virt), key_states], dim=2)

    def compress(self) -> None:
        if not self.is_initialized:
            return
        # Decide sinks among tokens that arrived since the last compression, then evict. A selector
        # that measures attention (sinks="auto") decides a token when it leaves the recent window
        # (which protects it until then), as the quantizing layer does: a decoded candidate has
        # then been measured by the queries after it. Deciding it one forward after it arrived,
        # before any later query, meant decode-time sinks were never confirmed under eviction.
        upto = self.seen - self.policy.window if self.sinks.needs_attention else self.seen
        if upto > self.marked:
            self._mark_upto(upto)
        if self.keys.shape[2] > self.policy.budget:
            self._evict()

    def _mark_upto(self, upto: int) -> None:
        """Sink decisions for columns ``marked .. upto - 1``. Real tokens among them are all still
        held (protected by the window since they arrived); pads are not protected and may be gone."""
        new = upto - self.marked
        b, h, t, d = self.keys.shape
        cols = torch.arange(self.marked, upto, device=self.keys.device)
        already = self.sink.sum(-1)  # only columns < marked can be sinks yet
        if upto == self.seen or self.marked >= self.ctx.max_pad(b):
            # all arrived since the last eviction, or no pads among them: in every row they are
            # the store's newest seen - marked entries
            a = t - (self.seen - self.marked)
            marks = self._mark_sinks(cols, self.keys[:, :, a : a + new], already)
            # (out of place: the flags may be inference tensors from a forward under inference_mode)
            parts = [self.sink[:, :, :a], marks if a + new == t else self.sink[:, :, a : a + new] | marks]
            self.sink = torch.cat(parts + ([self.sink[:, :, a + new :]] if a + new < t else []), dim=2)
        else:
            # a padded row may have evicted some of these pad columns already (the newest pads go
            # first): find each column by position (the store keeps column order); a column a row
            # no longer holds is one of its pads, never a sink
            want = cols.to(self.pos.dtype).view(1, 1, new).expand(b, h, new).contiguous()
            idx = torch.searchsorted(self.pos.contiguous(), want).clamp_max_(t - 1)
            found = self.pos.gather(2, idx) == want
            keys = self.keys.gather(2, idx.unsqueeze(-1).expand(b, h, new, d))
            marks = self._mark_sinks(cols, keys, already) & found
            self.sink = self.sink.scatter(2, idx, self.sink.gather(2, idx) | marks)
        self.marked = upto

    def _evict(self) -> None:
        """Keep the top-``budget`` tokens per (row, head): sinks and window first, pads last."""
        n = self.policy.budget
        protected = self.sink | (self.pos >= self.seen - self.policy.window)
        prio = self.score.masked_fill(protected, _BIG)
        prio = prio.masked_fill(self.pos < self.ctx.pad_counts(prio.shape[0], prio.device).view(-1, 1, 1), -_BIG)
        # Sorting the kept indices keeps column order, which the padding mask relies on.
        # A stable sort breaks score ties by column order, so a left-padded row keeps the same tokens
        # as when it runs alone (topk's tie order depends on where the row sits in memory).
        idx = _keep_order(prio, n)
        self.keys = _take(self.keys, idx)
        self.values = _take(self.values, idx)
        for name in self._batched[2:]:  # pos, score, sink (and vatp's weight): [B, H, T] per held token
            setattr(self, name, getattr(self, name).gather(2, idx))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest ``-tokens_to_remove`` tokens (assisted decoding); only inside the window."""
        n = self._crop_count(tokens_to_remove)
        if n == 0:
            return
        # Cropping is exact only if the removed tokens and the window that remains are all still held
        # (true right after a forward, since compression runs one forward late).
        m = min(n + self.policy.window, self.seen)
        expected = torch.arange(self.seen - m, self.seen, device=self.pos.device, dtype=self.pos.dtype)
        if m > self.held() or not torch.equal(self.pos[:, :, self.held() - m :], expected.expand_as(self.pos[:, :, self.held() - m :])):
            raise ValueError(
                f"crop({tokens_to_remove}) would need tokens that were already evicted "
                f"(window={self.policy.window}): evicted tokens cannot be restored"
            )
        self._map_batched(lambda t: t[:, :, :-n])
        self.seen -= n
        self.marked = min(self.marked, self.seen)


def check_head_dim(policy: QuantizePolicy, d: int) -> None:
    """Raise unless ``policy`` can quantize heads of size ``d``: value groups split the head, and
    codes pack ``8 // bits`` to a byte. (SinkCache calls this at construction when it knows the
    model; a layer calls it when it first sees keys.)"""
    vgroup = min(policy.group_size, d)
    if d % vgroup:
        raise ValueError(
            f"group_size={policy.group_size} does not divide head_dim={d} (value groups split the head); "
            f"allowed: a divisor of {d} or a value >= {d}"
        )
    if d % (8 // policy.bits):
        raise ValueError(f"head_dim={d} cannot be packed at {policy.bits} bits (needs a multiple of {8 // policy.bits})")


class QuantizedLayer(CompressingLayer):
    """Bit-packed body + full-precision sinks + full-precision recent window.

    Stored per layer:
      * body: ``k_codes``/``v_codes`` ``[B, H, Tb, D*bits/8]`` uint8, key scale/zero
        ``[B, H, Tb/G, D]``, value scale/zero ``[B, H, Tb, D/Gv]``, group ids ``gid`` ``[B, H, Tb/G]``
        (column // G; groups are evicted per (row, head) under ``hybrid``) and group scores;
      * sinks: ``sink_k``/``sink_v`` ``[B, H, S, D]`` model dtype, ``sink_col`` ``[B, H, S]`` (-1 = empty);
      * window: ``win_k``/``win_v`` ``[B, H, W', D]``, columns ``win_start .. seen-1``;
      * refinement (``policy.refine``, :mod:`sinkcache.refine`): ``rk_codes``/``rv_codes``
        ``[B, H, R, D*rbits/8]`` uint8 residual codes of the refined tokens, at columns ``r_col``
        ``[B, H, R]`` (quantize never evicts, so a column is its body slot).

    A sink keeps its slot (and its unused codes) in the body; when the body is dequantized the
    sink's exact key/value is written over that slot, so attention sees it at full precision and
    the returned tensors stay in column order.
    """

    _batched = (
        "k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "gid", "gscore",
        "sink_k", "sink_v", "sink_col", "sink_slot", "win_k", "win_v", "rk_codes", "rv_codes", "r_col",
    )
    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    gid: torch.Tensor
    gscore: torch.Tensor
    sink_k: torch.Tensor
    sink_v: torch.Tensor
    sink_col: torch.Tensor
    sink_slot: torch.Tensor
    win_k: torch.Tensor
    win_v: torch.Tensor
    rk_codes: torch.Tensor
    rv_codes: torch.Tensor
    r_col: torch.Tensor

    def __init__(
        self, policy: QuantizePolicy, sinks: SinkSelector, ctx: TokenContext, layer_idx: int = -1
    ) -> None:
        super().__init__(sinks, ctx, layer_idx)
        self.policy = policy
        self.bits = policy.bits
        self.group = policy.group_size
        self.capacity: int | None = policy.body_capacity() if isinstance(policy, HybridPolicy) else None
        self.win_start = 0
        self.vgroup = self.group
        self.refine = policy.refine
        # Post-RoPE queries of the last OBS_QUERIES positions ([B, Hq, w, D] float32), kept by
        # sinkcache.refine.RecentQueries while a flush is near; working memory, not cache bytes.
        self.q_ring: torch.Tensor | None = None
        self.q_scaling = 1.0
        # (key group, output slot) of each refined token, derived from r_col; rebuilt when it changes.
        self._r_index: tuple[torch.Tensor, ...] | None = None
        for name in self._batched:
            setattr(self, name, _EMPTY)

    def _init_storage(self, b: int, h: int, d: int) -> None:
        check_head_dim(self.policy, d)
        self.vgroup = min(self.group, d)
        dev, dt = self.device, self.dtype
        nb = d * self.bits // 8
        self.k_codes = torch.empty(b, h, 0, nb, dtype=torch.uint8, device=dev)
        self.v_codes = torch.empty(b, h, 0, nb, dtype=torch.uint8, device=dev)
        self.k_scale = torch.empty(b, h, 0, d, dtype=dt, device=dev)
        self.k_zero = torch.empty(b, h, 0, d, dtype=dt, device=dev)
        self.v_scale = torch.empty(b, h, 0, d // self.vgroup, dtype=dt, device=dev)
        self.v_zero = torch.empty(b, h, 0, d // self.vgroup, dtype=dt, device=dev)
        self.gid = torch.empty(b, h, 0, dtype=torch.int32, device=dev)
        self.gscore = torch.empty(b, h, 0, dtype=torch.float32, device=dev)
        self.sink_k = torch.empty(b, h, 0, d, dtype=dt, device=dev)
        self.sink_v = torch.empty(b, h, 0, d, dtype=dt, device=dev)
        self.sink_col = torch.empty(b, h, 0, dtype=torch.int32, device=dev)
        self.sink_slot = torch.empty(b, h, 0, dtype=torch.long, device=dev)
        self.win_k = torch.empty(b, h, 0, d, dtype=dt, device=dev)
        self.win_v = torch.empty(b, h, 0, d, dtype=dt, device=dev)
        rb = self.refine.bits if self.refine is not None else 8
        self.rk_codes = torch.empty(b, h, 0, d * rb // 8, dtype=torch.uint8, device=dev)
        self.rv_codes = torch.empty(b, h, 0, d * rb // 8, dtype=torch.uint8, device=dev)
        self.r_col = torch.empty(b, h, 0, dtype=torch.int32, device=dev)
        self.win_start = 0
        self.q_ring = None
        self._r_index = None

    def reset(self) -> None:
        super().reset()
        self.win_start = 0
        self.q_ring = None
        self._r_index = None

    def _map_batched(self, fn) -> None:
        super()._map_batched(fn)
        self._r_index = None
        if self.q_ring is not None:
            self.q_ring = fn(self.q_ring)

    # ---- queries for refinement (fed by sinkcache.refine.RecentQueries) ------------------------
    def wants_queries(self) -> bool:
        """True when this layer ranks blocks by attention and its next flush is within
        ``OBS_QUERIES`` positions (so only those queries are ever projected and kept)."""
        if self.refine is None or not self.refine.needs_attention or not self.is_initialized:
            return False
        return self.win_k.shape[2] + OBS_QUERIES >= self.policy.window + self.group

    def push_queries(self, q: torch.Tensor, scaling: float) -> None:
        """Keep the newest ``OBS_QUERIES`` of this forward's queries ``q`` ``[B, Hq, w, D]`` (its last positions)."""
        ring = q if self.q_ring is None or self.q_ring.shape[0] != q.shape[0] else torch.cat([self.q_ring, q], dim=2)
        self.q_ring = ring[:, :, -OBS_QUERIES:]
        self.q_scaling = scaling

    # ---- sizes --------------------------------------------------------------------------------
    def body_len(self) -> int:
        return self.k_codes.shape[2] if self.is_initialized else 0

    def held(self) -> int:
        return self.body_len() + self.win_k.shape[2] if self.is_initialized else 0

    def sink_count(self) -> float:
        if self.sink_col.numel() == 0:
            return 0.0
        return float((self.sink_col >= 0).sum(-1).float().mean())

    # ---- the hot path -------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self._check(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.compress()
        self.win_k = torch.cat([self.win_k, key_states], dim=2)
        self.win_v = torch.cat([self.win_v, value_states], dim=2)
        self.seen += key_states.shape[2]
        return self._materialize()

    def newest_keys(self, t: int) -> torch.Tensor | None:
        # The newest tokens sit at the end of the exact window until the next update flushes it.
        if not self.is_initialized or t > self.win_k.shape[2]:
            return None
        return self.win_k[:, :, -t:]

    def _flushable(self) -> int:
        """Tokens the next compression moves out of the window (a multiple of the group size)."""
        if not self.is_initialized:
            return 0
        return max(self.win_k.shape[2] - self.policy.window, 0) // self.group * self.group

    def held_after_compress(self) -> int:
        n = self._flushable()
        body = self.body_len() + n
        if self.capacity is not None:
            body = min(body, self.capacity)
        return body + (self.win_k.shape[2] - n if self.is_initialized else 0)

    def compress(self) -> None:
        # Each token is quantized exactly once, when it leaves the window; the prompt itself was
        # attended at full precision in its own forward (as in KIVI).
        if self._flushable():
            self._flush()

    def _materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized body (sinks written back exactly) followed by the window: ``[B, H, Tb+W', D]``."""
        tb = self.body_len()
        if tb == 0:
            return self.win_k, self.win_v
        b, h, w, d = self.win_k.shape
        # Slot 0 is scratch: empty sink entries point there, so one scatter handles ragged sink counts.
        # Keys and values share one buffer so that refinement adds to both in one pass.
        kv = torch.empty(2, b, h, 1 + tb + w, d, dtype=self.dtype, device=self.win_k.device)
        out_k, out_v = kv[0], kv[1]
        dequantize_keys(QuantizedKeys(self.k_codes, self.k_scale, self.k_zero), self.bits, self.group, out_k[:, :, 1 : 1 + tb])
        dequantize_values(QuantizedValues(self.v_codes, self.v_scale, self.v_zero), self.bits, self.vgroup, out_v[:, :, 1 : 1 + tb])
        out_k[:, :, 1 + tb :] = self.win_k
        out_v[:, :, 1 + tb :] = self.win_v
        if self.r_col.shape[2]:
            self._apply_refinement(kv)
        if self.sink_k.shape[2]:
            idx = self.sink_slot.unsqueeze(-1).expand(-1, -1, -1, d)
            out_k.scatter_(2, idx, self.sink_k)
            out_v.scatter_(2, idx, self.sink_v)
        return out_k[:, :, 1:], out_v[:, :, 1:]

    def _apply_refinement(self, kv: torch.Tensor) -> None:
        """Add the refined tokens' residuals to their dequantized slots of ``kv`` ``[2, B, H, 1 + Tb
        + W, D]`` (keys, values; slot 0 scratch): work on the R refined tokens, not the body."""
        assert self.refine is not None
        _, b, h, n_t, d = kv.shape
        if self._r_index is None:
            # Flat row indices into the scales (fixed until the next flush, which resets them).
            col = self.r_col.long()
            rows = torch.arange(b * h, device=col.device).view(b, h, 1)
            k_rows = (rows * self.k_scale.shape[2] + torch.div(col, self.group, rounding_mode="floor")).reshape(-1)
            v_rows = (rows * self.v_scale.shape[2] + col).reshape(-1)
            self._r_index = (k_rows, v_rows, rows * (n_t - self.win_k.shape[2]) + col + 1, rows)
        k_rows, v_rows, body_rows, rows = self._r_index
        bits, r = self.refine.bits, k_rows.numel()
        # Keys' and values' codes unpacked together: [2R, D] offsets in steps of the base grid.
        codes = torch.cat([self.rk_codes.reshape(r, -1), self.rv_codes.reshape(r, -1)])
        delta = residual_cells(codes, bits, kv.dtype)
        # A key's step is its group's per-channel scale, a value's its token's channel-group scale
        # (broadcast over the group, not repeated); 2**-bits is exact and folded in once.
        delta[:r].mul_(self.k_scale.reshape(-1, d).index_select(0, k_rows))
        delta[r:].view(r, d // self.vgroup, self.vgroup).mul_(self.v_scale.reshape(-1, d // self.vgroup, 1).index_select(0, v_rows))
        delta.mul_(1.0 / (1 << bits))
        # Rows of the flattened [2*B*H*(1+Tb+W), D] buffer: index_add_ adds whole rows (a scatter
        # along dim 2 reads an int64 index per element, ~2-3x slower). The window grows between
        # flushes, which shifts every (row, head)'s block by its W; values sit B*H*(1+Tb+W) rows on.
        flat = (body_rows + rows * self.win_k.shape[2]).reshape(-1)
        kv.view(-1, d).index_add_(0, torch.cat([flat, flat + b * h * n_t]), delta)

    # ---- leaving the window -------------------------------------------------------------------
    def _flush(self) -> None:
        n = self._flushable()
        ck, cv = self.win_k[:, :, :n], self.win_v[:, :, :n]
        b, h, _, d = ck.shape
        cols = torch.arange(self.win_start, self.win_start + n, device=ck.device)
        marks = self._mark_sinks(cols, ck, (self.sink_col >= 0).sum(-1))
        exclude = marks | self._pad_mask(cols, b)
        qk = quantize_keys(ck, self.bits, self.group, exclude)
        qv = quantize_values(cv, self.bits, self.vgroup)
        self.k_codes = torch.cat([self.k_codes, qk.codes], dim=2)
        self.k_scale = torch.cat([self.k_scale, qk.scale], dim=2)
        self.k_zero = torch.cat([self.k_zero, qk.zero], dim=2)
        self.v_codes = torch.cat([self.v_codes, qv.codes], dim=2)
        self.v_scale = torch.cat([self.v_scale, qv.scale], dim=2)
        self.v_zero = torch.cat([self.v_zero, qv.zero], dim=2)
        ng = n // self.group
        gid = (cols[:: self.group] // self.group).to(torch.int32)
        self.gid = torch.cat([self.gid, gid.view(1, 1, ng).expand(b, h, ng)], dim=2)
        # Group score for hybrid eviction: mean key-norm score of the group's ordinary tokens.
        sc = (-ck.float().norm(dim=-1)).masked_fill(exclude, 0.0).view(b, h, ng, self.group).sum(-1)
        cnt = (~exclude).expand(b, h, n).reshape(b, h, ng, self.group).sum(-1).clamp_min(1)
        self.gscore = torch.cat([self.gscore, sc / cnt], dim=2)
        if self.refine is not None:
            self._refine_block(ck, cv, cols, exclude, qk, qv)
        self._add_sinks(marks, ck, cv, cols)
        self.win_k, self.win_v = self.win_k[:, :, n:], self.win_v[:, :, n:]
        self.win_start += n
        if self.capacity is not None and self.body_len() > self.capacity:
            self._evict_groups()
        self._locate_sinks()

    def _refine_block(
        self, ck: torch.Tensor, cv: torch.Tensor, cols: torch.Tensor, exclude: torch.Tensor,
        qk: QuantizedKeys, qv: QuantizedValues,
    ) -> None:
        """Store refinement codes for the most attended ``refine.share`` of the block being flushed
        (``ck``/``cv`` ``[B, H, n, D]`` exact, ``qk``/``qv`` its new codes); sinks and pads never."""
        assert self.refine is not None
        b, h, n, d = ck.shape
        k = self.refine.count(n)
        if k == 0:
            return
        score = self._block_salience(ck, n).masked_fill(exclude.expand(b, h, n), float("-inf"))
        top = score.topk(k, dim=-1).indices.sort(dim=-1).values  # [B, H, k], column order
        sk, sv = _take(ck, top), _take(cv, top)
        grp = torch.div(top, self.group, rounding_mode="floor")
        k_scale, k_zero = _take(qk.scale, grp), _take(qk.zero, grp)  # [B, H, k, D]
        v_scale, v_zero = _take(qv.scale, top), _take(qv.zero, top)  # [B, H, k, D/Gv]
        base_k = torch.addcmul(k_zero.float(), unpack(_take(qk.codes, top), self.bits).float(), k_scale.float())
        vsz = v_scale.repeat_interleave(self.vgroup, dim=-1)
        vz = v_zero.repeat_interleave(self.vgroup, dim=-1)
        base_v = torch.addcmul(vz.float(), unpack(_take(qv.codes, top), self.bits).float(), vsz.float())
        # The base approximation in the model dtype, as _materialize will rebuild it.
        base_k, base_v = base_k.to(ck.dtype), base_v.to(cv.dtype)
        rb = self.refine.bits
        self.rk_codes = torch.cat([self.rk_codes, quantize_residual(sk, base_k, k_scale, rb)], dim=2)
        self.rv_codes = torch.cat([self.rv_codes, quantize_residual(sv, base_v, vsz, rb)], dim=2)
        self.r_col = torch.cat([self.r_col, cols[top].to(torch.int32)], dim=2)
        self._r_index = None
        self.q_ring = None

    def _block_salience(self, ck: torch.Tensor, n: int) -> torch.Tensor:
        """``[B, H, n]`` float32: how much attention each token of the block being flushed draws.

        ``"attention"``: the last queries' softmax over every held key (the body as attention will
        see it, sinks exact), summed over the queries and averaged over each kv group's query heads.
        Without kept queries (no model hooks ran) it falls back to ``"keynorm"``."""
        assert self.refine is not None
        ring = self.q_ring
        if self.refine.score == "keynorm" or ring is None or ring.shape[0] != ck.shape[0]:
            return -ck.float().norm(dim=-1)
        from .scores.observe import attention_received

        keys, _ = self._materialize()  # body + window, before this flush: the keys the queries saw
        b, h, t, _ = keys.shape
        tb = t - self.win_k.shape[2]
        body_cols = (self.gid.long().unsqueeze(-1) * self.group + torch.arange(self.group, device=keys.device)).flatten(2)
        win_cols = torch.arange(self.win_start, self.seen, device=keys.device).view(1, 1, -1).expand(b, h, -1)
        key_pos = torch.cat([body_cols, win_cols], dim=2)
        w = ring.shape[2]
        q_cols = torch.arange(self.seen - w, self.seen, device=keys.device)
        pad = self.ctx.pad_counts(b, keys.device)
        attn, _ = attention_received(ring, keys, key_pos, q_cols, pad, self.q_scaling, newest=True)
        return attn[:, :, tb : tb + n]

    def _add_sinks(self, marks: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor, cols: torch.Tensor) -> None:
        m = int(marks.sum(-1).max())
        if m == 0:
            return
        # Stable sort puts each (row, head)'s sinks first, in column order; ragged counts become empty (-1) entries.
        order = marks.to(torch.int8).sort(dim=-1, descending=True, stable=True)
        idx, valid = order.indices[..., :m], order.values[..., :m].bool()
        d = ck.shape[-1]
        full = idx.unsqueeze(-1).expand(-1, -1, -1, d)
        self.sink_k = torch.cat([self.sink_k, ck.gather(2, full)], dim=2)
        self.sink_v = torch.cat([self.sink_v, cv.gather(2, full)], dim=2)
        new_cols = torch.where(valid, cols[idx].to(torch.int32), torch.full_like(idx, -1, dtype=torch.int32))
        self.sink_col = torch.cat([self.sink_col, new_cols], dim=2)

    def _locate_sinks(self) -> None:
        """Body slot (+1, slot 0 is scratch) of every sink; 0 for empty entries or sinks not in the body."""
        if self.sink_col.shape[2] == 0:
            self.sink_slot = torch.empty_like(self.sink_col, dtype=torch.long)
            return
        col = self.sink_col.long()
        sg = torch.div(col, self.group, rounding_mode="floor")
        where = torch.searchsorted(self.gid.long().contiguous(), sg.contiguous()).clamp_max(max(self.gid.shape[2] - 1, 0))
        found = (col >= 0) & (self.gid.long().gather(2, where) == sg)
        self.sink_slot = torch.where(found, 1 + where * self.group + col % self.group, torch.zeros_like(col))

    def _evict_groups(self) -> None:
        """Hybrid: keep the best ``capacity / G`` groups per (row, head); groups holding a sink stay."""
        assert self.capacity is not None
        keep_n = self.capacity // self.group
        b, h, ng = self.gid.shape
        sg = torch.div(self.sink_col.long(), self.group, rounding_mode="floor").masked_fill(self.sink_col < 0, -1)
        pinned = (sg.unsqueeze(2) == self.gid.long().unsqueeze(3)).any(-1)  # [B, H, ng]
        pad = self.ctx.pad_counts(b, self.gid.device).view(-1, 1, 1)
        all_pad = (self.gid.long() + 1) * self.group <= pad
        prio = self.gscore.masked_fill(pinned, _BIG).masked_fill(all_pad, -_BIG)
        keep = prio.argsort(dim=-1, descending=True, stable=True)[..., :keep_n].sort(dim=-1).values  # [B, H, keep_n]
        if bool((pinned.sum(-1) > keep_n).any()):
            raise RuntimeError(f"layer {self.layer_idx}: more sink groups than the hybrid budget holds")
        tok = (keep.unsqueeze(-1) * self.group + torch.arange(self.group, device=keep.device)).reshape(b, h, -1)
        self.k_codes, self.v_codes = _take(self.k_codes, tok), _take(self.v_codes, tok)
        self.v_scale, self.v_zero = _take(self.v_scale, tok), _take(self.v_zero, tok)
        self.k_scale, self.k_zero = _take(self.k_scale, keep), _take(self.k_zero, keep)
        self.gid, self.gscore = _take(self.gid, keep), _take(self.gscore, keep)
        self._check_padding_after_eviction()

    def _check_padding_after_eviction(self) -> None:
        pad = self.ctx.pad_counts(self.gid.shape[0], self.gid.device)
        if not bool((pad > 0).any()):
            return
        # The shared mask expects exactly max(0, held - real) pads per row, all first.
        held = self.body_len() + self.win_k.shape[2]
        expected = (held - (self.seen - pad)).clamp_min(0)
        cols = (self.gid.long().unsqueeze(-1) * self.group + torch.arange(self.group, device=pad.device)).flatten(2)
        in_window = (pad - self.win_start).clamp(0, self.win_k.shape[2])
        pads_held = (cols < pad.view(-1, 1, 1)).sum(-1) + in_window.view(-1, 1)  # [B, H]
        if bool((pads_held != expected.view(-1, 1)).any()):
            raise ValueError(
                "policy='hybrid' evicts whole quantized groups, which cannot keep a left-padded row's real tokens "
                "aligned with the padding mask when rows differ this much in length; use policy='evict' or "
                "'quantize' for this batch, or batch prompts of similar length"
            )

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest ``-tokens_to_remove`` tokens (assisted decoding); only inside the window."""
        n = self._crop_count(tokens_to_remove)
        if n == 0:
            return
        # Exact only while the removed tokens and the window that remains are unquantized
        # (true right after a forward, since compression runs one forward late).
        if n + min(self.policy.window, self.seen - n) > self.win_k.shape[2]:
            raise ValueError(
                f"crop({tokens_to_remove}) would need tokens that were already quantized "
                f"(window={self.policy.window}, {self.win_k.shape[2]} exact tokens held)"
            )
        self.win_k, self.win_v = self.win_k[:, :, :-n], self.win_v[:, :, :-n]
        self.seen -= n
        self.q_ring = None  # its positions no longer end at `seen`
