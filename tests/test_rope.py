"""positions="shifted": re-rotation equals recomputing keys at the new positions."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt

from sinkcache import SinkCache
from sinkcache.rope import Rotary


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_rotate_unrotate_roundtrip(tiny, arch):
    m = tiny(arch)
    rot = Rotary.from_model(m, layer_type="full_attention")
    x = torch.randn(2, 2, 7, 32)
    pos = torch.arange(100, 107).view(1, 7).expand(2, 7)
    assert torch.allclose(rot.unrotate(rot.rotate(x, pos), pos), x, atol=1e-5)
    # Rotating by p then by d equals rotating by p + d (what re-rotation relies on).
    back = rot.rotate(rot.unrotate(rot.rotate(x, pos), pos), pos + 5)
    assert torch.allclose(back, rot.rotate(x, pos + 5), atol=1e-5)


def _keys_at(model, ids, positions):
    """Post-RoPE keys of layer 0 computed directly with the given position ids."""
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        k = attn.k_proj(h).view(ids.shape[0], ids.shape[1], -1, attn.head_dim).transpose(1, 2)
        if getattr(attn, "k_norm", None) is not None:
            k = attn.k_norm(k)
        return Rotary.from_model(model, "full_attention").rotate(k, positions)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_shifted_keys_equal_recomputation_at_new_positions(tiny, arch):
    m = tiny(arch)
    ids = prompt(40)
    budget, window = 16, 8
    cache = SinkCache(policy="evict", budget=budget, window=window, sinks="first", n_first=2, positions="shifted", model=m)
    with torch.no_grad():
        m(ids, past_key_values=cache)
        nxt = prompt(1, seed=3)
        captured = {}
        layer = cache.layers[0]
        orig = layer.update

        def spy(k, v, *a, **kw):
            out = orig(k, v, *a, **kw)
            captured["k"] = out[0]
            return out

        layer.update = spy
        m(nxt, past_key_values=cache, position_ids=torch.tensor([[40]]))
    all_ids = torch.cat([ids, nxt], dim=1)
    for head in range(layer.pos.shape[1]):  # eviction is per kv-head
        held_cols = layer.pos[0, head, :-1].long()  # held tokens in order (the last entry is the new token)
        assert held_cols.numel() == budget
        # Recompute their keys with positions contiguous up to the new token: 40 - budget .. 39.
        want = _keys_at(m, all_ids[:, held_cols], torch.arange(40 - budget, 40).view(1, -1))[:, head]
        got = captured["k"][:, head, :budget]
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_shifted_streams_past_max_positions_with_flat_memory(tiny):
    m = tiny("llama")
    cache = SinkCache(policy="evict", budget=32, window=16, sinks="first", n_first=4, positions="shifted", model=m)
    out = m.generate(prompt(20), past_key_values=cache, max_new_tokens=120, do_sample=False, min_new_tokens=120)
    assert out.shape[1] == 140
    st = cache.stats()
    assert st["tokens_held"] == 32 and st["tokens_seen"] == 139
    assert torch.isfinite(m(out[:, -1:], past_key_values=cache).logits).all()


def test_shifted_needs_model():
    with pytest.raises(ValueError, match="positions='shifted' needs model"):
        SinkCache(policy="evict", budget=64, positions="shifted")
    with pytest.raises(ValueError, match="positions='sideways'"):
        SinkCache(policy="evict", budget=64, positions="sideways")
    with pytest.raises(ValueError, match="does not use positions"):
        SinkCache(policy="quantize", positions="shifted")
