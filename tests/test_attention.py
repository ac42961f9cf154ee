"""``sinkcache.attention``: the keys hooks reuse from the cache equal the keys they would recompute."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt

from sinkcache import SinkCache
from sinkcache.attention import CacheHooks, apply_rope, layer_keys, project_k, rope_last


class _Collect(CacheHooks):
    def __init__(self) -> None:
        self.seen: list[tuple[int, float | None]] = []

    def on_forward(self, idx, module, cache, hs, pe) -> None:
        k = layer_keys(cache.layers[idx], hs.shape[1])
        diff = None if k is None else float((k - project_k(module, hs, pe[0], pe[1])).abs().max())
        self.seen.append((hs.shape[1], diff))


@pytest.mark.parametrize("name", ["llama", "qwen3"])
@pytest.mark.parametrize(
    "kw", [dict(policy="quantize", bits=2, window=4, group_size=8, sinks="first"), dict(policy="evict", budget=12, window=4, sinks="first")]
)
def test_layer_keys_are_the_keys_the_model_computed(tiny, name, kw):
    model = tiny(name, attn="sdpa")
    cache = SinkCache(**kw)
    hooks = _Collect()
    hooks.attach(model, cache)
    try:
        with torch.inference_mode():
            model.generate(prompt(20), past_key_values=cache, max_new_tokens=6, do_sample=False)
    finally:
        hooks.detach()
    assert hooks.seen and all(d is not None for _, d in hooks.seen)  # prefill and every decode step
    assert max(d for _, d in hooks.seen if d is not None) == 0.0
    assert {t for t, _ in hooks.seen} == {20, 1}


def test_no_keys_where_the_layer_does_not_hold_them_exactly(tiny):
    model = tiny("llama", attn="sdpa")
    shifted = SinkCache(policy="evict", budget=12, window=4, sinks="first", positions="shifted", model=model)
    with torch.inference_mode():
        model(input_ids=prompt(20), past_key_values=shifted, use_cache=True)
    assert layer_keys(shifted.layers[0], 1) is None  # un-rotated storage: recompute
    q = SinkCache(policy="quantize", bits=2, window=4, group_size=8, sinks="first")
    with torch.inference_mode():
        model(input_ids=prompt(20), past_key_values=q, use_cache=True)
    assert layer_keys(q.layers[0], 21) is None and layer_keys(q.layers[0], 20) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w", [1, 3, 7])
def test_rope_last_is_apply_rope_bit_for_bit(dtype, w):
    g = torch.Generator().manual_seed(0)
    cos = torch.randn(2, 7, 64, generator=g).to(dtype)
    sin = torch.randn(2, 7, 64, generator=g).to(dtype)
    for _ in range(2):  # the second call is served by the per-forward tables
        x = torch.randn(2, 9, w, 64, generator=g).to(dtype)
        assert torch.equal(rope_last(x, cos, sin), apply_rope(x, cos[:, -w:], sin[:, -w:]))


def test_rope_last_tables_follow_new_and_edited_embeddings():
    """The shared tables are rebuilt for another forward's embeddings and after an in-place edit,
    never served stale."""
    g = torch.Generator().manual_seed(1)
    cos, sin = torch.randn(1, 4, 8, generator=g), torch.randn(1, 4, 8, generator=g)
    x = torch.randn(1, 2, 1, 8, generator=g)
    rope_last(x, cos, sin)
    cos2, sin2 = torch.randn(1, 4, 8, generator=g), torch.randn(1, 4, 8, generator=g)
    assert torch.equal(rope_last(x, cos2, sin2), apply_rope(x, cos2[:, -1:], sin2[:, -1:]))
    sin2.mul_(-0.5)  # same object, new values
    assert torch.equal(rope_last(x, cos2, sin2), apply_rope(x, cos2[:, -1:], sin2[:, -1:]))


def test_rope_last_scale_is_the_scaled_rotation():
    g = torch.Generator().manual_seed(2)
    cos, sin = torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    x = torch.randn(1, 3, 2, 16, generator=g)
    plain = rope_last(x, cos, sin)
    torch.testing.assert_close(rope_last(x, cos, sin, 0.125), plain * 0.125)
    assert torch.equal(rope_last(x, cos, sin), plain)  # the scaled tables are not served unscaled


def test_rope_last_under_inference_mode():
    """Inference tensors keep no version counter: the tables still work (what ``sinkcache bench`` runs)."""
    with torch.inference_mode():
        cos, sin = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
        x = torch.randn(1, 2, 1, 8)
        assert torch.equal(rope_last(x, cos, sin), apply_rope(x, cos[:, -1:], sin[:, -1:]))
        assert torch.equal(rope_last(x, cos, sin), apply_rope(x, cos[:, -1:], sin[:, -1:]))
