"""Offline rotation of the residual stream (vmfx.passes.rotate): folding R into the weights leaves
the float model's logits unchanged (float64, random Vims and the bundled proxy), the KLT-enhanced
rotation equalises the in_proj inputs' channels, the ``rotate`` presets compile, save and load bit
for bit, PTQ4VM runs on the rotated graph, and models whose stream cannot be rotated are refused."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vmfx
from vmfx.config import JLSSConfig
from vmfx.models import VisionMamba
from vmfx.passes import (DetectMambaMixersPass, InsertObserversPass, Pipeline, RotateResidualPass, RotationOptions,
                         method_passes)

VARIANTS = {
    "middle-cls": {},
    "front-cls": {"use_middle_cls_token": False},
    "double-cls": {"use_double_cls_token": True},
    "mean-pool": {"if_cls_token": False, "final_pool_type": "mean"},
}


def _random_vim(seed: int, dim: int, variant: str) -> VisionMamba:
    """A float64 Vim whose residual stream stays float64 (``residual_in_fp32=False``) and whose norm
    weights, patch bias, class tokens and position embedding are all non-trivial."""
    torch.manual_seed(seed)
    model = VisionMamba(img_size=16, patch_size=4, stride=4, embed_dim=dim, depth=2, num_classes=5,
                        residual_in_fp32=False, **VARIANTS[variant]).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name == "norm_f.weight":
                p.uniform_(0.3, 3.0)
            elif name in ("patch_embed.proj.bias", "cls_token", "pos_embed", "cls_token_head", "cls_token_tail"):
                p.normal_(0, 0.5)
    return model


def _float64_proxy():
    """The bundled proxy in float64, its residual stream in float64 too."""
    from vmfx.data import load_proxy_model

    model = load_proxy_model().double()
    model.residual_in_fp32 = False
    for block in model.layers:
        block.residual_in_fp32 = False
    return model


def _rotated(model, images, kind="klt", seed=0):
    return Pipeline([DetectMambaMixersPass(), RotateResidualPass(kind, seed)])(model, images)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def digits():
    from vmfx.data import load_digits

    return load_digits("train")[0][:32]


@pytest.fixture(scope="module")
def proxy():
    from vmfx.data import load_proxy_model

    return load_proxy_model()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), dim=st.sampled_from([20, 24, 32, 48]), variant=st.sampled_from(sorted(VARIANTS)),
       kind=st.sampled_from(["klt", "hadamard"]))
def test_rotating_a_random_vim_leaves_its_logits_unchanged_in_float64(seed, dim, variant, kind):
    model = _random_vim(seed, dim, variant)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    gm = _rotated(model, x, kind, seed)
    with torch.no_grad():
        ref, got = model(x), gm(x)
        other = torch.randn_like(x)  # not the calibration data
        assert _rel(gm(other), model(other)) < 1e-10
    assert _rel(got, ref) < 1e-10
    # the weights did change: in_proj reads rotated inputs, the norms lost their weights
    assert torch.equal(gm.get_submodule("layers.0.norm").weight, torch.ones(dim, dtype=torch.float64))
    in_proj = "layers.0.mixer.in_proj"
    assert not torch.allclose(gm.get_submodule(in_proj).weight, model.get_submodule(in_proj).weight)


@pytest.mark.parametrize("kind", ["klt", "hadamard"])
def test_rotating_the_proxy_leaves_its_logits_unchanged_in_float64(digits, kind):
    model = _float64_proxy()
    images = digits.double()
    gm = _rotated(model, images, kind)
    with torch.no_grad():
        assert _rel(gm(images), model(images)) < 1e-10
    record = gm.meta["vmfx_rotation"]
    assert record["kind"] == kind and record["dim"] == 96 and record["blocks"] == [96]
    absorbed = record["absorbed"]
    assert absorbed["pos_embed"] == absorbed["cls_token"] == "P <- P R"
    assert absorbed["layers.0.mixer.in_proj.weight"] == "W <- W diag(layers_0_norm.g) R"
    assert absorbed["layers.5.mixer.out_proj.weight"] == "W <- R^T W"
    assert absorbed["head.weight"] == "W <- W diag(norm_f.g) R"
    assert absorbed["patch_embed.proj.weight"] == "output channels W <- R^T W, b <- R^T b"
    assert len([k for k in absorbed if k.endswith("norm.weight") or k == "norm_f.weight"]) == 7


def _in_proj_channel_energy(gm) -> torch.Tensor:
    """Mean square of every input channel of every in_proj, (blocks, d), over the calibration digits."""
    sums, counts = {}, {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in gm.named_modules() if n.endswith("mixer.in_proj")]
    return handles, sums, counts


def test_the_klt_rotation_equalises_the_in_proj_inputs(proxy, digits):
    spreads = {}
    for label, gm in (("float", Pipeline([DetectMambaMixersPass()])(proxy, digits)),
                      ("hadamard", _rotated(proxy, digits, "hadamard")), ("klt", _rotated(proxy, digits, "klt"))):
        handles, sums, counts = _in_proj_channel_energy(gm)
        with torch.no_grad():
            gm(digits)
        for h in handles:
            h.remove()
        pooled = sum(sums.values()) / sum(counts.values())
        per_block = [s / counts[k] for k, s in sums.items()]
        spreads[label] = (float(pooled.max() / pooled.min()), max(float(b.max() / b.min()) for b in per_block))
    # pooled over the blocks (what the KLT was computed from): every channel gets the mean eigenvalue
    assert spreads["klt"][0] < 1.0001
    assert spreads["float"][0] > 10 * spreads["klt"][0] and spreads["hadamard"][0] > 5 * spreads["klt"][0]
    # block by block (one R for every block) the spread still falls below the float model's and a
    # plain Hadamard's (measured on these 32 digits: pooled 21 float, 9.8 Hadamard, 1.0000004 KLT; worst block
    # 91, 25, 16)
    assert spreads["klt"][1] < spreads["hadamard"][1] < spreads["float"][1]
    assert spreads["float"][1] > 4 * spreads["klt"][1]


@pytest.fixture(scope="module")
def rotated_w8a8(proxy, digits):
    return vmfx.compile(proxy, digits, "rotate-w8a8")


def test_rotate_w8a8_compiles_close_to_float_and_round_trips(proxy, digits, rotated_w8a8, tmp_path):
    q = rotated_w8a8
    assert q.meta["vmfx_config"]["method"] == "rotate"
    assert q.meta["vmfx_config"]["sections"]["rotate"] == {"kind": "klt", "seed": 0, "online_out_proj": False, "residual": True}
    with torch.no_grad():
        ref, got = proxy(digits), q(digits)
    assert float((got - ref).norm() / ref.norm()) < 0.05
    assert bool((got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95)
    loaded = vmfx.load(vmfx.save(q, str(tmp_path / "rotated.safetensors")))
    with torch.no_grad():
        assert torch.equal(loaded(digits), got)
    for name, p in q.state_dict().items():  # the rotated float state comes back as it was
        if name.endswith("norm.weight") or name in ("cls_token", "pos_embed", "patch_embed.proj.weight", "head.weight"):
            assert torch.equal(loaded.state_dict()[name], p), name
    table = vmfx.inspect.table(loaded)
    rotated = [line for line in table.splitlines() if "residual R (klt-hadamard 96)" in line]
    names = {line.split()[0] for line in rotated}
    assert {"patch_embed_proj", "layers_0_norm", "layers_0_mixer_in_proj", "layers_0_mixer_out_proj", "norm_f",
            "head"} <= names
    assert len(names) == 1 + 6 * 3 + 2
    assert any("cls_token, pos_embed <- P R" in line or "pos_embed, cls_token <- P R" in line for line in rotated)
    assert any("A " in line and "W <- W diag(layers_0_norm.g) R" in line for line in rotated)


def test_compare_skips_the_rotated_outputs_and_the_staged_api_gives_the_same_model(proxy, digits, rotated_w8a8):
    report = vmfx.inspect.compare(proxy, rotated_w8a8, digits[:8])
    reported = {layer.node for layer in report.layers}
    assert "layers_0_mixer_in_proj" in reported and "head" in reported
    assert not {"layers_0_norm", "layers_0_mixer_out_proj", "patch_embed_proj", "norm_f"} & reported
    in_proj = next(layer for layer in report.layers if layer.node == "layers_0_mixer_in_proj")
    assert in_proj.cosine > 0.99  # in_proj's output is the float model's: R cancels inside it
    staged = vmfx.convert(vmfx.calibrate(vmfx.prepare(proxy, "rotate-w8a8", digits), digits))
    with torch.no_grad():
        assert torch.equal(staged(digits), rotated_w8a8(digits))


def test_kscaled_runs_on_the_rotated_graph(proxy, digits):
    cfg = vmfx.preset("kscaled-w8a8").replace(
        method="rotate", search=vmfx.config.SimilaritySearchConfig(rounds=1, candidates=5, images=4))
    q = vmfx.compile(proxy, digits[:16], cfg)
    assert list(q.meta["vmfx_pass_seconds"])[:3] == ["DetectMambaMixersPass", "RotateResidualPass", "InsertObserversPass"]
    assert "scales_searched" in q.meta["vmfx_facts"] and "residual_rotated" in q.meta["vmfx_facts"]
    with torch.no_grad():
        ref, got = proxy(digits[:16]), q(digits[:16])
    assert float((got - ref).norm() / ref.norm()) < 0.3


def test_the_rotate_method_runs_the_rotation_right_after_detection():
    names = [p.name for p in method_passes(vmfx.preset("ptq4vm-rotate-w4a4"))]
    assert names == ["DetectMambaMixersPass", "RotateResidualPass", "InsertObserversPass", "CalibratePass",
                     "SmoothQuantPass", "CalibratePass", "ConvertPass", "JLSSPass", "FoldSmoothingPass"]
    assert [p.name for p in method_passes(vmfx.preset("rotate-w4a8"))] == [
        "DetectMambaMixersPass", "RotateResidualPass", "InsertObserversPass", "CalibratePass", "ConvertPass"]
    for bits in ("w8a8", "w4a8", "w4a4"):
        assert {f"rotate-{bits}", f"ptq4vm-rotate-{bits}"} <= set(vmfx.preset_names())
        assert vmfx.preset(f"rotate-hadamard-{bits}") == vmfx.preset(f"rotate-{bits}").replace(
            options=RotationOptions("hadamard", 0))
        assert vmfx.preset(f"ptq4vm-rotate-hadamard-{bits}").options == RotationOptions("hadamard", 0)
    with pytest.raises(vmfx.ConfigError, match="kind must be one of 'klt', 'hadamard'"):
        RotationOptions(kind="givens")
    with pytest.raises(vmfx.ConfigError, match="seed must be a non-negative integer"):
        RotationOptions(seed=-1)
    cfg = vmfx.preset("rotate-w8a8").replace(options=RotationOptions("hadamard", 7))
    assert vmfx.QuantConfig.from_dict(cfg.to_dict()).options == RotationOptions("hadamard", 7)


def test_ptq4vm_rotate_w4a4_learns_on_the_rotated_graph(proxy, digits):
    cfg = vmfx.preset("ptq4vm-rotate-w4a4").replace(jlss=JLSSConfig(steps=2, batch_size=8))
    q = vmfx.compile(proxy, digits[:16], cfg)
    assert len(q.meta["vmfx_jlss"]["blocks"]) == 6
    assert "residual_rotated" in q.meta["vmfx_facts"] and "smoothing_folded" in q.meta["vmfx_facts"]
    # the norms' weights were set to one by the rotation, then divided by the smoothing factors
    assert not torch.allclose(q.get_submodule("layers.0.norm").weight, torch.ones(96))
    with torch.no_grad():
        out = q(digits[:16])
    assert bool(torch.isfinite(out).all())


def test_a_hadamard_rotation_needs_no_data_and_is_seeded(proxy, digits):
    a = _rotated(proxy, digits, "hadamard", seed=1)
    b = Pipeline([DetectMambaMixersPass(), RotateResidualPass("hadamard", 1)])(proxy, example_inputs=(digits[:1],))
    c = _rotated(proxy, digits, "hadamard", seed=2)
    in_proj = "layers.2.mixer.in_proj"
    assert torch.equal(a.get_submodule(in_proj).weight, b.get_submodule(in_proj).weight)
    assert not torch.equal(a.get_submodule(in_proj).weight, c.get_submodule(in_proj).weight)
    with pytest.raises(vmfx.CalibrationDataError, match="KLT-enhanced rotation needs calibration data"):
        Pipeline([DetectMambaMixersPass(), RotateResidualPass("klt")])(proxy, example_inputs=(digits[:1],))


def test_models_whose_stream_cannot_be_rotated_are_refused():
    x = torch.randn(2, 3, 16, 16)
    layer_norm = VisionMamba(img_size=16, patch_size=4, stride=4, embed_dim=24, depth=2, num_classes=5, rms_norm=False)
    with pytest.raises(vmfx.ConfigError, match="normalised by a LayerNorm .*subtracts the mean"):
        vmfx.compile(layer_norm.eval(), x, "rotate-w8a8")
    scaled = VisionMamba(img_size=16, patch_size=4, stride=4, embed_dim=24, depth=2, num_classes=5, init_layer_scale=0.5)
    refused = r"node 'mul_\d+' \(call_function mul\) writes the residual stream but cannot absorb a rotation"
    with pytest.raises(vmfx.ConfigError, match=refused):
        _rotated(scaled.eval(), x, "hadamard")


@pytest.mark.parametrize("extra", [{}, {"if_cls_token": True, "use_middle_cls_token": True}], ids=["mean-pool", "middle-cls"])
def test_local_vim_rotates_exactly_and_its_rope_is_refused(extra):
    from vmfx.models.localmamba import LocalVim

    torch.manual_seed(0)
    args = dict(img_size=40, patch_size=8, depth=2, embed_dim=32, num_classes=10, rms_norm=True, residual_in_fp32=False,
                final_pool_type="mean", if_abs_pos_embed=True, bimamba_type="v2",
                directions=[("h", "v_flip", "w2", "w7_flip"), ("h_flip", "v", "w2_flip", "w7")])
    model = LocalVim(**args, **extra).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".norm.weight") and ".attn." not in name or name == "norm_f.weight":
                p.uniform_(0.3, 3.0)
    x = torch.randn(3, 3, 40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gm = _rotated(model, x, "klt")
    with torch.no_grad():
        assert _rel(gm(x), model(x)) < 1e-10
    if not extra:
        rope = LocalVim(**dict(args, if_rope=True, if_rope_residual=True)).eval()
        with pytest.raises(vmfx.ConfigError, match="cannot be rotated offline: node 'mul'"):
            _rotated(rope, x.float(), "hadamard")


def test_a_vmamba_is_refused_for_its_layer_norms():
    from vmfx.data.proxy_vmamba import load_proxy_vmamba

    images = torch.randn(4, 1, 30, 30, generator=torch.Generator().manual_seed(0))
    with pytest.raises(vmfx.ConfigError, match="normalised by a layer_norm .*subtracts the mean.*supports RMSNorm models"):
        vmfx.compile(load_proxy_vmamba(), images, "rotate-w8a8")


def test_the_rotation_must_come_before_the_observers(proxy, digits):
    with pytest.raises(vmfx.errors.PassError, match=r"RotateResidualPass \(position 3\) cannot run after InsertObserversPass"):
        Pipeline([DetectMambaMixersPass(), InsertObserversPass(), RotateResidualPass("hadamard")])(proxy, digits)
