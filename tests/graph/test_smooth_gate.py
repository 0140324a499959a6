"""MambaQuant's smooth-fused gate (vmfx.quant.smooth_silu, vmfx.passes.smooth_gate): the Smooth-SiLU
of z / s is silu(z) / s (float64, fresh random inputs); the pass leaves float64 logits unchanged on
random Vims (with and without the residual rotation and the online Hadamard) and on the proxy, its
factors are MambaQuant's formula on out_proj's measured input, the ``rotate-smooth-online`` presets
save and load bit for bit, inspect.table names what absorbed s, and what it cannot smooth is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import vmfx
from vmfx.models import VisionMamba
from vmfx.passes import (DetectMambaMixersPass, OnlineHadamardPass, Pipeline, RotateResidualPass, RotationOptions,
                         SmoothFusedGatePass, method_passes)
from vmfx.passes.smooth_gate import smooth_gate_factors
from vmfx.quant.registry import build_module, describe_module
from vmfx.quant.smooth_silu import SmoothSiLU, smooth_silu


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max())


@settings(max_examples=40, deadline=None)
@given(channels=st.integers(1, 40), dim=st.sampled_from([-1, -2, -3]), seed=st.integers(0, 2**31 - 1))
def test_smooth_silu_of_z_over_s_is_silu_z_over_s_in_float64(channels, dim, seed):
    g = torch.Generator().manual_seed(seed)
    shape = [2, 3, 4]
    shape[dim] = channels
    z = torch.randn(*shape, dtype=torch.float64, generator=g) * 8
    s = torch.exp(torch.randn(channels, dtype=torch.float64, generator=g) * 2)  # 1e-3 .. 1e3
    view = [1, 1, 1]
    view[dim] = channels
    got = SmoothSiLU(s, dim)(z / s.reshape(view))
    assert _rel(got, F.silu(z) / s.reshape(view)) < 1e-13
    assert _rel(smooth_silu(z, torch.ones(channels, dtype=torch.float64), dim), F.silu(z)) < 1e-15


def _random_vim(seed: int, dim: int) -> VisionMamba:
    torch.manual_seed(seed)
    model = VisionMamba(img_size=16, patch_size=4, stride=4, embed_dim=dim, depth=2, num_classes=5,
                        residual_in_fp32=False).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name == "norm_f.weight":
                p.uniform_(0.3, 3.0)
            if name.endswith("in_proj.weight"):  # gate channels of very different ranges
                p.mul_(torch.exp(torch.randn(p.shape[0], 1, dtype=p.dtype) * 1.5))
    return model


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), dim=st.sampled_from([8, 12, 16]), residual=st.booleans(),
       online=st.booleans(), alpha=st.sampled_from([0.0, 0.5, 0.8, 1.0]))
def test_the_smooth_fused_gate_leaves_float64_logits_unchanged(seed, dim, residual, online, alpha):
    model = _random_vim(seed, dim)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    passes = [DetectMambaMixersPass()] + ([RotateResidualPass("hadamard", seed)] if residual else [])
    passes += [SmoothFusedGatePass(alpha)] + ([OnlineHadamardPass()] if online else [])
    gm = Pipeline(passes)(model, x)
    with torch.no_grad():
        assert _rel(gm(x), model(x)) < 1e-12
    record = gm.meta["vmfx_smooth_gate"]
    assert set(record) == {"layers_0_mixer_out_proj", "layers_1_mixer_out_proj"}
    assert record["layers_0_mixer_out_proj"]["rows"] == [2 * dim, 4 * dim]
    gates = [m for m in gm.modules() if isinstance(m, SmoothSiLU)]
    assert len(gates) == 4 and all(g.channel_dim == -2 for g in gates)  # both directions of both blocks
    assert not any(n.op == "call_function" and n.target is F.silu and (a := vmfx.annotations.annotation(n)) is not None
                   and a.role == "gate" for n in gm.graph.nodes)
    w, w0 = gm.get_submodule("layers.1.mixer.in_proj").weight, model.get_submodule("layers.1.mixer.in_proj").weight
    if not residual:  # only the gate rows changed
        assert torch.equal(w[: 2 * dim], w0[: 2 * dim]) and not torch.allclose(w[2 * dim:], w0[2 * dim:])


def test_the_factors_are_mambaquants_formula_on_out_projs_input():
    model = _random_vim(3, 8)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    seen = {}
    out_proj = model.layers[1].mixer.out_proj
    hook = out_proj.register_forward_pre_hook(lambda m, i: seen.update(x=i[0].detach().clone()))
    with torch.no_grad():
        model(x)
    hook.remove()
    act = seen["x"].abs().reshape(-1, 16).amax(0)
    w = out_proj.weight.detach().clone()
    expected = (act.sqrt() / w.abs().amax(0).clamp(min=1e-5).sqrt()).clamp(min=1e-2)
    assert torch.equal(smooth_gate_factors(act, w, 0.5), expected)
    gm = Pipeline([DetectMambaMixersPass(), SmoothFusedGatePass(0.5)])(model, [x[:2], x[2:]])  # two batches
    name = gm.meta["vmfx_smooth_gate"]["layers_1_mixer_out_proj"]["gates"][0]
    gate = gm.get_submodule(next(n.target for n in gm.graph.nodes if n.name == name))
    assert _rel(gate.factors, expected) < 1e-15
    assert _rel(gm.get_submodule("layers.1.mixer.out_proj").weight, w * expected) < 1e-15
    entry = describe_module(gate)
    assert entry == {"kind": "SmoothSiLU", "channels": 16, "channel_dim": -2}
    assert build_module(entry).channel_dim == -2


def test_the_proxy_keeps_its_float64_logits():
    from vmfx.data import load_proxy_model

    model = load_proxy_model().double()
    model.residual_in_fp32 = False  # the residual stream in float64 too
    for block in model.layers:
        block.residual_in_fp32 = False
    images = torch.randn(2, 1, 30, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gm = Pipeline([DetectMambaMixersPass(), RotateResidualPass("hadamard"), SmoothFusedGatePass(), OnlineHadamardPass()])(
        model, images)
    with torch.no_grad():
        assert _rel(gm(images), model(images)) < 1e-12
    assert len(gm.meta["vmfx_smooth_gate"]) == 6


@pytest.fixture(scope="module")
def smooth_w4a8():
    torch.manual_seed(0)
    model = VisionMamba(img_size=16, patch_size=4, stride=4, embed_dim=24, depth=2, num_classes=5).eval()
    images = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return model, images, vmfx.compile(model, images, "rotate-smooth-online-w4a8")


def test_the_preset_runs_saves_loads_and_names_what_absorbed_s(smooth_w4a8, tmp_path):
    model, images, q = smooth_w4a8
    assert q.meta["vmfx_config"]["sections"]["rotate"] == {"kind": "klt", "seed": 0, "online_out_proj": True, "residual": True,
                                                "smooth_gate": True}
    assert list(q.meta["vmfx_pass_seconds"])[:5] == ["DetectMambaMixersPass", "RotateResidualPass",
                                                      "SmoothFusedGatePass", "OnlineHadamardPass", "InsertObserversPass"]
    with torch.no_grad():
        ref, got = model(images), q(images)
    assert float((got - ref).norm() / ref.norm()) < 0.2
    loaded = vmfx.load(vmfx.save(q, str(tmp_path / "smooth.safetensors")))
    with torch.no_grad():
        assert torch.equal(loaded(images), got)
    rows = {line.split()[0]: line for line in vmfx.inspect.table(loaded).splitlines()[2:]}
    for block in range(2):
        gates = q.meta["vmfx_smooth_gate"][f"layers_{block}_mixer_out_proj"]["gates"]
        assert len(gates) == 2
        for gate in gates:
            assert "gate" in rows[gate] and "smooth-fused gate (alpha 0.5, 48 channels): Smooth-SiLU" in rows[gate]
        assert "gate rows 48..96 W <- W / s" in rows[f"layers_{block}_mixer_in_proj"]
        out_proj = rows[f"layers_{block}_mixer_out_proj"]
        assert out_proj.index("W <- W diag(s)") < out_proj.index("W <- W H / sqrt(48)")  # s before the Hadamard


def test_options_presets_and_refusals():
    names = set(vmfx.preset_names())
    assert {f"{p}rotate-smooth-online-{b}" for p in ("", "ptq4vm-") for b in ("w8a8", "w4a8", "w4a4")} <= names
    smooth = RotationOptions("klt", 0, True, True, True)
    assert vmfx.preset("ptq4vm-rotate-smooth-online-w4a4").options == smooth
    unset = vmfx.preset("rotate-online-w4a4").to_dict()["sections"]["rotate"]
    assert unset == {"kind": "klt", "seed": 0, "online_out_proj": True, "residual": True}  # unchanged when unset
    cfg = vmfx.preset("rotate-w8a8").replace(options=RotationOptions(online_out_proj=True, smooth_gate=True,
                                                                     smooth_alpha=0.7))
    assert cfg.to_dict()["sections"]["rotate"]["smooth_alpha"] == 0.7
    assert vmfx.QuantConfig.from_dict(cfg.to_dict()).options == cfg.options
    names = [p.name for p in method_passes(vmfx.preset("rotate-smooth-online-w8a8"))]
    assert names[:4] == ["DetectMambaMixersPass", "RotateResidualPass", "SmoothFusedGatePass", "OnlineHadamardPass"]
    with pytest.raises(vmfx.ConfigError, match="set online_out_proj=True as well"):
        RotationOptions(smooth_gate=True)
    with pytest.raises(vmfx.ConfigError, match=r"smooth_alpha must be a number in \[0, 1\], got 1.5"):
        RotationOptions(online_out_proj=True, smooth_gate=True, smooth_alpha=1.5)
    with pytest.raises(vmfx.ConfigError, match="smooth_gate must be True or False"):
        RotationOptions(online_out_proj=True, smooth_gate=1)
    with pytest.raises(vmfx.ConfigError, match="factors must be positive and finite"):
        SmoothSiLU(torch.tensor([1.0, 0.0]))
    with pytest.raises(vmfx.errors.InputError, match="SmoothSiLU over 2 channels"):
        SmoothSiLU(torch.ones(2), -2)(torch.zeros(1, 3, 4))
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(vmfx.errors.CalibrationDataError, match="smooth-fused gate needs calibration data"):
        Pipeline([DetectMambaMixersPass(), SmoothFusedGatePass()])(_random_vim(0, 8).float())
    with pytest.raises(vmfx.errors.PassError, match=r"SmoothFusedGatePass \(position \d\) cannot run after"):
        Pipeline([DetectMambaMixersPass(), OnlineHadamardPass(), SmoothFusedGatePass()])(_random_vim(0, 8).float(), x)
    from vmfx.data.proxy_vmamba import load_proxy_vmamba

    with pytest.raises(vmfx.ConfigError, match=r"through node 'layer_norm_\d+' \(call_function layer_norm\).*does not "
                                               "commute with a per-channel scale"):
        Pipeline([DetectMambaMixersPass(), SmoothFusedGatePass()])(load_proxy_vmamba(), torch.randn(2, 1, 30, 30))
