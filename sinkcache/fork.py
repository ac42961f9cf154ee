"""Prefill once, fork into many caches: score N policies from one forward over the prompt.

Every in-package policy attends the prompt at full precision and compresses one forward later
(:meth:`~sinkcache.layers.CompressingLayer.compress`), so the prompt's forward is the same for all
of them. :class:`SharedPrefill` runs that forward once through a *recording* cache (it keeps the
full-precision keys/values, the token context and, when asked, what ``sinks="auto"`` measures in
that forward), and :meth:`SharedPrefill.fork_into` loads the recording into a fresh
:class:`~sinkcache.SinkCache` of any policy, exactly as if that cache had run the forward itself.
The fork then compresses, scores and generates on its own.

Equality with running each policy alone is a tested property (``tests/test_fork.py``): same
loglikelihoods and same generated tokens. This is evaluation tooling; ``import sinkcache`` does not
load it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch

from .attention import CacheHooks, project_q
from .cache import SinkCache
from .layers import CompressingLayer, EvictingLayer, QuantizedLayer
from .policies import QuantizePolicy
from .refine import OBS_QUERIES
from .scores.observe import attention_received
from .sinks import NoSinks
from .sinks.auto import AutoSinks

__all__ = ["SharedPrefill", "detector_config", "fresh_detector", "prefill_needs"]


def detector_config(sel: Any) -> tuple | None:
    """What an :class:`~sinkcache.sinks.AutoSinks` measures depends on (not ``max_sinks``: the
    layers apply that cap when they mark). ``None`` for selectors that measure nothing."""
    if not isinstance(sel, AutoSinks):
        return None
    punct = None if sel.punct_ids is None else tuple(int(i) for i in sel.punct_ids.tolist())
    return (sel.n_first, sel.threshold, sel.obs_window, sel.context, sel.bank_size, sel.min_ratio, punct)


def prefill_needs(caches: Iterable[Any], names: Iterable[str] | None = None) -> tuple[AutoSinks | None, tuple, bool]:
    """What one recorded forward must measure to serve ``caches``: a template of their common
    ``sinks="auto"`` detector (``None`` if none uses it), the query counts their attention scorers
    read at prefill, and whether any ranks refinement by attention (it needs the prompt's last
    queries). Raises if two detectors are configured differently (they cannot share)."""
    caches = list(caches)
    labels = list(names) if names is not None else [str(i) for i in range(len(caches))]
    found: dict[tuple, tuple[str, AutoSinks]] = {}
    queries: dict[int | None, None] = {}
    refine_queries = False
    for label, c in zip(labels, caches, strict=True):
        cfg = detector_config(c.sink_selector)
        if cfg is not None:
            found.setdefault(cfg, (label, c.sink_selector))
        scorer = c.policy.scorer() if hasattr(c.policy, "scorer") else None
        if scorer is not None and scorer.needs_attention:
            queries[scorer.queries] = None
        plan = getattr(c.policy, "refine", None)
        refine_queries = refine_queries or (plan is not None and plan.needs_attention)
    if len(found) > 1:
        raise ValueError(f"members' sink detectors differ ({', '.join(n for n, _ in found.values())}); they cannot share a prefill")
    return (next(iter(found.values()))[1] if found else None), tuple(queries), refine_queries


def fresh_detector(template: AutoSinks | None) -> AutoSinks | None:
    """A detector configured like ``template`` with no measurements and no hooks (one per prefill)."""
    if template is None:
        return None
    d = copy.copy(template)
    d.state, d._handles = {}, []
    return d


class SharedPrefill(CacheHooks):
    """One prompt forward recorded for many caches.

    Args:
        model: the model the forks will run with.
        detector: an :class:`~sinkcache.sinks.AutoSinks` configured like the forks' (its
            measurements are copied into every fork whose selector has the same
            :func:`detector_config`); ``None`` when no fork uses ``sinks="auto"``.

    Usage::

        shared = SharedPrefill(model, detector=AutoSinks(...))
        model(input_ids=ids, attention_mask=mask, past_key_values=shared.cache, use_cache=True)
        for options in policies:
            cache = SinkCache(**options, model=model, tokenizer=tok)
            shared.fork_into(cache)   # as if ``cache`` had run that forward
            cache.compress()
    """

    def __init__(
        self, model: Any, *, detector: AutoSinks | None = None, score_queries: Iterable[int | None] = (), refine_queries: bool = False
    ) -> None:
        sel = detector if detector is not None else NoSinks()
        # A quantizing cache that never compresses before fork_into: its layers hold the forward's
        # keys/values exactly (window + nothing flushed) and give the detector its hooks.
        self.cache = SinkCache(QuantizePolicy(bits=8), sinks=sel, model=model)
        self.cache.ctx.keep_ids = True  # forks with id-based selectors (punct, profile) need them
        self.detector = detector
        self._config = detector_config(detector)
        # Attention scorers of the forks (score="tova"/"snapkv"/"h2o") read the prompt's attention in
        # its own forward; record it once per distinct query count they read (None: every query).
        self.score_queries = tuple(dict.fromkeys(score_queries))
        self.attention: dict[int, dict[int | None, tuple[torch.Tensor, torch.Tensor]]] = {}
        # Forks that rank refinement by attention keep the prompt's last OBS_QUERIES queries (their
        # RecentQueries hooks would have caught them in this forward): record them once per layer.
        self.refine_queries = bool(refine_queries)
        self.queries: dict[int, tuple[torch.Tensor, float]] = {}
        if self.score_queries or self.refine_queries:
            self.attach(model, self.cache)

    def on_forward(self, idx: int, module: Any, cache: Any, hs: torch.Tensor | None, pe: Any) -> None:
        """(CacheHooks) Record the attention the prompt's last queries give its keys, per layer."""
        layer = cache.layers[idx]
        if not isinstance(layer, QuantizedLayer):
            return  # a sliding layer: never evicted by an EvictingLayer
        if hs is None or pe is None:
            raise RuntimeError(f"{type(module).__name__} passes no hidden_states/position_embeddings: attention scorers cannot fork")
        b, t = hs.shape[0], hs.shape[1]
        if self.refine_queries:
            self.queries[idx] = (project_q(module, hs, pe[0], pe[1], min(OBS_QUERIES, t)), float(module.scaling))
        pos = torch.arange(t, device=hs.device, dtype=torch.int32).view(1, 1, t).expand(b, layer.win_k.shape[1], t)
        pad = cache.ctx.pad_counts(b, hs.device)
        for nq in self.score_queries:
            w = t if nq is None else min(nq, t)
            q = project_q(module, hs, pe[0], pe[1], w)
            cols = torch.arange(t - w, t, device=hs.device)
            self.attention.setdefault(idx, {})[nq] = attention_received(q, layer.win_k, pos, cols, pad, module.scaling, newest=True)

    def close(self) -> None:
        """Remove the recording cache's hooks from the model."""
        self.cache.detach()
        self.detach()

    def fork_into(self, cache: SinkCache) -> SinkCache:
        """Load the recorded forward into ``cache`` (fresh, built for the same model); returns it.

        ``cache`` holds exactly what it would hold had it run the forward itself: the full-precision
        keys/values pending compression, the token context, and the detector's measurements.
        """
        rec = self.cache
        if rec.get_seq_length() == 0:
            raise ValueError("nothing recorded: run the prompt's forward with past_key_values=shared.cache first")
        if cache.get_seq_length() != 0:
            raise ValueError(f"fork_into needs a fresh cache; this one has seen {cache.get_seq_length()} tokens")
        if len(cache.layers) not in (0, len(rec.layers)):
            raise ValueError(f"cache has {len(cache.layers)} layers, the recorded forward {len(rec.layers)}")
        sel_cfg = detector_config(cache.sink_selector)
        if sel_cfg is not None and sel_cfg != self._config:
            raise ValueError(
                f"the fork's sink detector is configured {sel_cfg}, the recorded one {self._config}: "
                "its measurements would differ (build SharedPrefill with the same detector settings)"
            )
        # Token context first: layers read padding (and the shifted-position layer reads it in update).
        cache.ctx.pad = None if rec.ctx.pad is None else rec.ctx.pad.clone()
        if cache.ctx.keep_ids and rec.ctx.ids is not None:
            cache.ctx.ids = rec.ctx.ids.clone()
        if sel_cfg is not None:
            # Deep copy: decoding adds to these measurements in place.
            cache.sink_selector.state = copy.deepcopy(self.detector.state)  # type: ignore[union-attr,attr-defined]
        for i, layer in enumerate(rec.layers):
            if isinstance(layer, QuantizedLayer):
                cache.update(layer.win_k, layer.win_v, i)  # new tensors: the fork never aliases the recording
                self._feed_scores(cache.layers[i], i, layer.win_k.shape[2])
                self._feed_queries(cache.layers[i], i)
            elif isinstance(layer, CompressingLayer):  # pragma: no cover - the recorder only builds QuantizedLayer
                raise TypeError(f"unexpected recording layer {type(layer).__name__}")
            else:
                # A sliding layer (kept as transformers' layer by every policy): it already holds what
                # it keeps; its update never writes in place, so a shallow copy is independent.
                if i < len(cache.layers):
                    cache.layers[i] = copy.copy(layer)
                else:
                    cache.layers.append(copy.copy(layer))
        return cache

    def _feed_scores(self, layer: Any, idx: int, t: int) -> None:
        """Give an attention-scored fork layer the prompt attention it would have measured itself."""
        scorer = getattr(layer, "scorer", None)
        if not isinstance(layer, EvictingLayer) or scorer is None or not scorer.needs_attention:
            return
        got = self.attention.get(idx, {})
        if scorer.queries not in got:
            raise ValueError(
                f"the fork scores with {scorer!r}, which reads {scorer.queries or 'all'} queries, but the recorded "
                f"forward measured {list(got) or 'no attention'}: build SharedPrefill with score_queries including it"
            )
        attn, nq = got[scorer.queries]
        layer.observe_attention(attn.clone(), nq.clone(), t)

    def _feed_queries(self, layer: Any, idx: int) -> None:
        """Give a fork layer that ranks refinement by attention the prompt queries its hooks would have kept."""
        wants = getattr(layer, "wants_queries", None)
        if wants is None or not wants():
            return
        if idx not in self.queries:
            raise ValueError(
                "the fork ranks refinement by attention but the recorded forward kept no queries: "
                "build SharedPrefill with refine_queries=True"
            )
        q, scaling = self.queries[idx]
        layer.push_queries(q.clone(), scaling)

    def matches(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> bool:
        """Whether the recorded forward saw ``input_ids`` ``[B, T]`` (and the padding of ``attention_mask``)."""
        ctx = self.cache.ctx
        ids = ctx.ids
        if ids is None or ids.shape != input_ids.shape or not bool(torch.equal(ids.to(input_ids.device), input_ids)):
            return False
        if attention_mask is not None:
            pad = (attention_mask.to(torch.long).cumsum(-1) == 0).sum(-1)
            rec = ctx.pad if ctx.pad is not None else torch.zeros_like(pad)
            return bool(torch.equal(rec.to(pad.device), pad))
        return True
