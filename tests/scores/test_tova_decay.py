"""Fading pooled TOVA (``sinkcache/scores/tova_decay.py``): ``max(pooled attention, decay * old)``,
checked against eager attention weights over a prefill and decode steps."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt
from helpers import eager_prefill

from sinkcache import SinkCache
from sinkcache.layers import EvictingLayer
from sinkcache.scores import DecayedTOVAScorer, PooledTOVAScorer, make_scorer
from sinkcache.scores.tova_pooled import pool_over_heads

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prefill_scores_are_pooled_tova(tiny):
    # one forward from zero scores: max(a, decay * 0) = a, the pooled score
    m = tiny("llama", "eager")
    cache = SinkCache("evict", budget=64, score="tova-decay", sinks="first", model=m)
    att = eager_prefill(m, cache, prompt(20))
    seen = 0
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, EvictingLayer):
            want = att[i][:, :, -1, :].float().mean(1, keepdim=True).expand_as(layer.score)
            torch.testing.assert_close(layer.score, want, atol=1e-5, rtol=1e-4)
            seen += 1
    assert seen


@pytest.mark.parametrize("decay", [0.0, 0.5, 1.0])
def test_update_is_the_max_of_the_new_score_and_the_decayed_old_one(decay):
    g = torch.Generator().manual_seed(0)
    pos = torch.arange(6, dtype=torch.int32).view(1, 1, 6).expand(1, 2, 6).contiguous()
    old, attn = torch.rand(1, 2, 6, generator=g), torch.rand(1, 2, 6, generator=g)
    got = DecayedTOVAScorer(decay).update(old, attn, torch.tensor([1]), pos, 7, 1)
    torch.testing.assert_close(got, torch.maximum(pool_over_heads(attn, pos), decay * old))
    if decay == 0.0:  # no memory: pooled TOVA exactly
        torch.testing.assert_close(got, PooledTOVAScorer().update(old, attn, torch.tensor([1]), pos, 7, 1))


def test_a_token_ignored_by_later_queries_fades_instead_of_dropping():
    pos = torch.arange(3, dtype=torch.int32).view(1, 1, 3)
    sc = DecayedTOVAScorer(0.5)
    s = sc.update(torch.zeros(1, 1, 3), torch.tensor([[[0.8, 0.1, 0.1]]]), torch.tensor([1]), pos, 3, 3)
    for _ in range(2):  # two queries that ignore token 0
        s = sc.update(s, torch.tensor([[[0.0, 0.5, 0.5]]]), torch.tensor([1]), pos, 4, 1)
    torch.testing.assert_close(s, torch.tensor([[[0.2, 0.5, 0.5]]]))


def test_decode_under_a_tight_budget_keeps_the_protected_tokens(tiny):
    m = tiny("llama", "sdpa")
    cache = SinkCache("evict", budget=24, window=4, score="tova-decay", sinks="first", model=m)
    with torch.no_grad():
        out = m(input_ids=prompt(60), past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(6):
            out = m(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
    layers = [la for la in cache.layers if isinstance(la, EvictingLayer)]
    assert layers and all(la.held() <= 25 for la in layers)
    for la in layers:
        assert (la.pos[:, :, 0] == 0).all()  # the first token (the sink) stays
        assert (la.pos[:, :, -4:] == torch.arange(62, 66, dtype=la.pos.dtype)).all()  # the window stays
        assert torch.equal(la.pos[:, :1].expand_as(la.pos), la.pos)  # pooled: one token set per layer
    cache.detach()


@pytest.mark.parametrize("decay", [-0.1, 1.5, True, "0.9"])
def test_bad_decay_raises(decay):
    with pytest.raises(ValueError, match=r"decay=.* must be a number in \[0, 1\]"):
        DecayedTOVAScorer(decay)


def test_the_registry_builds_the_default_decay():
    assert repr(make_scorer("tova-decay")) == "DecayedTOVAScorer(decay=0.9)"
