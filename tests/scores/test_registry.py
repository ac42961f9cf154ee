"""The scorer registry (``sinkcache/scores/__init__.py``) and how options reach the built cache."""

from __future__ import annotations

import pytest
from conftest import prompt
from helpers import eager_prefill

from sinkcache import EvictPolicy, SinkCache
from sinkcache.policies import make_policy
from sinkcache.scores import (
    DEFAULT_SCORE,
    QUERY_FREE_SCORE,
    SCORE_NAMES,
    H2OScorer,
    Scorer,
    TOVAScorer,
    make_scorer,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_score_names_and_objects():
    assert SCORE_NAMES == ("keynorm", "tova", "snapkv", "h2o", "tova-pooled", "vatp", "tova-span")
    for name in SCORE_NAMES:
        assert make_scorer(name).name == name
    sc = TOVAScorer()
    assert make_scorer(sc) is sc
    assert isinstance(make_scorer("h2o"), H2OScorer) and isinstance(make_scorer("keynorm"), Scorer)


def test_cli_score_choices_match_the_registry():
    # The CLI keeps its own copy so parsing imports no torch; it must not drift from the registry.
    from sinkcache import cli

    assert cli.SCORE_NAMES == SCORE_NAMES


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(policy="evict", budget=8, score="attn"), r"score='attn' is unknown; allowed: keynorm, tova, snapkv, h2o"),
        (dict(policy="quantize", score="tova"), r"does not use score"),
        (dict(policy="evict", budget=8, score="tova"), r"pass model= to SinkCache"),
    ],
)
def test_bad_score_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SinkCache(kwargs.pop("policy"), **kwargs)


def test_attention_scores_refuse_shifted_positions():
    with pytest.raises(ValueError, match="positions='shifted'"):
        make_policy("evict", budget=8, score="tova", positions="shifted")


@pytest.mark.parametrize("score", SCORE_NAMES)
def test_the_built_cache_records_its_scorer(tiny, score):
    c = SinkCache("evict", budget=16, score=score, model=tiny("llama", "sdpa"))
    d = c.describe()
    assert d["score"] == score and d["scorer"] == repr(make_scorer(score))



def test_the_default_scorer_is_pooled_tova_with_the_model_and_keynorm_without(tiny):
    m = tiny("llama", "sdpa")
    assert DEFAULT_SCORE == "tova-pooled" and QUERY_FREE_SCORE == "keynorm"
    assert SinkCache("evict", budget=16, model=m).describe()["score"] == "tova-pooled"
    assert SinkCache("evict", budget=16).describe()["score"] == "keynorm"  # no queries to read
    assert SinkCache("evict", budget=16, positions="shifted", model=m).describe()["score"] == "keynorm"
    assert SinkCache(EvictPolicy(budget=16), model=m).describe()["score"] == "keynorm"  # an object says what it is


def test_eviction_keeps_the_best_scored_and_always_the_protected(tiny):
    """With TOVA, what a tight cache keeps after the next forward is: the first token, the window,
    and the unprotected tokens with the highest scores (the last prompt query's attention)."""
    m = tiny("llama", "eager")
    budget, window = 8, 3
    cache = SinkCache("evict", budget=budget, window=window, score="tova", sinks="first", model=m)
    ids = prompt(20)
    eager_prefill(m, cache, ids)
    scores = [layer.score.clone() for layer in cache.layers]
    cache.compress()
    for layer, s in zip(cache.layers, scores):
        for h in range(s.shape[1]):
            free = list(range(1, 20 - window))  # not the first token, not the window
            best = sorted(free, key=lambda c: (-float(s[0, h, c]), c))[: budget - 1 - window]
            expect = sorted([0, *best, *range(20 - window, 20)])
            assert layer.pos[0, h].tolist() == expect
