"""The online Hadamard + activation quantize kernel (vmfx.lowering.kernels.hadamard) and its
lowering: under the interpreter (or on a GPU), on fresh random inputs in float32 and float16, its
codes equal the exact reference op bit for bit and the float64 reference (``x H / sqrt(n)`` by a
dense product, then the activation formula) except by one step at a rounding tie, for widths 2^k,
12 x 2^k, 20 x 2^k and 28 x 2^k; a lowered ``rotate-online`` model has one ``hadamard`` partition
per block feeding ``out_proj``'s GEMM and matches its fake-quant graph."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vmfx
from tests.lowering.conftest import DEVICE
from vmfx.lowering import find_partitions, lower, lowered_partitions
from vmfx.lowering import kernels as K
from vmfx.lowering import reference as R
from vmfx.lowering.params import make_act_quant
from vmfx.models import VisionMamba
from vmfx.quant.online_hadamard import online_hadamard_matrix

WIDTHS = [8, 64, 12, 48, 192, 20, 40, 28, 56]


def _act_for(y: torch.Tensor, bits: int, per_token: bool, smooth: torch.Tensor | None, g) -> "R.ActQuant":
    """Static parameters from the min/max of ``y / smooth`` (B, L, n), range shrunk so that some values clamp."""
    v = (y / smooth if smooth is not None else y).double()
    dims = (0, 2) if per_token else (0, 1, 2)
    lo, hi = v.amin(dim=dims).clamp(max=0), v.amax(dim=dims).clamp(min=0)
    shrink = 0.8 + 0.2 * float(torch.rand((), generator=g))
    scale = ((hi - lo) * shrink / (2**bits - 1)).clamp(min=1e-6).float()
    zero = torch.round(-lo.float() * shrink / scale).clamp(0, 2**bits - 1)
    return make_act_quant(scale.reshape(-1), zero.reshape(-1), bits, smooth=smooth)


def _float64_codes(x: torch.Tensor, act) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of ``x H / sqrt(n)`` computed in float64 with a dense H, and the distance of each
    pre-rounding value to its nearest rounding tie."""
    n = x.shape[-1]
    y = x.double().reshape(-1, n) @ online_hadamard_matrix(n) / n**0.5
    if act.inv_smooth is not None:
        y = y * act.inv_smooth.double().cpu()
    tok = torch.arange(y.shape[0]) % act.tokens
    v = y * act.inv_scale.double().cpu()[tok][:, None]
    q = torch.clamp(torch.round(v) + act.zero_point.double().cpu()[tok][:, None], act.qmin, act.qmax)
    tie = ((v - torch.floor(v)) - 0.5).abs()
    return (q - act.offset).to(torch.int8), tie


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.sampled_from(WIDTHS), dtype=st.sampled_from([torch.float32, torch.float16]),
       per_token=st.booleans(), smooth=st.booleans(), bits=st.sampled_from([4, 8]),
       batch=st.integers(1, 2), length=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_hadamard_quantize_matches_the_references(n, dtype, per_token, smooth, bits, batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, length, n, generator=g) * 3 + torch.randn(n, generator=g)).to(dtype)
    s = torch.rand(n, generator=g) * 1.5 + 0.25 if smooth else None
    act = _act_for(R.fast_hadamard_transform(x.float()).reshape(batch, length, n), bits, per_token, s, g)
    strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # a non-contiguous input of the same values
    codes = K.hadamard_quantize(strided.to(DEVICE), act.to(DEVICE)).cpu()
    assert codes.shape == (batch * length, n) and codes.dtype == torch.int8
    assert torch.equal(codes, R.hadamard_quantize(x, act))  # the exact reference op, bit for bit
    expected, tie = _float64_codes(x, act)
    diff = (codes.int() - expected.int()).abs()
    assert int(diff.max()) <= 1
    assert bool((diff[tie > 1e-3] == 0).all())  # away from a rounding tie, the float64 codes exactly


def test_the_kernel_refuses_what_it_cannot_rotate():
    act = make_act_quant(torch.ones(1), torch.zeros(1), 8)
    with pytest.raises(ValueError, match=r"width 2\^k m with m in \(1, 12, 20, 28\), got 36"):
        K.hadamard_quantize(torch.zeros(2, 36, device=DEVICE), act.to(DEVICE))
    with pytest.raises(ValueError, match="does not fit 5 per-token parameters"):
        K.hadamard_quantize(torch.zeros(2, 4, 16, device=DEVICE),
                            make_act_quant(torch.ones(5), torch.zeros(5), 8).to(DEVICE))


@pytest.fixture(scope="module")
def online():
    torch.manual_seed(0)
    model = VisionMamba(img_size=16, patch_size=4, stride=4, embed_dim=24, depth=2, num_classes=5).eval()
    images = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return model, images, vmfx.compile(model, images, "rotate-online-w4a8")


def test_a_lowered_rotate_online_model_matches_its_fake_quant_graph(online):
    model, images, q = online
    parts = find_partitions(q)
    assert [p.kind for p in parts].count("hadamard") == 2
    for block in range(2):
        out_proj = next(p for p in parts if p.name == f"layers_{block}_mixer_out_proj")
        assert out_proj.info.codes_from.kind == "hadamard"
    lowered = lower(q, "reference", strict=True)
    kinds = lowered.meta["vmfx_lowered"]["partitions"]  # after the rewrites: both directions paired
    assert kinds.count("hadamard") == 2 and kinds.count("scan_merge") == 2
    with torch.no_grad():
        expected, got = q(images), lowered(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    rotations = [p for p in lowered_partitions(lowered) if p.kind == "hadamard"]
    assert len(rotations) == 2 and all(p.dim == 48 for p in rotations)
    assert all(not isinstance(m, vmfx.quant.online_hadamard.OnlineHadamard) for m in lowered.modules())


def test_the_triton_backend_runs_the_rotate_online_model_like_the_reference(online):
    model, images, q = online
    x = images[:2]
    ref_model, triton_model = lower(q, "reference"), lower(q, "triton")
    with torch.no_grad():
        expected, got = ref_model(x), triton_model.to(DEVICE)(x.to(DEVICE)).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    source = next(p for p in lowered_partitions(triton_model) if p.kind == "hadamard").source()
    assert "template=hadamard_quantize" in source and "vmfx_q_layers_0_mixer_out_proj__hadamard" in source
    assert "_vmfx_butterfly(t, BLOCK_M, P, 1)" in source  # 48 = 12 x 2^2: two butterfly stages


def test_inspect_names_the_online_hadamard_of_a_lowered_model(online, tmp_path):
    model, images, q = online
    loaded = vmfx.load(vmfx.save(lower(q, "reference"), str(tmp_path / "lowered.safetensors")))
    rows = {line.split()[0]: line for line in vmfx.inspect.table(loaded).splitlines()[2:]}
    kernel = rows["vmfx_lowered_vmfx_q_layers_0_mixer_out_proj__hadamard"]
    assert "kernel" in kernel and "online Hadamard 48 = 12 x 2^2 (FWHT), before layers_0_mixer_out_proj" in kernel
    out_proj = rows["vmfx_lowered_layers_0_mixer_out_proj"]
    assert "A uint8 asym per-token | W int4 sym per-channel" in out_proj
    assert "W <- W H / sqrt(48) (absorbs its H^T)" in out_proj and "residual R (klt-hadamard 24)" in out_proj
    report = vmfx.coverage.coverage(loaded)  # the rotation is no layer of the coverage report
    assert {layer.kind for layer in report.layers} == {"linear", "conv", "scan"}
    assert not [layer for layer in report.layers if "hadamard" in layer.name]


def test_ptq4vm_rotate_online_smooths_after_the_rotation_and_lowers(online):
    from vmfx.config import JLSSConfig

    model, images, _ = online
    cfg = vmfx.preset("ptq4vm-rotate-online-w4a4").replace(jlss=JLSSConfig(steps=2, batch_size=6))
    q = vmfx.compile(model, images, cfg)
    assert {"residual_rotated", "out_proj_input_rotated", "smoothing_folded"} <= set(q.meta["vmfx_facts"])
    lowered = lower(q, "reference", strict=True)
    rotation = next(p for p in lowered_partitions(lowered) if p.kind == "hadamard")
    assert rotation.a_inv_smooth is not None  # out_proj's smoothing runs in the rotation kernel, after x H
    with torch.no_grad():
        expected, got = q(images), lowered(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
