"""PunctSinks (``sinkcache/sinks/punct.py``): first token plus punctuation ids, and degenerate prompts end to end through ``generate``.

Every token punctuation (a sink candidate everywhere, so the cap must hold and eviction must still
make room), or none (only the first token is protected): both must keep every cache invariant.
"""

from __future__ import annotations

import pytest
import torch
from conftest import prompt
from helpers import check_invariants, generate

from sinkcache import SinkCache
from sinkcache.layers import EvictingLayer, QuantizedLayer
from sinkcache.sinks import PunctSinks

# prompt() draws ids from [3, 128): "all punctuation" declares every one of them a punctuation id,
# "no punctuation" declares only ids the prompt never contains.
ALL_PUNCT = range(3, 128)
NO_PUNCT = range(200, 210)
MAX_SINKS = 3

POLICIES = {
    "evict": dict(policy="evict", budget=16, window=4),
    "quantize": dict(policy="quantize", bits=2, window=4, group_size=4),
    "hybrid": dict(policy="hybrid", bits=2, budget=32, window=4, group_size=4),
}


def _sink_counts(cache: SinkCache) -> list[int]:
    """Largest number of sinks held by any (row, kv-head), per compressing layer."""
    out = []
    for layer in cache.layers:
        if isinstance(layer, EvictingLayer):
            out.append(int(layer.sink.sum(-1).max()))
        elif isinstance(layer, QuantizedLayer):
            out.append(int((layer.sink_col >= 0).sum(-1).max()) if layer.sink_col.numel() else 0)
    return out


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("punct", ["all", "none"])
def test_punct_sinks_on_degenerate_prompts(tiny, policy, punct):
    model = tiny("llama")
    ids = prompt(40)
    sel = PunctSinks(ALL_PUNCT if punct == "all" else NO_PUNCT, n_first=1, max_sinks=MAX_SINKS)
    cache = SinkCache(**POLICIES[policy], sinks=sel, model=model)
    out = generate(model, ids, cache, 12)
    assert out.sequences.shape[1] == 40 + 12
    check_invariants(cache, 40 + 12 - 1)
    counts = _sink_counts(cache)
    assert counts, "no compressing layer was built"
    if punct == "all":
        # every held token is a candidate: exactly the cap is kept, never more
        assert set(counts) == {MAX_SINKS}, counts
    else:
        # only the first token qualifies
        assert set(counts) == {1}, counts


def test_punct_sinks_keep_the_first_token_and_punctuation_only():
    """mark() flags the first real token and punctuation ids, nothing else, and never a pad."""
    from sinkcache.context import TokenContext

    ctx = TokenContext()
    ctx.keep_ids = True  # the cache sets this for selectors with needs_ids
    ids = torch.tensor([[0, 0, 5, 9, 7, 9], [5, 7, 9, 8, 9, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    ctx.observe(ids, mask, past=0)
    cols = torch.arange(6)
    keys = torch.zeros(2, 1, 6, 4)
    got = PunctSinks([9, 0], n_first=1).mark(0, cols, ctx, keys)[:, 0]
    want = torch.tensor([[False, False, True, True, False, True], [True, False, True, False, True, False]])
    assert torch.equal(got, want)
