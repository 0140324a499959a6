"""MambaQuant's Smooth-SiLU gate ``z * sigmoid(s z)`` inside the ``scan`` and ``scan_merge`` kernels
and their lowering: under the interpreter (or on a GPU), small ragged shapes, fresh random inputs
and factors over three decades. The reference ops match a float64 composition (the ungated scan
of :func:`vmfx.ops.selective_scan` times the Smooth-SiLU), the kernels match the reference ops
(within 1e-5, codes exact given the kernel's own float output), and a lowered
``rotate-smooth-online-w4a8`` model puts the factors in its ``scan_merge`` launches and matches its
fake-quant graph."""

from __future__ import annotations

import zlib

import pytest
import torch

import vmfx
from tests.lowering.conftest import DEVICE
from tests.lowering.test_kernels import _calibrate, _rel
from tests.lowering.test_kernels_scan_merge import BSZ, E, L, _check_codes, _f32_cpu, _inputs
from vmfx.lowering import lower, lowered_partitions
from vmfx.lowering import kernels as K
from vmfx.lowering import reference as R
from vmfx.models import VisionMamba
from vmfx.ops.selective_scan import selective_scan as ops_selective_scan
from vmfx.quant.smooth_silu import SmoothSiLU


def _factors(seed: int, e: int) -> torch.Tensor:
    return torch.exp(torch.randn(e, generator=torch.Generator().manual_seed(seed)) * 2.0)


def _float64_gated(u, delta, A, B, C, D, z, s, softplus, flip_z=False):
    """The ungated scan in float64 times the float64 Smooth-SiLU of z (reversed with ``flip_z``)."""
    d = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
    y = ops_selective_scan(d(u), d(delta), d(A), d(B), d(C), d(D), None, None, delta_softplus=softplus)
    zz = d(z).flip(-1) if flip_z else d(z)
    return y * (zz * torch.sigmoid(d(s)[:, None] * zz))


#: exp(-(s z)) overflows to inf for s z < -88 under the interpreter (numpy warns); z / inf = -0 is the limit
OVERFLOW = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


@OVERFLOW
@pytest.mark.parametrize("flip_z", [False, True], ids=["forward", "flip_z"])
def test_the_scan_kernel_gates_with_the_smooth_silu(flip_z):
    u_f, delta_f, A_f, B_f, C_f, D_f, *_, z = _inputs(zlib.crc32(f"scan{flip_z}".encode()))
    s = _factors(int(flip_z), E).to(DEVICE)
    out = K.selective_scan(u_f, delta_f, A_f, B_f, C_f, D_f, z, None, True, flip_z=flip_z, z_smooth=s,
                           block={"BLOCK_E": 16})
    ref = R.selective_scan(*_f32_cpu((u_f, delta_f, A_f, B_f, C_f, D_f, z)), None, True, flip_z=flip_z,
                           z_smooth=s.cpu())
    assert _rel(ref.double(), _float64_gated(u_f, delta_f, A_f, B_f, C_f, D_f, z, s, True, flip_z)) <= 1e-5
    assert out.shape == (BSZ, E, L) and _rel(out.cpu(), ref) <= 1e-5
    plain = K.selective_scan(u_f, delta_f, A_f, B_f, C_f, D_f, z, None, True, flip_z=flip_z, block={"BLOCK_E": 16})
    assert _rel(plain.cpu(), ref) > 1e-3  # the factors are used
    with pytest.raises(ValueError, match="z_smooth needs z"):
        K.selective_scan(u_f, delta_f, A_f, B_f, C_f, D_f, None, None, True, z_smooth=s)


@OVERFLOW
@pytest.mark.parametrize("act_spec", [None, (True, 4, True)], ids=["float", "codes-tok4-smooth"])
def test_the_scan_merge_kernel_gates_both_directions_with_the_smooth_silu(act_spec):
    args = _inputs(zlib.crc32(f"merge{act_spec}".encode()))
    s = _factors(5, E).to(DEVICE)
    ref_args = _f32_cpu(args)
    m_ref = R.scan_merge(*ref_args, delta_softplus=True, scale=0.5, z_smooth=s.cpu())
    y_f = _float64_gated(*args[:6], args[12], s, True)
    y_b = _float64_gated(*args[6:12], args[12], s, True, flip_z=True)
    assert _rel(m_ref.double(), ((y_f + y_b.flip(-1)) * 0.5).transpose(1, 2)) <= 1e-5
    act = None
    if act_spec is not None:
        per_token, bits, smooth = act_spec
        inv = _factors(9, E) if smooth else None
        act = _calibrate(m_ref.to(DEVICE), bits, per_token, inv)
    res = K.scan_merge(*args, delta_softplus=True, scale=0.5, act=act, z_smooth=s, block={"BLOCK_E": 8})
    m = res if act is None else res[0]
    assert _rel(m.cpu(), m_ref) <= 1e-5
    if act is not None:
        ref = R.scan_merge(*ref_args, delta_softplus=True, scale=0.5, act=act.to("cpu"), z_smooth=s.cpu())
        _check_codes(res[1], m, act, ref[1])


@pytest.fixture(scope="module")
def smooth_online():
    torch.manual_seed(0)
    model = VisionMamba(img_size=16, patch_size=4, stride=4, embed_dim=24, depth=2, num_classes=5).eval()
    images = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return model, images, vmfx.compile(model, images, "rotate-smooth-online-w4a8")


def test_a_lowered_rotate_smooth_online_model_matches_its_fake_quant_graph(smooth_online):
    model, images, q = smooth_online
    lowered = lower(q, "reference", strict=True)
    kinds = lowered.meta["vmfx_lowered"]["partitions"]
    assert kinds.count("scan_merge") == 2 and kinds.count("hadamard") == 2
    merges = [p for p in lowered_partitions(lowered) if p.kind == "scan_merge"]
    gates = [m for m in q.modules() if isinstance(m, SmoothSiLU)]
    for part in merges:  # the factors both directions' Smooth-SiLU nodes held
        assert part.gate_s is not None and any(torch.equal(part.gate_s, g.factors) for g in gates)
    assert not any(isinstance(m, SmoothSiLU) for m in lowered.modules())
    with torch.no_grad():
        expected, got = q(images), lowered(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    source = next(p for p in lowered_partitions(lower(q, "triton")) if p.kind == "scan_merge").source()
    assert "smooth_gate = True" in source and "g = _vmfx_smooth_silu(" in source
