"""Property tests of the quantization primitives (vmfx.ops.quantize)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.reference import fake_quant_ref
from vmfx.ops.quantize import dequantize, fake_quantize, qrange, quantize

bits_st = st.integers(2, 8)
sym_st = st.booleans()


def _inputs(seed: int, n: int, spread: float):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float32) * spread


def _qparams(x, bits, symmetric):
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        scale = x.abs().max().clamp(min=1e-6) / qmax
        zp = torch.tensor(0.0)
    else:
        lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-6)
        zp = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zp, qmin, qmax


@given(bits=bits_st)
def test_qrange(bits):
    assert qrange(bits, True) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    assert qrange(bits, False) == (0, 2**bits - 1)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), bits=bits_st, symmetric=sym_st, spread=st.floats(1e-3, 1e3))
def test_round_trip_within_half_step_inside_range(seed, bits, symmetric, spread):
    x = _inputs(seed, 257, spread)
    scale, zp, qmin, qmax = _qparams(x, bits, symmetric)
    y = fake_quantize(x, scale, zp, qmin, qmax)
    lo, hi = (qmin - zp) * scale, (qmax - zp) * scale
    inside = (x >= lo) & (x <= hi)
    err = (y - x).abs()[inside]
    # half a step, plus float32 rounding of the products
    assert bool((err <= scale / 2 * (1 + 1e-5) + 1e-6 * x.abs().max()).all())
    torch.testing.assert_close(y.double(), fake_quant_ref(x, scale, zp, qmin, qmax), rtol=1e-6, atol=1e-6 * float(scale))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), bits=bits_st, symmetric=sym_st, shrink=st.floats(0.05, 0.9))
def test_clamping_outside_range(seed, bits, symmetric, shrink):
    x = _inputs(seed, 200, 3.0)
    scale, zp, qmin, qmax = _qparams(x * shrink, bits, symmetric)  # range too small for x
    y = fake_quantize(x, scale, zp, qmin, qmax)
    lo, hi = float((qmin - zp) * scale), float((qmax - zp) * scale)
    assert float(y.min()) >= lo - 1e-5 and float(y.max()) <= hi + 1e-5
    assert torch.allclose(y[x > hi + scale], torch.tensor(hi), atol=1e-5)
    assert torch.allclose(y[x < lo - scale], torch.tensor(lo), atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), bits=bits_st, symmetric=sym_st)
def test_idempotent(seed, bits, symmetric):
    x = _inputs(seed, 300, 2.0)
    scale, zp, qmin, qmax = _qparams(x, bits, symmetric)
    once = fake_quantize(x, scale, zp, qmin, qmax)
    twice = fake_quantize(once, scale, zp, qmin, qmax)
    assert torch.equal(once, twice)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), bits=bits_st, symmetric=sym_st)
def test_integer_path_equals_fake_quant_bit_for_bit(seed, bits, symmetric):
    x = _inputs(seed, 300, 5.0)
    scale, zp, qmin, qmax = _qparams(x, bits, symmetric)
    q = quantize(x, scale, zp, qmin, qmax)
    assert q.dtype in (torch.int8, torch.uint8)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    assert torch.equal(dequantize(q, scale, zp), fake_quantize(x, scale, zp, qmin, qmax))


def test_per_token_broadcasting_matches_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 9, 6, generator=g) * torch.linspace(0.1, 10, 9).view(1, 9, 1)
    qmin, qmax = qrange(4, False)
    lo = x.amin(dim=(0, 2), keepdim=True).clamp(max=0)
    hi = x.amax(dim=(0, 2), keepdim=True).clamp(min=0)
    scale = (hi - lo) / (qmax - qmin)
    zp = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    torch.testing.assert_close(fake_quantize(x, scale, zp, qmin, qmax).double(), fake_quant_ref(x, scale, zp, qmin, qmax))


def test_straight_through_gradients():
    x = torch.tensor([-3.0, -0.26, 0.1, 0.74, 2.9], requires_grad=True)
    scale = torch.tensor(0.5, requires_grad=True)
    qmin, qmax = qrange(3, True)  # -3..3 -> range [-1.5, 1.5]
    y = fake_quantize(x, scale, 0.0, qmin, qmax)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    # LSQ: inside, round(x/s) - x/s; outside, the clamp bound
    v = x.detach() / 0.5
    inside = (v.round() - v)[1:4].sum()
    expected = float(inside) + qmin + qmax
    assert abs(float(scale.grad) - expected) < 1e-5
