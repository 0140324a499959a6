"""VMamba (vmfx.models.VSSM): official state_dict layout, logits against a float64 reference of the
official computation, loading, timm registration."""

from __future__ import annotations

import math

import pytest
import torch

import vmfx.models
from vmfx.errors import CheckpointError, ConfigError
from vmfx.models import VSSM, load_checkpoint

from ..reference import vssm_ref

# The published configurations, written out from the official configs (archs.md 2.1), not from
# vmfx's table: name -> (generation, depths, base dim, ssm_ratio).
PUBLISHED = {
    "vanilla_vmamba_tiny": ("v0", [2, 2, 9, 2], 96, 2.0),
    "vanilla_vmamba_small": ("v0", [2, 2, 27, 2], 96, 2.0),
    "vanilla_vmamba_base": ("v0", [2, 2, 27, 2], 128, 2.0),
    "vmamba_tiny_s2l5": ("v2", [2, 2, 5, 2], 96, 2.0),
    "vmamba_small_s2l15": ("v2", [2, 2, 15, 2], 96, 2.0),
    "vmamba_base_s2l15": ("v2", [2, 2, 15, 2], 128, 2.0),
    "vmamba_tiny_s1l8": ("v2", [2, 2, 8, 2], 96, 1.0),
    "vmamba_small_s1l20": ("v2", [2, 2, 20, 2], 96, 1.0),
    "vmamba_base_s1l20": ("v2", [2, 2, 20, 2], 128, 1.0),
}


def official_shapes(gen: str, depths, dim0: int, ratio: float, classes: int = 1000) -> dict:
    """The official key -> shape table (archs.md 2.4)."""
    s = {}
    dims = [dim0 * 2**i for i in range(len(depths))]
    N = 16 if gen == "v0" else 1
    if gen == "v0":
        s["patch_embed.0.weight"], s["patch_embed.0.bias"] = (dim0, 3, 4, 4), (dim0,)
        s["patch_embed.2.weight"] = s["patch_embed.2.bias"] = (dim0,)
    else:
        h = dim0 // 2
        s["patch_embed.0.weight"], s["patch_embed.0.bias"] = (h, 3, 3, 3), (h,)
        s["patch_embed.2.weight"] = s["patch_embed.2.bias"] = (h,)
        s["patch_embed.5.weight"], s["patch_embed.5.bias"] = (dim0, h, 3, 3), (dim0,)
        s["patch_embed.7.weight"] = s["patch_embed.7.bias"] = (dim0,)
    for i, (depth, C) in enumerate(zip(depths, dims)):
        d, R = int(ratio * C), math.ceil(C / 16)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            s[p + "norm.weight"] = s[p + "norm.bias"] = (C,)
            s[p + "op.x_proj_weight"] = (4, R + 2 * N, d)
            s[p + "op.A_logs"] = (4 * d, N)
            s[p + "op.Ds"] = (4 * d,)
            s[p + "op.dt_projs_weight"] = (4, d, R)
            s[p + "op.dt_projs_bias"] = (4, d)
            s[p + "op.out_norm.weight"] = s[p + "op.out_norm.bias"] = (d,)
            s[p + "op.in_proj.weight"] = (2 * d if gen == "v0" else d, C)
            s[p + "op.conv2d.weight"] = (d, 1, 3, 3)
            if gen == "v0":
                s[p + "op.conv2d.bias"] = (d,)
            s[p + "op.out_proj.weight"] = (C, d)
            if gen == "v2":
                s[p + "norm2.weight"] = s[p + "norm2.bias"] = (C,)
                s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"] = (4 * C, C), (4 * C,)
                s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"] = (C, 4 * C), (C,)
        if i < len(depths) - 1:
            q = f"layers.{i}.downsample."
            if gen == "v0":
                s[q + "reduction.weight"] = (2 * C, 4 * C)
                s[q + "norm.weight"] = s[q + "norm.bias"] = (4 * C,)
            else:
                s[q + "1.weight"], s[q + "1.bias"] = (2 * C, C, 3, 3), (2 * C,)
                s[q + "3.weight"] = s[q + "3.bias"] = (2 * C,)
    s["classifier.norm.weight"] = s["classifier.norm.bias"] = (dims[-1],)
    s["classifier.head.weight"], s["classifier.head.bias"] = (classes, dims[-1]), (classes,)
    return s


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configurations_have_the_official_keys_and_shapes(name):
    import timm

    with torch.device("meta"):
        model = timm.create_model(name)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = official_shapes(*PUBLISHED[name])
    assert sorted(set(got) ^ set(want)) == []
    assert {k for k in want if got[k] != want[k]} == set()


def test_tiny_s1l8_parameter_count_matches_the_papers_30m():
    with torch.device("meta"):
        model = vmfx.models.VSSM(**vmfx.models.VMAMBA_VARIANTS["vmamba_tiny_s1l8"][0])
    # counted from the official key list in archs.md 2.1 (the README says "30M")
    assert sum(v.numel() for v in model.state_dict().values()) == 30_249_064


# -- logits against the float64 reference -----------------------------------------------------------

SMALL = {  # small versions of each generation / layout (depths, dims, classes shrunk)
    "v0": dict(forward_type="v0", ssm_d_state=4, ssm_ratio=2.0, ssm_conv_bias=True, mlp_ratio=0.0, norm_layer="ln",
               downsample_version="v1", patchembed_version="v1"),
    "v2-ln2d": dict(forward_type="v05_noz", ssm_d_state=1, ssm_ratio=1.0, ssm_conv_bias=False, mlp_ratio=4.0,
                    norm_layer="ln2d", downsample_version="v3", patchembed_version="v2"),
    "v2-ln-s2": dict(forward_type="v3_noz", ssm_d_state=2, ssm_ratio=2.0, ssm_conv_bias=False, mlp_ratio=2.0,
                     norm_layer="ln", downsample_version="v3", patchembed_version="v2"),
}


def small_model(kind: str, depths=(1, 2), dims=16, classes=7, seed=0) -> VSSM:
    torch.manual_seed(seed)
    return VSSM(depths=list(depths), dims=dims, num_classes=classes, drop_path_rate=0.0, **SMALL[kind]).eval()


def randomized_official_state_dict(model: VSSM, seed: int) -> dict:
    """The model's official-layout keys with fresh random values (norms near 1, A_logs / Ds / dt
    biases in their usual ranges) so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        r = torch.randn(v.shape, generator=g)
        if k.endswith("A_logs"):
            r = torch.log(torch.rand(v.shape, generator=g) * 4 + 0.5)
        elif k.endswith("dt_projs_bias"):
            r = torch.log(torch.expm1(torch.rand(v.shape, generator=g) * 0.1 + 0.001))
        elif ("norm" in k or k.startswith("patch_embed.2") or k.startswith("patch_embed.7")
              or k.endswith("downsample.3.weight")) and k.endswith("weight"):
            r = 1 + 0.1 * r
        elif k.endswith("Ds"):
            r = 1 + 0.5 * r
        else:
            r = r / math.sqrt(max(v[0].numel(), 1)) if v.dim() > 1 else 0.1 * r
        out[k] = r
    return out


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_logits_match_the_float64_reference_of_the_official_computation(kind):
    model = small_model(kind)
    sd = randomized_official_state_dict(model, seed=1)
    if SMALL[kind]["norm_layer"] == "ln2d":  # channel-first files hold Linear2d (1x1 conv) weights
        sd = {k: (v[:, :, None, None] if k.endswith(("in_proj.weight", "out_proj.weight", "fc1.weight",
                                                        "fc2.weight")) else v) for k, v in sd.items()}
    model.load_state_dict(dict(sd))
    x = torch.randn(2, 3, 32, 28, generator=torch.Generator().manual_seed(2))  # H != W: the transposes matter
    with torch.no_grad():
        got = model(x).double()
    args = SMALL[kind]
    want = vssm_ref(sd, x, depths=[1, 2], forward_type=args["forward_type"], mlp_ratio=args["mlp_ratio"],
                    downsample_version=args["downsample_version"], patchembed_version=args["patchembed_version"])
    assert got.shape == want.shape == (2, 7)
    rel = (got - want).norm() / want.norm()
    assert rel < 1e-4, f"relative error {rel:.2e}"


def test_state_dict_round_trips_and_legacy_names_load():
    model = small_model("v0", depths=(1, 1))
    sd = model.state_dict()
    assert "layers.0.blocks.0.op.x_proj_weight" in sd and not any("x_projs" in k for k in sd)
    legacy = {}
    for k, v in sd.items():
        k = k.replace("patch_embed.0.", "patch_embed.proj.").replace("patch_embed.2.", "patch_embed.norm.")
        k = k.replace(".blocks.0.norm.", ".blocks.0.ln_1.").replace(".op.", ".self_attention.")
        k = k.replace("classifier.norm.", "norm.").replace("classifier.head.", "head.")
        legacy[k] = v.clone() + 0.01
    other = small_model("v0", depths=(1, 1), seed=5)
    other.load_state_dict(legacy)
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, sd[k] + 0.01)


def test_load_checkpoint_reads_an_official_style_file(tmp_path):
    model = small_model("v2-ln2d")
    sd = randomized_official_state_dict(model, seed=3)
    path = tmp_path / "vssm1_tiny_ckpt.pth"
    torch.save({"model": sd, "max_accuracy": 82.6, "epoch": 264}, path)
    fresh = small_model("v2-ln2d", seed=9)
    record = load_checkpoint(fresh, path)
    assert record.key == "model" and record.epoch == 264
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, sd[k])
    bad = dict(sd)
    bad["layers.0.blocks.0.op.x_proj_weight"] = bad["layers.0.blocks.0.op.x_proj_weight"][:, :-1]
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="x_proj"):
        load_checkpoint(small_model("v2-ln2d"), tmp_path / "bad.pth")


_FAKE_YACS = """
class CfgNode(dict):
    def __init__(self, init=None):
        init = dict(init or {})
        for k, v in init.items():
            if isinstance(v, dict):
                init[k] = CfgNode(v)
        super().__init__(init)
        self.__dict__["__immutable__"] = True
        self.__dict__["__deprecated_keys__"] = set()
        self.__dict__["__new_allowed__"] = False

    def __getattr__(self, name):
        if name in self:
            return self[name]
        raise AttributeError(name)

    def __setstate__(self, state):  # would run if the loader unpickled the real class
        raise RuntimeError("yacs code ran during the load")
"""


def test_official_files_with_a_yacs_config_load_weights_only(tmp_path, monkeypatch):
    """The released files pickle their yacs config (a dict subclass) next to the weights: it is
    read as a plain mapping, without importing yacs or running its code."""
    import sys

    pkg = tmp_path / "fakepkgs" / "yacs"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text(_FAKE_YACS)
    monkeypatch.syspath_prepend(str(tmp_path / "fakepkgs"))
    from yacs.config import CfgNode  # the stand-in, only to write the file

    model = small_model("v0", depths=(1, 1))
    sd = randomized_official_state_dict(model, seed=4)
    cfg = CfgNode({"MODEL": {"TYPE": "vssm", "VSSM": {"DEPTHS": [1, 1], "EMBED_DIM": 16}}})
    torch.save({"model": sd, "config": cfg, "epoch": 292, "max_accuracy": 82.2}, tmp_path / "vssm.pth")
    for name in ("yacs", "yacs.config"):
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "fakepkgs" not in p])
    record = load_checkpoint(model, tmp_path / "vssm.pth")
    assert record.epoch == 292 and "yacs" not in sys.modules
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, sd[k])


def test_timm_registration_and_no_downloads():
    import timm

    assert set(PUBLISHED) <= set(timm.list_models("*vmamba*"))
    model = timm.create_model("vmamba_tiny_s1l8", num_classes=5, depths=[1, 1, 1, 1], dims=16)
    assert isinstance(model, VSSM) and model.classifier.head.out_features == 5
    assert model.pretrained_cfg["checkpoint_file"] == "vssm1_tiny_0230s_ckpt_epoch_264.pth"
    with pytest.raises(CheckpointError, match="load_checkpoint"):
        timm.create_model("vmamba_tiny_s1l8", pretrained=True)


@pytest.mark.parametrize("kwargs, words", [
    (dict(forward_type="v2"), "forward_type"),
    (dict(forward_type="v0", norm_layer="ln2d"), "channel-last"),
    (dict(norm_layer="bn"), "norm_layer"),
    (dict(downsample_version="v9"), "downsample_version"),
])
def test_unsupported_options_raise_config_errors(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        VSSM(depths=[1, 1], dims=8, **kwargs)
