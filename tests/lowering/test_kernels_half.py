"""Half-precision input and output of every kernel (issue 13, part 1): ``qlinear``, ``quantize``,
``conv``, ``scan``, ``merge_quantize`` and ``mixed_qlinear``.

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
  the fused K-loop quantize;
* ``conv``, ``scan``, ``merge_quantize`` and ``mixed_qlinear`` read half-precision activations
  (strided views, as the model passes them) and write ``out_dtype`` (default: the input's dtype;
  float32 for the mixed linear, whose input is codes): the half output is the same kernel's float32
  output rounded once (bit for bit; one bf16 ulp under the interpreter, as above), the codes they
  emit for the next linear do not depend on the output dtype, and the float32 output on half inputs
  matches the reference on the exactly converted inputs (to the tolerances of the fp32 tests in
  ``test_kernels.py`` / ``test_kernels_mixed.py``).
"""

from __future__ import annotations

import pytest
import torch

from tests.lowering.conftest import DEVICE
from tests.lowering.test_kernels import _calibrate, _rel, _smooth
from vmfx.lowering import kernels as K
from vmfx.lowering import mixed_reference as MR
from vmfx.lowering import reference as R
from vmfx.ops import selective_scan as ops_selective_scan

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


# ------------------------------------------------------------------ conv, scan, merge, mixed linear


def _half(g, dtype, *shape, scale=1.0, shift=0.0):
    """A fresh random activation in ``dtype`` on the kernels' device."""
    return (torch.randn(*shape, generator=g) * scale + shift).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("flip", [False, True], ids=["fwd", "flip"])
def test_conv_half_in_half_out(dtype, flip):
    g = torch.Generator().manual_seed(11 + flip)
    bsz, e, length, width = 2, 24, 13, 4
    x = _half(g, dtype, bsz, length, 2 * e)[..., :e].transpose(1, 2)  # in_proj's x half, a strided view
    w = (torch.randn(e, width, generator=g) * 0.5).to(DEVICE)
    b = (torch.randn(e, generator=g) * 0.2).to(DEVICE)
    ref32 = R.causal_conv1d_silu(x.float().cpu(), w.cpu(), b.cpu(), flip=flip)
    act = _calibrate(ref32.transpose(1, 2).to(DEVICE), 8, True, _smooth(g, e))
    out32, codes32 = K.causal_conv1d_silu(x, w, b, flip=flip, act=act, out_dtype=torch.float32)
    out, codes = K.causal_conv1d_silu(x, w, b, flip=flip, act=act)
    assert out.dtype == dtype and out.shape == (bsz, e, length) and out.is_contiguous()
    _assert_rounded_once(out.cpu(), out32.cpu(), dtype)
    assert torch.equal(codes, codes32)  # codes of the float32 result, whatever out's dtype
    assert _rel(out32.cpu(), ref32) <= 1e-6
    ref_codes = R.causal_conv1d_silu(x.float().cpu(), w.cpu(), b.cpu(), flip=flip, act=act.to("cpu"))[1]
    diff = (codes.cpu().int() - ref_codes.int()).abs()
    assert diff.max() <= 1 and (diff > 0).sum() <= 2  # one step at an exp-ulp tie, rarely


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("state", [False, True], ids=["float-state", "quantized-state"])
def test_scan_half_in_half_out(dtype, state):
    g = torch.Generator().manual_seed(21 + state)
    bsz, e, n, length, rank = 2, 24, 5, 11, 3
    u = _half(g, dtype, bsz, length, e).transpose(1, 2)  # conv output, transposed
    delta = _half(g, dtype, bsz, length, e, shift=-2.0).transpose(1, 2)  # dt_proj output, transposed
    x_dbl = _half(g, dtype, bsz, length, rank + 2 * n)  # B and C: slices of x_proj's output
    Bm, Cm = x_dbl[..., rank:rank + n].transpose(1, 2), x_dbl[..., rank + n:].transpose(1, 2)
    z = _half(g, dtype, bsz, length, e).transpose(1, 2)
    A = -torch.exp(torch.randn(e, n, generator=g) * 0.5).to(DEVICE)
    D = torch.randn(e, generator=g).to(DEVICE)
    extra = {}
    if state:
        extra = dict(step_scale=(torch.rand(length, generator=g) * 0.5 + 0.75).to(DEVICE),
                     out_scale=(torch.rand(e, generator=g) * 0.5 + 0.75).to(DEVICE),
                     state_scales=(torch.rand(length, generator=g) * 0.3 / 127 + 0.2 / 127).to(DEVICE), state_bits=8)
    out32 = K.selective_scan(u, delta, A, Bm, Cm, D, z, None, True, out_dtype=torch.float32, **extra)
    out = K.selective_scan(u, delta, A, Bm, Cm, D, z, None, True, **extra)
    assert out.dtype == dtype and out.shape == (bsz, e, length)
    _assert_rounded_once(out.cpu(), out32.cpu(), dtype)
    f = lambda t: t.float().cpu()  # noqa: E731  (exact)
    ref = R.selective_scan(f(u), f(delta), A.cpu(), f(Bm), f(Cm), D.cpu(), f(z), None, True,
                           **{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in extra.items()})
    assert _rel(out32.cpu(), ref) <= 1e-5
    if not state:
        expected = ops_selective_scan(f(u), f(delta), A.cpu(), f(Bm), f(Cm), D.cpu(), f(z), None, delta_softplus=True)
        assert _rel(out32.cpu(), expected) <= 1e-5


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("emit_codes", [False, True], ids=["float", "codes"])
def test_merge_half_in_half_out(dtype, emit_codes):
    g = torch.Generator().manual_seed(31 + emit_codes)
    bsz, e, length = 2, 24, 13
    y_f = _half(g, dtype, bsz, e, length)
    y_b = _half(g, dtype, bsz, length, e).transpose(1, 2)  # strided
    act = None
    if emit_codes:
        act = _calibrate(R.merge_quantize(y_f.float().cpu(), y_b.float().cpu(), 0.5).to(DEVICE), 4, True, _smooth(g, e))
    res = K.merge_quantize(y_f, y_b, 0.5, act)
    ref = R.merge_quantize(y_f.float().cpu(), y_b.float().cpu(), 0.5, None if act is None else act.to("cpu"))
    out, codes = (res, None) if act is None else res
    ref_out, ref_codes = (ref, None) if act is None else ref
    assert out.dtype == dtype and out.shape == (bsz, length, e)
    _assert_rounded_once(out.cpu(), ref_out, dtype)  # the reference's float32 merge is exact here
    if emit_codes:
        assert torch.equal(codes.cpu(), ref_codes)


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_mixed_qlinear_half_out(dtype):
    from vmfx.token_layout import TokenLayout
    from vmfx.quant.mixed import MixedPrecisionQuantize
    from vmfx.quant.observers import QParams
    from vmfx.quant.spec import QuantSpec

    g = torch.Generator().manual_seed(41)
    b, steps, k, n = 2, 9, 32, 24
    x = torch.randn(b, steps, k, generator=g).to(dtype)  # the model's half activation
    x[:, :, 5] *= 25.0  # an outlier channel
    scale = (x.float().abs().median(dim=-1).values.mean(0) * 3 / 7).reshape(1, steps, 1)
    q = MixedPrecisionQuantize(QuantSpec(4, True, "token"), QParams(scale, torch.zeros_like(scale), -7, 7),
                               TokenLayout.token_major(x.shape), outlier_bits=8)
    codes = MR.mixed_codes(x.float(), q)
    assert codes.mask.any()
    w = torch.randn(n, k, generator=g)
    weight = R.QWeight.from_float(w, w.abs().amax(1) / 7, bits=4)
    bias = torch.randn(n, generator=g)
    y_ref = MR.mixed_qlinear(codes, weight, bias)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    codes_d = MR.MixedCodes(*(dev(getattr(codes, f)) for f in ("codes_in", "scale_in", "codes_out", "scale_out", "mask")),
                           codes.in_bits, codes.out_bits)
    weight_d = R.QWeight(dev(weight.codes), dev(weight.scale), dev(weight.wsum), weight.bits)
    y32 = K.mixed_qlinear(codes_d, weight_d, dev(bias))
    y = K.mixed_qlinear(codes_d, weight_d, dev(bias), out_dtype=dtype)
    assert y32.dtype == torch.float32 and y.dtype == dtype
    _assert_rounded_once(y.cpu(), y32.cpu(), dtype)
    torch.testing.assert_close(y32.cpu(), y_ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("launch", ["conv", "scan", "merge", "mixed"])
def test_bad_float_dtypes_are_refused(launch):
    x = torch.randn(1, 4, 5, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="out_dtype" if launch == "mixed" else "float32 or torch.float16"):
        if launch == "conv":
            K.causal_conv1d_silu(x, torch.randn(4, 3, device=DEVICE))
        elif launch == "scan":
            K.selective_scan(x, x, torch.randn(4, 2, device=DEVICE), x, x)
        elif launch == "merge":
            K.merge_quantize(x)
        else:
            codes = MR.MixedCodes(torch.zeros(5, 4, dtype=torch.int8), torch.ones(5), torch.zeros(5, 4, dtype=torch.int8),
                                 torch.ones(5), torch.zeros(5, 4, dtype=torch.bool), 4, 8)
            K.mixed_qlinear(codes, R.QWeight.from_float(torch.randn(3, 4), torch.ones(3), bits=4),
                            out_dtype=torch.float64)
    with pytest.raises(ValueError, match="out_dtype"):
        {"conv": lambda: K.render_conv(width=3, out_dtype="float64"),
         "scan": lambda: K.render_scan(out_dtype="float64"),
         "merge": lambda: K.render_merge(out_dtype="float64"),
         "mixed": lambda: K.render_mixed_qlinear(out_dtype="float64")}[launch]()
