"""LocalVim through the vmfx pipeline: detection of the multi-direction mixer, per-direction token
layouts in each scan order (padding included), PTQ4VM at W8A8 / W4A8, save / load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vmfx
from vmfx.annotations import LINEAR_ROLES, annotation
from vmfx.models import LocalVim
from vmfx.models.localmamba import scan_order
from vmfx.passes.linear_edges import quantized_linears

# a 3x3 patch grid: w2 windows pad it to 4x4 (16 positions), w7 to 7x7 (49)
_DIRS = [("h", "v_flip", "w2", "w2_flip"), ("h_flip", "v", "w2", "w7")]
_ARGS = dict(img_size=48, patch_size=16, depth=2, embed_dim=16, num_classes=10, rms_norm=True, residual_in_fp32=True,
             fused_add_norm=True, final_pool_type="mean", if_abs_pos_embed=True, bimamba_type="v2", directions=_DIRS)


def _model(**overrides) -> LocalVim:
    torch.manual_seed(0)
    return LocalVim(**{**_ARGS, "if_rope": True, "if_rope_residual": True, **overrides}).eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(24, 3, 48, 48)


def _cosine(a, b) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _check_every_mixer_linear_is_quantized_in_its_scan_order(model: LocalVim, q) -> None:
    mixers = q.meta["vmfx_mixers"]
    assert len(mixers) == len(model.layers)
    assert all(len(m["directions"]) == 4 for m in mixers)
    every = {e.module: e for e in quantized_linears(q)}
    edges = {name: e for name, e in every.items() if annotation(e.linear).role in LINEAR_ROLES}
    # the channel-attention merge's linears are not mixer linears: quantized with the generic role
    others = {name for name in every if name not in edges}
    assert others == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                      and ".attn." in n}, others
    assert {annotation(every[name].linear).role for name in others} <= {"linear"}
    grid = model.token_size
    cls = model.token_position
    expected = set()
    for i, block in enumerate(model.layers):
        prefix = f"layers.{i}.mixer."
        expected |= {prefix + "in_proj", prefix + "out_proj"}
        for k, direction in enumerate(block.mixer.directions):
            order = scan_order(direction, grid, cls)
            for role in ("x_proj", "dt_proj"):
                e = edges[f"{prefix}{role}_{k}"]
                expected.add(e.module)
                assert annotation(e.linear).role == role
                layout = e.quantizer("input").layout
                assert layout.order == order, (e.module, direction)  # per-token scales in the scan order
        for name in ("in_proj", "out_proj"):
            layout = edges[prefix + name].quantizer("input").layout
            assert layout.is_identity and layout.tokens == block.mixer.multi_scan.tokens
    assert set(edges) == expected
    assert all(e.act_quant is not None and e.weight_quant is not None for e in edges.values())


def test_detection_labels_one_mixer_of_four_scan_orders_per_block(images):
    model = _model()
    q = vmfx.compile(model, images[:8], "minmax-w8a8")
    assert q.meta["vmfx_detect_failures"] == []
    directions = [m["directions"] for m in q.meta["vmfx_mixers"]]
    assert list(directions[0]) == ["forward", "order1", "order2", "order3"]  # h is the identity order
    assert list(directions[1]) == ["backward", "order1", "order2", "order3"]  # h_flip the reversed one
    _check_every_mixer_linear_is_quantized_in_its_scan_order(model, q)
    # the channel attention's pooled branch holds no tokens: its nodes are the only ones without a layout
    unknown = {name for name, _ in q.meta["vmfx_layout_unknown"]}
    assert unknown and all("attn" in name or name.startswith("mean") for name in unknown)


def test_middle_class_token_sits_in_every_scan_order(images):
    model = _model(if_rope=False, if_rope_residual=False, if_cls_token=True, use_middle_cls_token=True)
    q = vmfx.compile(model, images[:8], "minmax-w8a8")
    _check_every_mixer_linear_is_quantized_in_its_scan_order(model, q)
    with torch.no_grad():
        assert _cosine(q(images[8:]), model(images[8:])) >= 0.99


@pytest.mark.parametrize("preset, floor", [("ptq4vm-w8a8", 0.99), ("ptq4vm-w4a8", 0.95)])
def test_ptq4vm_compiles_local_vim(images, preset, floor):
    model = _model()
    q = vmfx.compile(model, images[:16], preset)
    _check_every_mixer_linear_is_quantized_in_its_scan_order(model, q)
    with torch.no_grad():
        expected, got = model(images[16:]), q(images[16:])
    assert not torch.equal(got, expected)  # quantization took effect
    assert _cosine(got, expected) >= floor


def test_save_and_load_round_trip(images, tmp_path):
    model = _model()
    q = vmfx.compile(model, images[:8], "minmax-w8a8")
    vmfx.save(q, tmp_path / "q.vmfx")
    loaded = vmfx.load(tmp_path / "q.vmfx")
    with torch.no_grad():
        assert torch.equal(loaded(images[8:]), q(images[8:]))


def test_reference_lowering_matches_the_fake_quant_graph(images):
    from vmfx.lowering import lower

    q = vmfx.compile(_model(), images[:8], "minmax-w8a8")
    lowered = lower(q, "reference")
    assert lowered.meta["vmfx_lowered"]["left_float"] == []
    with torch.no_grad():
        expected, got = q(images[8:]), lowered(images[8:])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
