"""The online Hadamard on out_proj's input (vmfx.quant.online_hadamard, vmfx.passes.online_hadamard):
the fast transform is x H / sqrt(n) for a ±1 Hadamard H (float64, fresh random inputs), out_proj's
weight absorbs H^T so float64 logits do not change (alone, with the offline rotation, on VMamba), the
activation quantizer calibrates on the rotated tensor, the ``rotate-online`` presets save and load
bit for bit, inspect.table names every rotation, and widths or models it cannot rotate are refused."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vmfx
from vmfx.models import VisionMamba
from vmfx.passes import (ConvertPass, DetectMambaMixersPass, InsertObserversPass, OnlineHadamardPass, Pipeline, RotateResidualPass, RotationOptions,
                         linear_edges, method_passes)
from vmfx.quant.online_hadamard import (OnlineHadamard, fast_hadamard_factors, fast_hadamard_transform,
                                        online_hadamard_matrix)
from vmfx.quant.registry import build_module, describe_module

WIDTHS = [1, 2, 16, 64, 12, 24, 48, 192, 384, 20, 40, 28, 56]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@settings(max_examples=40, deadline=None)
@given(n=st.sampled_from(WIDTHS), rows=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_the_fast_transform_is_x_h_over_sqrt_n_in_float64(n, rows, seed):
    x = torch.randn(rows, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 10
    h = online_hadamard_matrix(n)
    assert torch.equal(h.abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    got = fast_hadamard_transform(x)
    assert got.dtype == torch.float64
    assert _rel(got, x @ h / n**0.5) < 1e-14
    assert abs(float(got.norm() / x.norm()) - 1) < 1e-13  # orthogonal


def test_widths_factor_with_the_smallest_base_and_others_are_refused():
    assert fast_hadamard_factors(192) == (4, 12) and fast_hadamard_factors(768) == (6, 12)
    assert fast_hadamard_factors(64) == (6, 1) and fast_hadamard_factors(112) == (2, 28)
    for n in (97, 10, 18, 0, -4):
        assert fast_hadamard_factors(n) is None
    with pytest.raises(vmfx.ConfigError, match="no fast Hadamard transform of width 97"):
        OnlineHadamard(97)
    module = OnlineHadamard(192)
    entry = describe_module(module)
    assert entry == {"kind": "OnlineHadamard", "dim": 192}
    assert build_module(entry).dim == 192 and module.describe() == "online Hadamard 192 = 12 x 2^4 (FWHT)"
    with pytest.raises(vmfx.errors.InputError, match="width 192 got an input of width 96"):
        module(torch.zeros(2, 96))


def _random_vim(seed: int, dim: int) -> VisionMamba:
    torch.manual_seed(seed)
    model = VisionMamba(img_size=16, patch_size=4, stride=4, embed_dim=dim, depth=2, num_classes=5,
                        residual_in_fp32=False).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name == "norm_f.weight":
                p.uniform_(0.3, 3.0)
    return model


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), dim=st.sampled_from([8, 12, 16, 24]), residual=st.booleans())
def test_the_online_hadamard_leaves_float64_logits_unchanged(seed, dim, residual):
    model = _random_vim(seed, dim)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    passes = [DetectMambaMixersPass()] + ([RotateResidualPass("hadamard", seed)] if residual else [])
    gm = Pipeline(passes + [OnlineHadamardPass()])(model, x)
    with torch.no_grad():
        assert _rel(gm(x), model(x)) < 1e-12
    record = gm.meta["vmfx_online_rotation"]
    assert set(record) == {"layers_0_mixer_out_proj", "layers_1_mixer_out_proj"}
    assert all(r["dim"] == 2 * dim for r in record.values())
    out_proj = "layers.1.mixer.out_proj"  # the weight changed: it absorbed H^T
    assert not torch.allclose(gm.get_submodule(out_proj).weight, model.get_submodule(out_proj).weight)


def test_a_vmamba_takes_the_online_hadamard_alone():
    from vmfx.data.proxy_vmamba import load_proxy_vmamba

    model = load_proxy_vmamba().double()
    x = torch.randn(2, 1, 30, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gm = Pipeline([DetectMambaMixersPass(), OnlineHadamardPass()])(model, x)
    with torch.no_grad():
        assert _rel(gm(x), model(x)) < 1e-12
    assert sorted(r["dim"] for r in gm.meta["vmfx_online_rotation"].values()) == [24, 48, 96, 96]
    names = [p.name for p in method_passes(vmfx.preset("rotate-online-w8a8").replace(
        options=RotationOptions(online_out_proj=True, residual=False)))]
    assert names[:3] == ["DetectMambaMixersPass", "OnlineHadamardPass", "InsertObserversPass"]


@pytest.fixture(scope="module")
def digits():
    from vmfx.data import load_digits

    return load_digits("train")[0][:16]


@pytest.fixture(scope="module")
def proxy():
    from vmfx.data import load_proxy_model

    return load_proxy_model()


@pytest.fixture(scope="module")
def online_w8a8(proxy, digits):
    return vmfx.compile(proxy, digits, "rotate-online-w8a8")


def test_rotate_online_quantizes_the_rotated_input_and_round_trips(proxy, digits, online_w8a8, tmp_path):
    q = online_w8a8
    assert q.meta["vmfx_config"]["sections"]["rotate"] == {"kind": "klt", "seed": 0, "online_out_proj": True, "residual": True}
    assert list(q.meta["vmfx_pass_seconds"])[:4] == ["DetectMambaMixersPass", "RotateResidualPass",
                                                      "OnlineHadamardPass", "InsertObserversPass"]
    out_proj = next(n for n in q.graph.nodes if n.name == "layers_0_mixer_out_proj")
    edges = linear_edges(out_proj)
    # calibration ran after the insertion, on the rotated tensor: the input quantizer reads x H
    assert isinstance(q.get_submodule(edges.source.target), OnlineHadamard)
    assert edges.act_quant.args[0] is edges.source
    rotated = {}
    hook = q.get_submodule(edges.source.target).register_forward_hook(lambda m, i, o: rotated.update(x=i[0], y=o))
    with torch.no_grad():
        ref, got = proxy(digits), q(digits)
    hook.remove()
    assert _rel(rotated["y"].double(), rotated["x"].double() @ online_hadamard_matrix(192) / 192**0.5) < 1e-5
    assert float((got - ref).norm() / ref.norm()) < 0.05
    loaded = vmfx.load(vmfx.save(q, str(tmp_path / "online.safetensors")))
    with torch.no_grad():
        assert torch.equal(loaded(digits), got)
    table = vmfx.inspect.table(loaded)
    rows = {line.split()[0]: line for line in table.splitlines()[2:]}
    for block in range(6):
        node = f"vmfx_q_layers_{block}_mixer_out_proj__hadamard"
        assert "rotation" in rows[node] and "online Hadamard 192 = 12 x 2^4 (FWHT)" in rows[node]
        assert f"before layers_{block}_mixer_out_proj: x <- x H / sqrt(192)" in rows[node]
        line = rows[f"layers_{block}_mixer_out_proj"]
        assert "residual R (klt-hadamard 96): W <- R^T W" in line
        assert f"online Hadamard 192 = 12 x 2^4 (FWHT) of {node}: W <- W H / sqrt(192) (absorbs its H^T)" in line


def test_options_and_refusals():
    assert {f"rotate-online-{b}" for b in ("w8a8", "w4a8", "w4a4")} <= set(vmfx.preset_names())
    assert vmfx.preset("ptq4vm-rotate-online-w4a4").options == RotationOptions("klt", 0, True, True)
    assert vmfx.preset("rotate-w4a4").options == RotationOptions()  # the offline presets are unchanged
    with pytest.raises(vmfx.ConfigError, match="online_out_proj must be True or False"):
        RotationOptions(online_out_proj=1)
    with pytest.raises(vmfx.ConfigError, match="rotates nothing"):
        RotationOptions(residual=False)
    cfg = vmfx.preset("rotate-w8a8").replace(options=RotationOptions("hadamard", 3, True, False))
    assert vmfx.QuantConfig.from_dict(cfg.to_dict()).options == RotationOptions("hadamard", 3, True, False)
    x = torch.randn(2, 3, 16, 16)
    odd = VisionMamba(img_size=16, patch_size=4, stride=4, embed_dim=9, depth=1, num_classes=5).eval()
    with pytest.raises(vmfx.ConfigError, match=r"out_proj 'layers_0_mixer_out_proj': its input width 18 has no fast"):
        Pipeline([DetectMambaMixersPass(), OnlineHadamardPass()])(odd, x)
    for before in ([InsertObserversPass()], [InsertObserversPass(), ConvertPass(requires_calibration=False)]):
        with pytest.raises(vmfx.errors.PassError, match=r"OnlineHadamardPass \(position \d\) cannot run after"):
            Pipeline([DetectMambaMixersPass()] + before + [OnlineHadamardPass()])(_random_vim(0, 8).float(), x)
