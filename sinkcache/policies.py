"""Compression policies: small frozen objects that say how a full-attention layer is compressed.

A policy validates its own knobs and builds the per-layer cache object. Which tokens are sinks is
a separate object (:mod:`sinkcache.sinks`), so every policy has a sink-aware and a sink-blind form.

=========  =====================================================================================
full       keep everything at model precision (reference; equals ``DynamicCache``)
evict      keep sinks + the recent ``window`` + the best-scored tokens, ``budget`` tokens in all
quantize   KIVI: keys per-channel, values per-token, ``bits`` wide; recent ``window`` unquantized
hybrid     quantize as above, and evict whole quantized groups once past ``budget`` tokens
=========  =====================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .quant import check_bits
from .refine import Refinement, make_refinement
from .scores import Scorer, make_scorer

POLICY_NAMES = ("full", "evict", "quantize", "hybrid")
POSITION_MODES = ("true", "shifted")


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return value


@dataclass(frozen=True)
class Policy:
    """Base class. ``name`` is the string users pass as ``policy=``."""

    name = "base"

    def budget_tokens(self) -> int | None:
        """Most tokens a layer holds, or None when unbounded."""
        return None


@dataclass(frozen=True)
class FullPolicy(Policy):
    """No compression."""

    name = "full"


@dataclass(frozen=True)
class EvictPolicy(Policy):
    """Keep at most ``budget`` tokens: sinks and the last ``window`` always, the rest by score.

    ``positions="shifted"`` re-rotates held keys to contiguous positions ending at the newest token
    (StreamingLLM), so query-key distances never exceed the budget and generation can run far past
    the model's trained context; ``"true"`` (default) keeps each key at its real position.

    ``score`` names the eviction scorer (:mod:`sinkcache.scores`): ``"keynorm"`` (the object's
    default; the negative L2 norm of the key, query-free, works without ``model=``), ``"tova"``,
    ``"snapkv"`` or ``"h2o"`` (attention-scored; need ``model=``), or a
    :class:`~sinkcache.scores.Scorer` object. ``SinkCache(policy="evict", model=...)`` without a
    score picks ``"tova"`` (:func:`sinkcache.scores.default_score`).
    """

    budget: int
    window: int = 0
    positions: str = "true"
    score: Any = "keynorm"
    name = "evict"

    def __post_init__(self) -> None:
        _check_int("budget", self.budget, 1)
        _check_int("window", self.window, 0)
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions={self.positions!r} is unknown; allowed: {', '.join(POSITION_MODES)}")
        if self.window > self.budget:
            raise ValueError(f"window={self.window} exceeds budget={self.budget}; allowed: window <= budget")
        scorer = make_scorer(self.score)  # validates the name
        if scorer.needs_attention and self.positions == "shifted":
            raise ValueError(
                f"score={scorer.name!r} reads attention over keys at their real positions; "
                "positions='shifted' re-rotates them (use score='keynorm')"
            )

    def scorer(self) -> Scorer:
        """A fresh scorer object (one per layer)."""
        return make_scorer(self.score) if isinstance(self.score, str) else self.score

    def budget_tokens(self) -> int | None:
        return self.budget


@dataclass(frozen=True)
class QuantizePolicy(Policy):
    """KIVI-style quantization; the newest ``window``..``window + group_size - 1`` tokens stay exact.

    Tokens are quantized once, ``group_size`` at a time, when they leave the window.
    ``refine`` (a :class:`~sinkcache.refine.Refinement`, or its share as a number) gives the most
    attended share of each quantized block more bits (:mod:`sinkcache.refine`); ``None``: none.
    """

    bits: int = 4
    window: int = 128
    group_size: int = 64
    refine: Any = None
    name = "quantize"

    def __post_init__(self) -> None:
        check_bits(self.bits)
        _check_int("window", self.window, 0)
        _check_int("group_size", self.group_size, 1)
        object.__setattr__(self, "refine", make_refinement(self.refine))
        if self.refine is not None and self.bits + self.refine.bits > 8:
            raise ValueError(
                f"bits={self.bits} + refine bits={self.refine.bits} exceeds 8; allowed: bits + refine bits <= 8"
            )


@dataclass(frozen=True)
class HybridPolicy(QuantizePolicy):
    """Quantize like :class:`QuantizePolicy`, and keep at most ``budget`` tokens by evicting whole
    quantized groups with the lowest mean key-norm score. Groups holding a sink are never evicted.
    """

    budget: int = 1024
    name = "hybrid"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("budget", self.budget, 1)
        if self.refine is not None:
            raise ValueError("refine= is supported with policy='quantize' only (hybrid evicts the groups it would refine)")
        if self.window > self.budget:
            raise ValueError(f"window={self.window} exceeds budget={self.budget}; allowed: window <= budget")
        if self.body_capacity() < self.group_size:
            raise ValueError(
                f"budget={self.budget} leaves no room for a quantized group: hybrid needs "
                f"budget >= window + 2*group_size - 1 = {self.window + 2 * self.group_size - 1}"
            )

    def body_capacity(self) -> int:
        """Tokens the quantized body may hold: the window grows up to ``window + group_size - 1``
        between flushes, and the total must stay within ``budget`` at all times."""
        room = self.budget - self.window - self.group_size + 1
        return max(room, 0) // self.group_size * self.group_size

    def budget_tokens(self) -> int | None:
        return self.budget


#: The knobs each named policy takes (any other must be left unset).
POLICY_KNOBS: dict[str, tuple[str, ...]] = {
    "full": (),
    "evict": ("budget", "window", "positions", "score"),
    "quantize": ("bits", "window", "group_size", "refine"),
    "hybrid": ("bits", "budget", "window", "group_size"),
}


def make_policy(
    policy: str | Policy = "quantize",
    *,
    bits: int | None = None,
    budget: int | None = None,
    window: int | None = None,
    group_size: int | None = None,
    positions: str | None = None,
    score: str | Scorer | None = None,
    refine: float | Refinement | None = None,
) -> Policy:
    """Build a policy from its name and knobs; knobs a policy does not use must be left unset."""
    if isinstance(policy, Policy):
        loose = dict(
            bits=bits, budget=budget, window=window, group_size=group_size, positions=positions, score=score, refine=refine
        )
        given = {k: v for k, v in loose.items() if v is not None}
        if given:
            raise ValueError(f"pass knobs inside the policy object, not alongside it: {sorted(given)}")
        return policy
    if policy not in POLICY_NAMES:
        raise ValueError(f"policy={policy!r} is unknown; allowed: {', '.join(POLICY_NAMES)}")
    knobs = {
        "bits": bits, "budget": budget, "window": window, "group_size": group_size, "positions": positions, "score": score,
        "refine": refine,
    }
    used = POLICY_KNOBS[policy]
    unused = sorted(k for k, v in knobs.items() if v is not None and k not in used)
    if unused:
        raise ValueError(f"policy={policy!r} does not use {', '.join(unused)}; it takes: {', '.join(used) or 'nothing'}")
    kwargs: dict = {k: v for k in used if (v := knobs[k]) is not None}
    if policy == "full":
        return FullPolicy()
    if policy == "evict":
        if budget is None:
            raise ValueError("policy='evict' needs budget= (tokens kept per layer)")
        kwargs.setdefault("window", min(256, budget // 2))
        return EvictPolicy(**kwargs)
    if policy == "quantize":
        return QuantizePolicy(**kwargs)
    if budget is None:
        raise ValueError("policy='hybrid' needs budget= (tokens kept per layer)")
    return HybridPolicy(**kwargs)
