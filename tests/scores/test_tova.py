"""TOVA (``sinkcache/scores/tova.py``): scores are the last query's attention, checked against eager attention weights."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt

from sinkcache import SinkCache
from sinkcache.layers import EvictingLayer

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
