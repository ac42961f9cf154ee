"""VATP (``sinkcache/scores/vatp.py``): the newest query's attention times each token's value L1
norm, per kv-head, pooled over heads; checked against eager attention weights and the held values."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt
from helpers import assert_layer_scores, eager_prefill, generate

from sinkcache import SinkCache
from sinkcache.layers import EvictingLayer
from sinkcache.scores import VATPScorer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_scores_are_attention_times_value_norm_pooled_over_heads(tiny, arch):
    m = tiny(arch, "eager")
    cache = SinkCache("evict", budget=64, score="vatp", sinks="first", model=m)
    att = eager_prefill(m, cache, prompt(20))  # [B, Hk, q, T], averaged within each kv group
    assert_layer_scores(cache, att, lambda last, layer: (last * layer.values.float().abs().sum(-1)).mean(1, keepdim=True))


def test_a_zero_value_weighs_zero_whatever_its_attention():
    values = torch.tensor([[[[0.0, 0.0], [1.0, -2.0]]]])  # [B, H, q, D]
    torch.testing.assert_close(VATPScorer().token_weight(values), torch.tensor([[[0.0, 3.0]]]))


def test_each_held_tokens_weight_is_its_value_norm_after_eviction_and_decoding(tiny):
    # The norm is taken once, on arrival, and must follow its token through every eviction.
    m = tiny("llama", "eager")
    cache = SinkCache("evict", budget=24, window=4, score="vatp", sinks="first", model=m)
    generate(m, prompt(40), cache, 12)
    layers = [layer for layer in cache.layers if isinstance(layer, EvictingLayer)]
    assert layers and all(layer.seen > layer.held() for layer in layers)  # something was evicted
    for layer in layers:
        assert torch.equal(layer.weight, layer.values.float().abs().sum(-1))
        assert "weight" in layer._batched  # moves with the rows (beam search, batch selection, crop)


def test_the_other_scorers_weigh_nothing_and_hold_no_weight(tiny):
    from sinkcache.scores import SCORERS

    assert [name for name, cls in SCORERS.items() if cls.weighs_tokens] == ["vatp"]
    m = tiny("llama", "eager")
    plain = SinkCache("evict", budget=64, score="tova-pooled", sinks="first", model=m)
    weighed = SinkCache("evict", budget=64, score="vatp", sinks="first", model=m)
    eager_prefill(m, plain, prompt(20))
    eager_prefill(m, weighed, prompt(20))
    for a, b in zip(plain.layers, weighed.layers):
        if isinstance(a, EvictingLayer):
            assert "weight" not in a._batched
            # the weight is counted: 4 bytes per held token and kv-head
            assert b.memory_bytes() - a.memory_bytes() == 4 * a.score.numel()
