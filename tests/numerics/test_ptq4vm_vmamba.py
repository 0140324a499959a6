"""PTQ4VM (and min-max) on VMamba: every mixer linear quantized, per-token scales per stage and per
direction in each scan order, alpha 0.65 from the model for preset names, W8A8 close to float."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vmfx
from vmfx.annotations import LINEAR_ROLES, annotation
from vmfx.config import JLSSConfig, preset
from vmfx.token_layout import layout_of
from vmfx.models import VSSM
from vmfx.models.hints import config_for_model
from vmfx.passes.linear_edges import quantized_linears


def small_vssm(kind: str = "v2") -> VSSM:
    torch.manual_seed(0)
    if kind == "v2":
        return VSSM(depths=[1, 1, 1], dims=16, num_classes=6, ssm_d_state=1, ssm_ratio=1.0, forward_type="v05_noz",
                    mlp_ratio=2.0, norm_layer="ln2d", downsample_version="v3", patchembed_version="v2").eval()
    return VSSM(depths=[1, 1, 1], dims=16, num_classes=6, ssm_d_state=4, forward_type="v0", mlp_ratio=0.0,
                norm_layer="ln", downsample_version="v1", patchembed_version="v1").eval()


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 24, generator=torch.Generator().manual_seed(seed))


def quick(name: str):
    """The preset with a short JLSS (the test checks the wiring, not the learning)."""
    cfg = preset(name)
    return cfg.replace(jlss=JLSSConfig(steps=3, batch_size=4)) if cfg.jlss is not None else cfg


def cosine(a, b) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_preset_names_get_vmambas_alpha_and_explicit_configs_are_kept():
    model = small_vssm()
    assert config_for_model(model, "ptq4vm-w8a8", preset("ptq4vm-w8a8")).smoothing.alpha == 0.65
    assert config_for_model(model, preset("ptq4vm-w8a8"), preset("ptq4vm-w8a8")).smoothing.alpha == 0.5
    assert config_for_model(model, "minmax-w8a8", preset("minmax-w8a8")).smoothing is None
    from vmfx.models import VisionMamba

    assert not hasattr(VisionMamba, "vmfx_smoothing_alpha")  # Vim keeps the presets' 0.5


@pytest.mark.parametrize("kind", ["v2", "v0"])
def test_ptq4vm_w8a8_quantizes_every_mixer_linear_with_per_direction_token_scales(kind, monkeypatch):
    model = small_vssm(kind)
    monkeypatch.setitem(vmfx.config.PRESETS, "ptq4vm-w8a8", quick("ptq4vm-w8a8"))
    q = vmfx.compile(model, images(8, 1), "ptq4vm-w8a8")
    assert q.meta["vmfx_config"]["sections"]["smoothing"]["alpha"] == 0.65
    every = quantized_linears(q)
    edges = [e for e in every if annotation(e.linear).role in LINEAR_ROLES]
    assert len(edges) == 3 * 10  # in_proj, 4 x_proj, 4 dt_proj, out_proj per block
    roles = {annotation(e.linear).role for e in edges}
    assert roles == {"in_proj", "x_proj", "dt_proj", "out_proj"}
    # every other linear but the head (v2: the MLPs' fc1 / fc2; v0: the patch merges' reductions) is
    # quantized too, with the generic "linear" role
    others = sorted(e.module for e in every if annotation(e.linear).role not in LINEAR_ROLES)
    assert others == sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                            and ".op." not in n and n != "classifier.head")
    assert len(others) == {"v2": 6, "v0": 2}[kind]
    assert {annotation(e.linear).role for e in every} - roles == {"linear"}
    assert all(annotation(e.linear).extra.get("smoothing_alpha") == 0.65 for e in edges)
    # static per-token input scales: one per token of the stage, held in each direction's scan order
    by_block = {}
    for e in edges:
        ann = annotation(e.linear)
        if ann.role == "x_proj":
            fq = e.quantizer("input")
            assert fq.layout is not None and fq.scale.numel() == ann.tokens
            by_block.setdefault(ann.block, []).append(fq.layout.order)
    assert all(len(set(orders)) == 4 for orders in by_block.values())
    assert sorted({annotation(e.linear).tokens for e in edges}) == [4, 12, 48]
    test = images(6, 2)
    with torch.no_grad():
        assert cosine(model(test), q(test)) >= 0.99


def test_ptq4vm_w4a8_and_minmax_run_on_vmamba():
    model = small_vssm("v2")
    test = images(6, 2)
    with torch.no_grad():
        ref = model(test)
    q4 = vmfx.compile(model, images(8, 1), quick("ptq4vm-w4a8"))
    mm = vmfx.compile(model, images(8, 1), "minmax-w8a8")
    with torch.no_grad():
        out4, out8 = q4(test), mm(test)
    assert torch.isfinite(out4).all()
    assert cosine(ref, out8) >= 0.99
    assert cosine(ref, out4) > 0.5  # 4-bit weights on random weights: only that it is not garbage
    assert len(quantized_linears(q4)) == len(quantized_linears(mm)) == 30 + 6  # mixer linears + MLP fc1/fc2


def test_quantized_vmamba_saves_loads_and_lowers(tmp_path):
    model = small_vssm("v2")
    x = images(4, 3)
    q = vmfx.compile(model, images(8, 1), "pts-w8a8")
    vmfx.save(q, tmp_path / "q.safetensors")
    q2 = vmfx.load(tmp_path / "q.safetensors")  # VSSM is rebuilt from its recorded constructor arguments
    with pytest.warns(UserWarning, match="in_proj__input") as caught:
        low = vmfx.lowering.lower(q, "reference")
    # the (B, H, W, C) grid inputs of in_proj / out_proj stay fake-quant torch ops; the rest is lowered
    assert "x_projs" not in str(caught[0].message)
    with torch.no_grad():
        ref = q(x)
        torch.testing.assert_close(q2(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(low(x), ref, rtol=1e-4, atol=1e-5)
