"""Eviction scorers (``sinkcache/scores``): each scorer's rule, checked against the attention the
model really computed (eager attention's weights), and the options that build them."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt

from sinkcache import SinkCache
from sinkcache.layers import EvictingLayer
from sinkcache.policies import EvictPolicy, make_policy
from sinkcache.scores import (
    SCORE_NAMES,
    H2OScorer,
    KeyNormScorer,
    Scorer,
    SnapKVScorer,
    TOVAScorer,
    make_scorer,
)
from sinkcache.scores.observe import attention_received

pytestmark = pytest.mark.usefixtures("one_thread")


def _prefill(model, cache, ids):
    """One prompt forward with eager attention weights; returns ``{layer: [B, Hk, q, T] weights
    averaged over each kv group's query heads}``."""
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, output_attentions=True)
    hk = model.config.num_key_value_heads
    res = {}
    for i, a in enumerate(out.attentions):
        b, hq, q, t = a.shape
        res[i] = a.view(b, hk, hq // hk, q, t).mean(2)
    return res


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_tova_scores_are_the_last_querys_attention(tiny, arch):
    m = tiny(arch, "eager")
    cache = SinkCache("evict", budget=64, score="tova", model=m)
    att = _prefill(m, cache, prompt(20))
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, EvictingLayer):
            torch.testing.assert_close(layer.score, att[i][:, :, -1, :].float(), atol=1e-5, rtol=1e-4)


def test_h2o_sums_every_query_and_keeps_adding(tiny):
    m = tiny("llama", "eager")
    cache = SinkCache("evict", budget=64, score="h2o", model=m)
    ids = prompt(20)
    att = _prefill(m, cache, ids)
    for i, layer in enumerate(cache.layers):
        torch.testing.assert_close(layer.score, att[i].sum(2).float(), atol=1e-5, rtol=1e-4)
    before = [layer.score.clone() for layer in cache.layers]
    att2 = _prefill(m, cache, prompt(1, seed=3))  # one decode step: its query's attention is added
    for i, layer in enumerate(cache.layers):
        expect = torch.cat([before[i], torch.zeros_like(before[i][..., :1])], -1) + att2[i][:, :, -1].float()
        torch.testing.assert_close(layer.score, expect, atol=1e-5, rtol=1e-4)


def test_snapkv_pools_the_window_mean_at_prefill_then_keeps_a_running_mean(tiny):
    m = tiny("llama", "eager")
    sc = SnapKVScorer(window=4, kernel=3)
    cache = SinkCache(EvictPolicy(budget=64, score=sc), model=m)
    att = _prefill(m, cache, prompt(20))
    for i, layer in enumerate(cache.layers):
        mean = att[i][:, :, -4:].mean(2).float()
        pooled = torch.nn.functional.max_pool1d(mean.flatten(0, 1).unsqueeze(1), 3, 1, 1).view_as(mean)
        torch.testing.assert_close(layer.score, pooled, atol=1e-5, rtol=1e-4)
    before = [layer.score.clone() for layer in cache.layers]
    att2 = _prefill(m, cache, prompt(1, seed=3))
    for i, layer in enumerate(cache.layers):
        old = torch.cat([before[i], torch.zeros_like(before[i][..., :1])], -1)
        count = (layer.seen - layer.pos.float()).clamp(1, 4)
        torch.testing.assert_close(layer.score, old + (att2[i][:, :, -1].float() - old) / count, atol=1e-5, rtol=1e-4)


def test_keynorm_is_the_negative_key_norm_and_needs_no_model():
    layer = EvictingLayer(EvictPolicy(budget=4, score="keynorm"), SinkCache("evict", budget=4).sink_selector, SinkCache().ctx)
    k = torch.randn(1, 2, 6, 8)
    layer.update(k, torch.randn(1, 2, 6, 8))
    torch.testing.assert_close(layer.score, -k.norm(dim=-1))
    assert not KeyNormScorer().needs_attention


def test_eviction_keeps_the_best_scored_and_always_the_protected(tiny):
    """With TOVA, what a tight cache keeps after the next forward is: the first token, the window,
    and the unprotected tokens with the highest scores (the last prompt query's attention)."""
    m = tiny("llama", "eager")
    budget, window = 8, 3
    cache = SinkCache("evict", budget=budget, window=window, score="tova", sinks="first", model=m)
    ids = prompt(20)
    _prefill(m, cache, ids)
    scores = [layer.score.clone() for layer in cache.layers]
    cache.compress()
    for layer, s in zip(cache.layers, scores):
        for h in range(s.shape[1]):
            free = list(range(1, 20 - window))  # not the first token, not the window
            best = sorted(free, key=lambda c: (-float(s[0, h, c]), c))[: budget - 1 - window]
            expect = sorted([0, *best, *range(20 - window, 20)])
            assert layer.pos[0, h].tolist() == expect


def test_attention_received_masks_pads_future_keys_and_pad_queries():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 3, 8)
    keys = torch.randn(2, 2, 5, 8)
    pos = torch.arange(5, dtype=torch.int32).view(1, 1, 5).expand(2, 2, 5)
    attn, nq = attention_received(q, keys, pos, torch.tensor([2, 3, 4]), torch.tensor([0, 3]), 0.5)
    assert nq.tolist() == [3, 2]  # row 1: column 2 is a pad query
    assert torch.all(attn[1, :, :3] == 0)  # pad keys get nothing
    # row 0: key 4 is seen only by the query at column 4; key 3 by columns 3 and 4
    s = torch.einsum("bhwd,bhtd->bhwt", q[:1].view(1, 2, 2, 3, 8).flatten(1, 2), keys[:1].repeat_interleave(2, 1)) * 0.5
    s = s.masked_fill(torch.arange(5).view(1, 5) > torch.tensor([2, 3, 4]).view(3, 1), float("-inf"))
    ref = s.softmax(-1).sum(2).view(1, 2, 2, 5).mean(2)
    torch.testing.assert_close(attn[:1], ref)


# ---- options ----------------------------------------------------------------------------------


def test_score_names_and_objects():
    assert SCORE_NAMES == ("keynorm", "tova", "snapkv", "h2o")
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


@pytest.mark.parametrize("bad", [0, 2, True, "7"])
def test_snapkv_knobs_are_checked(bad):
    with pytest.raises(ValueError):
        SnapKVScorer(kernel=bad)


@pytest.mark.parametrize("score", SCORE_NAMES)
def test_the_built_cache_records_its_scorer(tiny, score):
    c = SinkCache("evict", budget=16, score=score, model=tiny("llama", "sdpa"))
    d = c.describe()
    assert d["score"] == score and d["scorer"] == repr(make_scorer(score))
    assert SinkCache("evict", budget=16).describe()["score"] == "keynorm"  # the default


def test_observer_hooks_follow_the_cache(tiny):
    """Hooks act only for their own cache, and go away with it (one model serves many caches)."""
    m = tiny("llama", "sdpa")
    a = SinkCache("evict", budget=64, score="tova", model=m)
    b = SinkCache("evict", budget=64, score="tova", model=m)
    with torch.no_grad():
        m(input_ids=prompt(10), past_key_values=a, use_cache=True)
    assert a.get_seq_length() == 10 and b.get_seq_length() == 0
    a.detach()
    assert a._observer is not None and a._observer._handles == []
