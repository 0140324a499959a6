"""Packed 4-bit weights (issue 13, part 2): two codes per byte, unpacked in registers in the GEMM.

Run on a CUDA GPU when there is one, else in Triton's interpreter (``conftest.py``), with small
ragged shapes (odd K included: the last high nibble is padding). Checked:

* :func:`pack_int4` / :func:`unpack_int4` round-trip every code in [-8, 7] bit for bit (hypothesis over
  shapes), and the packed form is half the bytes (rounded up);
* ``qlinear`` on a packed weight gives the int32 accumulator of the unpacked reference exactly and
  the same float output as the unpacked kernel, for W4A8 and W4A4, float32 / float16 / codes input,
  per-token and per-tensor;
* bad input gets a clear error (8-bit codes cannot be packed; codes outside [-8, 7]).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.lowering.conftest import DEVICE
from vmfx.lowering import kernels as K
from vmfx.lowering import reference as R


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(n, k, seed):
    codes = torch.randint(-8, 8, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = R.pack_int4(codes)
    assert packed.dtype == torch.int8 and packed.shape == (n, (k + 1) // 2)
    assert torch.equal(R.unpack_int4(packed, k), codes)


def test_every_nibble_value_round_trips():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # (3, 32): every value in both halves
    assert torch.equal(R.unpack_int4(R.pack_int4(codes), 32), codes)


def test_pack_refuses_wide_codes():
    w = R.QWeight.from_codes(torch.tensor([[100, -3]]), torch.ones(1), 8)
    with pytest.raises(ValueError, match="at most 4 bits"):
        w.pack()
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        R.pack_int4(torch.tensor([[9]], dtype=torch.int8))


def _case(seed, per_token, a_bits, k=101, n=70):
    g = torch.Generator().manual_seed(seed)
    bsz, length = 2, 7
    x = torch.randn(bsz, length, k, generator=g) * 2 + 0.3
    t = length if per_token else 1
    qmax = 2**a_bits - 1
    act = R.make_act_quant(torch.rand(t, generator=g) * 0.1 + 0.02,
                           torch.randint(0, qmax + 1, (t,), generator=g).float(), a_bits,
                           smooth=torch.rand(k, generator=g) + 0.5)
    w = R.QWeight.from_codes(torch.randint(-7, 8, (n, k), generator=g), torch.rand(n, generator=g) * 0.01 + 1e-3, 4)
    return x, act, w


def _dev(w):
    return R.QWeight(*(t.to(DEVICE) if isinstance(t, torch.Tensor) else t
                       for t in (w.codes, w.scale, w.wsum, w.bits, w.packed, w.in_features)))


@pytest.mark.parametrize("a_bits", [8, 4], ids=["w4a8", "w4a4"])
@pytest.mark.parametrize("per_token", [True, False], ids=["token", "tensor"])
@pytest.mark.parametrize("inp", ["fp32", "fp16", "codes"])
def test_packed_qlinear_matches_the_reference(a_bits, per_token, inp):
    x, act, w = _case(7 + a_bits + per_token, per_token, a_bits)
    wp = w.pack()
    assert wp.packed.numel() * 2 - w.codes.numel() in (0, w.codes.shape[0])  # half the bytes (K odd: + N/2)
    act_d = act.to(DEVICE)
    if inp == "codes":
        xin = R.quantize_act(x, act)
    else:
        xin = x.half() if inp == "fp16" else x
    bias = torch.randn(70, generator=torch.Generator().manual_seed(1))
    y, acc = K.qlinear(xin.to(DEVICE), _dev(wp), act_d, bias.to(DEVICE), return_acc=True)
    y_unpacked, acc_unpacked = K.qlinear(xin.to(DEVICE), _dev(w), act_d, bias.to(DEVICE), return_acc=True)
    y_ref, acc_ref = R.qlinear(xin, w, act, bias, return_acc=True)
    assert torch.equal(acc.cpu(), acc_ref) and torch.equal(acc_unpacked.cpu(), acc_ref)
    assert torch.equal(y, y_unpacked)
    # stored packed only (the lowered model's form): the kernel and the reference unpack it
    only = w.pack(keep_codes=False)
    assert only.codes is None and only.shape == w.shape
    y_only, acc_only = K.qlinear(xin.to(DEVICE), _dev(only), act_d, bias.to(DEVICE), return_acc=True)
    assert torch.equal(acc_only.cpu(), acc_ref) and torch.equal(y_only, y)
    y_ref_only, acc_ref_only = R.qlinear(xin, only, act, bias, return_acc=True)
    assert torch.equal(acc_ref_only, acc_ref) and torch.equal(y_ref_only, y_ref)
    assert torch.equal(y.cpu().float(), y_ref.to(y.dtype).float())


def test_from_packed_rebuilds_the_weight():
    _, _, w = _case(3, True, 8, k=33)
    wp = w.pack()
    back = R.QWeight.from_packed(wp.packed, 33, w.scale, 4)
    assert torch.equal(back.codes, w.codes) and torch.equal(back.wsum, w.wsum) and torch.equal(back.packed, wp.packed)


def test_packed_only_weight_needs_its_k():
    _, _, w = _case(4, True, 8, k=33)
    only = R.QWeight.from_packed(w.pack().packed, 33, w.scale, 4, keep_codes=False)
    assert only.codes is None and torch.equal(only.unpacked(), w.codes) and torch.equal(only.wsum, w.wsum)
    with pytest.raises(ValueError, match="in_features"):
        R.QWeight(None, w.scale, w.wsum, 4, only.packed)
    with pytest.raises(ValueError, match="K=40"):
        R.QWeight(None, w.scale, w.wsum, 4, only.packed, 40)
    # the slow reference path (the oracle) reads the packed-only weight too
    x, act, _ = _case(4, True, 8, k=33)
    previous = R.set_fast_path(False)
    try:
        assert torch.equal(R.qlinear(x, only, act), R.qlinear(x, w, act))
    finally:
        R.set_fast_path(previous)


def test_packed_source_unpacks_two_nibbles():
    src = K.render_qlinear(packed=True, prequantized=True)
    assert "KH = (K + 1) // 2" in src and "w_lo" in src and "w_hi" in src and src.count("tl.dot(") == 2
    assert "w_hi" not in K.render_qlinear(packed=False, prequantized=True)
