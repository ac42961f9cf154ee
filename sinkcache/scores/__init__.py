"""Eviction scorers: one file per scorer, behind :class:`~sinkcache.scores.base.Scorer`.

==========  ========================================================================  ============
name        a held token's score                                                      needs
==========  ========================================================================  ============
keynorm     ``-||k||`` at arrival (Devoto et al.); query-free                          nothing
tova        attention from the newest query, replaced every forward (TOVA)            ``model=``
tova-pooled the same, averaged over the layer's heads per token (TOVA paper, kvpress)   ``model=``
snapkv      mean attention from the last 32 queries, pooled at prefill (SnapKV)       ``model=``
h2o         attention accumulated over every query since arrival (H2O)                ``model=``
vatp        ``tova-pooled`` on attention times the token's value L1 norm (VATP)         ``model=``
tova-span   ``tova-pooled`` max-pooled over 5 neighbouring held tokens                 ``model=``
==========  ========================================================================  ============

Attention scorers are fed by :mod:`sinkcache.scores.observe` (forward hooks; sdpa works).
"""

from __future__ import annotations

from .base import Scorer
from .h2o import H2OScorer
from .keynorm import KeyNormScorer
from .snapkv import SnapKVScorer
from .tova import TOVAScorer
from .tova_pooled import PooledTOVAScorer
from .tova_span import SpanTOVAScorer
from .vatp import VATPScorer

SCORERS: dict[str, type[Scorer]] = {
    "keynorm": KeyNormScorer,
    "tova": TOVAScorer,
    "snapkv": SnapKVScorer,
    "h2o": H2OScorer,
    "tova-pooled": PooledTOVAScorer,
    "vatp": VATPScorer,
    "tova-span": SpanTOVAScorer,
}
SCORE_NAMES = tuple(SCORERS)
#: The scorer ``policy="evict"`` uses when none is given (see README: why).
#: The eviction scorer ``SinkCache(policy="evict", model=...)`` uses unless told: the measured best
#: (README "Eviction scores"): TOVA pooled over heads is level with or better than per-head TOVA on
#: smollm2-135m's suite (a win at 50%) and RULER (+0.118), and identical on gemma3-270m (one kv head);
#: per-head TOVA beat key norm, SnapKV and H2O on both models' suites. It reads attention, so without
#: ``model=`` the query-free :data:`QUERY_FREE_SCORE` is the default instead.
DEFAULT_SCORE = "tova-pooled"
#: The default without ``model=`` (and with ``positions="shifted"``): needs no queries.
QUERY_FREE_SCORE = "keynorm"


def default_score(has_model: bool, positions: str | None = None) -> str:
    """The scorer an evicting cache uses when ``score`` is not given."""
    return DEFAULT_SCORE if has_model and positions != "shifted" else QUERY_FREE_SCORE


def make_scorer(score: str | Scorer) -> Scorer:
    """A scorer object from its name (or the object itself)."""
    if isinstance(score, Scorer):
        return score
    if score not in SCORERS:
        raise ValueError(f"score={score!r} is unknown; allowed: {', '.join(SCORE_NAMES)}")
    return SCORERS[score]()


__all__ = ["DEFAULT_SCORE", "QUERY_FREE_SCORE", "default_score", "SCORERS", "SCORE_NAMES", "H2OScorer", "KeyNormScorer", "PooledTOVAScorer", "Scorer", "SnapKVScorer", "SpanTOVAScorer", "TOVAScorer", "VATPScorer", "make_scorer"]
