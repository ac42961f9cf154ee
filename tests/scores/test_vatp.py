"""VATP (``sinkcache/scores/vatp.py``): the newest query's attention times each token's value L1
norm, per kv-head, pooled over heads; checked against eager attention weights and the held values."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt
from helpers import eager_prefill

from sinkcache import SinkCache
from sinkcache.layers import EvictingLayer
from sinkcache.scores import VATPScorer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_scores_are_attention_times_value_norm_pooled_over_heads(tiny, arch):
    m = tiny(arch, "eager")
    cache = SinkCache("evict", budget=64, score="vatp", sinks="first", model=m)
    att = eager_prefill(m, cache, prompt(20))  # [B, Hk, q, T], averaged within each kv group
    seen = 0
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, EvictingLayer):
            weighed = att[i][:, :, -1, :].float() * layer.values.float().abs().sum(-1)
            want = weighed.mean(1, keepdim=True).expand_as(layer.score)
            torch.testing.assert_close(layer.score, want, atol=1e-5, rtol=1e-4)
            seen += 1
    assert seen


def test_a_zero_value_scores_zero_whatever_its_attention():
    attn = torch.tensor([[[0.9, 0.1]]])
    values = torch.tensor([[[[0.0, 0.0], [1.0, -2.0]]]])
    got = VATPScorer().weigh(attn, values)
    torch.testing.assert_close(got, torch.tensor([[[0.0, 0.3]]]))


def test_the_other_scorers_read_plain_attention():
    from sinkcache.scores import SCORERS

    attn, values = torch.rand(1, 2, 5), torch.rand(1, 2, 5, 4)
    for name, cls in SCORERS.items():
        if name != "vatp":
            assert cls().weigh(attn, values) is attn, name
