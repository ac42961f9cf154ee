"""Pooled TOVA (``sinkcache/scores/tova_pooled.py``): the newest query's attention averaged over
all heads, checked against eager attention weights, and pooled per column when heads differ."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt
from helpers import assert_layer_scores, eager_prefill

from sinkcache import SinkCache
from sinkcache.layers import EvictingLayer
from sinkcache.scores.tova_pooled import pool_over_heads

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_pooled_scores_are_the_last_querys_attention_averaged_over_all_heads(tiny, arch):
    m = tiny(arch, "eager")
    cache = SinkCache("evict", budget=64, score="tova-pooled", sinks="first", model=m)
    att = eager_prefill(m, cache, prompt(20))  # [B, Hk, q, T], averaged within each kv group
    assert_layer_scores(cache, att, lambda last, layer: last.mean(1, keepdim=True))
    for layer in cache.layers:
        if isinstance(layer, EvictingLayer):
            assert torch.equal(layer.score[:, :1].expand_as(layer.score), layer.score)  # one score per token


def test_pooling_is_per_column_when_heads_hold_different_tokens():
    # head 0 holds columns 0, 1, 3; head 1 holds 0, 2, 3 (e.g. a measured sink only head 1 kept)
    pos = torch.tensor([[[0, 1, 3], [0, 2, 3]]], dtype=torch.int32)
    x = torch.tensor([[[0.2, 0.4, 0.6], [0.4, 0.8, 0.0]]])
    got = pool_over_heads(x, pos)
    want = torch.tensor([[[0.3, 0.4, 0.3], [0.3, 0.8, 0.3]]])  # a column held by one head keeps its own score
    torch.testing.assert_close(got, want)


def _pool_by_scatter(x, pos, seen):
    """Reference: a [B, seen] buffer per column (what the scorer first did)."""
    b = x.shape[0]
    col, flat = pos.long().reshape(b, -1), x.reshape(b, -1)
    total = flat.new_zeros(b, seen).scatter_add_(1, col, flat)
    heads = flat.new_zeros(b, seen).scatter_add_(1, col, torch.ones_like(flat))
    return (total / heads.clamp_min(1)).gather(1, col).view_as(x)


@pytest.mark.parametrize("seed", range(5))
def test_pooling_matches_a_per_column_scatter(seed):
    g = torch.Generator().manual_seed(seed)
    b, h, t, seen = 2, 3, 12, 40
    pos = torch.stack([torch.randperm(seen, generator=g)[:t].sort().values for _ in range(b * h)]).view(b, h, t).int()
    pos[:, :, :3] = torch.arange(3, dtype=torch.int32)  # shared columns (the sinks) in every head
    x = torch.rand(b, h, t, generator=g)
    torch.testing.assert_close(pool_over_heads(x, pos), _pool_by_scatter(x, pos, seen), atol=0, rtol=1e-6)


def test_pooled_eviction_keeps_one_token_set_per_layer(tiny):
    m = tiny("llama", "sdpa")
    cache = SinkCache("evict", budget=24, window=4, score="tova-pooled", sinks="first", model=m)
    with torch.no_grad():
        out = m(input_ids=prompt(60), past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(5):
            out = m(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
    layers = [la for la in cache.layers if isinstance(la, EvictingLayer)]
    # evicted down to the budget (plus the newest token: layers compress one forward late)
    assert layers and all(la.held() <= 25 for la in layers)
    for la in layers:
        assert torch.equal(la.pos[:, :1].expand_as(la.pos), la.pos)  # every kv-head holds the same columns
    cache.detach()


def test_shared_columns_pool_is_the_per_column_pool():
    # pos [B, 1, T] says every head holds these columns: a plain mean, bit-identical to the general pool
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 50, generator=g)
    pos = torch.sort(torch.randperm(200, generator=g)[:50]).values.to(torch.int32).view(1, 1, 50).expand(2, 1, 50)
    shared = pool_over_heads(x, pos)
    assert torch.equal(shared, pool_over_heads(x, pos.expand(2, 3, 50)))
    assert torch.equal(shared[:, :1].expand_as(shared), shared)
