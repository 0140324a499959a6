"""Weights stored as integer codes: packing round trips, the stand-in weight reproduces the codes."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vmfx.ops.quantize import qrange, quantize
from vmfx.quant import stored_weights as sw

BITS = st.integers(min_value=2, max_value=8)


@settings(max_examples=60, deadline=None)
@given(bits=BITS, symmetric=st.booleans(), numel=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits, symmetric, numel, seed):
    qmin, qmax = qrange(bits, symmetric)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(qmin, qmax + 1, (numel,), generator=g)
    width = sw.bits_per_code(qmin, qmax)
    assert width == (4 if bits <= 4 else 8)
    data = sw._pack(codes - qmin, width)
    assert data.dtype == torch.uint8 and data.numel() == sw.packed_numel(numel, width)
    assert sw.check_codes(data, numel, qmin, qmax) is None
    assert torch.equal(sw._unpack(data, width, numel) + qmin, codes)


def test_codes_that_do_not_fit_the_spec_are_named():
    qmin, qmax = qrange(8, True)
    data = sw._pack(torch.randint(0, qmax - qmin + 1, (10,)), 8)
    assert "take 10 bytes" in sw.check_codes(data, 10, *qrange(4, True))  # 8-bit codes read as 4-bit
    assert "outside the quantizer's range" in sw.check_codes(data, 10, *qrange(6, True))
    assert "wider than 8 bits" in sw.check_codes(data, 10, *qrange(16, True))


@settings(max_examples=40, deadline=None)
@given(bits=BITS, symmetric=st.booleans(), smoothed=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_stand_in_weight_has_the_stored_codes(bits, symmetric, smoothed, seed):
    """The weight rebuilt from codes quantizes back to the same codes, so the graph's quantized
    weight (a function of the codes only) is bit for bit the same."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(7, 13, generator=g) * torch.rand(7, 1, generator=g) * 3
    factors = [torch.rand(13, generator=g) * 4 + 0.05] if smoothed else []
    ws = w * factors[0] if smoothed else w
    qmin, qmax = qrange(bits, symmetric)
    lo, hi = ws.amin(1, keepdim=True).clamp(max=0), ws.amax(1, keepdim=True).clamp(min=0)
    if symmetric:
        scale, zp = torch.maximum(-lo, hi) / qmax, torch.zeros(7, 1)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zp = (qmin - lo / scale).round().clamp(qmin, qmax)
    scale = scale.clamp(min=1e-8)
    codes = quantize(ws, scale, zp, qmin, qmax, dtype=torch.int32)
    data = sw._pack(codes - qmin, sw.bits_per_code(qmin, qmax))
    rebuilt = sw.decode(data, (7, 13), qmin, qmax, scale, zp, factors, torch.float32)
    rs = rebuilt * factors[0] if smoothed else rebuilt
    assert torch.equal(quantize(rs, scale, zp, qmin, qmax, dtype=torch.int32), codes)
    # the stand-in is the float weight up to half a step (divided by the smoothing factors)
    step = scale / (factors[0] if smoothed else 1)
    inside = (codes > qmin) & (codes < qmax)
    assert bool(((rebuilt - w).abs() <= step * 0.5 + 1e-5)[inside].all())
