"""Lowering a quantized graph: partitions, generated kernels, the reference and Triton backends."""

from __future__ import annotations

import io

import pytest
import torch

import vmfx
from vmfx.lowering import find_partitions, lower, lowered_partitions, show
from vmfx.models import VisionMamba


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = VisionMamba(img_size=16, patch_size=4, stride=4, embed_dim=32, depth=2, num_classes=5).eval()
    images = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return model, images


def test_partitions_of_a_bidirectional_vim(small):
    model, images = small
    q = vmfx.compile(model, images, "pts-smooth-w8a8")
    parts = find_partitions(q)
    kinds = [p.kind for p in parts]
    assert kinds.count("qlinear") == 12 and kinds.count("conv") == 4 and kinds.count("scan") == 4
    assert kinds.count("merge") == 2
    x_proj = next(p for p in parts if p.name == "layers_0_mixer_x_proj")
    assert x_proj.info.codes_from.kind == "conv"  # the conv emits x_proj's codes
    out_proj = next(p for p in parts if p.name == "layers_1_mixer_out_proj")
    assert out_proj.info.codes_from.kind == "merge"
    assert out_proj.info.epilogue == [("add", "extra0")]  # the residual add, fused
    taken = [n for p in parts for n in p.nodes]
    assert len(taken) == len(set(taken))


@pytest.mark.parametrize("preset", ["minmax-w8a8", "pts-w4a8", "ptq4vm-w4a4"])
def test_reference_backend_matches_the_fake_quant_graph(small, preset):
    model, images = small
    q = vmfx.compile(model, images, preset)
    lowered = lower(q, "reference")
    with torch.no_grad():
        expected, got = q(images), lowered(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert all(p.backend == "reference" for p in lowered_partitions(lowered))
    assert not any(isinstance(m, (vmfx.quant.FakeQuantize, vmfx.quant.Smooth)) for m in lowered.modules())
    with torch.no_grad():
        assert torch.equal(q(images), expected)  # the quantized model is untouched


def test_triton_kernels_run_the_whole_model_like_the_reference(small):
    """Every generated kernel of a model, under the interpreter on a CPU (on the GPU if present)."""
    model, images = small
    q = vmfx.compile(model, images, "ptq4vm-w4a8")
    ref_model = lower(q, "reference")
    triton_model = lower(q, "triton")
    x = images[:2]
    if torch.cuda.is_available():
        triton_model, x_dev = triton_model.cuda(), x.cuda()
    else:
        x_dev = x
    with torch.no_grad():
        got, expected = triton_model(x_dev).cpu(), ref_model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_lowered_model_runs_in_half_precision(small, dtype):
    """``lowered.to(half)``: the float ops run in half, every partition keeps its float32
    parameters, reads and writes half activations, and the model predicts like in float32."""
    model, images = small
    q = vmfx.compile(model, images, "pts-w8a8")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = images[:2].to(device)
    with torch.no_grad():
        y32 = lower(q, "triton").to(device)(x)
    seen = {}
    for backend in ("triton", "reference"):
        half = lower(q, backend).to(device=device, dtype=dtype)
        parts = lowered_partitions(half)
        assert parts and all(p.io_dtype == dtype for p in parts)
        assert not any(b.dtype in (torch.float16, torch.bfloat16) for p in parts for b in p.buffers())
        for p in parts:  # the activation each partition reads: the model's half ones (or int8 codes)
            p.register_forward_pre_hook(lambda m, args: seen.setdefault(m.kind, set()).add(args[0].dtype))
        with torch.no_grad():
            y = half(x.to(dtype))
        assert y.dtype == dtype
        assert seen["scan_merge"] == {dtype} and seen["conv_bidir"] == {dtype}  # both directions, one launch each
        assert seen["qlinear"] <= {dtype, torch.int8}
        cos = torch.nn.functional.cosine_similarity(y.float(), y32, dim=-1)
        assert float(cos.min()) > (0.999 if dtype == torch.float16 else 0.99), (backend, cos)
        assert bool((y.float().argmax(-1) == y32.argmax(-1)).all())


def test_a_lowered_model_runs_with_grad_enabled_and_refuses_double(small):
    model, images = small
    q = vmfx.compile(model, images, "minmax-w8a8")
    lowered = lower(q, "reference")
    y = lowered(images[:2])  # gradients enabled: the partitions compute without autograd
    with torch.no_grad():
        assert torch.equal(y.detach(), lowered(images[:2]))
    with pytest.raises(vmfx.errors.ConfigError, match="float32, float16 or bfloat16"):
        lowered.double()


def test_compile_with_a_backend_and_show(small):
    model, images = small
    lowered = vmfx.compile(model, images, "minmax-w8a8", backend="reference")
    assert lowered.meta["vmfx_lowered"]["backend"] == "reference"
    buf = io.StringIO()
    text = show(lowered, file=buf)
    assert buf.getvalue() == text + "\n"
    assert text.count("@triton.jit\ndef vmfx_") == len(lowered_partitions(lowered))
    assert "# provenance (FX nodes):" in text and "layers_0_mixer_in_proj (call_function linear)" in text
    assert "vmfx_q_layers_0_mixer_in_proj__input (call_module" in text  # the quantizer node it fused
    assert "@triton.autotune" in text
    rows = [r for r in vmfx.inspect.rows(lowered) if r["role"] == "kernel"]
    assert len(rows) == len(lowered_partitions(lowered))


def test_bad_backend_fails_before_calibration(small):
    model, images = small
    with pytest.raises(vmfx.ConfigError, match="unknown backend 'cuda'; use one of triton, reference, auto"):
        vmfx.compile(model, images, "minmax-w8a8", backend="cuda")
    with pytest.raises(vmfx.ConfigError, match="expects a quantized model"):
        lower(model, "reference")


@pytest.mark.slow
def test_random_vim_t_lowers_end_to_end():
    import timm

    import vmfx.models  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2").eval()
    g = torch.Generator().manual_seed(2)
    calib, test = torch.randn(8, 3, 224, 224, generator=g), torch.randn(2, 3, 224, 224, generator=g)
    q = vmfx.compile(model, calib, "pts-w8a8")
    lowered = lower(q, "reference")
    kinds = [p.kind for p in lowered_partitions(lowered)]
    # per block: in_proj, out_proj; both x_proj grouped; both convs; both scans with their dt_proj and the merge
    assert kinds.count("qlinear") == 24 * 2 and kinds.count("qlinear_group") == 24
    assert kinds.count("scan_merge") == 24 and kinds.count("conv_bidir") == 24
    with torch.no_grad():
        expected, got = q(test), lowered(test)
    assert torch.isfinite(got).all()
    # 24 blocks: an activation code may differ by one step where the kernels' reciprocal
    # multiplies and the graph's divisions round a tie differently; the drift stays small
    cos = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
    assert float(cos) > 0.9999
    assert float((got - expected).abs().max()) < 1e-2 * float(expected.abs().max())


def test_lowered_proxy_model_predicts_like_the_fake_quant_model():
    """The Done-when of the lowering: same top-1 prediction on >= 99.5% of the proxy test set."""
    from vmfx.data import load_digits, load_proxy_model, predictions

    model = load_proxy_model()
    test_x, _ = load_digits("test")
    train_x, _ = load_digits("train")
    calib = train_x[torch.randperm(4000, generator=torch.Generator().manual_seed(0))[:128]]
    q = vmfx.compile(model, calib, "pts-smooth-w4a8")
    lowered = lower(q, "reference")
    same = (predictions(q, test_x) == predictions(lowered, test_x)).float().mean().item()
    print(f"lowered vs fake-quant: same prediction on {100 * same:.2f}% of {test_x.shape[0]} images")
    assert same >= 0.995


def test_show_prints_the_kernel_that_runs_for_4_bit_weights(small):
    """A 4-bit weight is stored packed two per byte, so the source ``show`` prints for its GEMM is
    the packed variant, which unpacks both nibbles."""
    model, images = small
    lowered = vmfx.compile(model, images, "pts-w4a8", backend="reference")
    gemms = [p for p in lowered_partitions(lowered) if p.kind == "qlinear"]
    assert gemms and all(p.w_packed is not None for p in gemms)
    assert all("w_hi" in p.source() and "KH = (K + 1) // 2" in p.source() for p in gemms)
    eight_bit = next(p for p in lowered_partitions(vmfx.compile(model, images, "pts-w8a8", backend="reference"))
                     if p.kind == "qlinear")
    assert eight_bit.w_packed is None and "w_hi" not in eight_bit.source()
