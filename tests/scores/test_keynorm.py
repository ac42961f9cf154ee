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


def test_keynorm_is_the_negative_key_norm_and_needs_no_model():
    layer = EvictingLayer(EvictPolicy(budget=4, score="keynorm"), SinkCache("evict", budget=4).sink_selector, SinkCache().ctx)
    k = torch.randn(1, 2, 6, 8)
    layer.update(k, torch.randn(1, 2, 6, 8))
    torch.testing.assert_close(layer.score, -k.norm(dim=-1))
    assert not KeyNormScorer().needs_attention
