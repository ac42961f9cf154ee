"""``SinkCache``: the cache container users pass to ``model.generate(past_key_values=...)``."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from .context import TokenContext
from .layers import CompressingLayer, EvictingLayer, QuantizedLayer, check_head_dim
from .policies import EvictPolicy, FullPolicy, HybridPolicy, Policy, QuantizePolicy, make_policy
from .refine import RecentQueries
from .rope import Rotary
from .scores import Scorer, default_score
from .scores.observe import AttentionObserver
from .sinks import SINK_MODES, FirstSinks, NoSinks, PunctSinks, SinkSelector, punctuation_token_ids

#: Default cap on sinks per (row, kv-head, layer) for policies that evict.
DEFAULT_MAX_SINKS = 16

_FULL_TYPES = ("full_attention",)
_SLIDING_TYPES = ("sliding_attention", "chunked_attention")


class SinkCache(Cache):
    """A sink-aware compressing KV cache.

    Args:
        policy: ``"quantize"`` (default), ``"evict"``, ``"hybrid"``, ``"full"``, or a
            :class:`~sinkcache.policies.Policy` object.
        bits: quantization width (2, 4 or 8; default 4) for ``quantize``/``hybrid``.
        budget: tokens held per layer for ``evict``/``hybrid`` (sinks and window included).
        window: recent tokens kept exact (default 128 for quantization; ``min(256, budget // 2)``
            for eviction).
        positions: eviction only: ``"true"`` (default) keeps keys at their real positions;
            ``"shifted"`` re-rotates held keys to contiguous positions (StreamingLLM), for streams
            longer than the model's context. Needs ``model=``.
        score: eviction only: how held tokens are ranked (:mod:`sinkcache.scores`): ``"tova"``,
            ``"snapkv"``, ``"h2o"`` (attention read by forward hooks; need ``model=``), ``"keynorm"``
            (query-free), or a :class:`~sinkcache.scores.Scorer`. Default (``None``): ``"tova"``
            with ``model=`` (measured best, README "Eviction scores"), ``"keynorm"`` without it or
            with ``positions="shifted"``; ``describe()["score"]`` says which was built.
        group_size: tokens per key scale group and channels per value group (default 64).
        sinks: ``"first"`` (the default), ``"auto"``, ``"punct"``, ``"none"``, or a
            :class:`~sinkcache.sinks.SinkSelector`. ``None`` means ``"first"``, or the profile
            when ``profile=`` is given. ``"first"`` is the default because it was as good as
            measured sinks at the default window and costs nothing per step (docs/sinks.md:
            held-out perplexity at 2 bits, window 128: first 9.397, auto 9.389; auto decodes
            1.41x slower).
        n_first: how many leading tokens count as sinks (default 1, or the profile's own
            ``n_first`` with ``profile=``; StreamingLLM uses 4).
        max_sinks: cap on sinks per (row, kv-head, layer); default ``n_first`` for ``"first"``,
            16 for ``"punct"``/``"auto"`` under eviction, unlimited for pure quantization.
        model: the model; lets the cache read layer types (sliding layers stay uncompressed),
            token ids and the padding mask (needed for left-padded batches and ``"punct"``).
        tokenizer: lets ``"punct"``/``"auto"`` find punctuation/delimiter token ids.
        config: a model config, when ``model`` is not given (layer types).
        profile: a sink profile (built-in model name, JSON path or dict written by
            ``sinkcache profile``): sinks are chosen by token id per layer/head, at no runtime cost.
            Needs ``model=`` to see token ids.
        refine: quantize only: give the most attended share of every quantized block more bits
            (:mod:`sinkcache.refine`): a share in (0, 1] (e.g. ``0.1``) or a
            :class:`~sinkcache.refine.Refinement`; ``score="attention"`` (the default) needs ``model=``.

    Without ``model``/``config`` every layer is treated as full attention; without ``model`` the
    cache cannot see padding, so left-padded batches need ``model=``.
    """

    def __init__(
        self,
        policy: str | Policy = "quantize",
        *,
        bits: int | None = None,
        budget: int | None = None,
        window: int | None = None,
        group_size: int | None = None,
        positions: str | None = None,
        score: str | Scorer | None = None,
        sinks: str | SinkSelector | None = None,
        n_first: int | None = None,
        max_sinks: int | None = None,
        model: Any = None,
        tokenizer: Any = None,
        config: Any = None,
        profile: Any = None,
        refine: Any = None,
    ) -> None:
        if score is None and policy == "evict":
            # The measured default reads attention, which needs the model's attention modules.
            score = default_score(model is not None, positions)
        self.policy = make_policy(
            policy, bits=bits, budget=budget, window=window, group_size=group_size, positions=positions, score=score,
            refine=refine,
        )
        self._observer: AttentionObserver | None = None
        self._queries: RecentQueries | None = None
        plan = getattr(self.policy, "refine", None)
        if plan is not None and plan.needs_attention:
            if model is None:
                raise ValueError(
                    "refine score='attention' ranks tokens by the attention they draw, read through the model's "
                    "attention modules: pass model= to SinkCache (or refine=Refinement(share, score='keynorm'))"
                )
            self._queries = RecentQueries()
        if isinstance(self.policy, EvictPolicy) and self.policy.scorer().needs_attention:
            if model is None:
                raise ValueError(
                    f"score={self.policy.scorer().name!r} reads attention through the model's attention modules: "
                    "pass model= to SinkCache (or use score='keynorm', which needs no queries)"
                )
            self._observer = AttentionObserver()
        if profile is not None:
            if sinks not in (None, "profile"):
                raise ValueError(f"profile= selects sinks by token id; it cannot be combined with sinks={sinks!r}")
            from .sinks.profile import ProfileSinks

            # n_first=None: the profile's own n_first (it was measured with it).
            sel = ProfileSinks(profile, n_first=n_first, max_sinks=max_sinks)
            if max_sinks is None:
                sel.max_sinks = _default_cap(self.policy, sel.n_first)
            self.sink_selector: SinkSelector = sel
        else:
            sinks = "first" if sinks is None else sinks
            self.sink_selector = _make_sinks(self.policy, sinks, n_first, max_sinks, model, tokenizer)
        _check_budget(self.policy, self.sink_selector)
        self.ctx = TokenContext()
        self.ctx.keep_ids = self.sink_selector.needs_ids
        if model is not None and config is not None:
            raise ValueError("pass model= or config=, not both")
        self.config = getattr(model, "config", None) if model is not None else config
        if self.config is not None:
            _check_against_model(self.policy, self.config)
        self._hook = None
        self._model_ref = weakref.ref(model) if model is not None else None
        self._rotary = None
        if isinstance(self.policy, EvictPolicy) and self.policy.positions == "shifted":
            if model is None:
                raise ValueError("positions='shifted' needs model= (to re-rotate keys with the model's RoPE)")
            self._rotary = Rotary.from_model(model, layer_type="full_attention")
        if model is not None:
            self._attach(model)
            if hasattr(self.sink_selector, "attach"):
                self.sink_selector.attach(model, self)
            if self._observer is not None:
                self._observer.attach(model, self)
            if self._queries is not None:
                self._queries.attach(model, self)
        if self.config is not None:
            super().__init__(layers=[self._make_layer(i, t, kw) for i, (t, kw) in enumerate(_layer_types(self.config))])
        else:
            # Cache calls the factory with no arguments; the index of the layer being added is len(layers).
            factory = lambda: self._make_layer(len(self.layers), "full_attention", {})  # noqa: E731
            super().__init__(layer_class_to_replicate=factory)  # type: ignore[arg-type]

    # ---- construction -------------------------------------------------------------------------
    def _make_layer(self, idx: int, layer_type: str, kwargs: dict):
        if layer_type in _SLIDING_TYPES:
            # The model's own local window already bounds these; compressing them too would fight the
            # sliding mask. Keep transformers' layer as is.
            return DynamicSlidingWindowLayer(**kwargs)
        p = self.policy
        if isinstance(p, FullPolicy):
            return DynamicLayer()
        if isinstance(p, EvictPolicy):
            return EvictingLayer(p, self.sink_selector, self.ctx, idx, rotary=self._rotary)
        if isinstance(p, QuantizePolicy):  # HybridPolicy included
            return QuantizedLayer(p, self.sink_selector, self.ctx, idx)
        raise ValueError(f"policy {p!r} has no layer implementation")

    def _attach(self, model) -> None:
        """Forward pre-hook on the model: see each forward's token ids and padding mask.

        The hook holds the cache weakly and acts only when this cache is the one passed in, so one
        model can serve many caches (e.g. one per evaluation request).
        """
        ref = weakref.ref(self)

        def hook(module, args, kwargs):
            cache = ref()
            if cache is None:
                handle.remove()
                return None
            if kwargs.get("past_key_values") is not cache:
                return None
            ids = kwargs.get("input_ids", args[0] if args else None)
            seen = cache.get_seq_length()
            if ids is not None and ids.dim() == 2 and ids.shape[1] == 0 and seen == 0:
                raise ValueError("the model was given no tokens (input_ids of shape [B, 0]): the prompt is empty")
            cache.ctx.observe(ids, kwargs.get("attention_mask"), seen)
            return None

        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        self._hook = handle
        self.ctx.sees_inputs = True

    def detach(self) -> None:
        """Remove the model hook (done automatically when the cache is garbage-collected)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
            self.ctx.sees_inputs = False
        if hasattr(self.sink_selector, "detach"):
            self.sink_selector.detach()
        if self._observer is not None:
            self._observer.detach()
        if self._queries is not None:
            self._queries.detach()

    def __deepcopy__(self, memo):
        # Hook handles and the model are not copied: the copy attaches its own hooks to the same model,
        # so it keeps seeing token ids, padding and attention like the original.
        import copy

        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k in ("_hook", "_model_ref", "_observer", "_queries"):
                continue
            setattr(new, k, copy.deepcopy(v, memo))
        new._hook, new._model_ref = None, self._model_ref
        new._observer = None if self._observer is None else AttentionObserver()
        new._queries = None if self._queries is None else RecentQueries()
        model = self._model_ref() if self._model_ref is not None else None
        if model is not None:
            new._attach(model)
            if new._observer is not None:
                new._observer.attach(model, new)
            if new._queries is not None:
                new._queries.attach(model, new)
            if hasattr(new.sink_selector, "attach"):
                new.sink_selector._handles = []
                new.sink_selector.attach(model, new)
        return new

    # ---- Cache API ----------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.layer_class_to_replicate is None and layer_idx >= len(self.layers):
            raise ValueError(
                f"layer_idx={layer_idx} but this cache was built for {len(self.layers)} layers: "
                "it belongs to a different model"
            )
        if key_states.shape[0] > 1 and not self.ctx.sees_inputs and not isinstance(self.policy, FullPolicy):
            layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
            if layer is None or (isinstance(layer, CompressingLayer) and not layer.is_initialized):
                # Without the attention mask a left-padded row's pads would count as its first tokens
                # (its sinks, its positions): a silently different answer from running the row alone.
                raise ValueError(
                    f"a batch of {key_states.shape[0]} rows needs SinkCache(model=model): without it the cache cannot "
                    "see the padding mask, and left-padded rows would be compressed as if their pads were tokens "
                    "(or run one row at a time)"
                )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.ctx.reset()
        self.sink_selector.reset()

    def compress(self) -> None:
        """Run compression that is pending (layers compress one forward after tokens arrive)."""
        for layer in self.layers:
            if isinstance(layer, CompressingLayer):
                layer.compress()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.ctx.reorder(beam_idx)
        self.sink_selector.reorder(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        rows = torch.as_tensor(indices).reshape(-1)
        if rows.dtype == torch.bool:
            rows = rows.nonzero().reshape(-1)
        self.ctx.reorder(rows)
        self.sink_selector.reorder(rows)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.ctx.repeat_interleave(repeats)
        self.sink_selector.repeat_interleave(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.ctx.crop(self.get_seq_length())

    # ---- accounting ---------------------------------------------------------------------------
    def _full_layers(self) -> list:
        return [layer for layer in self.layers if not getattr(layer, "is_sliding", False)]

    def memory_bytes(self) -> int:
        """Bytes actually held: packed codes + scales/zeros + full-precision parts + metadata.

        Runs pending compression first (it would run at the next forward anyway)."""
        self.compress()
        return sum(_layer_bytes(layer) for layer in self.layers)

    def dense_bytes(self) -> int:
        """What ``DynamicCache`` would hold for the same tokens, in the model dtype."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, CompressingLayer):
                total += layer.dense_bytes()
            else:
                total += _layer_bytes(layer)
        return total

    def describe(self) -> dict[str, Any]:
        """The configuration this cache was really built with, read back from its parts.

        ``{"policy": name, "policy_class", <every policy field: bits, window, group_size, budget,
        positions>, "sinks": selector name, "sink_selector": class, "n_first", "max_sinks",
        "sink_threshold" (measured sinks only), "layers", "sliding_layers"}``. Results record
        this, not the options that were asked for, so a label can never outlive its meaning.
        """
        import dataclasses

        p, sel = self.policy, self.sink_selector
        out: dict[str, Any] = {"policy": p.name, "policy_class": type(p).__name__}
        for f in ("bits", "window", "group_size", "budget", "positions", "score"):
            out[f] = getattr(p, f, None)
        if dataclasses.is_dataclass(p):
            out.update({f.name: getattr(p, f.name) for f in dataclasses.fields(p)})
        if isinstance(p, EvictPolicy):
            out["score"] = p.scorer().name  # a Scorer object is recorded by its name
            out["scorer"] = repr(p.scorer())
        elif isinstance(p, HybridPolicy):
            out["score"] = "keynorm"  # hybrid ranks whole groups by their mean key-norm score
        if isinstance(p, QuantizePolicy):
            r = p.refine
            out["refine"] = None if r is None else {"share": r.share, "bits": r.bits, "score": r.score}
        out.update(
            sinks=sel.name,
            sink_selector=type(sel).__name__,
            n_first=sel.n_first,
            max_sinks=sel.max_sinks,
            sink_threshold=getattr(sel, "threshold", None),
            layers=len(self.layers),
            sliding_layers=sum(bool(getattr(layer, "is_sliding", False)) for layer in self.layers),
        )
        return out

    def stats(self) -> dict[str, Any]:
        """Tokens seen/held, sinks per layer, bytes and compression ratio, and :meth:`describe`."""
        self.compress()
        full = self._full_layers()
        held = [layer.held() if isinstance(layer, CompressingLayer) else layer.get_seq_length() for layer in full]
        mem, dense = self.memory_bytes(), self.dense_bytes()
        return {
            "policy": self.policy.name,
            "policy_config": repr(self.policy),
            "sinks": self.sink_selector.name,
            "tokens_seen": self.get_seq_length(),
            "tokens_held": max(held) if held else 0,
            "sinks_per_layer": [
                round(layer.sink_count(), 3) if isinstance(layer, CompressingLayer) else 0.0 for layer in self.layers
            ],
            "layers": len(self.layers),
            "sliding_layers": sum(bool(getattr(layer, "is_sliding", False)) for layer in self.layers),
            "memory_bytes": mem,
            "dense_bytes": dense,
            "compression_ratio": (dense / mem) if mem else 1.0,
            "config": self.describe(),
        }

    def __repr__(self) -> str:
        return f"SinkCache(policy={self.policy!r}, sinks={self.sink_selector!r}, layers={len(self.layers)})"


def _layer_bytes(layer) -> int:
    if isinstance(layer, CompressingLayer):
        return layer.memory_bytes()
    total = 0
    for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def _check_against_model(policy: Policy, config: Any) -> None:
    """What the model's config already decides about the options: raise now, not at the first forward."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    window = getattr(policy, "window", None)
    ctx_len = getattr(cfg, "max_position_embeddings", None)
    if window is not None and isinstance(ctx_len, int) and window > ctx_len:
        # A window the model can never fill: the cache would hold everything exactly and compress nothing.
        raise ValueError(
            f"window={window} exceeds the model's context (max_position_embeddings={ctx_len}): nothing would ever "
            f"be compressed; allowed: window <= {ctx_len} (policy='full' keeps everything)"
        )
    if isinstance(policy, QuantizePolicy):
        heads = getattr(cfg, "num_attention_heads", None)
        d = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else None)
        if isinstance(d, int):
            check_head_dim(policy, d)


def _layer_types(config) -> list[tuple[str, dict]]:
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * n
    out: list[tuple[str, dict]] = []
    for t in types:
        if t in _FULL_TYPES:
            out.append((t, {}))
        elif t in _SLIDING_TYPES:
            window = cfg.sliding_window if t == "sliding_attention" else cfg.attention_chunk_size
            out.append((t, {"sliding_window": window}))
        else:
            raise ValueError(
                f"model type {getattr(cfg, 'model_type', '?')!r} has a {t!r} layer; SinkCache supports "
                f"{', '.join(_FULL_TYPES + _SLIDING_TYPES)} layers"
            )
    return out


def _make_sinks(policy: Policy, sinks, n_first: int | None, max_sinks: int | None, model, tokenizer) -> SinkSelector:
    if isinstance(sinks, SinkSelector):
        if n_first is not None or max_sinks is not None:
            raise ValueError("pass n_first/max_sinks to the SinkSelector object, not alongside it")
        return sinks
    if sinks not in SINK_MODES:
        raise ValueError(f"sinks={sinks!r} is unknown; allowed: {', '.join(SINK_MODES)}")
    if max_sinks is not None and (isinstance(max_sinks, bool) or not isinstance(max_sinks, int) or max_sinks < 0):
        raise ValueError(f"max_sinks={max_sinks!r} must be None or an integer >= 0")
    if sinks == "none":
        # Asking for sinks while turning them off is a contradiction, not a default to ignore.
        if n_first not in (None, 0) or max_sinks not in (None, 0):
            raise ValueError(
                f"sinks='none' keeps no sinks; n_first={n_first!r}, max_sinks={max_sinks!r} do not apply "
                "(leave them unset, or choose sinks='first')"
            )
        return NoSinks()
    n_first = 1 if n_first is None else n_first
    if sinks == "first":
        if max_sinks is not None and max_sinks != n_first:
            raise ValueError(f"sinks='first' keeps exactly n_first={n_first} sinks; max_sinks={max_sinks} does not apply")
        return FirstSinks(n_first)
    cap = max_sinks if max_sinks is not None else _default_cap(policy, n_first)
    if sinks == "punct":
        if tokenizer is None:
            raise ValueError("sinks='punct' needs tokenizer= (to know which token ids are punctuation)")
        return PunctSinks(punctuation_token_ids(tokenizer), n_first=n_first, max_sinks=cap)
    # "auto": measured sinks when the cache can see the model; the first token otherwise.
    from .sinks.auto import make_auto_sinks

    return make_auto_sinks(n_first=n_first, max_sinks=cap, model=model, tokenizer=tokenizer)


def _default_cap(policy: Policy, n_first: int) -> int | None:
    """Default ``max_sinks``: unlimited when nothing is evicted; else 16, or what the budget allows."""
    if isinstance(policy, HybridPolicy):
        room = policy.body_capacity() // policy.group_size - 1  # a sink pins its group
        return max(n_first, min(DEFAULT_MAX_SINKS, room))
    if isinstance(policy, EvictPolicy):
        return max(n_first, min(DEFAULT_MAX_SINKS, policy.budget - policy.window))
    return None


def _check_budget(policy: Policy, sinks: SinkSelector) -> None:
    if isinstance(policy, EvictPolicy):
        if sinks.max_sinks is None:
            raise ValueError("policy='evict' needs a finite max_sinks")
        if policy.budget < policy.window + sinks.max_sinks:
            raise ValueError(
                f"budget={policy.budget} is smaller than window={policy.window} + sinks={sinks.max_sinks}; "
                f"allowed: budget >= {policy.window + sinks.max_sinks}"
            )
    if isinstance(policy, HybridPolicy):
        if sinks.max_sinks is None:
            raise ValueError("policy='hybrid' needs a finite max_sinks")
        groups = policy.body_capacity() // policy.group_size
        if groups < sinks.max_sinks + 1:
            need = policy.window + policy.group_size - 1 + (sinks.max_sinks + 1) * policy.group_size
            raise ValueError(
                f"budget={policy.budget} holds {groups} quantized groups, fewer than max_sinks={sinks.max_sinks} + 1 "
                f"(a sink pins its group); allowed: budget >= {need}, or fewer sinks"
            )
