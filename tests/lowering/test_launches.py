"""What a lowered model launches per forward (issue 22): folded parameter constants, absorbed
flips, both scan directions of a block in one launch each, at most 6 launches per Vim block (also
with an online Hadamard before ``out_proj``, which runs in the prologue of its GEMM), half
precision between kernels, and ``torch.compile(fullgraph=True)`` on the reference backend.

The launch counts come from :func:`vmfx.lowering.launch_plan`, which runs the graph once and
counts every call that makes a new tensor (views are not launches)."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx

import vmfx
from vmfx.lowering import launch_plan, lower, lowered_partitions
from vmfx.lowering.rewrite import FoldedConstants, fold_parameter_constants, sink_flips
from vmfx.models import VisionMamba

#: The launches of one optimized Vim block.
VIM_BLOCK = {"RMSNorm": 1, "qlinear": 2, "conv_bidir": 1, "qlinear_group": 1, "scan_merge": 1}

#: ... and of one with an online Hadamard on out_proj's input, fused into out_proj's GEMM.
VIM_BLOCK_ROTATED = {"RMSNorm": 1, "qlinear": 1, "hadamard_qlinear": 1, "conv_bidir": 1, "qlinear_group": 1,
                     "scan_merge": 1}


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = VisionMamba(img_size=16, patch_size=4, stride=4, embed_dim=32, depth=2, num_classes=5).eval()
    images = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return model, images


@pytest.fixture(scope="module")
def quantized(small):
    model, images = small
    return vmfx.compile(model, images, "pts-w4a8")


@pytest.fixture(scope="module")
def rotated(small):
    """``rotate-online-w4a8`` on the small Vim: d_inner = 64 = 2^6, so the online Hadamard fuses."""
    model, images = small
    return vmfx.compile(model, images, "rotate-online-w4a8")


# -- the rewrites, on their own ------------------------------------------------------------------


class _ParamMath(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.A_log = torch.nn.Parameter(torch.randn(6, 4))
        self.w = torch.nn.Parameter(torch.randn(4, 6))

    def forward(self, x):
        A = -torch.exp(self.A_log.float())  # parameter-only: folded, float32 even in a half model
        scale = (self.w * 2.0).t()  # parameter-only: folded (a view of a computed value), follows the model's dtype
        return x @ A + x @ scale + x @ self.w.t()  # w.t(): a view of a parameter, kept


def test_fold_parameter_constants_computes_once_and_keeps_the_outputs():
    torch.manual_seed(3)
    module = _ParamMath()
    gm = fx.symbolic_trace(module)
    x = torch.randn(5, 6, dtype=torch.float64).float()
    expected = gm(x)
    folded = fold_parameter_constants(gm)
    gm.recompile()
    assert len(folded) == 2
    ops = {n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
    assert torch.exp not in ops and operator.neg not in ops and "float" not in ops
    assert "t" in ops  # the view of w was not turned into a copy
    assert torch.equal(gm(x), expected)
    holder = gm.get_submodule("vmfx_lowered.constants")
    assert isinstance(holder, FoldedConstants) and len(holder.pinned) == 1
    gm.half()
    dtypes = {name: buf.dtype for name, buf in holder.named_buffers()}
    assert sorted(dtypes.values(), key=str) == [torch.float16, torch.float32]  # A stays float32, as the graph had it


class _FlipTranspose(torch.nn.Module):
    def forward(self, x):  # (B, L, E): the backward direction's input, flipped along L, then made (B, E, L)
        return torch.nn.functional.silu(x.flip(1).transpose(1, 2)) * 2


def test_sink_flips_commutes_the_flip_past_the_transpose():
    from torch.fx.passes.shape_prop import ShapeProp

    gm = fx.symbolic_trace(_FlipTranspose())
    x = torch.randn(2, 7, 5)
    ShapeProp(gm).propagate(x)
    expected = gm(x)
    assert sink_flips(gm) == 1
    gm.recompile()
    order = [n.target for n in gm.graph.nodes if n.op == "call_method"]
    assert order == ["transpose", "flip"]
    flip = next(n for n in gm.graph.nodes if n.target == "flip")
    assert flip.args[1] == (2,)
    assert torch.equal(gm(x), expected)


# -- the lowered model ---------------------------------------------------------------------------


def test_six_launches_per_vim_block_and_no_parameter_math_per_forward(quantized, small):
    _, images = small
    lowered = lower(quantized, "reference")
    plan = launch_plan(lowered, images[:1])
    assert plan.per_block() == {0: 6, 1: 6}
    assert plan.kinds_per_block(0) == plan.kinds_per_block(1) == VIM_BLOCK
    kinds = {x.kind for x in plan.launches}
    assert not kinds & {"exp", "neg", "flip", "float"}  # folded or absorbed
    assert not any(n.op == "call_method" and n.target == "flip" for n in lowered.graph.nodes)
    # the unoptimized lowering, for comparison: the glue ops run per forward
    before = launch_plan(lower(quantized, "reference", optimize=False), images[:1])
    assert before.kinds_per_block(0) == {"RMSNorm": 1, "qlinear": 6, "conv": 2, "scan": 2, "merge": 1,
                                         "flip": 2, "exp": 2, "neg": 2}
    assert plan.bytes_per_forward(64) < before.bytes_per_forward(64)


@pytest.mark.parametrize("preset", ["pts-smooth-w8a8", "pts-w4a8", "ptq4vm-w4a4"])
def test_optimized_lowering_computes_what_the_unoptimized_one_does(small, preset):
    model, images = small
    q = vmfx.compile(model, images, preset)
    with torch.no_grad():
        fused, unfused, fake = lower(q, "reference")(images), lower(q, "reference", optimize=False)(images), q(images)
    # the same float32 operations, in other kernels: equal up to a rare one-step code difference at a tie
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-4 * float(unfused.abs().max()))
    torch.testing.assert_close(fused, fake, rtol=1e-4, atol=1e-4 * float(fake.abs().max()))


def test_half_precision_lowered_model_has_no_float32_activation(quantized, small):
    _, images = small
    half = lower(quantized, "reference").half()
    plan = launch_plan(half, images[:1].half())
    written = {d for x in plan.launches for d in x.dtypes_written}
    assert written <= {"float16", "int8"}, written
    assert all(p.io_dtype == torch.float16 for p in lowered_partitions(half))


def test_the_partitions_run_as_one_triton_launch_each(quantized, small):
    """The fused kernels under the interpreter (on the GPU when there is one) against the reference."""
    _, images = small
    x = images[:2]
    ref_model, triton_model = lower(quantized, "reference"), lower(quantized, "triton")
    if torch.cuda.is_available():
        triton_model, x_dev = triton_model.cuda(), x.cuda()
    else:
        x_dev = x
    with torch.no_grad():
        got, expected = triton_model(x_dev).cpu(), ref_model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_torch_compile_fullgraph_matches_eager(quantized, small):
    _, images = small
    lowered = lower(quantized, "reference")
    torch._dynamo.reset()
    compiled = torch.compile(lowered, fullgraph=True)
    with torch.no_grad():
        expected, got = lowered(images[:3]), compiled(images[:3])
    # the partitions are opaque custom ops (the same computation); inductor compiles the norms and glue
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    torch._dynamo.reset()


def test_torch_compile_of_the_triton_backend_in_half_precision(quantized, small):
    """The form benchmarks/gpu.py times: Triton kernels (the interpreter here), half precision,
    torch.compile(fullgraph=True); the kernels run as they do eagerly."""
    _, images = small
    x = images[:2].half()
    lowered = lower(quantized, "triton").half()
    if torch.cuda.is_available():
        lowered, x = lowered.cuda(), x.cuda()
    torch._dynamo.reset()
    with torch.no_grad():
        expected, got = lowered(x), torch.compile(lowered, fullgraph=True)(x)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
    torch._dynamo.reset()


def test_a_copied_lowered_model_runs_its_own_partitions_under_compile(quantized, small):
    """The custom op finds each partition by a key; a deepcopy (or an unpickled model) gets keys of
    its own, so a compiled copy does not run the original's weights."""
    import copy

    _, images = small
    lowered = lower(quantized, "reference")
    twin = copy.deepcopy(lowered)
    keys = {p._registry_key() for p in lowered_partitions(lowered)}
    assert keys.isdisjoint({p._registry_key() for p in lowered_partitions(twin)})
    for p in lowered_partitions(twin):
        if p.kind == "qlinear":
            p.w_scale.mul_(2.0)  # the copy now computes something else
    torch._dynamo.reset()
    with torch.no_grad():
        assert not torch.equal(torch.compile(twin, fullgraph=True)(images[:2]), lowered(images[:2]))
    torch._dynamo.reset()


def test_random_vim_t_lowers_to_six_launches_per_block():
    import timm

    import vmfx.models  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2").eval()
    calib = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    q = vmfx.compile(model, calib, "minmax-w8a8")
    plan = launch_plan(lower(q, "reference"), calib[:1])
    assert set(plan.per_block().values()) == {6} and len(plan.per_block()) == 24
    assert plan.kinds_per_block(11) == VIM_BLOCK
    assert plan.summary()["launches_outside_blocks"] == 5  # patch embed, class token cat, position add, norm, head


def test_lowered_proxy_makes_six_launches_per_block_in_half_precision():
    from vmfx.data import load_digits, load_proxy_model

    images, _ = load_digits("train")
    q = vmfx.compile(load_proxy_model(), images[:16], "pts-w8a8")
    half = lower(q, "reference").half()
    plan = launch_plan(half, images[:1].half())
    assert plan.per_block() == {b: 6 for b in range(6)}
    assert all(plan.kinds_per_block(b) == VIM_BLOCK for b in range(6))
    assert {d for x in plan.launches for d in x.dtypes_written} <= {"float16", "int8"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_a_rotate_online_vim_block_runs_six_launches(rotated, small, dtype):
    _, images = small
    lowered = lower(rotated, "reference", strict=True).to(dtype)
    plan = launch_plan(lowered, images[:1].to(dtype))
    assert plan.per_block() == {0: 6, 1: 6}
    assert plan.kinds_per_block(0) == plan.kinds_per_block(1) == VIM_BLOCK_ROTATED
    merges = [x for x in plan.launches if x.kind == "scan_merge"]
    assert all(x.dtypes_written == (str(dtype).removeprefix("torch."),) for x in merges)  # the float merged row
    assert "vmfx_hadamard_qlinear" in next(p for p in lowered_partitions(lowered) if p.kind == "hadamard_qlinear").source()


def test_the_fused_online_hadamard_computes_what_two_launches_do(rotated, small, monkeypatch):
    """The fused partition (reference and Triton backends) against today's two-launch path
    (``hadamard_quantize``, then ``qlinear`` on its codes), bit for bit, in float32 and float16."""
    import copy

    from vmfx.lowering import partition

    _, images = small
    fused_model = lower(rotated, "reference")
    monkeypatch.setattr(partition, "fits_gemm_prologue", lambda n: False)
    two_model = lower(rotated, "reference")
    assert launch_plan(two_model, images[:1]).kinds_per_block(0)["hadamard"] == 1
    with torch.no_grad():
        assert torch.equal(fused_model(images), two_model(images))
    fused = next(p for p in lowered_partitions(fused_model) if p.partition_name == "layers_0_mixer_out_proj")
    two = {p.kind: p for p in lowered_partitions(two_model)
           if p.partition_name in (fused.partition_name, fused.provenance[0].split()[0])}
    assert fused.kind == "hadamard_qlinear" and set(two) == {"hadamard", "qlinear"}
    g = torch.Generator().manual_seed(5)
    x, res = torch.randn(2, 17, 64, generator=g) * 0.5, torch.randn(2, 17, 32, generator=g)
    for dtype in (torch.float32, torch.float16):
        on_triton = copy.deepcopy(fused).to(dtype)
        on_triton.backend = "triton"
        rotation, linear, reference = (copy.deepcopy(m).to(dtype) for m in (two["hadamard"], two["qlinear"], fused))
        with torch.no_grad():
            expected = linear(rotation(x.to(dtype))[1], res.to(dtype))
            assert torch.equal(reference(x.to(dtype), res.to(dtype)), expected)
            device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
            got = on_triton.to(device)(x.to(device, dtype), res.to(device, dtype)).cpu()
        assert got.dtype == dtype and torch.equal(got, expected)


def test_a_saved_rotate_online_model_loads_fused_also_from_the_two_launch_form(rotated, small, monkeypatch, tmp_path):
    """A lowered file round-trips with the fused partition; a file written in the two-launch form
    (its own ``hadamard`` partition) loads into the fused form and computes the same."""
    from vmfx.lowering import partition

    _, images = small
    fused = lower(rotated, "reference", strict=True)
    loaded = vmfx.load(vmfx.save(fused, str(tmp_path / "fused.safetensors")))
    monkeypatch.setattr(partition, "fits_gemm_prologue", lambda n: False)
    two_launch_file = vmfx.save(lower(rotated, "reference", strict=True), str(tmp_path / "two.safetensors"))
    monkeypatch.undo()
    from_two = vmfx.load(two_launch_file)
    assert [p.kind for p in lowered_partitions(from_two)].count("hadamard_qlinear") == 2
    with torch.no_grad():
        expected = fused(images)
        assert torch.equal(loaded(images), expected) and torch.equal(from_two(images), expected)
    row = next(line for line in vmfx.inspect.table(loaded).splitlines()
               if line.startswith("vmfx_lowered_layers_0_mixer_out_proj "))
    assert "online Hadamard 64 = 2^6 (FWHT), before layers_0_mixer_out_proj" in row
