"""FirstSinks (``sinkcache/sinks/first.py``): the first real token(s) of each row, never a pad."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt
from helpers import generate

from sinkcache import SinkCache
from sinkcache.context import TokenContext
from sinkcache.layers import EvictingLayer
from sinkcache.sinks import FirstSinks


def test_first_sinks_skip_left_padding():
    ctx = TokenContext()
    ctx.observe(torch.tensor([[0, 4, 5, 6], [4, 5, 6, 7]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), past=0)
    keys = torch.zeros(2, 2, 4, 4)
    got = FirstSinks(n_first=2).mark(0, torch.arange(4), ctx, keys)[:, 0]
    assert got.tolist() == [[False, True, True, False], [True, True, False, False]]


def test_first_sinks_survive_eviction(tiny):
    model = tiny("llama")
    cache = SinkCache(policy="evict", budget=12, window=4, sinks="first", n_first=2, model=model)
    generate(model, prompt(40), cache, 6)
    for layer in cache.layers:
        if isinstance(layer, EvictingLayer):
            held = set(layer.pos[0, 0][layer.sink[0, 0]].tolist())
            assert held == {0, 1}


@pytest.mark.parametrize("n", [-1, 1.5, True])
def test_first_sinks_reject_bad_counts(n):
    with pytest.raises(ValueError, match="n_first"):
        FirstSinks(n_first=n)
