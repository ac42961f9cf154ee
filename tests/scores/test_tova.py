"""TOVA (``sinkcache/scores/tova.py``): scores are the last query's attention, checked against eager attention weights."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt
from helpers import eager_prefill

from sinkcache import SinkCache
from sinkcache.layers import EvictingLayer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_tova_scores_are_the_last_querys_attention(tiny, arch):
    m = tiny(arch, "eager")
    cache = SinkCache("evict", budget=64, score="tova", model=m)
    att = eager_prefill(m, cache, prompt(20))
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, EvictingLayer):
            torch.testing.assert_close(layer.score, att[i][:, :, -1, :].float(), atol=1e-5, rtol=1e-4)
