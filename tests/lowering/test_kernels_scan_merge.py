"""Tests of ``scan_merge``: both scan directions of a Vim block, their merge and out_proj's input
quantization in one launch, against :func:`vmfx.lowering.reference.scan_merge` (the composition of
the reference selective scans and ``merge_quantize``).

Run on a CUDA GPU when there is one, else in Triton's interpreter (``conftest.py``), with small
ragged shapes (E = 24 channels in blocks of 8 or 16, N = 5 states, L = 11 tokens) and the inputs as
the model passes them: transposed (B, L, E) views for u, delta and z, slices of x_proj's output for
B and C. What is checked:

* float32 inputs: ``m`` within 1e-5 (largest difference / largest magnitude) of the reference, as
  the per-direction scan; the codes equal the reference quantization of the kernel's own float32
  ``m`` exactly, and the reference's codes except, rarely, by one step where an ``exp`` ulp of the
  scan crosses a rounding tie (as for ``conv`` in ``test_kernels.py``); per-token and per-tensor,
  8 and 4 bits, with and without smoothing, with and without D, with and without softplus;
* float16 / bfloat16 inputs: the half ``m`` is the kernel's own float32 ``m`` rounded once (one
  bf16 ulp under the interpreter, see ``test_kernels_half.py``), the codes do not depend on the
  output dtype, the float32 ``m`` matches the reference on the exactly converted inputs;
* ``write_float=False`` returns ``(None, codes)`` with the same codes;
* bad arguments raise ``ValueError``; the autotuned source compiles;
* the fused dt_proj (delta computed in the kernel from the (B, L, R) slice ``x_proj_out[..., :R]``
  of each direction, as the model passes it): per-token and per-tensor dt activation parameters
  (a different choice per direction too), 8 and 4 bits, with and without smoothing, 8- and 4-bit
  weight codes, with and without bias, ranks 2..16 (padded to a power of 2), against the reference
  (same tolerances), and against the unfused launcher given ``reference.qlinear``'s delta computed
  outside; float16 / bfloat16 inputs as above; its argument errors.
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
from vmfx.lowering.kernels.scan_merge import DtProj

BSZ, E, N, L, RANK = 2, 24, 5, 11, 3


def _direction(g, dtype, has_D, softplus):
    """One direction's (u, delta, A, B, C, D), strided views as the model passes them."""
    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype).to(DEVICE)

    u = r(BSZ, L, E).transpose(1, 2)  # conv output, transposed
    if softplus:
        delta = r(BSZ, L, E, shift=-2.0).transpose(1, 2)  # dt_proj output, transposed
    else:
        delta = (torch.rand(BSZ, L, E, generator=g) * 0.5 + 0.01).to(dtype).to(DEVICE).transpose(1, 2)
    x_dbl = r(BSZ, L, RANK + 2 * N)  # B and C: slices of x_proj's output
    Bm, Cm = x_dbl[..., RANK:RANK + N].transpose(1, 2), x_dbl[..., RANK + N:].transpose(1, 2)
    A = -torch.exp(torch.randn(E, N, generator=g) * 0.5).to(DEVICE)
    D = torch.randn(E, generator=g).to(DEVICE) if has_D else None
    return u, delta, A, Bm, Cm, D


def _inputs(seed, dtype=torch.float32, has_D=True, softplus=True):
    """(u_f, delta_f, A_f, B_f, C_f, D_f, u_b, delta_b, A_b, B_b, C_b, D_b, z)."""
    g = torch.Generator().manual_seed(seed)
    fwd, bwd = _direction(g, dtype, has_D, softplus), _direction(g, dtype, has_D, softplus)
    z = torch.randn(BSZ, L, E, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
    return (*fwd, *bwd, z)


def _f32_cpu(args):
    """The inputs converted to float32 on the CPU (exact), for the reference."""
    return tuple(None if t is None else t.float().cpu() for t in args)


def _check_codes(codes, m32, act, ref_codes):
    assert codes.shape == (BSZ * L, E) and codes.dtype == torch.int8
    # exact, given the kernel's own float32 m
    assert torch.equal(codes.cpu(), R.quantize_act(m32.cpu().reshape(-1, E), act.to("cpu")))
    # and against the reference's codes: equal except (rarely) one step at an exp-ulp tie
    diff = (codes.cpu().int() - ref_codes.int()).abs()
    assert diff.max() <= 1 and (diff > 0).sum() <= 2


CASES = [
    # id, act (None | (per_token, bits, smooth)), D, softplus, block
    ("tok8-smooth-D", (True, 8, True), True, True, {"BLOCK_E": 8}),
    ("tensor8-noD", (False, 8, False), False, True, {"BLOCK_E": 8}),
    ("tok4-noD", (True, 4, False), False, True, {"BLOCK_E": 16}),
    ("tensor4-smooth-D-default-block", (False, 4, True), True, True, None),
    ("tok8-smooth-D-no-softplus", (True, 8, True), True, False, {"BLOCK_E": 8}),
    ("float-only", None, True, True, {"BLOCK_E": 8}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_scan_merge_matches_reference(case):
    name, actspec, has_D, softplus, block = case
    args = _inputs(zlib.crc32(name.encode()), has_D=has_D, softplus=softplus)
    ref_args = _f32_cpu(args)
    m_ref = R.scan_merge(*ref_args, delta_softplus=softplus, scale=0.5)
    act = None
    if actspec is not None:
        per_token, bits, smooth = actspec
        s = _smooth(torch.Generator().manual_seed(7), E) if smooth else None
        act = _calibrate(m_ref.to(DEVICE), bits, per_token, s)
    res = K.scan_merge(*args, delta_softplus=softplus, scale=0.5, act=act, block=block,
                       provenance=[f"test.{name}"])
    m = res if act is None else res[0]
    assert m.shape == (BSZ, L, E) and m.dtype == torch.float32 and m.is_contiguous()
    assert _rel(m.cpu(), m_ref) <= 1e-5
    if act is None:
        return
    ref = R.scan_merge(*ref_args, delta_softplus=softplus, scale=0.5, act=act.to("cpu"))
    assert torch.equal(ref[0], m_ref)
    _check_codes(res[1], m, act, ref[1])
    # codes only: the same codes, no float output
    none, codes = K.scan_merge(*args, delta_softplus=softplus, scale=0.5, act=act, block=block,
                               write_float=False)
    assert none is None and torch.equal(codes, res[1])


def test_reference_is_the_composition():
    args = _f32_cpu(_inputs(3))
    act = _calibrate(R.scan_merge(*args, delta_softplus=True, scale=0.5), 8, True)
    y_f = R.selective_scan(*args[:6], args[12], None, True)
    y_b = R.selective_scan(*args[6:12], args[12], None, True, flip_z=True)
    m, codes = R.merge_quantize(y_f, y_b, 0.5, act)
    m2, codes2 = R.scan_merge(*args, delta_softplus=True, scale=0.5, act=act)
    assert torch.equal(m, m2) and torch.equal(codes, codes2)
    none, codes3 = R.scan_merge(*args, delta_softplus=True, scale=0.5, act=act, write_float=False)
    assert none is None and torch.equal(codes3, codes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_scan_merge_half_in_half_out(dtype):
    args = _inputs(40 + (dtype == torch.bfloat16), dtype)
    ref_args = _f32_cpu(args)
    m_ref = R.scan_merge(*ref_args, delta_softplus=True, scale=0.5)
    act = _calibrate(m_ref.to(DEVICE), 8, True, _smooth(torch.Generator().manual_seed(8), E))
    block = {"BLOCK_E": 8}
    m32, codes32 = K.scan_merge(*args, delta_softplus=True, scale=0.5, act=act, block=block,
                                out_dtype=torch.float32)
    m, codes = K.scan_merge(*args, delta_softplus=True, scale=0.5, act=act, block=block)
    assert m.dtype == dtype and m.shape == (BSZ, L, E) and m.is_contiguous()
    _assert_rounded_once(m.cpu(), m32.cpu(), dtype)
    assert torch.equal(codes, codes32)  # codes of the float32 m, whatever m's dtype
    assert _rel(m32.cpu(), m_ref) <= 1e-5
    _check_codes(codes32, m32, act, R.scan_merge(*ref_args, delta_softplus=True, scale=0.5, act=act.to("cpu"))[1])
    none, codes_only = K.scan_merge(*args, delta_softplus=True, scale=0.5, act=act, block=block, write_float=False)
    assert none is None and torch.equal(codes_only, codes32)


def test_scan_merge_argument_errors():
    args = list(_inputs(5))
    kw = dict(delta_softplus=True, scale=0.5)

    def with_(i, value):
        a = list(args)
        a[i] = value
        return a

    bad = [
        (with_(0, args[0].double()), kw, "u_f must have dtype"),
        (with_(12, args[12].double()), kw, "z must have dtype"),
        (with_(1, args[1][..., :-1]), kw, "delta_f must have shape"),  # wrong L
        (with_(7, args[7][:, :-1]), kw, "delta_b must have shape"),  # wrong E
        (with_(9, args[9][:, :-1]), kw, "B_b must have shape"),  # wrong N
        (with_(8, args[8][:, :-1]), kw, "A_b must have shape"),  # N differs from A_f's
        (with_(2, args[2][:-1]), kw, "A_f must be"),  # wrong E
        (with_(5, args[5][:-1]), kw, "D_f must have shape"),
        (with_(11, args[11].double()), kw, "D_b must have dtype"),
        (with_(0, args[0][0]), kw, "u_f must be"),  # not 3-D
        (with_(3, "B"), kw, "B_f must be a tensor"),
        (args, dict(kw, write_float=False), "needs act"),
        (args, dict(kw, out_dtype=torch.float64), "out_dtype"),
        (args, dict(kw, act=R.make_act_quant(torch.full((L + 1,), 0.05), 128, 8)), "tokens"),
        (args, dict(kw, act=R.make_act_quant(0.05, 128, 8, smooth=torch.ones(E + 1))), "inv_smooth"),
    ]
    for a, k, match in bad:
        with pytest.raises(ValueError, match=match):
            K.scan_merge(*a, **k)
    with pytest.raises(ValueError, match="out_dtype"):
        K.render_scan_merge(out_dtype="float64")
    with pytest.raises(ValueError):
        K.render_scan_merge(write_float=False, emit_codes=False)
    with pytest.raises(ValueError):
        R.scan_merge(*_f32_cpu(args), **kw, write_float=False)


@pytest.mark.parametrize("kwargs", [
    dict(emit_codes=True, per_token=True, smooth=True, workspace_is_out=True),
    dict(emit_codes=True, per_token=False, write_float=False, has_D_b=False, act_bits=4),
    dict(out_dtype="bfloat16", has_z=False, delta_softplus=False),
])
def test_autotuned_source_compiles(kwargs):
    src = K.render_scan_merge(autotune=True, provenance=["mixer.scan_f", "mixer.scan_b"], **kwargs)
    assert src.startswith("# vmfx generated kernel: template=scan_merge\n")
    assert "@triton.autotune(" in src and "#   mixer.scan_b\n" in src
    assert src.count("@triton.jit\ndef vmfx_scan_merge(") == 1
    compile(src, "<vmfx kernel>", "exec")  # syntax only: autotuning needs a GPU


# ------------------------------------------------------------------------------ fused dt_proj

def _dt_direction(g, dtype, rank, dspec, has_D, softplus):
    """One direction's scan inputs for the fused form: (u, A, B, C, D) and dt_proj's (dt_in,
    weight, act, bias), with dt_in, B and C slices of one (B, L, R + 2N) x_proj output.

    ``dspec`` = (per_token, act_bits, w_bits, smooth, bias)."""
    per_token, a_bits, w_bits, smooth, has_bias = dspec
    u = (torch.randn(BSZ, L, E, generator=g)).to(dtype).to(DEVICE).transpose(1, 2)
    x_dbl = torch.randn(BSZ, L, rank + 2 * N, generator=g).to(dtype).to(DEVICE)
    dt_in = x_dbl[..., :rank]
    Bm, Cm = x_dbl[..., rank:rank + N].transpose(1, 2), x_dbl[..., rank + N:].transpose(1, 2)
    A = -torch.exp(torch.randn(E, N, generator=g) * 0.5).to(DEVICE)
    D = torch.randn(E, generator=g).to(DEVICE) if has_D else None
    s = _smooth(g, rank) if smooth else None
    w = torch.randn(E, rank, generator=g) * (0.8 / rank**0.5 if softplus else 0.1 / rank**0.5)
    ws = w * s.cpu() if s is not None else w
    sw = ws.abs().amax(1) / (2 ** (w_bits - 1) - 1) * 0.95
    weight = R.QWeight.from_float(w, sw, w_bits, smooth=None if s is None else s.cpu())
    weight = R.QWeight(weight.codes.to(DEVICE), weight.scale.to(DEVICE), weight.wsum.to(DEVICE), w_bits)
    bias = None
    if has_bias:
        bias = torch.randn(E, generator=g) * 0.5 - 1.5 if softplus else torch.rand(E, generator=g) * 0.3 + 0.3
        bias = bias.to(DEVICE)
    elif not softplus:
        raise ValueError("without softplus the test needs a bias to keep delta positive")
    act = _calibrate(dt_in.float(), a_bits, per_token, s)
    return (u, A, Bm, Cm, D), dict(dt_in=dt_in, dt_weight=weight, dt_act=act, dt_bias=bias)


def _dt_inputs(seed, dspec_f, dspec_b, dtype=torch.float32, rank=(RANK, RANK), has_D=True, softplus=True):
    """(positional args with delta None, the dt_proj keywords)."""
    g = torch.Generator().manual_seed(seed)
    pos, kw = [], {}
    for d, dspec, r in (("f", dspec_f, rank[0]), ("b", dspec_b, rank[1])):
        (u, A, Bm, Cm, D), dt = _dt_direction(g, dtype, r, dspec, has_D, softplus)
        pos += [u, None, A, Bm, Cm, D]
        kw.update({f"{k}_{d}": v for k, v in dt.items()})
    z = torch.randn(BSZ, L, E, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
    return tuple(pos) + (z,), kw


def _dt_cpu(kw):
    """The dt_proj keywords on the CPU, dt_in converted to float32 (exact)."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            v = v.float().cpu()
        elif isinstance(v, R.ActQuant):
            v = v.to("cpu")
        elif isinstance(v, R.QWeight):
            v = R.QWeight(v.codes.cpu(), v.scale.cpu(), v.wsum.cpu(), v.bits)
        out[k] = v
    return out


def _deltas_outside(args, kw):
    """The unfused launcher's positional args: delta = reference dt_proj, transposed, on DEVICE."""
    a = list(args)
    for i, d in ((1, "f"), (7, "b")):
        a[i] = R.qlinear(kw[f"dt_in_{d}"].float().cpu(), *(_dt_cpu(kw)[f"dt_{k}_{d}"] for k in ("weight", "act")),
                         _dt_cpu(kw)[f"dt_bias_{d}"]).transpose(1, 2).to(DEVICE)
    return tuple(a)


DT_CASES = [
    # id, dt f spec, dt b spec (per_token, act_bits, w_bits, smooth, bias), rank (f, b), out act, D,
    # softplus, block
    ("tok8w8-smooth-bias", (True, 8, 8, True, True), (True, 8, 8, True, True), (RANK, RANK),
     (True, 8, True), True, True, {"BLOCK_E": 8}),
    ("tensor8w4-nobias", (False, 8, 4, False, False), (False, 8, 4, False, False), (5, 5),
     (False, 8, False), False, True, {"BLOCK_E": 16}),
    ("tok8w4-smooth-vs-tensor8w8", (True, 8, 4, True, False), (False, 8, 8, False, True), (RANK, RANK),
     (True, 4, False), True, True, None),
    ("tensor4w8-smooth-bias-rank16-float-only", (False, 4, 8, True, True), (True, 4, 8, True, True),
     (16, 16), None, True, True, {"BLOCK_E": 8}),
    ("tok8w8-bias-no-softplus", (True, 8, 8, False, True), (True, 8, 8, False, True), (2, 2),
     (True, 8, True), True, False, {"BLOCK_E": 8}),
]


@pytest.mark.parametrize("case", DT_CASES, ids=[c[0] for c in DT_CASES])
def test_scan_merge_fused_dt_proj(case):
    name, dspec_f, dspec_b, rank, actspec, has_D, softplus, block = case
    args, kw = _dt_inputs(zlib.crc32(name.encode()), dspec_f, dspec_b, rank=rank, has_D=has_D, softplus=softplus)
    ref_args, ref_kw = _f32_cpu(args), _dt_cpu(kw)
    m_ref = R.scan_merge(*ref_args, delta_softplus=softplus, scale=0.5, **ref_kw)
    act = None
    if actspec is not None:
        per_token, bits, smooth = actspec
        s = _smooth(torch.Generator().manual_seed(9), E) if smooth else None
        act = _calibrate(m_ref.to(DEVICE), bits, per_token, s)
    common = dict(delta_softplus=softplus, scale=0.5, act=act, block=block)
    res = K.scan_merge(*args, **common, provenance=[f"test.{name}"], **kw)
    m = res if act is None else res[0]
    assert m.shape == (BSZ, L, E) and m.dtype == torch.float32 and m.is_contiguous()
    assert _rel(m.cpu(), m_ref) <= 1e-5
    # the unfused launcher on the reference dt_proj's delta, computed outside
    res_unfused = K.scan_merge(*_deltas_outside(args, kw), **common)
    m_unfused = res_unfused if act is None else res_unfused[0]
    assert _rel(m.cpu(), m_unfused.cpu()) <= 1e-5
    if act is None:
        return
    ref = R.scan_merge(*ref_args, delta_softplus=softplus, scale=0.5, act=act.to("cpu"), **ref_kw)
    assert torch.equal(ref[0], m_ref)
    _check_codes(res[1], m, act, ref[1])
    diff = (res[1].cpu().int() - res_unfused[1].cpu().int()).abs()
    assert diff.max() <= 1 and (diff > 0).sum() <= 2
    none, codes = K.scan_merge(*args, **dict(common, write_float=False), **kw)
    assert none is None and torch.equal(codes, res[1])


def test_reference_fused_is_the_composition():
    args, kw = _dt_inputs(11, (True, 8, 8, True, True), (False, 8, 4, False, False))
    args, kw = _f32_cpu(args), _dt_cpu(kw)
    act = _calibrate(R.scan_merge(*args, delta_softplus=True, scale=0.5, **kw), 8, True)
    m, codes = R.scan_merge(*_deltas_outside(args, kw), delta_softplus=True, scale=0.5, act=act)
    m2, codes2 = R.scan_merge(*args, delta_softplus=True, scale=0.5, act=act, **kw)
    assert torch.equal(m, m2) and torch.equal(codes, codes2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_scan_merge_fused_dt_proj_half(dtype):
    args, kw = _dt_inputs(60 + (dtype == torch.bfloat16), (True, 8, 8, True, True), (False, 8, 4, False, True),
                          dtype=dtype, rank=(6, 6))
    ref_args, ref_kw = _f32_cpu(args), _dt_cpu(kw)
    m_ref = R.scan_merge(*ref_args, delta_softplus=True, scale=0.5, **ref_kw)
    act = _calibrate(m_ref.to(DEVICE), 8, True, _smooth(torch.Generator().manual_seed(10), E))
    common = dict(delta_softplus=True, scale=0.5, act=act, block={"BLOCK_E": 8})
    m32, codes32 = K.scan_merge(*args, **common, out_dtype=torch.float32, **kw)
    m, codes = K.scan_merge(*args, **common, **kw)
    assert m.dtype == dtype and m.shape == (BSZ, L, E) and m.is_contiguous()
    _assert_rounded_once(m.cpu(), m32.cpu(), dtype)
    assert torch.equal(codes, codes32)
    assert _rel(m32.cpu(), m_ref) <= 1e-5
    _check_codes(codes32, m32, act,
                 R.scan_merge(*ref_args, delta_softplus=True, scale=0.5, act=act.to("cpu"), **ref_kw)[1])


def test_scan_merge_fused_dt_proj_argument_errors():
    args, kw = _dt_inputs(12, (True, 8, 8, True, True), (True, 8, 8, False, False))
    common = dict(delta_softplus=True, scale=0.5)
    delta = torch.rand(BSZ, E, L, device=DEVICE)
    w_f = kw["dt_weight_f"]
    packed_only = R.QWeight.from_codes(w_f.codes.cpu().clamp(-7, 7), w_f.scale.cpu(), 4).pack(keep_codes=False)
    packed_only = R.QWeight(None, packed_only.scale.to(DEVICE), packed_only.wsum.to(DEVICE), 4,
                            packed_only.packed.to(DEVICE), RANK)

    def with_args(i, value):
        a = list(args)
        a[i] = value
        return a

    only_f = {k: v for k, v in kw.items() if k.endswith("_f")}
    no_act_b = dict(kw, dt_act_b=None)
    bad = [
        (with_args(1, delta), kw, "delta_f must be None"),
        (with_args(7, delta), kw, "delta_b must be None"),
        (with_args(1, delta), only_f, "both directions or in neither"),
        (args, {}, "delta_f is required"),
        (args, no_act_b, "dt_act_b is required"),
        (args, dict(kw, dt_weight_f=packed_only), "packed only"),
        (args, dict(kw, dt_weight_f=w_f.codes), "must be a QWeight"),
        (args, dict(kw, dt_in_f=kw["dt_in_f"][:, :-1]), "dt_in_f must have shape"),
        (args, dict(kw, dt_in_b=kw["dt_in_b"].double()), "dt_in_b must have dtype"),
        (args, dict(kw, dt_in_f=kw["dt_in_f"][..., :-1]), "dt_in_f must have shape"),  # rank != weight's
        (args, dict(kw, dt_weight_b=R.QWeight(w_f.codes[:-1], w_f.scale[:-1], w_f.wsum[:-1], 8)),
         "dt_weight_b.codes must be"),
        (args, dict(kw, dt_bias_f=kw["dt_bias_f"][:-1]), "dt_bias_f must have shape"),
        (args, dict(kw, dt_act_f=R.make_act_quant(torch.full((L + 1,), 0.05), 128, 8)), "tokens"),
        (args, dict(kw, dt_act_b=R.make_act_quant(0.05, 128, 8, smooth=torch.ones(RANK + 1))),
         "dt_act_b.inv_smooth"),
    ]
    for a, k, match in bad:
        with pytest.raises(ValueError, match=match):
            K.scan_merge(*a, **common, **k)
    ref_args, ref_kw = _f32_cpu(args), _dt_cpu(kw)
    with pytest.raises(ValueError, match="must be None"):
        R.scan_merge(*ref_args[:1], delta.cpu(), *ref_args[2:], **common, **ref_kw)
    with pytest.raises(ValueError, match="both directions or in neither"):
        R.scan_merge(*ref_args, **common, **{k: v for k, v in ref_kw.items() if k.endswith("_b")})
    with pytest.raises(ValueError, match="required"):
        R.scan_merge(*ref_args, **common)
    with pytest.raises(ValueError, match="both be given or both be None"):
        K.render_scan_merge(dt_proj_f=DtProj())
    with pytest.raises(ValueError, match="act_bits"):
        K.render_scan_merge(dt_proj_f=(True, False, 9, True), dt_proj_b=(True, False, 8, True))


@pytest.mark.parametrize("kwargs", [
    dict(emit_codes=True, per_token=True, workspace_is_out=True, dt_proj_f=(True, True, 8, True),
         dt_proj_b=(False, False, 4, False)),
    dict(emit_codes=True, write_float=False, delta_softplus=False, dt_proj_f=(False, True, 8, False),
         dt_proj_b=(True, False, 8, True)),
])
def test_autotuned_fused_source_compiles(kwargs):
    src = K.render_scan_merge(autotune=True, provenance=["mixer.dt_proj_f", "mixer.scan_f"], **kwargs)
    assert "#   dt_proj_f = DtProj(" in src and "BLOCK_R: tl.constexpr" in src
    assert "d" + "f_ptr" not in src.replace("dtxf_ptr", "")  # no delta pointer
    compile(src, "<vmfx kernel>", "exec")
