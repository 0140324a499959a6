"""OuroMamba's mixed-precision linear (issue 11): the generated Triton kernel against the exact
integer reference, under the interpreter without a GPU (small shapes, large tiles).

Checked on fresh random activations with a few large outlier channels per window:

* the reference's two int32 accumulators equal a float64 computation of ``sum qi W`` and
  ``sum qo W`` and its output the float64 dequantization (to float32 rounding);
* the kernel's accumulators equal the reference's exactly and its output to float32 rounding,
  for 8-bit outliers (W4A4O8) and 16-bit outliers split into two int8 planes (W4A8O16), for
  several row tilings (the per-tile index lists change, the result must not);
* the per-tile index lists hold exactly the union of the tile's outlier columns;
* bad input is refused with a message naming it.
"""

from __future__ import annotations

import pytest
import torch

from tests.lowering.conftest import DEVICE
from vmfx.token_layout import TokenLayout
from vmfx.lowering import kernels as K
from vmfx.lowering import mixed_reference as MR
from vmfx.lowering import reference as R
from vmfx.quant.mixed import MixedPrecisionQuantize
from vmfx.quant.observers import QParams
from vmfx.quant.spec import QuantSpec


def _case(seed: int, b: int, steps: int, k: int, n: int, a_bits: int, o_bits: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, steps, k, generator=g)
    hot = torch.randint(0, k, (3,), generator=g)
    x[:, :, hot] *= 25.0  # outlier channels
    x[:, steps // 2, torch.randint(0, k, (1,), generator=g)] += 60.0  # a transient one
    qmax = 2 ** (a_bits - 1) - 1
    scale = (x.abs().median(dim=-1).values.mean(0) * 3 / qmax).reshape(1, steps, 1)
    q = MixedPrecisionQuantize(QuantSpec(a_bits, True, "token"), QParams(scale, torch.zeros_like(scale), -qmax, qmax),
                               TokenLayout.token_major(x.shape), outlier_bits=o_bits)
    w = torch.randn(n, k, generator=g)
    ws = w.abs().amax(1) / 7
    weight = R.QWeight.from_float(w, ws, bits=4)
    bias = torch.randn(n, generator=g)
    return x, q, weight, bias


@pytest.mark.parametrize("a_bits,o_bits", [(4, 8), (8, 16)])
def test_reference_matches_float64(a_bits, o_bits):
    x, q, weight, bias = _case(1, 2, 23, 40, 24, a_bits, o_bits)
    codes = MR.mixed_codes(x, q)
    assert codes.mask.any() and (~codes.mask).any()
    assert not (codes.codes_in.bool() & codes.mask).any() and not (codes.codes_out.bool() & ~codes.mask).any()
    y, acc_i, acc_o = MR.mixed_qlinear(codes, weight, bias, return_acc=True)
    wq = weight.codes.double()
    assert torch.equal(acc_i.double(), codes.codes_in.double() @ wq.T)
    assert torch.equal(acc_o.double(), codes.codes_out.double() @ wq.T)
    tok = torch.arange(codes.codes_in.shape[0]) % codes.tokens
    expect = (codes.codes_in.double() * codes.scale_in.double()[tok, None]
              + codes.codes_out.double() * codes.scale_out.double()[:, None]) @ (wq * weight.scale.double()[:, None]).T
    expect = expect + bias.double()
    torch.testing.assert_close(y.double(), expect, rtol=1e-5, atol=1e-4)
    # and the integer form is the quantizer's own fake-quantized value
    fq = q(x).reshape(-1, x.shape[-1]).double()
    deq = codes.codes_in.double() * codes.scale_in.double()[tok, None] + codes.codes_out.double() * codes.scale_out.double()[:, None]
    torch.testing.assert_close(deq, fq, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("a_bits,o_bits", [(4, 8), (8, 16)])
@pytest.mark.parametrize("block_m", [16, 32])
def test_kernel_matches_reference(a_bits, o_bits, block_m):
    x, q, weight, bias = _case(2 + block_m, 2, 21, 48, 40, a_bits, o_bits)
    codes = MR.mixed_codes(x, q)
    y_ref, ai_ref, ao_ref = MR.mixed_qlinear(codes, weight, bias, return_acc=True)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    codes_d = MR.MixedCodes(*(dev(getattr(codes, f)) for f in ("codes_in", "scale_in", "codes_out", "scale_out", "mask")),
                           codes.in_bits, codes.out_bits)
    weight_d = R.QWeight(dev(weight.codes), dev(weight.scale), dev(weight.wsum), weight.bits)
    y, ai, ao = K.mixed_qlinear(codes_d, weight_d, dev(bias), return_acc=True,
                                block={"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_J": 16})
    assert torch.equal(ai.cpu(), ai_ref)
    assert torch.equal(ao.cpu(), ao_ref)
    torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-6, atol=1e-5)


def test_tile_lists_are_the_union_of_the_tile():
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(37, 19, generator=g) > 0.9
    cols, counts = MR.tile_outlier_columns(mask, 16)
    for t in range(cols.shape[0]):
        union = set(torch.nonzero(mask[16 * t: 16 * t + 16].any(0)).flatten().tolist())
        assert counts[t] == len(union)
        assert cols[t, : counts[t]].tolist() == sorted(union)


def test_kernel_refuses_bad_codes():
    x, q, weight, bias = _case(4, 1, 12, 16, 8, 4, 8)
    codes = MR.mixed_codes(x, q)
    bad = MR.MixedCodes(codes.codes_in.to(torch.int32), codes.scale_in, codes.codes_out, codes.scale_out, codes.mask, 4, 8)
    with pytest.raises(ValueError, match="codes.codes_in"):
        K.mixed_qlinear(bad, weight)


def test_asymmetric_quantizer_has_no_mixed_linear():
    x, q, weight, _ = _case(5, 1, 12, 16, 8, 4, 8)
    asym = MixedPrecisionQuantize(QuantSpec(4, False, "token"), QParams(q.scale.data, torch.full_like(q.scale.data, 8), 0, 15),
                                  q.layout, 8, 4.0)
    with pytest.raises(ValueError, match="symmetric"):
        MR.mixed_codes(x, asym)
