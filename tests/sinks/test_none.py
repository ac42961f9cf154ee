"""NoSinks (``sinkcache/sinks/none.py``): the sink-blind baselines protect nothing."""

from __future__ import annotations

import torch
from conftest import prompt
from helpers import generate

from sinkcache import SinkCache
from sinkcache.context import TokenContext
from sinkcache.layers import EvictingLayer, QuantizedLayer
from sinkcache.sinks import NoSinks


def test_no_sinks_marks_nothing():
    ctx = TokenContext()
    ctx.observe(torch.tensor([[0, 4, 5, 6]]), torch.tensor([[0, 1, 1, 1]]), past=0)
    assert not NoSinks().mark(0, torch.arange(4), ctx, torch.zeros(1, 2, 4, 4)).any()
    assert (NoSinks().n_first, NoSinks().max_sinks) == (0, 0)


def test_no_sinks_hold_no_exact_token_in_the_cache(tiny):
    model = tiny("llama")
    for kw in (dict(policy="evict", budget=12, window=4), dict(policy="quantize", bits=2, window=4, group_size=4)):
        cache = SinkCache(**kw, sinks="none", model=model)
        generate(model, prompt(40), cache, 4)
        layers = [x for x in cache.layers if isinstance(x, (EvictingLayer, QuantizedLayer))]
        assert layers
        for layer in layers:
            if isinstance(layer, EvictingLayer):
                assert not bool(layer.sink.any())
            else:
                assert not bool((layer.sink_col >= 0).any())
