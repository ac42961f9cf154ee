"""Attention-aware bit allocation (sinkcache.refine): options, residual codes, storage, selection."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import prompt
from helpers import check_invariants
from planted import SINK, planted_model, sample

from sinkcache import SinkCache
from sinkcache.layers import QuantizedLayer
from sinkcache.policies import HybridPolicy, QuantizePolicy, make_policy
from sinkcache.quant import (
    dequantize_keys,
    pack,
    quantize_keys,
    quantize_residual,
    residual_cells,
    residual_delta,
    unpack,
)
from sinkcache.refine import OBS_QUERIES, Refinement, make_refinement

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- options -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, True, "0.1", float("nan")])
def test_bad_share_is_one_line_error(bad):
    with pytest.raises(ValueError, match="refine share"):
        Refinement(bad)


def test_bad_bits_and_score():
    with pytest.raises(ValueError, match="bits=3"):
        Refinement(0.1, bits=3)
    with pytest.raises(ValueError, match="score='h2o' is unknown; allowed: attention, keynorm"):
        Refinement(0.1, score="h2o")


def test_make_refinement_translation():
    assert make_refinement(None) is None
    assert make_refinement(0) is None
    assert make_refinement(0.25) == Refinement(0.25, bits=2, score="attention")
    r = Refinement(0.5, bits=4, score="keynorm")
    assert make_refinement(r) is r


def test_policy_knob_translation_and_limits():
    p = make_policy("quantize", bits=2, refine=0.1)
    assert isinstance(p, QuantizePolicy) and p.refine == Refinement(0.1)
    assert make_policy("quantize", bits=2).refine is None
    with pytest.raises(ValueError, match="bits=8 \\+ refine bits=2 exceeds 8"):
        make_policy("quantize", bits=8, refine=0.1)
    with pytest.raises(ValueError, match="policy='evict' does not use refine"):
        make_policy("evict", budget=64, refine=0.1)
    with pytest.raises(ValueError, match="policy='quantize' only"):
        HybridPolicy(bits=2, budget=1024, refine=0.1)


def test_attention_score_needs_model():
    with pytest.raises(ValueError, match="pass model= to SinkCache"):
        SinkCache("quantize", bits=2, refine=0.1)
    c = SinkCache("quantize", bits=2, refine=Refinement(0.1, score="keynorm"))  # query-free: fine
    assert c.describe()["refine"] == {"share": 0.1, "bits": 2, "score": "keynorm"}
    assert SinkCache("quantize", bits=2).describe()["refine"] is None


# ---- residual codes ----------------------------------------------------------------------------
@pytest.mark.parametrize("base,extra", [(2, 2), (2, 4), (4, 2)])
def test_refinement_has_the_error_of_the_finer_grid(base, extra):
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 64, 32, generator=g) * torch.linspace(0.1, 5, 32)  # channel ranges differ
    q = quantize_keys(k, base, 64)
    approx = dequantize_keys(q, base, 64, torch.empty_like(k))
    scale = q.scale.repeat_interleave(64, dim=2)
    fine = approx + residual_delta(quantize_residual(k, approx, scale, extra), scale, extra)
    err_base = (k - approx).abs()
    err_fine = (k - fine).abs()
    # Half a base step before; half of a step 2**extra times finer after (float slack only).
    assert bool((err_base <= scale / 2 * (1 + 1e-5) + 1e-6).all())
    assert bool((err_fine <= scale / 2 ** (extra + 1) * (1 + 1e-4) + 1e-6).all())
    assert float(err_fine.mean()) < float(err_base.mean()) / 2 ** extra * 1.5


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_cells_are_exact_offsets_from_the_grid_point(bits, dtype):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (2, 3, 5, 32), generator=g)
    packed = pack(codes, bits)
    got = residual_cells(packed, bits, dtype)
    assert got.dtype == dtype and got.shape == codes.shape
    # (code + 0.5) / 2**bits - 0.5 of a step, in cells of 1 / 2**bits step
    assert torch.equal(got / (1 << bits), ((codes.double() + 0.5) / (1 << bits) - 0.5).to(dtype))
    scale = torch.rand(2, 3, 5, 32, generator=g).to(dtype)
    assert torch.equal(residual_delta(packed, scale, bits), (((codes.double() + 0.5) / (1 << bits) - 0.5).to(dtype) * scale))


# ---- the layer ---------------------------------------------------------------------------------
def _feed(cache, n_layers: int, chunks, d: int = 16, h: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ks, vs = [], []
    for t in chunks:
        k, v = torch.randn(1, h, t, d, generator=g), torch.randn(1, h, t, d, generator=g)
        ks.append(k)
        vs.append(v)
        for layer in range(n_layers):
            out_k, out_v = cache.update(k, v, layer)
    return torch.cat(ks, 2), torch.cat(vs, 2), out_k, out_v


def test_keynorm_refinement_storage_bytes_and_error():
    plain = SinkCache("quantize", bits=2, window=8, group_size=16, sinks="first")
    ref = SinkCache("quantize", bits=2, window=8, group_size=16, sinks="first", refine=Refinement(0.25, score="keynorm"))
    k, v, pk, pv = _feed(plain, 1, [40, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    _, _, rk, rv = _feed(ref, 1, [40, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    layer = ref.layers[0]
    assert isinstance(layer, QuantizedLayer)
    body = layer.body_len()
    assert body == 32  # two flushed groups of 16
    # 25% of the flushed block (the prompt's 32 columns, flushed at once) per (row, head), never
    # the sink (column 0), in column order.
    assert layer.r_col.shape == (1, 2, 8)
    assert not bool((layer.r_col == 0).any())
    assert bool((layer.r_col[..., 1:] > layer.r_col[..., :-1]).all())
    # Refinement bytes: two 16-channel 2-bit code rows (4 bytes each) + an int32 column per refined token.
    extra = ref.memory_bytes() - plain.memory_bytes()
    assert extra == 1 * 2 * 8 * (4 + 4 + 4)
    # Same tokens elsewhere: only refined slots differ, and they are closer to the exact keys/values.
    cols = layer.r_col[0].long()  # [H, R]
    same = torch.ones(2, body, dtype=torch.bool)
    same.scatter_(1, cols, False)
    for out_p, out_r, exact in ((pk, rk, k), (pv, rv, v)):
        assert torch.equal(out_p[0, :, :body][same], out_r[0, :, :body][same])
        sel = lambda t: t[0, :, :body].gather(1, cols.unsqueeze(-1).expand(-1, -1, 16))  # noqa: E731
        assert float((sel(out_r) - sel(exact)).abs().mean()) < float((sel(out_p) - sel(exact)).abs().mean()) / 2
        assert torch.equal(out_r[0, :, body:], exact[0, :, body:])  # the window is exact
    # Exactly base + residual (an independent unpack of the stored codes, scales gathered per token).
    bits = layer.refine.bits
    steps = lambda c: (unpack(c, bits).float() + 0.5) / (1 << bits) - 0.5  # noqa: E731
    kscale = layer.k_scale[0].repeat_interleave(16, dim=1).gather(1, cols.unsqueeze(-1).expand(-1, -1, 16))
    vscale = layer.v_scale[0].gather(1, cols.unsqueeze(-1).expand(-1, -1, layer.v_scale.shape[-1]))
    vscale = vscale.repeat_interleave(layer.vgroup, dim=-1)
    for out_p, out_r, rc, sc in ((pk, rk, layer.rk_codes, kscale), (pv, rv, layer.rv_codes, vscale)):
        base = out_p[0, :, :body].gather(1, cols.unsqueeze(-1).expand(-1, -1, 16))
        got = out_r[0, :, :body].gather(1, cols.unsqueeze(-1).expand(-1, -1, 16))
        assert torch.equal(got, base + steps(rc[0]) * sc)
    # The smallest-norm non-sink keys of the block were chosen.
    norms = k[0, :, :32].norm(dim=-1)
    norms[:, 0] = float("inf")
    want = norms.topk(8, largest=False).indices.sort().values
    assert torch.equal(layer.r_col[0].long(), want)


def test_attention_refinement_picks_the_token_that_draws_attention():
    """sinks='none': the planted sink is an ordinary quantized token, but it draws the attention,
    so it is the token refined in its block (and random keys would not pick it)."""
    model = planted_model(attn="sdpa", layers=1)
    ids = torch.tensor([sample(80, (21,), seed=3)])
    cache = SinkCache("quantize", bits=2, window=8, group_size=16, sinks="none", refine=Refinement(1 / 16), model=model)
    with torch.no_grad():
        model(ids[:, :40], past_key_values=cache, use_cache=True)
        for t in range(40, 80):
            model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    cols = layer.r_col[0]  # [H, blocks]: one token per block of 16
    assert ids[0, 21] == SINK
    assert bool((cols == 21).any(-1).all()), cols
    # Queries were kept only while a flush was near, and the ring is bounded.
    assert layer.q_ring is None or layer.q_ring.shape[2] <= OBS_QUERIES


def test_refined_cache_generates_and_keeps_invariants(tiny):
    model = tiny("llama")
    ids = prompt(70)
    cache = SinkCache("quantize", bits=2, window=8, group_size=16, refine=0.25, model=model)
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=30, do_sample=False)
    assert out.shape[1] == 100
    check_invariants(cache, 99)
    assert cache.layers[0].r_col.shape[2] > 0
    # deepcopy keeps working hooks: the copy continues identically to the original.
    twin = copy.deepcopy(cache)
    nxt = out[:, -1:]
    with torch.no_grad():
        a = model(nxt, past_key_values=cache, use_cache=True).logits
        b = model(nxt, past_key_values=twin, use_cache=True).logits
    assert torch.equal(a, b)


def test_refinement_beam_reorder_moves_rows_together(tiny):
    model = tiny("llama")
    ids = prompt(60, batch=2, seed=1)
    cache = SinkCache("quantize", bits=2, window=8, group_size=16, refine=0.25, model=model)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        model(ids[:, -1:], past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    before = layer.r_col.clone(), layer.rk_codes.clone()
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.r_col, before[0].flip(0)) and torch.equal(layer.rk_codes, before[1].flip(0))
