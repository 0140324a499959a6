"""Tests of ``qlinear_group``: G pre-quantized linears on int8 codes (G, M, K) in one launch.

Run on a CUDA GPU when there is one, else in Triton's interpreter (``conftest.py``), with small
ragged shapes (G = 2 groups, M = 2 x 7 rows with per-token parameters over L = 7, K = 40, N = 30)
and explicit tiles smaller than the sizes (several row and column tiles, several K steps), so the
group axis, the grouped tile order and every mask are exercised. Checked:

* ``out[g]`` equals the exact reference ``qlinear(codes[g], weights[g], acts[g], biases[g])`` (the
  int32 accumulation is exact and the dequantize is the same float32 ops: <= 1e-6 relative, as the
  prequantized ``qlinear`` of ``test_kernels.py``, where it is measured bit-identical), for
  per-token and per-tensor activations, 8-bit and 4-bit weights (unpacked, packed, packed-only),
  4-bit activations, with and without biases (also a bias on one group only); it is also bit for
  bit the single-group ``qlinear`` launcher on the same codes; and
  :func:`vmfx.lowering.reference.qlinear_group` is that stack;
* float16 / bfloat16 ``out_dtype``: the float32 result rounded once (``_assert_rounded_once``);
* the stacking is done once: :meth:`GroupedQWeight.cached` returns the same object for the same
  parameters, a prebuilt :class:`GroupedQWeight` gives the same output, and an in-place change of a
  parameter is picked up;
* bad input raises ``ValueError`` naming the problem.
"""

from __future__ import annotations

import pytest
import torch

from tests.lowering.conftest import DEVICE
from tests.lowering.test_kernels import _rel
from tests.lowering.test_kernels_half import _assert_rounded_once
from vmfx.lowering import kernels as K
from vmfx.lowering import reference as R
from vmfx.lowering.kernels.linear_group import GroupedQWeight

G, BSZ, LENGTH, KDIM, NDIM = 2, 2, 7, 40, 30
M = BSZ * LENGTH
# tiles smaller than the sizes (tl.dot on a GPU needs >= 16 per side, int8 K >= 32)
BLOCK = ({"BLOCK_M": 8, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2} if DEVICE.type == "cpu"
         else {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2})


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _act(g, per_token, bits):
    t = LENGTH if per_token else 1
    qmax = 2**bits - 1
    return R.make_act_quant(torch.rand(t, generator=g) * 0.1 + 0.02,
                            torch.randint(0, qmax + 1, (t,), generator=g).float(), bits)


def _weight(g, bits, layout="codes"):
    q = 2 ** (bits - 1) - 1
    w = R.QWeight.from_codes(torch.randint(-q, q + 1, (NDIM, KDIM), generator=g),
                             torch.rand(NDIM, generator=g) * 0.01 + 1e-3, bits)
    if layout == "packed":
        w = w.pack()
    elif layout == "packed-only":
        w = w.pack(keep_codes=False)
    return w


def _dev_w(w):
    return R.QWeight(*(t.to(DEVICE) if isinstance(t, torch.Tensor) else t
                       for t in (w.codes, w.scale, w.wsum, w.bits, w.packed, w.in_features)))


def _case(seed, per_token=True, w_bits=8, layout="codes", a_bits=8, bias=True):
    """CPU codes (G, M, K), weights, acts, biases (a list, or None)."""
    g = _gen(seed)
    acts = [_act(g, per_token, a_bits) for _ in range(G)]
    weights = [_weight(g, w_bits, layout) for _ in range(G)]
    off = 2 ** (a_bits - 1)
    codes = torch.randint(-off, off, (G, M, KDIM), generator=g, dtype=torch.int8)
    biases = [torch.randn(NDIM, generator=g) for _ in range(G)] if bias else None
    return codes, weights, acts, biases


def _to_dev(weights, acts, biases):
    return ([_dev_w(w) for w in weights], [a.to(DEVICE) for a in acts],
            None if biases is None else [None if b is None else b.to(DEVICE) for b in biases])


def _per_group_ref(codes, weights, acts, biases):
    return [R.qlinear(codes[i], weights[i], acts[i], None if biases is None else biases[i]) for i in range(G)]


CASES = [
    # id, per_token, w_bits, weight layout, a_bits, bias
    ("tok-w8-bias", True, 8, "codes", 8, True),
    ("tensor-w8-bias", False, 8, "codes", 8, True),
    ("tok-w8-nobias", True, 8, "codes", 8, False),
    ("tensor-w8-nobias", False, 8, "codes", 8, False),
    ("tok-w4packed-bias", True, 4, "packed", 8, True),
    ("tensor-w4packed-nobias", False, 4, "packed", 8, False),
    ("tok-w4unpacked-a4-bias", True, 4, "codes", 4, True),
    ("tensor-w4packedonly-a4-bias", False, 4, "packed-only", 4, True),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_qlinear_group_matches_reference_per_group(case):
    name, per_token, w_bits, layout, a_bits, has_bias = case
    codes, weights, acts, biases = _case(sum(map(ord, name)), per_token, w_bits, layout, a_bits, has_bias)
    wd, ad, bd = _to_dev(weights, acts, biases)
    out = K.qlinear_group(codes.to(DEVICE), wd, ad, bd, token_shape=(BSZ, LENGTH), block=BLOCK,
                          provenance=[f"test.{name}"])
    assert out.shape == (G, M, NDIM) and out.dtype == torch.float32 and out.is_contiguous()
    refs = _per_group_ref(codes, weights, acts, biases)
    for i in range(G):
        assert _rel(out[i].cpu(), refs[i]) <= 1e-6, f"group {i}"
    ref = R.qlinear_group(codes, weights, acts, biases)
    assert ref.shape == (G, M, NDIM) and torch.equal(ref, torch.stack(refs))
    if layout == "packed":
        assert K.GroupedQWeight.cached(wd, ad, bd).packed


def test_default_blocks_strided_codes_and_one_bias():
    """Default (large-tile) blocks; codes a strided view (K channels of a wider tensor, groups
    apart); a bias on the second group only."""
    codes, weights, acts, _ = _case(5)
    wide = torch.randint(-128, 128, (G, M, KDIM + 9), generator=_gen(6), dtype=torch.int8)
    wide[..., :KDIM] = codes
    view = wide.to(DEVICE)[..., :KDIM]
    assert not view.is_contiguous()
    biases = [None, torch.randn(NDIM, generator=_gen(7))]
    wd, ad, bd = _to_dev(weights, acts, biases)
    out = K.qlinear_group(view, wd, ad, bd, token_shape=(BSZ, LENGTH))
    refs = _per_group_ref(codes, weights, acts, biases)
    for i in range(G):
        assert _rel(out[i].cpu(), refs[i]) <= 1e-6
        # and bit for bit the single-group launcher on the same codes
        assert torch.equal(out[i], K.qlinear(view[i], wd[i], ad[i], bd[i]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("per_token", [True, False], ids=["token", "tensor"])
def test_half_out_is_the_float32_result_rounded_once(dtype, per_token):
    codes, weights, acts, biases = _case(11 + per_token, per_token, 4, "packed")
    wd, ad, bd = _to_dev(weights, acts, biases)
    y = K.qlinear_group(codes.to(DEVICE), wd, ad, bd, token_shape=(BSZ, LENGTH), block=BLOCK, out_dtype=dtype)
    assert y.dtype == dtype and y.shape == (G, M, NDIM)
    _assert_rounded_once(y.cpu(), R.qlinear_group(codes, weights, acts, biases), dtype)


def test_stacking_is_done_once_and_cached():
    codes, weights, acts, biases = _case(21)
    wd, ad, bd = _to_dev(weights, acts, biases)
    grouped = K.GroupedQWeight.cached(wd, ad, bd)
    assert K.GroupedQWeight.cached(wd, ad, bd) is grouped  # same parameters: same stacked copy
    assert grouped.groups == G and grouped.shape == (NDIM, KDIM) and grouped.tokens == LENGTH
    assert grouped.store.shape == (G, NDIM, KDIM) and grouped.bias.shape == (G, NDIM)
    cd = codes.to(DEVICE)
    y = K.qlinear_group(cd, wd, ad, bd, token_shape=(BSZ, LENGTH), block=BLOCK)
    assert K.GroupedQWeight.cached(wd, ad, bd) is grouped
    # prebuilt at "lowering time" and passed in: same output
    built = GroupedQWeight.build(wd, ad, bd)
    assert built is not grouped
    assert torch.equal(K.qlinear_group(cd, built, None, token_shape=(BSZ, LENGTH), block=BLOCK), y)
    # an in-place change of a parameter is stacked again
    bd[1].add_(1.0)
    y2 = K.qlinear_group(cd, wd, ad, bd, token_shape=(BSZ, LENGTH), block=BLOCK)
    assert K.GroupedQWeight.cached(wd, ad, bd) is not grouped
    assert _rel(y2[1].cpu(), R.qlinear(codes[1], weights[1], acts[1], bd[1].cpu())) <= 1e-6
    assert _rel(y2[1].cpu(), y[1].cpu() + 1.0) <= 1e-6


def test_bad_input_raises():
    codes, weights, acts, biases = _case(31)
    wd, ad, bd = _to_dev(weights, acts, biases)
    cd = codes.to(DEVICE)
    ts = (BSZ, LENGTH)
    tensor_act = _act(_gen(1), False, 8).to(DEVICE)
    with pytest.raises(ValueError, match="per-token or every one per-tensor"):
        K.qlinear_group(cd, wd, [ad[0], tensor_act], bd, token_shape=ts)
    with pytest.raises(ValueError, match="same bits"):
        K.qlinear_group(cd, wd, [ad[0], _act(_gen(2), True, 4).to(DEVICE)], bd, token_shape=ts)
    with pytest.raises(ValueError, match="groups"):
        K.qlinear_group(cd, wd + wd[:1], ad + ad[:1], None, token_shape=ts)  # 3 groups, codes G=2
    with pytest.raises(ValueError, match="groups"):
        K.qlinear_group(cd, wd, ad[:1], bd, token_shape=ts)
    with pytest.raises(ValueError, match="groups"):
        K.qlinear_group(cd, wd, ad, bd[:1], token_shape=ts)
    with pytest.raises(ValueError, match="int8"):
        K.qlinear_group(cd.float(), wd, ad, bd, token_shape=ts)
    with pytest.raises(ValueError, match=r"\(G, M, K\)"):
        K.qlinear_group(cd[0], wd, ad, bd, token_shape=ts)
    with pytest.raises(ValueError, match="K=39"):
        K.qlinear_group(cd[..., :39], wd, ad, bd, token_shape=ts)
    with pytest.raises(ValueError, match="token_shape"):
        K.qlinear_group(cd, wd, ad, bd, token_shape=(3, 7))
    with pytest.raises(ValueError, match="L=14"):
        K.qlinear_group(cd, wd, ad, bd, token_shape=(1, 14))
    other = _dev_w(R.QWeight.from_codes(torch.zeros(NDIM + 1, KDIM), torch.ones(NDIM + 1)))
    with pytest.raises(ValueError, match="same shape"):
        K.qlinear_group(cd, [wd[0], other], ad, bd, token_shape=ts)
    with pytest.raises(ValueError, match="same bits"):
        K.qlinear_group(cd, [wd[0], _dev_w(_weight(_gen(3), 4))], ad, bd, token_shape=ts)
    with pytest.raises(ValueError, match="acts=None"):
        K.qlinear_group(cd, GroupedQWeight.build(wd, ad, bd), ad, token_shape=ts)
    with pytest.raises(ValueError, match="out_dtype"):
        K.qlinear_group(cd, wd, ad, bd, token_shape=ts, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="groups"):
        R.qlinear_group(codes, weights[:1], acts[:1])
    with pytest.raises(ValueError, match="int8"):
        R.qlinear_group(codes.float(), weights, acts)


def test_source_has_a_group_axis():
    src = K.render_qlinear_group(per_token=False, bias=False, packed=True, act_bits=4, provenance=["x_proj_f"])
    assert "tl.program_id(1)" in src and "w_hi" in src and src.count("tl.dot(") == 2
    assert "bias_ptr" not in src and "#   x_proj_f\n" in src
    src = K.render_qlinear_group(autotune=True)
    assert "@triton.autotune(" in src
    compile(src, "<vmfx kernel>", "exec")
