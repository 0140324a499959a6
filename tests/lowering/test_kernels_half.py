"""Half-precision input and output of the ``qlinear`` and ``quantize`` kernels (issue 13, part 1).

Run on a CUDA GPU when there is one, else in Triton's interpreter (``conftest.py``), with small
ragged shapes. The kernels read float16 / bfloat16 activations (converted to float32 in registers)
and write float16 / bfloat16 / float32 outputs (the float32 result rounded once, at the store). The
exact reference (:mod:`vmfx.lowering.reference`) takes the same half-precision input (its float32
conversion is exact), so:

* the activation codes and the int32 accumulator are identical;
* the half output equals the reference's float32 output rounded to that dtype, bit for bit, for
  epilogues without transcendental ops (checked), and within one half-precision ulp with SiLU.
  Exception: Triton's interpreter converts float32 to bfloat16 by truncation (seen here: 4.4300
  stored as 4.4062, not 4.4375), so under the interpreter bfloat16 outputs are checked to within
  one bfloat16 ulp; compiled on a GPU the conversion rounds to nearest and the check is exact;
* ``quantize_once`` (standalone quantize + GEMM on codes, the GPU default) gives the same results as
  the fused K-loop quantize.
"""

from __future__ import annotations

import pytest
import torch

from tests.lowering.conftest import DEVICE
from vmfx.lowering import kernels as K
from vmfx.lowering import reference as R

HALF = [torch.float16, torch.bfloat16]


def _assert_rounded_once(y, y_ref32, dtype):
    """``y`` is ``y_ref32`` rounded to ``dtype`` (bit for bit; one ulp for the interpreter's bf16)."""
    from vmfx.lowering.codegen import interpreting

    expected = y_ref32.to(dtype)
    if dtype == torch.bfloat16 and interpreting():
        ulp = 2.0 ** (torch.frexp(y_ref32)[1].float() - 8)  # one bf16 ulp at the value's binade
        assert bool(((y.float() - y_ref32).abs() <= ulp).all()), "bf16 output more than one ulp off"
        truncated = (y_ref32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
        assert bool(((y == expected) | (y == truncated)).all()), "bf16 output neither rounded nor truncated"
    else:
        assert torch.equal(y, expected), "half output differs from the reference rounded once"


def _setup(seed, dtype, per_token=True, smooth=True, a_bits=8, w_bits=8, n=70, k=100):
    g = torch.Generator().manual_seed(seed)
    bsz, length = 2, 7
    x = (torch.randn(bsz, length, k, generator=g) * 2 + 0.3).to(dtype)
    s = torch.rand(k, generator=g) * 1.5 + 0.25 if smooth else None
    v = x.float() / s if smooth else x.float()
    dims = (0, 2) if per_token else (0, 1, 2)
    lo, hi = v.amin(dim=dims).clamp(max=0), v.amax(dim=dims).clamp(min=0)
    qmax = 2**a_bits - 1
    sa = ((hi - lo) / qmax * 0.9).clamp(min=1e-6)
    act = R.make_act_quant(sa, torch.clamp(torch.round(-lo / sa), 0, qmax), a_bits, smooth=s)
    w = torch.randn(n, k, generator=g)
    ws = w * s if smooth else w
    qw = R.QWeight.from_float(w, ws.abs().amax(1) / (2 ** (w_bits - 1) - 1) * 0.95, w_bits, smooth=s)
    bias = torch.randn(n, generator=g)
    res = torch.randn(bsz, length, n, generator=g)
    return x, act, qw, bias, res


def _dev(act, qw):
    return act.to(DEVICE), R.QWeight(qw.codes.to(DEVICE), qw.scale.to(DEVICE), qw.wsum.to(DEVICE), qw.bits)


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", [(8, 8), (8, 4), (4, 4)], ids=["w8a8", "w4a8", "w4a4"])
def test_qlinear_half_in_half_out(dtype, bits):
    a_bits, w_bits = bits
    x, act, qw, bias, res = _setup(13 + a_bits + w_bits, dtype, a_bits=a_bits, w_bits=w_bits)
    act_d, qw_d = _dev(act, qw)
    ep = [("add", "res"), ("mul", 0.5)]
    y, acc = K.qlinear(x.to(DEVICE), qw_d, act_d, bias.to(DEVICE), epilogue=ep,
                       epilogue_inputs={"res": res.to(dtype).to(DEVICE)}, return_acc=True)
    assert y.dtype == dtype and y.shape == (2, 7, 70)
    y_ref, acc_ref = R.qlinear(x, qw, act, bias, ep, {"res": res.to(dtype)}, return_acc=True)
    assert torch.equal(acc.cpu(), acc_ref)
    _assert_rounded_once(y.cpu(), y_ref, dtype)
    codes = K.quantize(x.to(DEVICE), act_d)
    assert torch.equal(codes.cpu(), R.quantize_act(x, act))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("per_token", [True, False], ids=["token", "tensor"])
def test_qlinear_out_dtype_and_quantize_once(out_dtype, per_token):
    x, act, qw, bias, _ = _setup(29, torch.float32, per_token=per_token)
    act_d, qw_d = _dev(act, qw)
    xd = x.to(DEVICE)
    ep = [("silu",)]
    y_fused, acc_fused = K.qlinear(xd, qw_d, act_d, bias.to(DEVICE), epilogue=ep, out_dtype=out_dtype,
                                   quantize_once=False, return_acc=True)
    y_once, acc_once = K.qlinear(xd, qw_d, act_d, bias.to(DEVICE), epilogue=ep, out_dtype=out_dtype,
                                 quantize_once=True, return_acc=True)
    assert y_fused.dtype == y_once.dtype == out_dtype
    assert torch.equal(acc_fused, acc_once) and torch.equal(y_fused, y_once)
    y_ref, acc_ref = R.qlinear(x, qw, act, bias, ep, return_acc=True)
    assert torch.equal(acc_once.cpu(), acc_ref)
    # SiLU's exp may differ by an ulp of float32 before the rounding to the output dtype
    ulp = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[out_dtype]
    err = (y_once.cpu().float() - y_ref).abs() / y_ref.abs().clamp(min=1e-3)
    assert float(err.max()) <= ulp + 1e-6


def test_bad_out_dtype_is_refused():
    x, act, qw, _, _ = _setup(3, torch.float32)
    act_d, qw_d = _dev(act, qw)
    with pytest.raises(ValueError, match="out_dtype"):
        K.qlinear(x.to(DEVICE), qw_d, act_d, out_dtype=torch.float64)
    with pytest.raises(ValueError, match="out_dtype"):
        K.render_qlinear(out_dtype="float64")
