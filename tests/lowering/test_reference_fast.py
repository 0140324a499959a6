"""The CPU fast path of the exact reference against its slow path, bit for bit.

:func:`vmfx.lowering.reference.qlinear` on CPU tensors takes a fast path (float32 GEMM on the
integer codes where exact, K split where not, tables prepared once, overflow bounds proved per
weight); ``set_fast_path(False)`` selects the slow path (float64 GEMM, per-call gathers and overflow
check), the test oracle. Hypothesis draws shapes (ragged, 2-D and 3-D, per-token and per-tensor),
bit widths (2..8 activations, 4 and 8 weights), smoothing, bias, epilogues and pre-quantized input;
weights are drawn dense at the extremes of their range so that large K forces the split. Checked:
codes, int32 accumulator and float output identical; the plan's bound really bounds ``|acc|``;
a K beyond the float32-exact range is split; the overflow error still fires where an overflow is
possible.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vmfx.lowering import reference as R


@contextlib.contextmanager
def _path(fast: bool):
    previous = R.set_fast_path(fast)
    try:
        yield
    finally:
        R.set_fast_path(previous)


def _both(fn):
    with _path(False):
        slow = fn()
    with _path(True):
        fast = fn()
    return slow, fast


def _case(seed, batch, tokens, k, n, a_bits, w_bits, per_token, smooth, extreme):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, k, generator=g) * 3 + 0.5
    x[torch.rand(x.shape, generator=g) < 0.2] = 0.0  # rows of equal codes: zero accumulators
    s = torch.rand(k, generator=g) * 1.5 + 0.25 if smooth else None
    t = tokens if per_token else 1
    qmax = 2**a_bits - 1
    sa = torch.rand(t, generator=g) * 0.05 + 0.01
    za = torch.randint(0, qmax + 1, (t,), generator=g).float()
    act = R.make_act_quant(sa, za, a_bits, smooth=s)
    q = 2 ** (w_bits - 1) - 1
    if extreme:  # codes at +-q: the largest sums the range allows
        codes = (torch.randint(0, 2, (n, k), generator=g) * 2 - 1) * q
    else:
        codes = torch.randint(-q, q + 1, (n, k), generator=g)
    w = R.QWeight.from_codes(codes, torch.rand(n, generator=g) * 0.01 + 1e-3, w_bits)
    return x, act, w


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), tokens=st.integers(1, 9),
       k=st.sampled_from([1, 5, 16, 67, 300, 1100, 2500]), n=st.integers(1, 40),
       a_bits=st.integers(2, 8), w_bits=st.sampled_from([4, 8]), per_token=st.booleans(),
       smooth=st.booleans(), extreme=st.booleans(), bias=st.booleans(), two_d=st.booleans(),
       codes_in=st.booleans(), epilogue=st.sampled_from([(), (("silu",),), (("add", "res"), ("mul", 0.5))]))
def test_fast_path_is_bit_identical_to_the_slow_path(seed, batch, tokens, k, n, a_bits, w_bits, per_token,
                                                      smooth, extreme, bias, two_d, codes_in, epilogue):
    x, act, w = _case(seed, batch, tokens, k, n, a_bits, w_bits, per_token, smooth, extreme)
    if two_d:
        x = x.reshape(-1, k)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1)) if bias else None
    inputs = {"res": torch.randn(x.shape[:-1] + (n,))} if any("res" in op for op in epilogue) else None

    (codes_s, codes_f) = _both(lambda: R.quantize_act(x, act))
    assert codes_s.dtype == codes_f.dtype == torch.int8
    assert torch.equal(codes_s, codes_f)
    xin = codes_s if codes_in else x
    (y_s, acc_s), (y_f, acc_f) = _both(lambda: R.qlinear(xin, w, act, b, epilogue, inputs, return_acc=True))
    assert torch.equal(acc_s, acc_f)
    assert y_s.dtype == y_f.dtype == torch.float32 and y_s.shape == y_f.shape
    assert torch.equal(y_s.view(torch.int32), y_f.view(torch.int32))  # bit for bit, signed zeros too
    plan = R.qlinear_plan(w, act)
    assert int(acc_s.abs().max()) <= plan.bound


def test_large_k_is_split_and_stays_exact():
    """K = 4096 with 8-bit codes at +-127: 128 * 4096 * 127 > 2^24, so the GEMM is split."""
    x, act, w = _case(3, 2, 5, 4096, 16, 8, 8, True, False, True)
    plan = R.qlinear_plan(w, act)
    assert len(plan.chunks) > 1 and not plan.acc_in_f32
    assert [c[0] for c in plan.chunks][0] == 0 and plan.chunks[-1][1] == 4096
    assert all(a[1] == b[0] for a, b in zip(plan.chunks, plan.chunks[1:]))
    (y_s, acc_s), (y_f, acc_f) = _both(lambda: R.qlinear(x, w, act, return_acc=True))
    assert torch.equal(acc_s, acc_f) and torch.equal(y_s, y_f)


def test_small_k_runs_in_float32():
    x, act, w = _case(4, 2, 7, 192, 8, 8, 8, True, True, False)
    plan = R.qlinear_plan(w, act)
    assert plan.acc_in_f32 and len(plan.chunks) == 1 and not plan.check_overflow


def test_plan_is_made_once_and_remade_after_an_in_place_change():
    x, act, w = _case(5, 1, 3, 20, 4, 8, 8, True, False, False)
    assert R.qlinear_plan(w, act) is R.qlinear_plan(w, act)
    old = R.qlinear_plan(w, act)
    w.codes.neg_()  # wsum is now stale too: rebuild the weight the way callers do
    w2 = R.QWeight(w.codes, w.scale, w.codes.sum(1, dtype=torch.int32), w.bits)
    assert R.qlinear_plan(w2, act) is not old
    (y_s, _), (y_f, _) = _both(lambda: R.qlinear(x, w2, act, return_acc=True))
    assert torch.equal(y_s, y_f)


def test_overflow_is_still_reported_where_possible():
    """A K so large that |acc| can reach 2^31: both paths raise the same error."""
    k = 140_000
    x = torch.full((1, k), 1e6)
    act = R.make_act_quant(1.0, 0.0, 8)  # every code saturates at q = 255, z = 0
    w = R.QWeight.from_codes(torch.full((1, k), 127), torch.ones(1), 8)
    assert R.qlinear_plan(w, act).check_overflow
    for fast in (False, True):
        with _path(fast), pytest.raises(OverflowError, match="overflow"):
            R.qlinear(x, w, act)


def test_slow_path_switch_and_environment():
    previous = R.set_fast_path(False)
    try:
        assert not R.fast_path_enabled()
    finally:
        R.set_fast_path(previous)
    assert R.fast_path_enabled() == previous


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), e=st.integers(1, 12), length=st.integers(1, 9),
       width=st.integers(1, 5), bias=st.booleans(), flip=st.booleans(), quant=st.sampled_from([None, "token", "tensor"]),
       smooth=st.booleans(), bits=st.integers(2, 8), zeros=st.booleans())
def test_fast_conv_is_bit_identical_to_the_slow_path(seed, batch, e, length, width, bias, flip, quant, smooth, bits,
                                                    zeros):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, e, length, generator=g)
    if zeros:  # exact zeros and negative zeros in the input: signed-zero products
        x[torch.rand(x.shape, generator=g) < 0.3] = 0.0
        x[torch.rand(x.shape, generator=g) < 0.2] = -0.0
    w = torch.randn(e, width, generator=g)
    b = torch.randn(e, generator=g) if bias else None
    act = None
    if quant is not None:
        t = length if quant == "token" else 1
        act = R.make_act_quant(torch.rand(t, generator=g) * 0.05 + 0.01,
                               torch.randint(0, 2**bits, (t,), generator=g).float(), bits,
                               smooth=torch.rand(e, generator=g) + 0.5 if smooth else None)
    slow, fast = _both(lambda: R.causal_conv1d_silu(x, w, b, flip=flip, act=act))
    if act is None:
        slow, fast = (slow,), (fast,)
    for s, f in zip(slow, fast):
        assert s.dtype == f.dtype and s.shape == f.shape
        assert torch.equal(s.view(torch.int8) if s.dtype == torch.int8 else s.view(torch.int32),
                           f.view(torch.int8) if f.dtype == torch.int8 else f.view(torch.int32))  # bits, signed zeros too


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), e=st.integers(1, 12), length=st.integers(1, 9),
       backward=st.booleans(), scale=st.sampled_from([0.5, 1.0, 0.3]), quant=st.sampled_from([None, "token", "tensor"]),
       smooth=st.booleans(), bits=st.integers(2, 8))
def test_fast_merge_is_bit_identical_to_the_slow_path(seed, batch, e, length, backward, scale, quant, smooth, bits):
    g = torch.Generator().manual_seed(seed)
    y_f, y_b = torch.randn(batch, e, length, generator=g), torch.randn(batch, e, length, generator=g)
    act = None
    if quant is not None:
        t = length if quant == "token" else 1
        act = R.make_act_quant(torch.rand(t, generator=g) * 0.05 + 0.01,
                               torch.randint(0, 2**bits, (t,), generator=g).float(), bits,
                               smooth=torch.rand(e, generator=g) + 0.5 if smooth else None)
    slow, fast = _both(lambda: R.merge_quantize(y_f, y_b if backward else None, scale, act))
    if act is None:
        slow, fast = (slow,), (fast,)
    for s, f in zip(slow, fast):
        assert s.dtype == f.dtype and s.shape == f.shape
        assert torch.equal(s.view(torch.int8) if s.dtype == torch.int8 else s.view(torch.int32),
                           f.view(torch.int8) if f.dtype == torch.int8 else f.view(torch.int32))


@pytest.mark.parametrize("epilogue", [[("silu",)], [("softplus",)], [("add", "res"), ("mul", 0.5)],
                                      [("mul", "gamma", "channel"), ("rsub", 1.0), ("rdiv", "res"), ("div", 3.0),
                                       ("sub", "res"), ("add", "gamma", "channel")]])
def test_fast_epilogues_match_the_slow_path(epilogue):
    x, act, w = _case(9, 2, 7, 50, 12, 8, 8, True, True, False)
    g = torch.Generator().manual_seed(1)
    inputs = {"res": torch.randn(2, 7, 12, generator=g), "gamma": torch.randn(12, generator=g)}
    b = torch.randn(12, generator=g)
    (y_s, a_s), (y_f, a_f) = _both(lambda: R.qlinear(x, w, act, b, epilogue, inputs, return_acc=True))
    assert torch.equal(a_s, a_f)
    assert torch.equal(y_s.view(torch.int32), y_f.view(torch.int32))
    assert torch.equal(inputs["res"], torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(1)))  # untouched


def test_all_zero_accumulator_is_a_positive_zero():
    """Codes equal to the zero point against negative weights: every product of the GEMM (the
    zero-point column's included) is -0; the fast path's accumulator must still be +0, as the
    slow path's integer round trip gives."""
    for m, k, n in [(3, 5, 4), (200, 96, 64), (1, 1, 1)]:
        act = R.make_act_quant(0.1, 128.0, 8)
        w = R.QWeight.from_codes(-torch.ones(n, k), torch.ones(n), 8)
        assert R.qlinear_plan(w, act).w_aug is not None  # the correction rides in the GEMM
        (y_s, a_s), (y_f, a_f) = _both(lambda: R.qlinear(torch.zeros(m, k), w, act, return_acc=True))
        assert torch.equal(y_s.view(torch.int32), y_f.view(torch.int32)) and not torch.signbit(y_f).any()


def test_correction_outside_the_gemm_where_the_bound_needs_it():
    """K = 1100 at 8 bits and extreme codes: the GEMM alone is exact in float32 but not with the
    correction column added, so the plan keeps the correction as a separate table."""
    x, act, w = _case(11, 2, 3, 1000, 6, 8, 8, True, False, True)
    plan = R.qlinear_plan(w, act)
    assert plan.w_aug is None
    (y_s, a_s), (y_f, a_f) = _both(lambda: R.qlinear(x, w, act, return_acc=True))
    assert torch.equal(a_s, a_f) and torch.equal(y_s.view(torch.int32), y_f.view(torch.int32))


@pytest.mark.parametrize("preset", ["pts-w8a8", "smoothquant-w4a8"])
def test_lowered_model_fast_path_is_bit_identical_to_the_slow_path(preset):
    """A whole lowered Vim (two bidirectional blocks, L = 17) on the reference backend: every
    partition on the fast path against the slow path, bit for bit."""
    import vmfx
    from vmfx.lowering import lower
    from vmfx.models import VisionMamba

    torch.manual_seed(0)
    model = VisionMamba(img_size=16, patch_size=4, stride=4, embed_dim=32, depth=2, num_classes=5).eval()
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    lowered = lower(vmfx.compile(model, images[:4], preset), "reference")
    with torch.no_grad():
        slow, fast = _both(lambda: lowered(images))
    assert torch.equal(slow.view(torch.int32), fast.view(torch.int32))
