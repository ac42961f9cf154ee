"""Bit packing and KIVI quantization: round trips and error bounds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sinkcache.quant import (
    SUPPORTED_BITS,
    QuantizedKeys,
    QuantizedValues,
    check_bits,
    dequantize_keys,
    dequantize_values,
    pack,
    quantize_keys,
    quantize_values,
    unpack,
)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_pack_roundtrip_and_size(bits):
    codes = torch.randint(0, 1 << bits, (2, 3, 5, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == 64 * bits // 8  # truly bit-packed
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", [3, 1, 16, 0, "4", 4.0, True])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits="):
        check_bits(bits)


def _key_bound(q: QuantizedKeys, group: int) -> torch.Tensor:
    # Half a step, plus one ulp of the zero point (scales/zeros are stored in the model dtype).
    s = q.scale.float().repeat_interleave(group, dim=2)
    z = q.zero.float().repeat_interleave(group, dim=2)
    return 0.5 * s + torch.finfo(q.scale.dtype).eps * z.abs() + 1e-6


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from(SUPPORTED_BITS),
    groups=st.integers(1, 3),
    group=st.sampled_from([4, 8, 16]),
    scale=st.floats(1e-3, 1e4),
    seed=st.integers(0, 2**16),
)
def test_keys_error_within_half_step(bits, groups, group, scale, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, 2, groups * group, 16, generator=g) * scale
    q = quantize_keys(k, bits, group)
    out = dequantize_keys(q, bits, group, torch.empty_like(k))
    assert torch.all((out - k).abs() <= _key_bound(q, group))


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(SUPPORTED_BITS), vgroup=st.sampled_from([4, 8, 16]), seed=st.integers(0, 2**16))
def test_values_error_within_half_step(bits, vgroup, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(1, 2, 7, 16, generator=g) * 3
    q = quantize_values(v, bits, vgroup)
    out = dequantize_values(q, bits, vgroup, torch.empty_like(v))
    s = q.scale.float().repeat_interleave(vgroup, dim=-1)
    z = q.zero.float().repeat_interleave(vgroup, dim=-1)
    assert torch.all((out - v).abs() <= 0.5 * s + torch.finfo(q.scale.dtype).eps * z.abs() + 1e-6)


def test_constant_channels_are_exact_and_finite():
    k = torch.full((1, 1, 8, 16), 3.25)
    q = quantize_keys(k, 2, 8)
    out = dequantize_keys(q, 2, 8, torch.empty_like(k))
    assert torch.isfinite(out).all() and torch.equal(out, k)
    v = torch.zeros(1, 1, 3, 16)
    qv = quantize_values(v, 2, 16)
    assert torch.equal(dequantize_values(qv, 2, 16, torch.empty_like(v)), v)


def test_extreme_values_no_nan():
    k = torch.randn(1, 2, 16, 8) * 1e4
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = k.to(dtype)
        q = quantize_keys(x, 4, 16)
        out = dequantize_keys(q, 4, 16, torch.empty_like(x))
        assert torch.isfinite(out).all()


def test_excluded_outlier_does_not_stretch_range():
    torch.manual_seed(0)
    k = torch.randn(1, 1, 8, 16)
    k[0, 0, 0] = 1000.0  # an outlier "sink" key
    ex = torch.zeros(1, 1, 8, dtype=torch.bool)
    ex[0, 0, 0] = True
    with_ex = quantize_keys(k, 2, 8, exclude=ex)
    without = quantize_keys(k, 2, 8)
    assert with_ex.scale.max() < 5.0 < 300.0 < without.scale.max()
    out = dequantize_keys(with_ex, 2, 8, torch.empty_like(k))
    err = (out - k)[0, 0, 1:].abs()
    assert torch.all(err <= 0.5 * with_ex.scale.float() + 1e-5)


def test_fully_excluded_group_is_finite():
    k = torch.randn(1, 1, 4, 8)
    q = quantize_keys(k, 4, 4, exclude=torch.ones(1, 1, 4, dtype=torch.bool))
    assert torch.isfinite(dequantize_keys(q, 4, 4, torch.empty_like(k))).all()


def test_group_must_divide():
    with pytest.raises(ValueError, match="group_size"):
        quantize_keys(torch.randn(1, 1, 6, 8), 4, 4)
    with pytest.raises(ValueError, match="head_dim"):
        quantize_values(torch.randn(1, 1, 6, 12), 4, 8)


def test_dataclasses_hold_packed_codes():
    k = torch.randn(1, 1, 8, 32)
    q = quantize_keys(k, 2, 8)
    assert isinstance(q, QuantizedKeys) and q.codes.shape == (1, 1, 8, 8)
    v = quantize_values(k, 2, 32)
    assert isinstance(v, QuantizedValues) and v.scale.shape == (1, 1, 8, 1)
