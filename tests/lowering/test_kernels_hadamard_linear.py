"""The online Hadamard as the prologue of the quantized GEMM (vmfx.lowering.kernels.hadamard_linear):
under the interpreter (or on a GPU), on fresh random inputs in float32 and float16, its output and
int32 accumulator equal the exact reference composition (``hadamard_quantize``, then ``qlinear`` on
the codes) bit for bit, for widths 2^k (k >= 5) and 12 / 20 x 16 (two base-product columns per
dot), int8 and packed 4-bit weights; its accumulator is within one activation step per channel of
the float64 ``x H`` reference (and equal to it away from rounding ties); widths whose dots would be
shallower than 32 are refused."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.lowering.conftest import DEVICE
from tests.lowering.test_kernels_hadamard import _act_for, _float64_codes
from vmfx.lowering import kernels as K
from vmfx.lowering import reference as R
from vmfx.lowering.params import QWeight, make_act_quant
from vmfx.quant.online_hadamard import fits_gemm_prologue

#: 2^k with k >= 5 (one base-product column per dot), and bases 12 and 20 times 16 (two per dot).
WIDTHS = [32, 64, 192, 320]


def _weight(n_out: int, n: int, bits: int, g: torch.Generator) -> QWeight:
    w = torch.randn(n_out, n, generator=g)
    weight = QWeight.from_float(w, w.abs().amax(1) / (2 ** (bits - 1) - 1), bits)
    return weight.pack(keep_codes=False) if bits <= 4 else weight


def _dev(w: QWeight) -> QWeight:
    return QWeight(*(t.to(DEVICE) if isinstance(t, torch.Tensor) else t
                     for t in (w.codes, w.scale, w.wsum, w.bits, w.packed, w.in_features)))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(n=192, dtype=torch.float16, per_token=True, smooth=False, act_bits=4, w_bits=4, bias=False, residual=True,
         batch=2, length=7, n_out=24, seed=1)  # the proxy's out_proj at W4A4 (d_inner 192 = 12 x 16), half
@given(n=st.sampled_from(WIDTHS), dtype=st.sampled_from([torch.float32, torch.float16]),
       per_token=st.booleans(), smooth=st.booleans(), act_bits=st.sampled_from([4, 8]),
       w_bits=st.sampled_from([4, 8]), bias=st.booleans(), residual=st.booleans(),
       batch=st.integers(1, 2), length=st.integers(1, 9), n_out=st.sampled_from([8, 24, 40]),
       seed=st.integers(0, 2**31 - 1))
def test_hadamard_qlinear_matches_the_references(n, dtype, per_token, smooth, act_bits, w_bits, bias, residual,
                                                 batch, length, n_out, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, length, n, generator=g) * 3 + torch.randn(n, generator=g)).to(dtype)
    s = torch.rand(n, generator=g) * 1.5 + 0.25 if smooth else None
    act = _act_for(R.fast_hadamard_transform(x.float()).reshape(batch, length, n), act_bits, per_token, s, g)
    weight = _weight(n_out, n, w_bits, g)
    b = torch.randn(n_out, generator=g) if bias else None
    epilogue, inputs = ([("add", "res")], {"res": torch.randn(batch, length, n_out, generator=g)}) if residual else ([], {})
    strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # a non-contiguous input of the same values
    y, acc = K.hadamard_qlinear(strided.to(DEVICE), _dev(weight), act.to(DEVICE),
                                None if b is None else b.to(DEVICE), epilogue=epilogue,
                                epilogue_inputs={k: v.to(DEVICE) for k, v in inputs.items()}, return_acc=True)
    y, acc = y.cpu(), acc.cpu()
    assert y.shape == (batch, length, n_out) and y.dtype == dtype
    y_ref, acc_ref = R.hadamard_qlinear(x, weight, act, b, epilogue=epilogue, epilogue_inputs=inputs, return_acc=True)
    assert torch.equal(acc, acc_ref)  # the composition of the exact reference ops, bit for bit
    assert torch.equal(y, y_ref.to(dtype))
    # against x H in float64: each code within one step of the float64 one, equal away from a tie
    codes64, tie = _float64_codes(x, act)
    tok = torch.arange(batch * length) % act.tokens
    wq = weight.unpacked().double()
    acc64 = (codes64.double() + act.offset - act.zero_point.double()[tok][:, None]) @ wq.T
    bound = (tie <= 1e-3).double() @ wq.abs().T  # one step on the channels near a rounding tie
    assert bool(((acc.reshape(-1, n_out).double() - acc64).abs() <= bound).all())


def test_the_fused_kernel_refuses_what_its_prologue_cannot_rotate():
    act = make_act_quant(torch.ones(1), torch.zeros(1), 8)
    g = torch.Generator().manual_seed(0)
    assert [fits_gemm_prologue(n) for n in (16, 32, 48, 192, 384, 768)] == [False, True, False, True, True, True]
    with pytest.raises(ValueError, match=r"at least 32 deep\), got 48; run hadamard_quantize"):
        K.hadamard_qlinear(torch.zeros(2, 48, device=DEVICE), _dev(_weight(8, 48, 8, g)), act.to(DEVICE))
    for n in (16, 36):
        with pytest.raises(ValueError, match=f"got {n};"):
            K.render_hadamard_qlinear(n=n)
    with pytest.raises(ValueError, match="does not fit 5 per-token parameters"):
        K.hadamard_qlinear(torch.zeros(2, 4, 32, device=DEVICE), _dev(_weight(8, 32, 8, g)),
                           make_act_quant(torch.ones(5), torch.zeros(5), 8).to(DEVICE))
