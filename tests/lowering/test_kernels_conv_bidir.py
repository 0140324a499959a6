"""Tests of ``conv_bidir``: both directions' causal conv1d + SiLU (+ each direction's x_proj codes)
in one launch, :func:`vmfx.lowering.kernels.causal_conv1d_silu_bidir`.

Run on a CUDA GPU when there is one, else in Triton's interpreter (``conftest.py``), with small
ragged shapes (B=2, E=24, L=13, W=4; 16 x 8 tiles give several channel and position blocks per
direction). What is checked, with the tolerances of ``conv`` in ``test_kernels.py``:

* float32 input given as a strided transposed view: ``out`` (2, B, E, L) is within 1e-6 of
  :func:`vmfx.lowering.reference.causal_conv1d_silu_bidir` (only ``exp`` in SiLU differs); the
  codes (2, B*L, E) equal the reference quantization of the kernel's own float output exactly, and
  the reference's codes except, rarely, by one step where an ``exp`` ulp crosses a rounding tie;
  per-token and per-tensor quantizers, with smoothing on both, one or no side, with biases on both,
  one or no side, and without quantizers;
* each direction equals the single-direction launcher ``causal_conv1d_silu`` (``flip=False`` /
  ``flip=True``, same tiles) bit for bit, out and codes;
* float16 / bfloat16 input: the half output is the kernel's own float32 output rounded once
  (``_assert_rounded_once``, one bf16 ulp under the interpreter, which truncates), the codes do not
  depend on ``out_dtype``;
* bad arguments raise ``ValueError`` naming the problem.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from tests.lowering.conftest import DEVICE
from tests.lowering.test_kernels import _calibrate, _rel, _smooth
from tests.lowering.test_kernels_half import _assert_rounded_once
from vmfx.lowering import kernels as K
from vmfx.lowering import reference as R

BSZ, E, L, W = 2, 24, 13, 4
TILES = {"BLOCK_E": 16, "BLOCK_L": 8}  # 2 channel blocks x 2 position blocks per (batch, direction)


def _inputs(g, dtype=torch.float32, bias=(True, True)):
    # x as the model passes it: the transposed (B, L, E) half of in_proj's output, a strided view
    x = (torch.randn(BSZ, L, 2 * E, generator=g) * 1.5 + 0.2).to(dtype).to(DEVICE)[..., :E].transpose(1, 2)
    w_f = (torch.randn(E, W, generator=g) * 0.5).to(DEVICE)
    w_b = (torch.randn(E, W, generator=g) * 0.5).to(DEVICE)
    b_f = (torch.randn(E, generator=g) * 0.2).to(DEVICE) if bias[0] else None
    b_b = (torch.randn(E, generator=g) * 0.2).to(DEVICE) if bias[1] else None
    return x, w_f, b_f, w_b, b_b


def _acts(g, x, w_f, b_f, w_b, b_b, per_token, bits, smooth=(False, False)):
    """Each direction's quantizer, calibrated on that direction's reference output."""
    ref = R.causal_conv1d_silu_bidir(x.float().cpu(), w_f.cpu(), _cpu(b_f), w_b.cpu(), _cpu(b_b))
    return tuple(_calibrate(ref[d].transpose(1, 2).to(DEVICE), bits, per_token, _smooth(g, E) if smooth[d] else None)
                 for d in (0, 1))


def _cpu(t):
    return None if t is None else t.cpu()


CASES = [
    # id, bias (f, b), act (None | (per_token, bits, smooth (f, b))), block
    ("tok8-smooth-bias", (True, True), (True, 8, (True, True)), TILES),
    ("tensor4-nosmooth-nobias", (False, False), (False, 4, (False, False)), TILES),
    ("tok4-smooth-f-bias-b", (False, True), (True, 4, (True, False)), TILES),
    ("tensor8-smooth-b-bias-f", (True, False), (False, 8, (False, True)), {"BLOCK_E": 16, "BLOCK_L": 16}),
    ("float-only", (True, True), None, TILES),
    ("float-only-default-tiles", (True, False), None, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_conv_bidir_matches_reference_and_single_direction(case):
    name, bias, actspec, block = case
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    x, w_f, b_f, w_b, b_b = _inputs(g, bias=bias)
    assert not x.is_contiguous()
    act_f = act_b = None
    if actspec is not None:
        act_f, act_b = _acts(g, x, w_f, b_f, w_b, b_b, *actspec)
    res = K.causal_conv1d_silu_bidir(x, w_f, b_f, w_b, b_b, act_f=act_f, act_b=act_b, block=block)
    out = res if actspec is None else res[0]
    assert out.shape == (2, BSZ, E, L) and out.dtype == torch.float32 and out.is_contiguous()
    cpu_acts = {} if actspec is None else dict(act_f=act_f.to("cpu"), act_b=act_b.to("cpu"))
    ref = R.causal_conv1d_silu_bidir(x.cpu(), w_f.cpu(), _cpu(b_f), w_b.cpu(), _cpu(b_b), **cpu_acts)
    ref_out = ref if actspec is None else ref[0]
    assert _rel(out.cpu(), ref_out) <= 1e-6
    if actspec is not None:
        codes = res[1]
        assert codes.shape == (2, BSZ * L, E) and codes.dtype == torch.int8
        for d, act in enumerate((act_f, act_b)):
            assert codes[d].is_contiguous()
            # exact, given the kernel's own float output
            own = R.quantize_act(out[d].cpu().transpose(1, 2).reshape(-1, E), act.to("cpu"))
            assert torch.equal(codes[d].cpu(), own)
        # and against the reference's codes: equal except (rarely) one step at an exp-ulp tie
        diff = (codes.cpu().int() - ref[1].int()).abs()
        assert diff.max() <= 1 and (diff > 0).sum() <= 2
    # each direction is what the single-direction launcher returns, bit for bit
    for d, (w, b, act) in enumerate(((w_f, b_f, act_f), (w_b, b_b, act_b))):
        single = K.causal_conv1d_silu(x, w, b, flip=bool(d), act=act, block=block)
        if actspec is None:
            assert torch.equal(out[d], single)
        else:
            assert torch.equal(out[d], single[0]) and torch.equal(res[1][d], single[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_conv_bidir_half_in_half_out(dtype):
    g = torch.Generator().manual_seed(71 + (dtype == torch.bfloat16))
    x, w_f, b_f, w_b, b_b = _inputs(g, dtype)
    act_f, act_b = _acts(g, x, w_f, b_f, w_b, b_b, True, 8, (True, False))
    out32, codes32 = K.causal_conv1d_silu_bidir(x, w_f, b_f, w_b, b_b, act_f=act_f, act_b=act_b, block=TILES,
                                                out_dtype=torch.float32)
    out, codes = K.causal_conv1d_silu_bidir(x, w_f, b_f, w_b, b_b, act_f=act_f, act_b=act_b, block=TILES)
    assert out.dtype == dtype and out.shape == (2, BSZ, E, L) and out.is_contiguous()
    assert out32.dtype == torch.float32
    _assert_rounded_once(out.cpu(), out32.cpu(), dtype)
    assert torch.equal(codes, codes32)  # codes of the float32 result, whatever out's dtype
    ref_out, ref_codes = R.causal_conv1d_silu_bidir(x.float().cpu(), w_f.cpu(), b_f.cpu(), w_b.cpu(), b_b.cpu(),
                                                    act_f.to("cpu"), act_b.to("cpu"))
    assert _rel(out32.cpu(), ref_out) <= 1e-6
    diff = (codes.cpu().int() - ref_codes.int()).abs()
    assert diff.max() <= 1 and (diff > 0).sum() <= 2


def test_conv_bidir_argument_errors():
    g = torch.Generator().manual_seed(5)
    x, w_f, b_f, w_b, b_b = _inputs(g)
    tok8 = R.make_act_quant(torch.full((L,), 0.05), 128, 8)
    tensor8 = R.make_act_quant(0.05, 128, 8)
    tok4 = R.make_act_quant(torch.full((L,), 0.5), 8, 4)
    launch = K.causal_conv1d_silu_bidir
    with pytest.raises(ValueError, match="per-token but act_b is per-tensor"):
        launch(x, w_f, b_f, w_b, b_b, act_f=tok8, act_b=tensor8)
    with pytest.raises(ValueError, match="same bit width"):
        launch(x, w_f, b_f, w_b, b_b, act_f=tok8, act_b=tok4)
    with pytest.raises(ValueError, match="both be given"):
        launch(x, w_f, b_f, w_b, b_b, act_f=tok8)
    with pytest.raises(ValueError, match="both be given"):
        R.causal_conv1d_silu_bidir(x.cpu(), w_f.cpu(), None, w_b.cpu(), None, act_b=tok8)
    with pytest.raises(ValueError, match="act_b: per-token parameters for 5 tokens"):
        launch(x, w_f, b_f, w_b, b_b, act_f=tok8, act_b=R.make_act_quant(torch.full((5,), 0.1), 128, 8))
    with pytest.raises(ValueError, match="act_f.inv_smooth"):
        launch(x, w_f, b_f, w_b, b_b, act_f=R.make_act_quant(0.1, 128, 8, smooth=torch.ones(E + 1)), act_b=tensor8)
    with pytest.raises(ValueError, match="same width"):
        launch(x, w_f, b_f, w_b[:, :3], b_b)
    with pytest.raises(ValueError, match="w_b must be"):
        launch(x, w_f, b_f, w_b[:-1], b_b)
    with pytest.raises(ValueError, match="w_f must be"):
        launch(x, w_f[:, None, None], b_f, w_b, b_b)
    with pytest.raises(ValueError, match="w_f must have dtype torch.float32"):
        launch(x, w_f.double(), b_f, w_b, b_b)
    with pytest.raises(ValueError, match="b_b must have shape"):
        launch(x, w_f, b_f, w_b, b_b[:-1])
    with pytest.raises(ValueError, match="x must have dtype torch.float32 or torch.float16"):
        launch(x.double(), w_f, b_f, w_b, b_b)
    with pytest.raises(ValueError, match="x must be"):
        launch(x[0], w_f, b_f, w_b, b_b)
    with pytest.raises(ValueError, match="out_dtype"):
        launch(x, w_f, b_f, w_b, b_b, out_dtype=torch.float64)
    with pytest.raises(ValueError, match="out_dtype"):
        K.render_conv_bidir(width=W, out_dtype="float64")
    with pytest.raises(ValueError, match="width"):
        K.render_conv_bidir(width=0)


@pytest.mark.parametrize("kwargs", [
    dict(emit_codes=True, per_token=True, smooth_f=True, smooth_b=True),
    dict(emit_codes=True, per_token=False, smooth_b=True, bias_f=False, act_bits=4),
    dict(bias_b=False, out_dtype="bfloat16"),
])
def test_conv_bidir_autotuned_source_compiles(kwargs):
    src = K.render_conv_bidir(width=W, autotune=True, provenance=["conv1d", "conv1d_b"], **kwargs)
    assert "@triton.autotune(" in src and "# provenance (FX nodes):\n#   conv1d\n#   conv1d_b\n" in src
    assert "template=conv_bidir" in src
    compile(src, "<vmfx kernel>", "exec")  # syntax only: autotuning needs a GPU
