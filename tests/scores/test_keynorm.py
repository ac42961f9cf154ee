"""Key norm (``sinkcache/scores/keynorm.py``): the query-free scorer."""

from __future__ import annotations

import pytest
import torch

from sinkcache import SinkCache
from sinkcache.layers import EvictingLayer
from sinkcache.policies import EvictPolicy
from sinkcache.scores import (
    KeyNormScorer,
)

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


def test_keynorm_is_the_negative_key_norm_and_needs_no_model():
    layer = EvictingLayer(EvictPolicy(budget=4, score="keynorm"), SinkCache("evict", budget=4).sink_selector, SinkCache().ctx)
    k = torch.randn(1, 2, 6, 8)
    layer.update(k, torch.randn(1, 2, 6, 8))
    torch.testing.assert_close(layer.score, -k.norm(dim=-1))
    assert not KeyNormScorer().needs_attention
