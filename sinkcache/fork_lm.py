"""An lm-eval model that scores several in-package policies from one prefill per request.

:class:`ForkLM` wraps *member* models (:class:`~sinkcache.evaluation.SinkCacheLM` or a subclass
such as ``FractionLM``, all sharing one loaded model). lm-eval runs once with it (the *record*
pass): for each request the prompt's forward runs once through a
:class:`~sinkcache.fork.SharedPrefill`, and every member then compresses, scores or generates from
its own fork of that forward, exactly as it would alone (its own ``_score_batch`` /
``_model_generate`` with the forward replaced by the fork). Each member's answers are kept by
request content; lm-eval then runs again per member in *replay* mode (:meth:`ForkLM.use`), which
answers from those tables, so every member's metrics, filters and logged samples come from lm-eval
itself. Streaming perplexity compresses after every chunk, so its members share nothing: each streams
on its own during the record pass.

Usage::

    members = {"kivi": FractionLM(model, tokenizer=tok, policy="quantize", bits=2, sinks="none"), ...}
    fork = ForkLM(members)
    results = fork.run_all(lambda lm: lm_eval.simple_evaluate(model=lm, tasks=..., ...))
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from .evaluation import SinkCacheLM
from .fork import SharedPrefill, fresh_detector, prefill_needs

__all__ = ["ForkLM"]


class ForkLM(SinkCacheLM):
    """Members' answers from one prefill per request (see the module docstring).

    Args:
        members: name -> member model; all must share one model object and tokenizer (and be built
            with the same ``max_length``/``batch_size``). Members whose ``sinks="auto"`` detectors
            are configured differently cannot share a prefill (``ValueError``).
    """

    def __init__(self, members: dict[str, SinkCacheLM]) -> None:
        if not members:
            raise ValueError("ForkLM needs at least one member")
        first = next(iter(members.values()))
        for name, m in members.items():
            if not isinstance(m, SinkCacheLM):
                raise TypeError(f"member {name!r} is a {type(m).__name__}, not a SinkCacheLM")
            if m.model is not first.model or m.tokenizer is not first.tokenizer:
                raise ValueError(f"member {name!r} has its own model or tokenizer; members must share one")
            if m.max_length != first.max_length or int(m.batch_size) != int(first.batch_size):
                raise ValueError(f"member {name!r} differs in max_length/batch_size from {next(iter(members))!r}")
        super().__init__(
            pretrained=first.model, tokenizer=first.tokenizer, policy="full", device=str(first.device),
            batch_size=int(first.batch_size), max_length=first.max_length,
        )
        self.members = dict(members)
        self.names = list(members)
        self._detector, self._score_queries, self._refine_queries = self._prefill_needs()
        self.answers: dict[str, dict[tuple, Any]] = {n: {} for n in self.names}
        self.current = self.names[0]  # the member whose answers lm-eval receives
        self.replaying = False  # False: the record pass (every member runs, one prefill per request)
        self.timing: dict[str, Any] = {"shared_prefill_s": 0.0, "prefills": 0, "member_s": {n: 0.0 for n in self.names}}

    def _prefill_needs(self) -> tuple:
        """(detector template, score query counts) from a probe cache of every member."""
        probes = [m.make_cache() for m in self.members.values()]
        try:
            return prefill_needs(probes, self.names)
        finally:
            for c in probes:
                c.detach()

    # ---- passes -----------------------------------------------------------------------------------
    def run_all(self, evaluate: Callable[[ForkLM], Any]) -> dict[str, Any]:
        """``{name: evaluate(self)}`` with ``self`` answering as each member in turn: the first call
        records every member's answers (one prefill per request), the others replay them."""
        out = {}
        for i, name in enumerate(self.names):
            self.current, self.replaying = name, i > 0
            out[name] = evaluate(self)
        self.current, self.replaying = self.names[0], False
        return out

    def _pad_quantum(self) -> int:
        q = 1
        for m in self.members.values():
            q = math.lcm(q, m._pad_quantum())
        return q

    @property
    def kv_memory(self) -> dict[str, Any]:
        return self.members[self.current].kv_memory

    @property
    def built_cache(self) -> dict[str, Any]:
        return self.members[self.current].built_cache

    def _lookup(self, key: tuple) -> Any:
        try:
            return self.answers[self.current][key]
        except KeyError:
            raise RuntimeError(
                f"member {self.current!r} has no recorded answer for this request: the replay pass must see "
                "the same requests as the record pass (same tasks, limit and seed)"
            ) from None

    def _for_members(self, fn) -> dict[str, Any]:
        out = {}
        for name, m in self.members.items():
            m._task = self._task
            t0 = time.perf_counter()
            out[name] = fn(m)
            self.timing["member_s"][name] += time.perf_counter() - t0
        return out

    def _shared_prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> SharedPrefill:
        t0 = time.perf_counter()
        shared = SharedPrefill(self.model, detector=fresh_detector(self._detector), score_queries=self._score_queries, refine_queries=self._refine_queries)
        if ids.shape[1]:
            self._prefill_forward(shared.cache, ids, mask)
        self.timing["shared_prefill_s"] += time.perf_counter() - t0
        self.timing["prefills"] += 1
        return shared

    def _fan_out(self, ids: torch.Tensor, mask: torch.Tensor, call: Callable[[SinkCacheLM], Any]) -> dict[str, Any]:
        """``call(member)`` for every member, each prefilling from one recorded forward of ``ids``
        ``[B, T]`` (a member's own ``_prefill`` loads the fork; nothing to share when ``T == 0``)."""
        shared = self._shared_prefill(ids, mask)

        def run(m):
            m._shared = shared if ids.shape[1] else None
            try:
                return call(m)
            finally:
                m._shared = None

        try:
            return self._for_members(run)
        finally:
            shared.close()

    # ---- loglikelihood ----------------------------------------------------------------------------
    def _score_batch(self, contexts, rows):
        keys = [("ll", tuple(contexts[g]), tuple(cont)) for g, (_, _, cont) in rows]
        if self.replaying:
            return [self._lookup(k) for k in keys]
        ids, mask = self._prompt_batch(contexts)
        outs = self._fan_out(ids, mask, lambda m: m._score_batch(contexts, rows))
        for name, res in outs.items():
            self.answers[name].update(zip(keys, res, strict=True))
        return outs[self.current]

    # ---- rolling loglikelihood --------------------------------------------------------------------
    def stream_loglikelihood(self, tokens, chunk_size=None):
        key = ("roll", tuple(tokens), chunk_size)
        if self.replaying:
            return self._lookup(key)
        outs = self._for_members(lambda m: m.stream_loglikelihood(tokens, chunk_size))
        for name, res in outs.items():
            self.answers[name][key] = res
        return outs[self.current]

    # ---- generation -------------------------------------------------------------------------------
    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        mask = generation_kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(context)
        key = ("gen", tuple(map(tuple, context.tolist())), tuple(map(tuple, mask.tolist())), int(max_length), tuple(stop or ()))
        if self.replaying:
            return self._lookup(key).to(context.device)
        outs = self._fan_out(context[:, :-1], mask[:, :-1], lambda m: m._model_generate(context, max_length, stop, **dict(generation_kwargs)))
        for name, res in outs.items():
            self.answers[name][key] = res.detach().cpu()
        return outs[self.current]
