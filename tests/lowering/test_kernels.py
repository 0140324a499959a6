"""Tests of vmfx's Triton kernel templates against the exact CPU reference.

They run on a CUDA GPU when there is one, else in Triton's interpreter (``TRITON_INTERPRET=1``, set
by ``conftest.py``), with small shapes whose sizes are not multiples of the tiles. Every input is
fresh random data from a fixed seed (never zeros). What is checked:

* integer parts exactly: activation codes (every template that writes them) and the int32 GEMM
  accumulator of ``qlinear``; the fused quantize of ``qlinear`` equals the standalone
  ``quantize`` kernel (codes fed back through the pre-quantized variant give the same ``acc``);
* float outputs, as (largest absolute difference) / (largest magnitude of the expected tensor):
  ``qlinear`` <= 1e-5 (measured in the interpreter over 6 seeds x 5 cases: bit-identical without
  transcendental epilogues, <= 3.3e-8 with silu/softplus), ``merge_quantize`` bit for bit,
  ``conv`` <= 1e-6 of the reference (measured 1.1e-7: only ``exp`` in SiLU differs) and <= 1e-5
  of ``F.conv1d`` (measured 1.3e-7), the scan <= 1e-5 of :func:`vmfx.ops.selective_scan`
  (measured 3.0e-7, also 2.1e-7 at L = 197, N = 16); ``conv``'s codes equal the reference
  quantization of the kernel's own float output exactly (and the reference's own codes except,
  rarely, by one step where an ``exp`` ulp crosses a rounding tie);
* code generation: provenance header, the kernel cache (a second load returns the same function
  and does not rewrite the file), the epilogue vocabulary's checks, autotuned sources compile;
* ``_vmfx_rint`` against ``torch.round`` (hypothesis, ties and near-ties included).
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.lowering.conftest import DEVICE
from vmfx.lowering import codegen
from vmfx.lowering import kernels as K
from vmfx.lowering import reference as R
from vmfx.ops import selective_scan as ops_selective_scan
from vmfx.ops.quantize import fake_quantize

# ------------------------------------------------------------------------------ helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=g) * scale + shift).to(DEVICE)


def _smooth(g, k):
    return (torch.rand(k, generator=g) * 1.5 + 0.25).to(DEVICE)


def _calibrate(x, bits, per_token, smooth=None, shrink=0.9):
    """Min-max static parameters of x (B, L, K) (per token over batch and channels, or global),
    the range shrunk a little so that some values clamp. Returns an ActQuant."""
    v = x / smooth if smooth is not None else x
    dims = (0, 2) if per_token else (0, 1, 2)
    lo = v.amin(dim=dims).clamp(max=0)
    hi = v.amax(dim=dims).clamp(min=0)
    qmax = 2**bits - 1
    sa = ((hi - lo) / qmax * shrink).clamp(min=1e-6)
    za = torch.clamp(torch.round(-lo / sa), 0, qmax)
    return R.make_act_quant(sa, za, bits, smooth=smooth)


def _qweight(g, n, k, bits, smooth=None):
    w = _randn(g, n, k)
    ws = w * smooth if smooth is not None else w
    sw = ws.abs().amax(1) / (2 ** (bits - 1) - 1) * 0.95
    return w, sw, R.QWeight.from_float(w, sw, bits, smooth=smooth)


def _rel(a, b):
    """Largest absolute difference relative to the largest magnitude of b."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


# ------------------------------------------------------------------------------ qlinear

QLINEAR_CASES = [
    # id, per_token, act_bits, w_bits, smooth, bias, epilogue
    ("tok-a8w8-smooth-bias", True, 8, 8, True, True, []),
    ("tensor-a8w8-silu", False, 8, 8, False, False, [("silu",)]),
    ("tok-a4w4-smooth-softplus", True, 4, 4, True, True, [("softplus",)]),
    ("tok-a8w4-add-mul", True, 8, 4, False, True, [("add", "res"), ("mul", 0.5)]),
    ("tensor-a4w8-smooth-div-sub", False, 4, 8, True, False, [("div", 3.0), ("sub", "res")]),
    ("tok-a8w8-gamma-rsub-rdiv", True, 8, 8, False, True,
     [("mul", "gamma", "channel"), ("rsub", 1.0), ("rdiv", "res"), ("add", "gamma", "channel")]),
]


@pytest.mark.parametrize("case", QLINEAR_CASES, ids=[c[0] for c in QLINEAR_CASES])
def test_qlinear_matches_reference(case):
    name, per_token, a_bits, w_bits, smooth, has_bias, epilogue = case
    g = _gen(zlib.crc32(name.encode()))
    bsz, length, k, n = 2, 7, 100, 70  # M = 14, ragged against every tile
    # a strided activation: the first K channels of a (B, L, 2K) tensor, as a slice of in_proj
    x = _randn(g, bsz, length, 2 * k, scale=2.0, shift=0.3)[..., :k]
    s = _smooth(g, k) if smooth else None
    act = _calibrate(x, a_bits, per_token, s)
    _, _, qw = _qweight(g, n, k, w_bits, s)
    bias = _randn(g, n) if has_bias else None
    inputs = {}
    if any("res" in op for op in epilogue):
        inputs["res"] = _randn(g, bsz, length, n)
    if any("gamma" in op for op in epilogue):
        inputs["gamma"] = _randn(g, n)

    y, acc = K.qlinear(x, qw, act, bias, epilogue=epilogue, epilogue_inputs=inputs, return_acc=True,
                       provenance=[f"test.{name}"])
    y_ref, acc_ref = R.qlinear(x.cpu(), _cpu_w(qw), act.to("cpu"), _cpu(bias), epilogue,
                               _cpu_dict(inputs), return_acc=True)
    assert y.shape == (bsz, length, n) and acc.dtype == torch.int32
    assert torch.equal(acc.cpu(), acc_ref), "int32 accumulator differs from the exact reference"
    assert _rel(y.cpu(), y_ref) <= 1e-5

    # The fused quantize equals the standalone one: its codes through the pre-quantized variant.
    codes = K.quantize(x, act)
    assert torch.equal(codes.cpu(), R.quantize_act(x.cpu(), act.to("cpu")))
    y2, acc2 = K.qlinear(codes, qw, act, bias, epilogue=epilogue, epilogue_inputs=inputs,
                         return_acc=True)
    assert torch.equal(acc2, acc)
    assert _rel(y2.cpu(), y_ref) <= 1e-5


def test_qlinear_multi_tile_prequantized_2d():
    """Small explicit tiles: several programs in grouped order and several K steps, 2-D rows."""
    g = _gen(11)
    bsz, length, k, n = 5, 10, 72, 40
    x = _randn(g, bsz, length, k)
    act = _calibrate(x, 8, True)
    _, _, qw = _qweight(g, n, k, 8)
    bias = _randn(g, n)
    codes = R.quantize_act(x.cpu(), act.to("cpu")).to(DEVICE).reshape(bsz * length, k)
    block = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}
    y, acc = K.qlinear(codes, qw, act, bias, block=block, return_acc=True)
    y_ref, acc_ref = R.qlinear(codes.cpu(), _cpu_w(qw), act.to("cpu"), bias.cpu(), return_acc=True)
    assert y.shape == (bsz * length, n)
    assert torch.equal(acc.cpu(), acc_ref)
    assert _rel(y.cpu(), y_ref) <= 1e-5


def test_reference_qlinear_matches_graph_fake_quant():
    """The lowered contract reproduces the graph's F.linear(fq_a(x / s), fq_w(W * s)) + b: codes
    agree except within an ulp of a rounding tie (reciprocal multiplies instead of divisions)."""
    g = _gen(5)
    bsz, length, k, n = 4, 9, 64, 24
    x = torch.randn(bsz, length, k, generator=g) * 3.0
    s = torch.rand(k, generator=g) * 1.5 + 0.25
    act = _calibrate(x, 8, True, s)
    w = torch.randn(n, k, generator=g)
    sw = (w * s).abs().amax(1) / 127 * 0.95
    qw = R.QWeight.from_float(w, sw, 8, smooth=s)
    bias = torch.randn(n, generator=g)
    sa, za = act.scale.reshape(1, length, 1), act.zero_point.reshape(1, length, 1)
    xa = fake_quantize(x / s, sa, za, 0, 255)
    graph = F.linear(xa, fake_quantize(w * s, sw[:, None], 0.0, -127, 127), bias)
    lowered = R.qlinear(x, qw, act, bias)
    codes_graph = torch.clamp(torch.round(x / s / sa) + za, 0, 255)
    codes_low = R.unshift_codes(R.quantize_act(x, act)).float()
    diff = (codes_graph - codes_low).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    if diff.max() == 0:
        assert _rel(lowered, graph) <= 1e-5


# ------------------------------------------------------------------------------ quantize

QUANT_CASES = [(True, 8, True), (True, 4, False), (False, 8, False), (False, 4, True)]


@pytest.mark.parametrize("per_token,bits,smooth", QUANT_CASES)
def test_quantize_codes_exact(per_token, bits, smooth):
    g = _gen(100 + bits + 2 * per_token + 4 * smooth)
    bsz, length, k = 3, 11, 90
    x = _randn(g, bsz, length, k, scale=1.5, shift=-0.2)
    s = _smooth(g, k) if smooth else None
    act = _calibrate(x, bits, per_token, s)
    xs = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous strides
    codes = K.quantize(xs, act)
    ref = R.quantize_act(x.cpu(), act.to("cpu"))
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert torch.equal(codes.cpu(), ref)
    q = R.unshift_codes(codes.cpu(), bits)
    assert int(q.min()) >= 0 and int(q.max()) <= 2**bits - 1
    assert int(q.min()) == 0 and int(q.max()) == 2**bits - 1  # the shrunk range clamps both ends
    # inside the range, the dequantized codes are within half a step of the smoothed input
    deq = R.dequantize_act(codes.cpu(), act.to("cpu"))
    v = (x / s if smooth else x).cpu()
    step = act.scale.cpu()[torch.arange(length)].reshape(1, length, 1) if per_token else act.scale.cpu()
    inside = (q > 0) & (q < 2**bits - 1)
    assert bool(((deq - v).abs() <= step * (0.5 + 1e-4))[inside].all())


# ------------------------------------------------------------------------------ conv

CONV_CASES = [
    # id, width, flip, bias, act (None | (per_token, bits, smooth)), block
    ("tok8-smooth-bias", 4, False, True, (True, 8, True), None),
    ("tensor4-flip-tiles", 4, True, False, (False, 4, False), {"BLOCK_E": 16, "BLOCK_L": 16}),
    ("float-only-w3", 3, False, True, None, None),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_matches_reference(case):
    name, width, flip, has_bias, actspec, block = case
    g = _gen(zlib.crc32(name.encode()))
    bsz, e, length = 2, 40, 21
    # x as the model passes it: the transposed (B, L, E) half of in_proj's output, a strided view
    x = _randn(g, bsz, length, 2 * e)[..., :e].transpose(1, 2)
    w = _randn(g, e, width, scale=0.5)
    b = _randn(g, e, scale=0.2) if has_bias else None
    torch_out = F.silu(F.conv1d((x.flip(-1) if flip else x).cpu(), w.cpu()[:, None], _cpu(b),
                                padding=width - 1, groups=e)[..., :length])
    act = None
    if actspec is not None:
        per_token, bits, smooth = actspec
        s = _smooth(g, e) if smooth else None
        act = _calibrate(torch_out.transpose(1, 2).to(DEVICE), bits, per_token, s)
    res = K.causal_conv1d_silu(x, w, b, flip=flip, act=act, block=block)
    out = res if act is None else res[0]
    ref = R.causal_conv1d_silu(x.cpu(), w.cpu(), _cpu(b), flip=flip, act=None if act is None else act.to("cpu"))
    ref_out = ref if act is None else ref[0]
    assert out.shape == (bsz, e, length) and out.is_contiguous()
    assert _rel(out.cpu(), ref_out) <= 1e-6
    assert _rel(out.cpu(), torch_out) <= 1e-5
    if act is not None:
        codes = res[1].cpu()
        assert codes.shape == (bsz * length, e) and codes.dtype == torch.int8
        # exact, given the kernel's own float output
        own = R.quantize_act(out.cpu().transpose(1, 2).reshape(-1, e), act.to("cpu"))
        assert torch.equal(codes, own)
        # and against the reference's codes: equal except (rarely) one step at an exp-ulp tie
        diff = (codes.int() - ref[1].int()).abs()
        assert diff.max() <= 1 and (diff > 0).sum() <= 2


# ------------------------------------------------------------------------------ scan

SCAN_CASES = [
    # id, D, z, delta_bias, softplus, flip_z, block
    ("full", True, True, False, True, False, None),
    ("flipz-bias-tiles", True, True, True, True, True, {"BLOCK_E": 16}),
    ("plain", False, False, False, False, False, None),
]


@pytest.mark.parametrize("case", SCAN_CASES, ids=[c[0] for c in SCAN_CASES])
def test_scan_matches_ops(case):
    name, has_D, has_z, has_bias, softplus, flip_z, block = case
    g = _gen(zlib.crc32(name.encode()))
    bsz, e, n, length, rank = 2, 40, 6, 13, 3
    u = _randn(g, bsz, e, length)
    if softplus:  # dt_proj output, (B, L, E) transposed: a strided view
        delta = _randn(g, bsz, length, e, scale=1.0, shift=-2.0).transpose(1, 2)
    else:
        delta = (torch.rand(bsz, e, length, generator=g) * 0.5 + 0.01).to(DEVICE)
    A = -torch.exp(_randn(g, e, n, scale=0.5))
    x_dbl = _randn(g, bsz, length, rank + 2 * n)  # B and C: slices of x_proj's output
    Bm = x_dbl[..., rank:rank + n].transpose(1, 2)
    Cm = x_dbl[..., rank + n:].transpose(1, 2)
    D = _randn(g, e) if has_D else None
    z = _randn(g, bsz, e, length) if has_z else None
    db = _randn(g, e, scale=0.3) if has_bias else None
    out = K.selective_scan(u, delta, A, Bm, Cm, D, z, db, softplus, flip_z=flip_z, block=block)
    zc = None if z is None else (z.flip(-1) if flip_z else z).cpu()
    expected = ops_selective_scan(u.cpu(), delta.cpu(), A.cpu(), Bm.cpu(), Cm.cpu(), _cpu(D), zc,
                                  _cpu(db), delta_softplus=softplus)
    assert out.shape == (bsz, e, length)
    assert _rel(out.cpu(), expected) <= 1e-5
    ref = R.selective_scan(u.cpu(), delta.cpu(), A.cpu(), Bm.cpu(), Cm.cpu(), _cpu(D), _cpu(z),
                           _cpu(db), softplus, flip_z=flip_z)
    assert torch.equal(ref, expected)


# ------------------------------------------------------------------------------ merge

MERGE_CASES = [
    # id, backward, c, act (None | (per_token, bits, smooth)), write_float
    ("bi-tok8-smooth", True, 0.5, (True, 8, True), True),
    ("uni-tensor4", False, 1.0, (False, 4, False), True),
    ("bi-float-only", True, 0.5, None, True),
    ("bi-codes-only-tok4", True, 0.5, (True, 4, False), False),
]


@pytest.mark.parametrize("case", MERGE_CASES, ids=[c[0] for c in MERGE_CASES])
def test_merge_quantize_exact(case):
    name, backward, c, actspec, write_float = case
    g = _gen(zlib.crc32(name.encode()))
    bsz, e, length = 2, 40, 19
    y_f = _randn(g, bsz, e, length)
    y_b = _randn(g, bsz, length, e).transpose(1, 2) if backward else None  # strided
    act = None
    if actspec is not None:
        per_token, bits, smooth = actspec
        s = _smooth(g, e) if smooth else None
        m0 = R.merge_quantize(y_f.cpu(), _cpu(y_b), c)
        act = _calibrate(m0.to(DEVICE), bits, per_token, s)
    res = K.merge_quantize(y_f, y_b, c, act, write_float=write_float)
    ref = R.merge_quantize(y_f.cpu(), _cpu(y_b), c, None if act is None else act.to("cpu"))
    out, codes = (res, None) if act is None else res
    ref_out, ref_codes = (ref, None) if act is None else ref
    if write_float:
        assert out.shape == (bsz, length, e)
        assert torch.equal(out.cpu(), ref_out)
    else:
        assert out is None
    if act is not None:
        assert codes.shape == (bsz * length, e)
        assert torch.equal(codes.cpu(), ref_codes)


# ------------------------------------------------------------------------------ rint helper


def _rint_kernel():
    buf = codegen.IndentedBuffer()
    codegen.render_header(buf, "rint_test", ["tests.lowering.test_kernels"], {})
    codegen.render_helpers(buf, ["_vmfx_rint"])
    buf.splice("""
        @triton.jit
        def vmfx_rint_test(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            tl.store(y_ptr + offs, _vmfx_rint(tl.load(x_ptr + offs, mask=mask, other=0.0)), mask=mask)
    """)
    return codegen.load_kernel(buf.getvalue(), "vmfx_rint_test")


def _run_rint(values):
    x = torch.tensor(values, dtype=torch.float32).to(DEVICE)
    y = torch.empty_like(x)
    _rint_kernel()[(_cdiv(x.numel(), 64),)](x, y, x.numel(), BLOCK=64)
    return x.cpu(), y.cpu()


def _cdiv(a, b):
    return -(-a // b)


def test_rint_known_cases():
    ties = [k + 0.5 for k in range(-6, 6)]
    hard = [0.49999997, -0.49999997, 0.50000006, -0.50000006, 1.4999999, 2.5000002, -2.4999998,
            2.0**22 + 0.5, -(2.0**22) - 0.5, 2.0**23 - 0.5, 2.0**23 + 1, 1e30, -1e30, 3.4e38, 1e-45,
            -1e-45, -0.0, 0.0, 8388607.5, 254.5, 255.5, -127.5]
    x, y = _run_rint(ties + hard)
    assert torch.equal(y, torch.round(x)), list(zip(x.tolist(), y.tolist(), torch.round(x).tolist()))


_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
_tie = st.integers(-(2**22), 2**22).map(lambda k: k + 0.5)
_near_tie = st.tuples(st.integers(-300, 300), st.sampled_from([-1.0, 1.0])).map(
    lambda t: float(torch.nextafter(torch.tensor(t[0] + 0.5, dtype=torch.float32),
                                    torch.tensor(t[1] * float("inf"), dtype=torch.float32))))
_small = st.floats(-300.0, 300.0, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(_f32, _tie, _near_tie, _small), min_size=1, max_size=64))
def test_rint_matches_torch_round(values):
    x, y = _run_rint(values)
    assert torch.equal(y, torch.round(x))


# ------------------------------------------------------------------------------ codegen


def test_indented_buffer():
    buf = codegen.IndentedBuffer()
    buf.writeline("def f(x):")
    with buf.indent():
        buf.writeline("if x:")
        with buf.indent():
            buf.writeline("return 1")
        buf.splice("""
            y = x
            return y
        """)
    assert buf.getvalue() == "def f(x):\n    if x:\n        return 1\n    y = x\n    return y\n"
    with pytest.raises(ValueError):
        buf.writeline("a\nb")


def test_provenance_header_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VMFX_CACHE_DIR", str(tmp_path))
    codegen.clear_memo()  # other tests may have loaded this kernel (from another cache directory)
    prov = ["in_proj (call_module)", f"unique {tmp_path.name}"]
    src = K.render_quantize(per_token=False, provenance=prov)
    assert src.startswith("# vmfx generated kernel: template=quantize\n# provenance (FX nodes):\n")
    assert "#   in_proj (call_module)\n" in src
    fn = codegen.load_kernel(src, "vmfx_quantize")
    shared, labels = codegen.split_provenance(src)  # the compiled source: every layer's the same
    assert labels == prov and "in_proj" not in shared
    path = tmp_path / f"{codegen.code_hash(shared)}.py"
    assert path.read_text() == shared and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert codegen.kernel_provenance(codegen.code_hash(shared))[-2:] == prov
    other = K.render_quantize(per_token=False, provenance=["out_proj (call_module)"])
    assert codegen.load_kernel(other, "vmfx_quantize") is fn  # another layer, the same kernel
    before = path.stat()
    assert codegen.load_kernel(src, "vmfx_quantize") is fn  # memoized: same function object
    codegen.clear_memo()  # a fresh process: re-imported, but the file is not rewritten
    fn2 = codegen.load_kernel(src, "vmfx_quantize")
    after = path.stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    # the re-imported kernel runs
    x = _randn(_gen(3), 5, 20)
    act = R.make_act_quant(0.02, 100, 8)
    codes = torch.empty(5, 20, dtype=torch.int8, device=DEVICE)
    fn2[(1, 1)](x, act.inv_scale.to(DEVICE), act.zero_point.to(DEVICE), codes, 5, 20, 1, 20, 1,
                BLOCK_M=8, BLOCK_K=32)
    assert torch.equal(codes.cpu(), R.quantize_act(x.cpu(), act))


def test_launchers_reuse_compiled_kernels():
    from vmfx.lowering.kernels import merge as merge_mod

    y = _randn(_gen(4), 1, 16, 16)
    merge_mod._kernel.cache_clear()
    K.merge_quantize(y, None, 1.0)
    K.merge_quantize(y, None, 1.0)
    info = merge_mod._kernel.cache_info()
    assert (info.misses, info.hits) == (1, 1)


@pytest.mark.parametrize("render,kwargs", [
    (K.render_qlinear, dict(per_token=True, smooth=True, epilogue=[("silu",), ("add", "r")])),
    (K.render_qlinear, dict(per_token=False, prequantized=True, bias=False, act_bits=4)),
    (K.render_quantize, dict(per_token=True, smooth=True)),
    (K.render_conv, dict(width=4, flip=True, emit_codes=True, smooth=True)),
    (K.render_scan, dict(delta_bias=True, flip_z=True)),
    (K.render_merge, dict(emit_codes=True, per_token=False)),
])
def test_autotuned_sources_compile(render, kwargs):
    src = render(autotune=True, provenance=["n1"], **kwargs)
    assert "@triton.autotune(" in src and "# provenance (FX nodes):\n#   n1\n" in src
    compile(src, "<vmfx kernel>", "exec")  # syntax only: autotuning needs a GPU


def test_epilogue_vocabulary_checks():
    ep = codegen.Epilogue.parse([("silu",), ("add", "res"), ("mul", 2), ("sub", "res"), "softplus",
                                 ("rdiv", "g", "channel"), ("rsub", 1)])
    assert ep.inputs == ("res", "g") and ep.arg_names() == ["ep_res_ptr", "ep_g_ptr"]
    assert ep.layout("g") == "channel" and ep.layout("res") == "full"
    assert ep.helpers == ("_vmfx_silu", "_vmfx_softplus")
    buf = codegen.IndentedBuffer()
    codegen.render_epilogue(buf, ep)
    text = buf.getvalue()
    assert text.count("tl.load(ep_res_ptr") == 1 and "acc = acc * 2.0" in text
    assert "ep_g = tl.load(ep_g_ptr + offs_n, mask=mask_n" in text and "acc = ep_g / acc" in text
    assert "acc = 1.0 - acc" in text
    for bad in ([("gelu",)], [("add",)], [("silu", 1.0)], [("mul", float("inf"))], [("add", "not a name")],
                [("add", True)], [("add", "r", "row")], [("add", 1.0, "channel")],
                [("add", "r"), ("mul", "r", "channel")]):
        with pytest.raises((ValueError, TypeError)):
            codegen.Epilogue.parse(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is only forced without a GPU")
def test_ensure_backend_refuses_interpreter_off(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        codegen.ensure_backend()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    codegen.ensure_backend()


def test_launcher_argument_errors():
    g = _gen(9)
    x = _randn(g, 2, 5, 16)
    act = R.make_act_quant(torch.full((5,), 0.05), 128, 8)
    _, _, qw = _qweight(g, 8, 16, 8)
    with pytest.raises(ValueError, match="K=12"):
        K.qlinear(x[..., :12], qw, act)
    with pytest.raises(ValueError, match="tokens"):
        K.qlinear(_randn(g, 2, 4, 16), qw, act)
    with pytest.raises(ValueError, match="epilogue inputs"):
        K.qlinear(x, qw, act, epilogue=[("add", "res")])
    with pytest.raises(ValueError, match="zero points"):
        R.make_act_quant(0.1, 300, 8)


# ------------------------------------------------------------------------------ small utilities


def _cpu(t):
    return None if t is None else t.cpu()


def _cpu_dict(d):
    return None if d is None else {k: v.cpu() for k, v in d.items()}


def _cpu_w(qw: R.QWeight) -> R.QWeight:
    return R.QWeight(qw.codes.cpu(), qw.scale.cpu(), qw.wsum.cpu(), qw.bits)
