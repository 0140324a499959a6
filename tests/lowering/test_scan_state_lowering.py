"""The quantized hidden state in the lowering: the Triton scan kernel (interpreter on the CPU)
against the reference backend, and a small Vim with ``pts-w8a8`` + ``scan_state`` lowered end
to end.

What is checked: the kernel with a per-step quantized state (with and without the
reparameterization's step ratio and output factor) equals the reference (the CPU op) to 1e-5 of
the largest output (measured 3.8e-8 to 1.2e-7 in the interpreter on these shapes: float32
rounding in the recurrence, no state code off by a step); the lowered Vim matches the fake-quant graph (reference backend) and the Triton
backend matches the reference; a scan whose quantized state no partition takes is listed as left
in float.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import vmfx
from tests.lowering.conftest import DEVICE
from vmfx.config import ScanStateConfig
from vmfx.lowering import kernels as K
from vmfx.lowering import lower
from vmfx.lowering import reference as R
from vmfx.lowering.partition import unlowered_quantizers
from vmfx.models.vim import VisionMamba
from vmfx.ops.selective_scan import reparameterize
from vmfx.passes.scan_state_passes import scan_nodes


def _rel(a, b):
    return float((a.cpu() - b.cpu()).abs().max() / b.abs().max())


@pytest.mark.parametrize("reparam", [False, True], ids=["plain", "reparam"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_state_kernel_matches_reference(reparam, bits):
    g = torch.Generator().manual_seed(zlib.crc32(f"{reparam}{bits}".encode()))
    bsz, e, n, length = 2, 24, 5, 11
    r = lambda *s, scale=1.0, shift=0.0: (torch.randn(*s, generator=g) * scale + shift).to(DEVICE)  # noqa: E731
    u, z = r(bsz, e, length), r(bsz, e, length)
    delta = r(bsz, length, e, shift=-2.0).transpose(1, 2)  # a strided view, as in the model
    A = -torch.exp(r(e, n, scale=0.5))
    Bm, Cm, D = r(bsz, n, length), r(bsz, n, length), r(e)
    extra = {}
    if reparam:
        f = lambda s: torch.exp(torch.randn(s, generator=g)).to(DEVICE)  # noqa: E731
        u, Bm, Cm, step, out_scale = reparameterize(u, Bm, Cm, f(e), f(length), f(n))
        extra.update(step_scale=step.contiguous(), out_scale=out_scale.contiguous())
    qmax = 2 ** (bits - 1) - 1
    extra["state_scales"] = (torch.rand(length, generator=g) * 0.3 / qmax + 0.2 / qmax).to(DEVICE)
    extra["state_bits"] = bits
    out = K.selective_scan(u, delta, A, Bm, Cm, D, z, None, True, block={"BLOCK_E": 16}, **extra)
    ref = R.selective_scan(u.cpu(), delta.cpu(), A.cpu(), Bm.cpu(), Cm.cpu(), D.cpu(), z.cpu(), None, True,
                           **{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in extra.items()})
    assert _rel(out, ref) <= 1e-5
    # the state quantization changed the result (the scales are small enough to matter)
    plain = R.selective_scan(u.cpu(), delta.cpu(), A.cpu(), Bm.cpu(), Cm.cpu(), D.cpu(), z.cpu(), None, True,
                             step_scale=extra.get("step_scale"), out_scale=extra.get("out_scale"))
    assert _rel(plain, ref) > 1e-4


def test_kernel_source_names_the_quantized_state():
    src = K.render_scan(step_scale=True, out_scale=True, quant_state=True, state_bits=6)
    assert "hs_ptr" in src and "step_ptr" in src and "os_ptr" in src and "31.0" in src
    assert "hs_ptr" not in K.render_scan()


@pytest.fixture(scope="module")
def quantized_vim():
    torch.manual_seed(0)
    model = VisionMamba(img_size=16, patch_size=4, stride=4, embed_dim=32, depth=2, num_classes=5).eval()
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    cfg = vmfx.preset("pts-w8a8").replace(scan_state=ScanStateConfig(search_samples=4, candidates=21))
    return vmfx.compile(model, images, config=cfg), images


def test_small_vim_with_quantized_state_lowers(quantized_vim):
    q, images = quantized_vim
    ref_model = lower(q, "reference", strict=True)
    assert ref_model.meta["vmfx_lowered"]["left_float"] == []
    scans = [m for m in ref_model.modules() if type(m).__name__ == "LoweredScan"]
    assert len(scans) == 4 and all(s.quant_state and s.reparameterized for s in scans)
    with torch.no_grad():
        fake, lowered = q(images), ref_model(images)
    assert _rel(lowered, fake) <= 1e-5
    tri = lower(q, "triton", strict=True)
    x = images[:2].to(DEVICE)
    with torch.no_grad():
        assert _rel(tri.to(DEVICE)(x), lowered[:2]) <= 1e-5
    assert "hs_ptr" in scans[0].source()


def test_unmatched_quantized_scan_is_listed_as_float(quantized_vim):
    q, _ = quantized_vim
    left = unlowered_quantizers(q, [])  # no partition takes anything
    assert set(scan_nodes(q)) <= set(left)
