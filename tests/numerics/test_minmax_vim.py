"""The spine's yardstick on a random-weight Vim-T: minmax-w8a8 keeps the logits (cosine >= 0.99),
W4A4 visibly does not. The figures are printed (run with -s to see them)."""

from __future__ import annotations

import pytest
import torch

import vmfx
import vmfx.models  # noqa: F401

VIM_T = "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"


@pytest.mark.slow
def test_minmax_on_random_vim_t():
    import timm

    torch.manual_seed(0)
    model = timm.create_model(VIM_T).eval()
    g = torch.Generator().manual_seed(1)
    calib = torch.randn(32, 3, 224, 224, generator=g)
    test_images = torch.randn(8, 3, 224, 224, generator=g)  # fresh images, not the calibration set

    results = {}
    for preset in ("minmax-w8a8", "minmax-w4a4"):
        qmodel = vmfx.compile(model, calib, preset)
        report = vmfx.inspect.compare(model, qmodel, test_images, roles=("out_proj",))
        with torch.no_grad():
            logits = qmodel(test_images)
        assert torch.isfinite(logits).all()
        results[preset] = report.output
        print(f"{preset}: logits cosine {report.output.cosine:.5f}, SQNR {report.output.sqnr_db:.2f} dB")
    assert results["minmax-w8a8"].cosine >= 0.99
    assert results["minmax-w4a4"].cosine < results["minmax-w8a8"].cosine - 0.01
