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


_granularities = st.sampled_from(["tensor", "token", "channel", "cluster"])


def _learned_qparams(g, x, granularity, bits, symmetric):
    """Step sizes (and zero points) of one granularity over ``x`` (B, L, C), scaled by a random factor
    so that some values clamp; the scale is a leaf that wants a gradient."""
    qmin, qmax = qrange(bits, symmetric)
    dims = {"tensor": (0, 1, 2), "token": (0, 2), "channel": (0, 1), "cluster": (0, 2)}[granularity]
    amax = x.abs().amax(dim=dims, keepdim=True) if granularity != "tensor" else x.abs().max()
    scale = amax * (0.5 + torch.rand(amax.shape, generator=g, dtype=x.dtype)) / qmax
    zp = 0.0 if symmetric else torch.randint(qmin, qmax + 1, scale.shape, generator=g).to(x.dtype)
    if granularity == "cluster":  # tokens share the scale of their cluster
        scale = scale[:, torch.arange(x.shape[1]) % 2][:, :, :]
        zp = zp if symmetric else zp[:, torch.arange(x.shape[1]) % 2]
    return scale.detach().clone().requires_grad_(True), zp, qmin, qmax


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), bits=bits_st, symmetric=sym_st, granularity=_granularities,
       straight_through=st.booleans(), spread=st.floats(1e-2, 1e2))
def test_fused_fake_quantize_matches_the_composed_form(seed, bits, symmetric, granularity, straight_through, spread):
    """The one-node fake quantization gives the composed form's values bit for bit and its gradients
    (to x and to the step size, at every granularity) up to float rounding; both are checked against
    the composed form in float64."""
    from vmfx.ops.quantize import FakeQuantizeFunction, fake_quantize_composed

    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 5, 4, generator=g) * spread).requires_grad_(True)
    scale, zp, qmin, qmax = _learned_qparams(g, x.detach(), granularity, bits, symmetric)
    upstream = torch.randn(x.shape, generator=g)

    fused = fake_quantize(x, scale, zp, qmin, qmax, straight_through)
    assert fused.grad_fn is not None and fused.grad_fn.name().endswith("FakeQuantizeFunctionBackward")
    composed = fake_quantize_composed(x, scale, zp, qmin, qmax, straight_through)
    assert torch.equal(fused, composed)
    gx, gs = torch.autograd.grad(fused, (x, scale), upstream)

    x64, s64 = x.detach().double().requires_grad_(True), scale.detach().double().requires_grad_(True)
    zp64 = zp if isinstance(zp, float) else zp.double()
    reference = fake_quantize_composed(x64, s64, zp64, qmin, qmax, straight_through)
    rx, rs = torch.autograd.grad(reference, (x64, s64), upstream.double())
    torch.testing.assert_close(gx.double(), rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gs.double(), rs, rtol=1e-4, atol=1e-4 * float(upstream.abs().sum()))
    assert gs.shape == scale.shape and gx.shape == x.shape


def test_fused_fake_quantize_gradient_to_x_alone_and_in_half_precision():
    """Only the inputs that want a gradient get one; a float16 input gets a float16 gradient."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 6, 8, generator=g) * 4).half().requires_grad_(True)
    scale = torch.full((1, 6, 1), 0.05)  # fixed step size: float32, no gradient
    y = fake_quantize(x, scale, 0.0, -7, 7)
    (gx,) = torch.autograd.grad(y.float().sum(), (x,))
    assert gx.dtype == torch.float16
    inside = (x.float() / scale).round().abs() < 7  # torch.clamp passes no gradient on the bounds either
    assert torch.equal(gx, inside.half())


def test_fake_quantize_without_gradients_is_the_composed_form():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 9, generator=g) * 10
    scale, zp = torch.rand(1, 9, generator=g) * 0.2 + 0.01, torch.randint(0, 15, (1, 9), generator=g).float()
    from vmfx.ops.quantize import fake_quantize_composed
    assert torch.equal(fake_quantize(x, scale, zp, 0, 15), fake_quantize_composed(x, scale, zp, 0, 15))


def test_fused_fake_quantize_with_a_zero_point_wider_than_the_input():
    """A zero point that broadcasts the result beyond x's and the scale's shape gives the composed form's
    values and gradients (the fused node cannot update its buffer in place there)."""
    from vmfx.ops.quantize import fake_quantize_composed

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(1, 6, generator=g) * 3).requires_grad_(True)
    scale = torch.full((1, 6), 0.2, requires_grad=True)
    zp = torch.randint(0, 16, (4, 1), generator=g).float()
    up = torch.randn(4, 6, generator=g)
    fused = fake_quantize(x, scale, zp, 0, 15)
    composed = fake_quantize_composed(x, scale, zp, 0, 15)
    assert torch.equal(fused, composed)
    for a, b in zip(torch.autograd.grad(fused, (x, scale), up), torch.autograd.grad(composed, (x, scale), up)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compiled_learning_fake_quantize_gives_the_eager_gradients():
    """Under ``torch.compile`` the learning path is the composed form (the compiler fuses it): same values
    and gradients as eager's fused node."""
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(4, 10, 8, generator=g) * 2).requires_grad_(True)
    scale = torch.full((1, 10, 1), 0.3, requires_grad=True)
    up = torch.randn(4, 10, 8, generator=g)

    def step(x, scale):
        return fake_quantize(x, scale, 0.0, -7, 7)

    eager = step(x, scale)
    compiled = torch.compile(step, fullgraph=True)(x, scale)
    assert torch.equal(eager, compiled)
    for a, b in zip(torch.autograd.grad(eager, (x, scale), up), torch.autograd.grad(compiled, (x, scale), up)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
