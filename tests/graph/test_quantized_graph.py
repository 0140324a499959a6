"""The quantized graph as the single source of truth: quantizers on any edge, rules, lowering that
lists what it leaves in float, and the bad input the representation must refuse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import vmfx
from vmfx.annotations import annotation
from vmfx.config import InitConfig, JLSSConfig, QuantRule
from vmfx.quant import FakeQuantize, QuantSpec


def _nodes(q, role=None, edge=None):
    out = []
    for n in q.graph.nodes:
        a = annotation(n)
        if a is not None and (role is None or a.role == role) and (edge is None or a.extra.get("edge") == edge):
            out.append(n)
    return out


def test_import_vmfx_sets_no_environment_variable():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import os, vmfx, vmfx.lowering; print(os.environ.get('TRITON_INTERPRET'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


def test_output_rules_put_quantizers_on_any_edge(tiny_model, tiny_images):
    cfg = vmfx.preset("minmax-w8a8").replace(rules=(
        QuantRule("output", QuantSpec(8, True, "tensor"), role="conv_act"),
        QuantRule("output", QuantSpec(8, False, "tensor", dynamic=True), role="scan"),
    ))
    q = vmfx.compile(tiny_model, tiny_images, cfg, check=True)
    outs = _nodes(q, edge="output")
    served = {annotation(n).extra["quantizes"] for n in outs}
    assert len(outs) == 8  # SiLU after each conv and each scan: 2 directions x 2 blocks x 2
    for n in outs:
        producer = n.args[0]
        assert annotation(producer).role in ("conv_act", "scan") and producer.name in served
        assert list(producer.users) == [n]  # every reader of the value reads the quantized one
        assert isinstance(q.get_submodule(n.target), FakeQuantize)
    dyn = [n for n in outs if q.get_submodule(n.target).spec.dynamic]
    assert len(dyn) == 4
    rows = {r["node"]: r for r in vmfx.inspect.rows(q)}
    assert rows[outs[0].name]["spec"] == "int8 sym per-tensor"
    # and it saves and loads like any other quantizer
    path = vmfx.save(q, os.path.join(os.environ.get("TMPDIR", "/tmp"), f"outq_{os.getpid()}.safetensors"))
    try:
        loaded = vmfx.load(path, model=tiny_model)
        with torch.no_grad():
            assert torch.equal(loaded(tiny_images), q(tiny_images))
    finally:
        os.remove(path)


def test_lowering_lists_what_it_leaves_in_float(tiny_model, tiny_images):
    cfg = vmfx.preset("minmax-w8a8").replace(rules=(
        QuantRule("output", QuantSpec(8, True, "tensor"), role="conv_act"),
        QuantRule("input", QuantSpec(8, True, "tensor"), role="dt_proj"),  # symmetric: no kernel takes it
    ))
    q = vmfx.compile(tiny_model, tiny_images, cfg)
    with pytest.warns(UserWarning, match=r"lowering leaves \d+ quantized node\(s\) in float.*vmfx_q_mixers_0_dt_proj__input"):
        lowered = vmfx.lowering.lower(q, "reference")
    left = lowered.meta["vmfx_lowered"]["left_float"]
    assert "vmfx_q_mixers_0_dt_proj__input" in left and any(n.endswith("__output") for n in left)
    with pytest.raises(vmfx.LoweringError, match="vmfx_q_mixers_0_dt_proj__input"):
        vmfx.lowering.lower(q, "reference", strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vmfx.lowering.lower(vmfx.compile(tiny_model, tiny_images, "pts-smooth-w8a8"), "reference", strict=True)


def test_another_image_size_is_a_clear_error(tiny_model, tiny_images):
    q = vmfx.compile(tiny_model, tiny_images, "minmax-w8a8")
    with pytest.raises(vmfx.InputError, match=r"inputs of shape \(N, 3x16x16\), got \(N, 3x20x20\)"):
        q(torch.randn(2, 3, 20, 20))
    with pytest.raises(vmfx.InputError, match=r"got one image of shape \(3, 16, 16\).*unsqueeze\(0\)"):
        q(tiny_images[0])


def test_nan_weights_are_refused_before_calibration(tiny_model, tiny_images):
    with torch.no_grad():
        tiny_model.mixers[0].in_proj.weight[0, 0] = float("nan")
    with pytest.raises(vmfx.CheckpointError, match="mixers.0.in_proj.weight hold NaN or Inf"):
        vmfx.compile(tiny_model, tiny_images, "minmax-w8a8")


def test_nan_checkpoint_is_refused_by_load_checkpoint(tiny_model, tmp_path):
    from vmfx.models import load_checkpoint

    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    state["head.weight"][0, 0] = float("inf")
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(vmfx.CheckpointError, match="1 tensor\\(s\\) hold NaN or Inf values \\(head.weight\\)"):
        load_checkpoint(tiny_model, tmp_path / "bad.pth")


@pytest.mark.parametrize("kwargs, message", [
    ({"candidates": 10**9}, "candidates must be an integer from 1 to 10000"),
    ({"candidates": True}, "candidates must be an integer"),
    ({"p": "2.4"}, "p must be a positive number"),
    ({"p": float("nan")}, "p must be a positive number"),
])
def test_init_config_bad_values(kwargs, message):
    with pytest.raises(vmfx.ConfigError, match=message):
        InitConfig(method="lp", **kwargs)


def test_dynamic_activations_are_validated_against_the_method():
    with pytest.raises(vmfx.ConfigError, match="dynamic activation specs cannot be combined with smoothing, jlss"):
        vmfx.preset("ptq4vm-w8a8").replace(activation=QuantSpec(8, False, "token", dynamic=True))
    with pytest.raises(vmfx.ConfigError, match="batch_size must be a positive integer or None"):
        JLSSConfig(batch_size=0)


def test_dynamic_activations_compile_without_calibration_passes(tiny_model, tiny_images):
    cfg = vmfx.preset("minmax-w8a8").replace(activation=QuantSpec(8, False, "token", dynamic=True))
    names = [p.name for p in vmfx.passes.method_passes(cfg)]
    assert "CalibratePass" not in names
    q = vmfx.compile(tiny_model, tiny_images, cfg)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(q(tiny_images).flatten(), tiny_model(tiny_images).flatten(), dim=0)
    assert cos > 0.99


def test_rules_round_trip_through_the_config_dict():
    cfg = vmfx.preset("pts-w4a8").replace(rules=(
        QuantRule("input", QuantSpec(4, False, "token"), role="in_proj", module="layers.1*"),
        QuantRule("weight", None, node="layers_3_mixer_out_proj"),
    ))
    again = vmfx.QuantConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.spec_for("input", "in_proj", "layers.12.mixer.in_proj") == QuantSpec(4, False, "token")
    assert again.spec_for("input", "in_proj", "layers.2.mixer.in_proj") == QuantSpec(8, False, "token")  # not layers.1*
    assert again.spec_for("weight", "out_proj", "x", "layers_3_mixer_out_proj") is None
    written_before_sections = json.loads((Path(__file__).parents[1] / "data" / "configs" / "quantconfig_v3.json")
                                         .read_text())["pts-smooth-w8a8"]
    old = {k: v for k, v in written_before_sections.items() if k != "rules"} | {"version": 1}
    assert vmfx.QuantConfig.from_dict(old).rules == ()  # version 1 had no rules
    with pytest.raises(vmfx.ConfigError, match="QuantRule.edge must be one of input, weight, output"):
        QuantRule("bias", None)


def test_the_readme_rules_example_compiles_a_vim():
    """The mixed-precision example of the README, on a small official-layout Vim."""
    from vmfx.models import VisionMamba

    torch.manual_seed(0)
    model = VisionMamba(img_size=16, patch_size=4, stride=4, embed_dim=32, depth=2, num_classes=5).eval()
    calib_images = torch.randn(8, 3, 16, 16)
    cfg = vmfx.preset("pts-w8a8").replace(rules=(
        QuantRule("input", QuantSpec(4, False, "token"), role="out_proj"),
        QuantRule("weight", QuantSpec(4, True, "channel"), role="out_proj"),
        QuantRule("output", QuantSpec(8, True, "tensor"), role="conv_act"),
        QuantRule("weight", None, module="layers.0.*"), QuantRule("input", None, module="layers.0.*"),
    ))
    qmodel = vmfx.compile(model, calib_images, config=cfg)
    rows = {r["node"]: r for r in vmfx.inspect.rows(qmodel)}
    assert "layers_0_mixer_in_proj" not in rows or rows["layers_0_mixer_in_proj"]["spec"] == ""
    assert rows["layers_1_mixer_in_proj"]["spec"] == "A uint8 asym per-token | W int8 sym per-channel"
    assert rows["layers_1_mixer_out_proj"]["spec"] == "A uint4 asym per-token | W int4 sym per-channel"
    assert sum(r["node"].endswith("__output") for r in rows.values()) == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU interpreter is only chosen without a GPU")
def test_triton_imported_before_the_interpreter_is_a_clear_error():
    """vmfx switches the interpreter on when it defines its first kernel; if timm already imported
    Triton with it off, a kernel cannot run, and the error says what to do."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import timm, torch, vmfx\n"
            "from vmfx.lowering import codegen\n"
            "try:\n    codegen.ensure_backend()\nexcept RuntimeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "Set TRITON_INTERPRET=1 in the environment before Python starts" in out.stdout
    ok = subprocess.run([sys.executable, "-c", "import torch, vmfx\nfrom vmfx.lowering import codegen\n"
                         "codegen.ensure_backend(); import os; print(os.environ['TRITON_INTERPRET'])"],
                        env=env, capture_output=True, text=True, check=True)
    assert ok.stdout.strip() == "1"  # nothing imported Triton first: vmfx switches it on itself
