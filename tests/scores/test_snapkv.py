"""SnapKV (``sinkcache/scores/snapkv.py``): pooled observation-window attention at prefill, a running mean at decode."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt
from helpers import eager_prefill

from sinkcache import SinkCache
from sinkcache.policies import EvictPolicy
from sinkcache.scores import (
    SnapKVScorer,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_snapkv_pools_the_window_mean_at_prefill_then_keeps_a_running_mean(tiny):
    m = tiny("llama", "eager")
    sc = SnapKVScorer(window=4, kernel=3)
    cache = SinkCache(EvictPolicy(budget=64, score=sc), model=m)
    att = eager_prefill(m, cache, prompt(20))
    for i, layer in enumerate(cache.layers):
        mean = att[i][:, :, -4:].mean(2).float()
        pooled = torch.nn.functional.max_pool1d(mean.flatten(0, 1).unsqueeze(1), 3, 1, 1).view_as(mean)
        torch.testing.assert_close(layer.score, pooled, atol=1e-5, rtol=1e-4)
    before = [layer.score.clone() for layer in cache.layers]
    att2 = eager_prefill(m, cache, prompt(1, seed=3))
    for i, layer in enumerate(cache.layers):
        old = torch.cat([before[i], torch.zeros_like(before[i][..., :1])], -1)
        count = (layer.seen - layer.pos.float()).clamp(1, 4)
        torch.testing.assert_close(layer.score, old + (att2[i][:, :, -1].float() - old) / count, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bad", [0, 2, True, "7"])
def test_snapkv_knobs_are_checked(bad):
    with pytest.raises(ValueError):
        SnapKVScorer(kernel=bad)
