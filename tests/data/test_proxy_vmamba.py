"""The bundled VMamba proxy: official VMamba layout, three stages of 2D token grids, and the
committed checkpoint reproducing its recorded accuracy."""

from __future__ import annotations

import vmfx
from vmfx.data import evaluate, load_digits
from vmfx.data.proxy_vmamba import load_proxy_vmamba, vmamba_proxy_metadata


def test_vmamba_proxy_is_a_v2v_vssm_with_four_directions_per_mixer():
    meta = vmamba_proxy_metadata()
    model = load_proxy_vmamba()
    assert isinstance(model, vmfx.models.VSSM) and meta["model_kwargs"]["forward_type"] == "v05_noz"
    assert "layers.0.blocks.0.op.x_proj_weight" in model.state_dict()
    gm = vmfx.trace(model, (load_digits("test")[0][:1],))
    mixers = gm.meta["vmfx_mixers"]
    assert len(mixers) == sum(meta["model_kwargs"]["depths"])
    assert [m["tokens"] for m in mixers] == [64, 16, 4, 4]  # 30x30 digits: 8x8, 4x4, 2x2 grids
    assert all(len(m["directions"]) == 4 for m in mixers)


def test_committed_vmamba_checkpoint_reproduces_its_recorded_accuracy_exactly():
    meta = vmamba_proxy_metadata()
    result = evaluate(load_proxy_vmamba(), load_digits("test"))
    assert result.images == 1000
    assert result.top1 == meta["test_top1"], (result.top1, meta["test_top1"])
    assert meta["test_top1"] >= 95.0
