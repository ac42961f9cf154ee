"""H2O (``sinkcache/scores/h2o.py``): scores accumulate every query's attention."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt
from helpers import eager_prefill

from sinkcache import SinkCache

pytestmark = pytest.mark.usefixtures("one_thread")


def test_h2o_sums_every_query_and_keeps_adding(tiny):
    m = tiny("llama", "eager")
    cache = SinkCache("evict", budget=64, score="h2o", model=m)
    ids = prompt(20)
    att = eager_prefill(m, cache, ids)
    for i, layer in enumerate(cache.layers):
        torch.testing.assert_close(layer.score, att[i].sum(2).float(), atol=1e-5, rtol=1e-4)
    before = [layer.score.clone() for layer in cache.layers]
    att2 = eager_prefill(m, cache, prompt(1, seed=3))  # one decode step: its query's attention is added
    for i, layer in enumerate(cache.layers):
        expect = torch.cat([before[i], torch.zeros_like(before[i][..., :1])], -1) + att2[i][:, :, -1].float()
        torch.testing.assert_close(layer.score, expect, atol=1e-5, rtol=1e-4)
