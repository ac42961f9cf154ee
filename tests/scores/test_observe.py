"""The attention observer (``sinkcache/scores/observe.py``): masks, and hooks that follow the cache."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt

from sinkcache import SinkCache
from sinkcache.scores.observe import attention_received

pytestmark = pytest.mark.usefixtures("one_thread")


def test_attention_received_masks_pads_future_keys_and_pad_queries():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 3, 8)
    keys = torch.randn(2, 2, 5, 8)
    pos = torch.arange(5, dtype=torch.int32).view(1, 1, 5).expand(2, 2, 5)
    attn, nq = attention_received(q, keys, pos, torch.tensor([2, 3, 4]), torch.tensor([0, 3]), 0.5)
    assert nq.tolist() == [3, 2]  # row 1: column 2 is a pad query
    assert torch.all(attn[1, :, :3] == 0)  # pad keys get nothing
    # row 0: key 4 is seen only by the query at column 4; key 3 by columns 3 and 4
    s = torch.einsum("bhwd,bhtd->bhwt", q[:1].view(1, 2, 2, 3, 8).flatten(1, 2), keys[:1].repeat_interleave(2, 1)) * 0.5
    s = s.masked_fill(torch.arange(5).view(1, 5) > torch.tensor([2, 3, 4]).view(3, 1), float("-inf"))
    ref = s.softmax(-1).sum(2).view(1, 2, 2, 5).mean(2)
    torch.testing.assert_close(attn[:1], ref)


@pytest.mark.parametrize("q_col", [4, 2, 1])
def test_one_query_path_equals_the_chunked_one(q_col):
    """Decode steps take a 3-d path for their single query: it must give what the general path
    gives for that query (read off as the last of two queries), pads and future keys included."""
    torch.manual_seed(1)
    q = torch.randn(3, 4, 2, 8)
    keys = torch.randn(3, 2, 5, 8)
    pos = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32).view(1, 1, 5).expand(3, 2, 5)
    pad = torch.tensor([0, 2, 5])  # row 2: all pad, so its query is a pad query
    one, n1 = attention_received(q[:, :, 1:], keys, pos, torch.tensor([q_col]), pad, 0.3)
    both, n2 = attention_received(q, keys, pos, torch.tensor([q_col - 1, q_col]), pad, 0.3)
    first, n0 = attention_received(q[:, :, :1], keys, pos, torch.tensor([q_col - 1]), pad, 0.3)
    torch.testing.assert_close(one, both - first)
    assert torch.equal(n1, n2 - n0) and n1.tolist() == [1, int(q_col >= 2), 0]
    assert torch.all(one[:, :, q_col + 1 :] == 0) and torch.all(one[2] == 0)
    if q_col == 4:  # the newest column: the caller may say so and skip the causal mask
        fast, nf = attention_received(q[:, :, 1:], keys, pos, torch.tensor([q_col]), pad, 0.3, newest=True)
        assert torch.equal(fast, one) and torch.equal(nf, n1)


def test_observer_hooks_follow_the_cache(tiny):
    """Hooks act only for their own cache, and go away with it (one model serves many caches)."""
    m = tiny("llama", "sdpa")
    a = SinkCache("evict", budget=64, score="tova", model=m)
    b = SinkCache("evict", budget=64, score="tova", model=m)
    with torch.no_grad():
        m(input_ids=prompt(10), past_key_values=a, use_cache=True)
    assert a.get_seq_length() == 10 and b.get_seq_length() == 0
    a.detach()
    assert a._observer is not None and a._observer._handles == []
