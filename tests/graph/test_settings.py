"""Per-node method settings (SettingRule / Selector) and composable smoothing passes."""

from __future__ import annotations

import json
import os

import pytest
import torch

import vmfx
from vmfx.annotations import annotation
from vmfx import JLSSConfig, QuantConfig, QuantSpec, Selector, SettingRule, SmoothingConfig
from vmfx.passes import (
    CalibratePass,
    ConvertPass,
    DetectMambaMixersPass,
    InsertObserversPass,
    Pipeline,
    SmoothQuantPass,
)
from vmfx.quant import Smooth
from vmfx.quant.observers import AbsMaxObserver, MinMaxObserver

OUT_PROJ_08 = (SettingRule("smoothing.alpha", 0.8, Selector(role="out_proj")),)


def _smoothing(q) -> dict[str, tuple[float, torch.Tensor]]:
    """{linear node: (alpha, factors)} of every smoothed linear of ``q``."""
    out = {}
    for node in q.graph.nodes:
        if node.op == "call_module" and isinstance(q.get_submodule(node.target), Smooth) and not node.kwargs.get("weight"):
            ann = annotation(node)
            out[ann.extra["quantizes"]] = (ann.extra["alpha"], q.get_submodule(node.target).factors.detach().clone())
    return out


def test_setting_rules_resolve_last_match_wins_and_round_trip():
    cfg = vmfx.preset("ptq4vm-w4a4").replace(settings=OUT_PROJ_08 + (
        SettingRule("smoothing.alpha", 0.3, Selector(role="out_proj", block=1)),
        SettingRule("jlss.steps", 7, Selector(block=0)),
    ))
    assert cfg.setting_for("smoothing.alpha", role="in_proj", block=1) == 0.5
    assert cfg.setting_for("smoothing.alpha", role="out_proj", block=0) == 0.8
    assert cfg.setting_for("smoothing.alpha", role="out_proj", block=1) == 0.3
    assert cfg.setting_for("jlss.steps", block=0) == 7 and cfg.setting_for("jlss.steps", block=2) == cfg.jlss.steps
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with open(os.path.join(os.path.dirname(__file__), "..", "data", "configs", "quantconfig_v3.json")) as f:
        old = json.load(f)["ptq4vm-w4a4+settings"]  # as vmfx wrote it before sections
    del old["settings"]
    old["version"] = 2  # a config saved before settings existed reads without them
    assert QuantConfig.from_dict(old) == vmfx.preset("ptq4vm-w4a4")


@pytest.mark.parametrize("make, message", [
    (lambda: SettingRule("smoothing.beta", 0.8), "must be one of smoothing.alpha"),
    (lambda: SettingRule("smoothing.alpha", 1.5), r"alpha must be in \[0, 1\]"),
    (lambda: SettingRule("jlss.steps", 10, Selector(role="out_proj")), "read per block"),
    (lambda: Selector(block=-1), "block index"),
    (lambda: Selector(role="outproj"), "role must be one of"),
    (lambda: vmfx.preset("minmax-w8a8").replace(settings=OUT_PROJ_08), "this config has no smoothing"),
])
def test_bad_settings_are_clear_errors(make, message):
    with pytest.raises(vmfx.ConfigError, match=message):
        make()


def test_alpha_per_role_without_a_subclass(tiny_model, tiny_images):
    """out_proj smoothed with alpha 0.8, the rest with 0.5, from one config; the factors are
    those of a run at 0.8 everywhere for out_proj and of a run at 0.5 for the others."""
    base = vmfx.preset("smoothquant-w8a8")
    mixed = vmfx.compile(tiny_model, tiny_images, base.replace(settings=OUT_PROJ_08))
    at_05 = _smoothing(vmfx.compile(tiny_model, tiny_images, base))
    at_08 = _smoothing(vmfx.compile(tiny_model, tiny_images, base.replace(smoothing=SmoothingConfig(0.8))))
    got = _smoothing(mixed)
    assert got.keys() == at_05.keys() and any("out_proj" in k for k in got)
    for linear, (alpha, factors) in got.items():
        reference = at_08 if "out_proj" in linear else at_05
        assert alpha == (0.8 if "out_proj" in linear else 0.5)
        assert torch.equal(factors, reference[linear][1])
    text = vmfx.inspect.table(mixed)
    assert "alpha 0.8" in text and "alpha 0.5" in text


def test_two_smoothing_passes_compose(tiny_model, tiny_images):
    """Two SmoothQuantPass instances with their own selectors give what one pass with a setting
    rule gives, bit for bit."""
    act, weight = QuantSpec(8, False, "tensor"), QuantSpec(8, True, "channel")
    cfg = QuantConfig(method="smoothquant", weight=weight, activation=act,
                      smoothing=SmoothingConfig(0.5, fold=False), settings=OUT_PROJ_08)
    two = Pipeline([
        DetectMambaMixersPass(),
        InsertObserversPass(act, weight, observer=AbsMaxObserver),
        CalibratePass(),
        SmoothQuantPass(0.8, observer=MinMaxObserver, select=Selector(role="out_proj")),
        SmoothQuantPass(0.5, observer=MinMaxObserver),
        CalibratePass(),
        ConvertPass(),
    ], check=True)(tiny_model, tiny_images)
    one = Pipeline([
        DetectMambaMixersPass(),
        InsertObserversPass(act, weight, observer=AbsMaxObserver),
        CalibratePass(),
        SmoothQuantPass(0.5, observer=MinMaxObserver, settings=cfg.settings),
        CalibratePass(),
        ConvertPass(),
    ])(tiny_model, tiny_images)
    with torch.no_grad():
        assert torch.equal(two(tiny_images), one(tiny_images))
    assert {k: a for k, (a, _) in _smoothing(two).items()} == {k: a for k, (a, _) in _smoothing(one).items()}


def test_a_selector_or_setting_that_selects_nothing_is_refused(tiny_model, tiny_images):
    act, weight = QuantSpec(8, False, "tensor"), QuantSpec(8, True, "channel")
    head = [DetectMambaMixersPass(), InsertObserversPass(act, weight, observer=AbsMaxObserver), CalibratePass()]
    with pytest.raises(vmfx.ConfigError, match="selects no linear"):
        Pipeline(head + [SmoothQuantPass(0.8, select=Selector(module="layer.*")), CalibratePass(), ConvertPass()])(
            tiny_model, tiny_images)
    typo = (SettingRule("smoothing.alpha", 0.8, Selector(module="mixer.*.out_proj")),)
    with pytest.raises(vmfx.ConfigError, match="selects none of the"):
        vmfx.compile(tiny_model, tiny_images, vmfx.preset("smoothquant-w8a8").replace(settings=typo))


def test_a_smoothing_pass_without_statistics_is_refused_before_running(tiny_model, tiny_images):
    act, weight = QuantSpec(8, False, "tensor"), QuantSpec(8, True, "channel")
    with pytest.raises(vmfx.PassError, match="smoothing_statistics"):
        Pipeline([DetectMambaMixersPass(), InsertObserversPass(act, weight, observer=AbsMaxObserver),
                  SmoothQuantPass(0.5), CalibratePass(), ConvertPass()])(tiny_model, tiny_images)


def test_jlss_steps_per_block(tiny_model, tiny_images):
    cfg = vmfx.preset("ptq4vm-w8a8").replace(jlss=JLSSConfig(steps=2, batch_size=8),
                                             settings=(SettingRule("jlss.steps", 0, Selector(block=0)),))
    q = vmfx.compile(tiny_model, tiny_images, cfg)
    steps = [b["steps"] for b in q.meta["vmfx_jlss"]["blocks"]]
    assert steps == [0, 2]
    far = cfg.replace(settings=(SettingRule("jlss.steps", 3, Selector(block=9)),))
    with pytest.raises(vmfx.ConfigError, match="selects none of this model's 2 blocks"):
        vmfx.compile(tiny_model, tiny_images, far)


def test_assert_nodes_counts_node_kinds(tiny_model, tiny_images):
    """vmfx.testing.assert_nodes: a smoothed W8A8 model of 2 blocks with 6 linears each has a
    quantizer on both edges of all 12, a Smooth node on both edges of each but the 2 in_proj
    inputs folded into their norms."""
    import torch.nn.functional as F

    from vmfx.quant import FakeQuantize
    from vmfx.testing import assert_nodes

    q = vmfx.compile(tiny_model, tiny_images, "smoothquant-w8a8")
    assert_nodes(q, {FakeQuantize: 24, Smooth: 22, F.linear: 12, "out_proj": 2, "in_proj": 2})
    with pytest.raises(AssertionError, match="Smooth: expected 24, found 22"):
        assert_nodes(q, {FakeQuantize: 24, Smooth: 24})
    with pytest.raises(ValueError, match="neither a role"):
        assert_nodes(q, {"outproj": 2})
