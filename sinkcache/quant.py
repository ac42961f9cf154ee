"""Asymmetric integer quantization with real bit-packing (KIVI layout).

Keys are quantized **per channel**: each group of ``group_size`` consecutive tokens shares one
scale/zero per channel, because key outliers live in fixed channels (KIVI, Liu et al. 2024).
Values are quantized **per token**: each token's head vector is split into groups of channels.

Codes are packed along the last (head_dim) axis for both, so every token owns whole bytes and
tokens can be gathered/evicted without touching their neighbours' codes.

Scales and zero points are stored in the model's dtype. They are rounded *outwards* (scale up,
zero down) before the codes are computed, so the integer grid always covers the group's range and
the dequantisation error stays within half a step (plus one ulp of the zero point).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 4, 8)


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is a supported width, else raise ``ValueError``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; allowed: {', '.join(map(str, SUPPORTED_BITS))}")
    return bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last axis into ``uint8``.

    ``codes``: ``[..., D]`` (any integer dtype); returns ``[..., D * bits // 8]``.

    Planar layout: with ``n = D * bits // 8`` bytes per token, bits ``[p*bits, (p+1)*bits)`` of
    byte ``j`` hold code ``p*n + j``. Unpacking is then one contiguous shift/mask per plane
    (``8 // bits`` vectorised passes) instead of an interleave with a tiny inner dimension, which
    made unpacking several times slower (see docs/performance.md).
    """
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise ValueError(f"last dim {codes.shape[-1]} is not divisible by {per_byte} ({bits}-bit packing)")
    c = codes.to(torch.uint8)
    if per_byte == 1:
        return c.contiguous()
    n = c.shape[-1] // per_byte
    out = c[..., :n].clone()
    for p in range(1, per_byte):
        # Distinct shifts never overlap, so OR-ing the planes in is exact.
        out.bitwise_or_(c[..., p * n : (p + 1) * n] << (p * bits))
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., D * bits // 8]`` ``uint8`` -> ``[..., D]`` ``uint8``.

    One contiguous shift/mask per plane, then one ``cat`` (a row-wise memcpy): writing each plane
    straight into its strided slice of the output is ~3x slower at ``head_dim`` 64.
    """
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    mask = (1 << bits) - 1
    planes = [packed & mask]
    for p in range(1, per_byte):
        plane = packed >> (p * bits)
        planes.append(plane if p == per_byte - 1 else plane.bitwise_and_(mask))  # top plane needs no mask
    return torch.cat(planes, dim=-1)


def unpack_float(packed: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Unpack straight to floating codes ``[..., D]`` of ``dtype`` (small integers, exact)."""
    return unpack(packed, bits).to(dtype)


def _outward_round(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Round scale up and zero down to ``dtype`` so the quantization grid still covers the range."""
    s = scale.to(dtype)
    s = torch.where(s.float() < scale, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
    z = zero.to(dtype)
    z = torch.where(z.float() > zero, torch.nextafter(z, torch.full_like(z, float("-inf"))), z)
    return s, z


def _scale_zero(lo: torch.Tensor, hi: torch.Tensor, bits: int, dtype: torch.dtype):
    qmax = (1 << bits) - 1
    rng = hi - lo
    # A constant group (zero range) gets scale 1: every code is 0 and dequantises to exactly `lo`.
    scale = torch.where(rng > 0, rng / qmax, torch.ones_like(rng))
    return _outward_round(scale, lo, dtype)


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = (1 << bits) - 1
    return ((x - zero.float()) / scale.float()).round_().clamp_(0, qmax)


@dataclass
class QuantizedKeys:
    """Keys quantized per channel over token groups.

    codes: ``[B, H, T, D*bits/8]`` uint8; scale/zero: ``[B, H, T/G, D]`` in the model dtype.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


@dataclass
class QuantizedValues:
    """Values quantized per token over channel groups.

    codes: ``[B, H, T, D*bits/8]`` uint8; scale/zero: ``[B, H, T, D/Gv]`` in the model dtype.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


def quantize_keys(
    k: torch.Tensor, bits: int, group_size: int, exclude: torch.Tensor | None = None
) -> QuantizedKeys:
    """Quantize keys ``[B, H, T, D]`` (T a multiple of ``group_size``) per channel.

    ``exclude``: optional ``[B, H, T]`` bool; excluded tokens (sinks, padding) do not take part in
    their group's min/max, so one outlier sink key cannot stretch the range for everyone else.
    Their codes are still written (clamped) but are never used: the caller keeps them elsewhere.
    """
    b, h, t, d = k.shape
    if t % group_size:
        raise ValueError(f"key block of {t} tokens is not a multiple of group_size={group_size}")
    x = k.float().reshape(b, h, t // group_size, group_size, d)
    if exclude is not None:
        ex = exclude.reshape(b, h, t // group_size, group_size, 1)
        lo = x.masked_fill(ex, float("inf")).amin(dim=3)
        hi = x.masked_fill(ex, float("-inf")).amax(dim=3)
        # Fully excluded channel group: nothing to represent, use an empty range at 0.
        empty = torch.isinf(lo)
        lo = lo.masked_fill(empty, 0.0)
        hi = hi.masked_fill(empty, 0.0)
    else:
        lo, hi = x.amin(dim=3), x.amax(dim=3)
    scale, zero = _scale_zero(lo, hi, bits, k.dtype)
    codes = _codes(x, scale.unsqueeze(3), zero.unsqueeze(3), bits).reshape(b, h, t, d)
    return QuantizedKeys(pack(codes, bits), scale, zero)


def dequantize_keys(q: QuantizedKeys, bits: int, group_size: int, out: torch.Tensor) -> torch.Tensor:
    """Dequantize into ``out`` (``[B, H, T, D]``, model dtype; may be a view). Returns ``out``."""
    b, h, t, d = out.shape
    o = out.view(b, h, t // group_size, group_size, d)
    # Convert the codes into the caller's buffer, then one in-place fused zero + codes * scale (one
    # rounding, as before): no full-size float temporary of the codes to write and read back.
    o.copy_(unpack(q.codes, bits).view(b, h, t // group_size, group_size, d))
    torch.addcmul(q.zero.unsqueeze(3), o, q.scale.unsqueeze(3), out=o)
    return out


def quantize_values(v: torch.Tensor, bits: int, group_size: int) -> QuantizedValues:
    """Quantize values ``[B, H, T, D]`` per token, in groups of ``group_size`` channels."""
    b, h, t, d = v.shape
    if d % group_size:
        raise ValueError(f"head_dim={d} is not divisible by the value group size {group_size}")
    x = v.float().reshape(b, h, t, d // group_size, group_size)
    lo, hi = x.amin(dim=-1), x.amax(dim=-1)
    scale, zero = _scale_zero(lo, hi, bits, v.dtype)
    codes = _codes(x, scale.unsqueeze(-1), zero.unsqueeze(-1), bits).reshape(b, h, t, d)
    return QuantizedValues(pack(codes, bits), scale, zero)


def dequantize_values(q: QuantizedValues, bits: int, group_size: int, out: torch.Tensor) -> torch.Tensor:
    """Dequantize into ``out`` (``[B, H, T, D]``, model dtype; may be a view). Returns ``out``."""
    b, h, t, d = out.shape
    codes = unpack(q.codes, bits).view(b, h, t, d // group_size, group_size)
    o = out.view(b, h, t, d // group_size, group_size)
    zero, scale = q.zero.unsqueeze(-1), q.scale.unsqueeze(-1)
    if out.dtype == torch.float32 or group_size == d:
        # Same single-rounding zero + codes * scale as below, ~3x faster: with both zero and scale
        # broadcast along the innermost axis addcmul falls off its vectorised loop; broadcasting
        # the zero point first leaves one broadcast operand. (Measured slower for bf16 with small
        # value groups, so those keep the one-call form.)
        o.copy_(zero.expand_as(o))
        o.addcmul_(codes, scale)
    else:
        torch.addcmul(zero, codes, scale, out=o)
    return out


def quantize_residual(x: torch.Tensor, approx: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Refinement codes for ``x`` ``[..., D]`` given its dequantized ``approx`` and per-element base
    ``scale`` (the base grid's step, broadcast to ``[..., D]``); returns packed ``uint8`` ``[..., D*bits/8]``.

    Rounding to the base grid leaves a residual within half a step, ``[-s/2, s/2]``. That interval
    is cut into ``2**bits`` equal cells and the code is the cell, reconstructed at its centre, so a
    token refined with ``bits`` more bits has the error of a ``base + bits`` grid without storing
    another scale or zero point (the base group's are reused).
    """
    cells = 1 << bits
    r = ((x.float() - approx.float()) / scale.float() + 0.5) * cells - 0.5
    return pack(r.round_().clamp_(0, cells - 1), bits)


def residual_cells(codes: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Refinement ``codes`` (packed, ``[..., n]``) as offsets from the base grid point, in cells of
    ``1 / 2**bits`` step: ``code - (2**bits - 1) / 2``, ``[..., n * 8 // bits]`` of ``dtype`` (exact).

    The step fraction is ``cells / 2**bits`` (a power-of-two scaling, exact), so callers fold it
    into one later in-place multiply: the result is bit-identical to :func:`residual_delta`."""
    return unpack(codes, bits).to(dtype).sub_(((1 << bits) - 1) / 2)


def residual_delta(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """What refinement ``codes`` (packed, ``[..., D*bits/8]``) add to the base dequantization:
    ``scale * ((code + 0.5) / 2**bits - 0.5)``, in ``scale``'s dtype, ``[..., D]``."""
    return residual_cells(codes, bits, scale.dtype).mul_(scale).mul_(1.0 / (1 << bits))
