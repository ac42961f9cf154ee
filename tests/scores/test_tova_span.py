"""Span TOVA (``sinkcache/scores/tova_span.py``): ``tova-pooled`` scores max-pooled over neighbouring
held tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import prompt
from helpers import assert_layer_scores, eager_prefill

from sinkcache import SinkCache
from sinkcache.scores import SpanTOVAScorer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_peak_lifts_its_neighbours_within_the_kernel():
    pos = torch.arange(7, dtype=torch.int32).view(1, 1, 7)
    attn = torch.tensor([[[0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.1]]])
    got = SpanTOVAScorer(kernel=3).update(torch.zeros(1, 1, 7), attn, torch.ones(1), pos, 7, 1)
    torch.testing.assert_close(got, torch.tensor([[[0.0, 0.0, 0.9, 0.9, 0.9, 0.1, 0.1]]]))
    assert torch.equal(SpanTOVAScorer(kernel=1).update(None, attn, None, pos, 7, 1), attn)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_scores_are_pooled_tova_max_pooled_along_the_held_tokens(tiny, arch):
    m = tiny(arch, "eager")
    cache = SinkCache("evict", budget=64, score="tova-span", sinks="first", model=m)
    att = eager_prefill(m, cache, prompt(20))
    # pooled over heads [B, 1, T], then max-pooled along the held tokens
    assert_layer_scores(cache, att, lambda last, layer: F.max_pool1d(last.mean(1, keepdim=True), 5, stride=1, padding=2))


@pytest.mark.parametrize("kernel", [0, 2, -1, True, 3.0])
def test_bad_kernel_is_refused(kernel):
    with pytest.raises(ValueError, match="kernel"):
        SpanTOVAScorer(kernel=kernel)
