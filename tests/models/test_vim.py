"""Tests of vmfx.models.vim: the official Vim layout, the timm names, the numerics and tracing.

The expected state_dict keys and shapes are written out from archs.md 1.6 (not derived from the
model), and the numerics are checked against an independent float64 re-derivation of the official
fast path (archs.md 1.2-1.5) that uses mamba-ssm's ``selective_scan_ref``.
"""

from __future__ import annotations

import importlib
import math
import warnings

import pytest
import timm
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import vmfx.models
import vmfx.ops
from vmfx.errors import CheckpointError, ConfigError
from vmfx.models import VisionMamba
from vmfx.nn import MambaMixer, RMSNorm

# ------------------------------------------------------------------------------------------------
# The official key list (archs.md 1.6), per variant: (key, vim_tiny, vim_small, vim_base)
# ------------------------------------------------------------------------------------------------

_TOP_ROWS = [
    ("cls_token", (1, 1, 192), (1, 1, 384), (1, 1, 768)),
    ("pos_embed", (1, 197, 192), (1, 197, 384), (1, 197, 768)),
    ("patch_embed.proj.weight", (192, 3, 16, 16), (384, 3, 16, 16), (768, 3, 16, 16)),
    ("patch_embed.proj.bias", (192,), (384,), (768,)),
    ("head.weight", (1000, 192), (1000, 384), (1000, 768)),
    ("head.bias", (1000,), (1000,), (1000,)),
]
_LAYER_ROWS = [
    ("mixer.A_log", (384, 16), (768, 16), (1536, 16)),
    ("mixer.D", (384,), (768,), (1536,)),
    ("mixer.A_b_log", (384, 16), (768, 16), (1536, 16)),
    ("mixer.D_b", (384,), (768,), (1536,)),
    ("mixer.in_proj.weight", (768, 192), (1536, 384), (3072, 768)),
    ("mixer.conv1d.weight", (384, 1, 4), (768, 1, 4), (1536, 1, 4)),
    ("mixer.conv1d.bias", (384,), (768,), (1536,)),
    ("mixer.x_proj.weight", (44, 384), (56, 768), (80, 1536)),
    ("mixer.dt_proj.weight", (384, 12), (768, 24), (1536, 48)),
    ("mixer.dt_proj.bias", (384,), (768,), (1536,)),
    ("mixer.conv1d_b.weight", (384, 1, 4), (768, 1, 4), (1536, 1, 4)),
    ("mixer.conv1d_b.bias", (384,), (768,), (1536,)),
    ("mixer.x_proj_b.weight", (44, 384), (56, 768), (80, 1536)),
    ("mixer.dt_proj_b.weight", (384, 12), (768, 24), (1536, 48)),
    ("mixer.dt_proj_b.bias", (384,), (768,), (1536,)),
    ("mixer.out_proj.weight", (192, 384), (384, 768), (768, 1536)),
    ("norm.weight", (192,), (384,), (768,)),
]
_BOTTOM_ROWS = [("norm_f.weight", (192,), (384,), (768,))]
_COLUMN = {"tiny": 1, "small": 2, "base": 3}
_PARAMS = {"tiny": 7_148_008, "small": 25_796_584, "base": 97_598_440}
_WIDTH = {"tiny": 192, "small": 384, "base": 768}


def official_keys(variant: str, stride8: bool = False):
    """The ordered (key, shape) list of archs.md 1.6 for one variant."""
    c = _COLUMN[variant]
    rows = [(r[0], r[c]) for r in _TOP_ROWS]
    for i in range(24):
        rows += [(f"layers.{i}.{r[0]}", r[c]) for r in _LAYER_ROWS]
    rows += [(r[0], r[c]) for r in _BOTTOM_ROWS]
    if stride8:  # the "+" checkpoints: 27x27 patches + 1 class token
        rows[1] = ("pos_embed", (1, 730, _WIDTH[variant]))
    return rows


def model_keys(model: nn.Module):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _variant_model(variant: str, stride: int = 16, device=None) -> VisionMamba:
    return VisionMamba(
        embed_dim=_WIDTH[variant], stride=stride, final_pool_type="mean", device=device
    )


# ------------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------------


def test_vim_tiny_has_the_official_415_keys_in_order():
    model = _variant_model("tiny")
    assert len(model.state_dict()) == 415
    assert model_keys(model) == official_keys("tiny")
    assert sum(p.numel() for p in model.parameters()) == _PARAMS["tiny"]
    assert not list(model.buffers())  # no persistent or other buffers


@pytest.mark.parametrize("variant", ["small", "base"])
def test_vim_small_base_keys_and_parameter_counts_on_meta(variant):
    model = _variant_model(variant, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert model_keys(model) == official_keys(variant)
    assert sum(p.numel() for p in model.parameters()) == _PARAMS[variant]


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_stride8_variants_have_730_tokens(variant):
    model = _variant_model(variant, stride=8, device="meta")
    assert model_keys(model) == official_keys(variant, stride8=True)
    assert model.patch_embed.grid_size == (27, 27)
    assert model.patch_embed.num_patches == 729
    assert model.token_position == 364
    assert tuple(model.patch_embed.proj.stride) == (8, 8)


def test_meta_build_matches_cpu_build():
    kw = dict(img_size=32, patch_size=8, stride=8, embed_dim=32, depth=2, num_classes=10)
    assert model_keys(VisionMamba(device="meta", **kw)) == model_keys(VisionMamba(**kw))


def test_submodules_and_attributes():
    model = VisionMamba(img_size=32, patch_size=8, stride=8, embed_dim=32, depth=2, num_classes=10)
    assert isinstance(model.patch_embed.proj, nn.Conv2d)
    assert model.patch_embed.grid_size == (4, 4) and model.patch_embed.num_patches == 16
    assert model.token_position == 8
    assert isinstance(model.layers[0].mixer, MambaMixer)
    assert model.layers[0].mixer.bimamba_type == "v2" and model.layers[0].mixer.if_divide_out
    assert isinstance(model.layers[0].norm, RMSNorm) and model.layers[0].norm.eps == 1e-5
    assert isinstance(model.norm_f, RMSNorm)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 10
    assert model.cls_token.shape == (1, 1, 32) and model.pos_embed.shape == (1, 17, 32)


# ------------------------------------------------------------------------------------------------
# timm registration
# ------------------------------------------------------------------------------------------------

_TIMM = {
    "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": ("tiny", 16),
    "vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": ("tiny", 8),
    "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": ("small", 16),
    "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": ("small", 8),
    "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2": ("base", 16),
}


@pytest.mark.parametrize("name", list(_TIMM))
def test_timm_names_create_the_official_models(name):
    variant, stride = _TIMM[name]
    model = timm.create_model(name, device="meta")
    assert type(model) is VisionMamba
    assert model_keys(model) == official_keys(variant, stride8=stride == 8)
    assert model.final_pool_type == "mean" and model.use_middle_cls_token
    assert model.layers[0].mixer.if_divide_out and model.residual_in_fp32
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)


def test_timm_kwargs_are_passed_through():
    name = "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
    model = timm.create_model(name, num_classes=10, depth=2)
    assert model.head.out_features == 10 and len(model.layers) == 2
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_timm_pretrained_true_points_to_load_checkpoint():
    name = "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
    with pytest.raises(CheckpointError, match="load_checkpoint") as info:
        timm.create_model(name, pretrained=True)
    assert "vim_s_midclstok_ft_81p6acc.pth" in str(info.value)


def test_importing_and_reloading_vmfx_models_is_harmless():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.import_module("vmfx.models")
        importlib.reload(vmfx.models)
    for fn in vmfx.models.vim.VIM_ENTRYPOINTS:
        assert timm.models.model_entrypoint(fn.__name__) is fn
    assert len(timm.list_models("vim_*_div2")) >= 5


# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------

_TINY = dict(img_size=32, patch_size=8, stride=8, embed_dim=32, depth=2, num_classes=10)


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"if_rope": True}, "if_rope"),
        ({"if_bidirectional": True}, "if_bidirectional"),
        ({"if_bimamba": True}, "if_bimamba"),
        ({"bimamba_type": "v1"}, "v1"),
    ],
)
def test_unimplemented_options_raise_value_error(kwargs, option):
    with pytest.raises(ValueError, match=option) as info:
        VisionMamba(**_TINY, **kwargs)
    assert isinstance(info.value, ConfigError)
    assert "no released Vim checkpoint" in str(info.value)


def test_unknown_keywords_are_swallowed_like_the_official_constructor():
    model = VisionMamba(**_TINY, if_devide_out=True, some_future_flag=3)
    assert model.ignored_kwargs == {"if_devide_out": True, "some_future_flag": 3}
    assert model.layers[0].mixer.if_divide_out  # the default, as in the official Vim-B


def test_bad_final_pool_type_is_rejected():
    with pytest.raises(ConfigError, match="final_pool_type"):
        VisionMamba(**_TINY, if_cls_token=False, final_pool_type="sum")


def test_official_initialisation():
    torch.manual_seed(0)
    model = VisionMamba()  # Vim-T defaults
    assert torch.all(model.head.bias == 0) and torch.all(model.patch_embed.proj.bias == 0)
    assert abs(model.head.weight.std().item() - 0.02) < 0.002
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002
    assert model.cls_token.abs().max() > 0
    mixer = model.layers[3].mixer
    assert torch.all(mixer.dt_proj_b.bias == 0)  # zeroed by the Mamba init (not _no_reinit)
    dt = F.softplus(mixer.dt_proj.bias)  # kept: log-uniform in [dt_min, dt_max]
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6 and dt.std() > 0
    n = torch.arange(1, 17, dtype=torch.float32).log()
    assert torch.equal(mixer.A_log, n.repeat(384, 1)) and torch.equal(mixer.A_b_log, mixer.A_log)
    assert torch.all(mixer.D == 1) and torch.all(mixer.D_b == 1)
    # out_proj: kaiming-uniform(a=sqrt 5), bound 1/sqrt(fan_in), then divided by sqrt(depth=24).
    bound = 1 / math.sqrt(384) / math.sqrt(24)
    w = mixer.out_proj.weight
    assert w.abs().max() <= bound + 1e-7 and w.abs().max() > 0.9 * bound
    for layer in model.layers:
        assert layer.norm.weight.eq(1).all()


# ------------------------------------------------------------------------------------------------
# Numerics: an independent float64 re-derivation of the official forward
# ------------------------------------------------------------------------------------------------


def _selective_scan_ref():
    """mamba-ssm's pure-torch ``selective_scan_ref`` (skips the test if mamba-ssm is missing)."""
    from tests.upstream import import_mamba_ssm

    return import_mamba_ssm()[1]


def _ref_norm(x, sd, prefix, rms, eps=1e-5):
    if rms:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * sd[prefix + "weight"]
    return F.layer_norm(x, x.shape[-1:], sd[prefix + "weight"], sd[prefix + "bias"], eps)


def _ref_mixer(h, sd, p, scan, d_state, divide):
    """Official bimamba v2 fast path (archs.md 1.4) on h (B, L, D), all float64 except the scan."""
    Bsz, L, D = h.shape
    W = sd[p + "in_proj.weight"]  # (2E, D)
    E = W.shape[0] // 2
    xz = (W @ h.reshape(Bsz * L, D).T).reshape(2 * E, Bsz, L).permute(1, 0, 2)  # (B, 2E, L)

    def direction(xz, s):
        x, z = xz[:, :E], xz[:, E:]
        xc = F.conv1d(x, sd[p + f"conv1d{s}.weight"], sd[p + f"conv1d{s}.bias"], padding=3, groups=E)
        xc = F.silu(xc[..., :L])
        x_dbl = xc.permute(0, 2, 1).reshape(Bsz * L, E) @ sd[p + f"x_proj{s}.weight"].T
        R = sd[p + f"dt_proj{s}.weight"].shape[1]
        dt, Bm, Cm = x_dbl[:, :R], x_dbl[:, R:R + d_state], x_dbl[:, R + d_state:]
        delta = (sd[p + f"dt_proj{s}.weight"] @ dt.T).reshape(E, Bsz, L).permute(1, 0, 2)
        Bm = Bm.reshape(Bsz, L, d_state).permute(0, 2, 1)
        Cm = Cm.reshape(Bsz, L, d_state).permute(0, 2, 1)
        A_log = sd[p + ("A_log" if s == "" else "A_b_log")]
        Dskip = sd[p + ("D" if s == "" else "D_b")]
        # selective_scan_ref runs in fp32 whatever it is given (it calls u.float(), delta.float()
        # and needs A in the same dtype); everything around it stays float64.
        A = -torch.exp(A_log).float()
        return scan(xc, delta, A, Bm, Cm, D=Dskip, z=z,
                    delta_bias=sd[p + f"dt_proj{s}.bias"], delta_softplus=True)

    out = direction(xz, "") + direction(xz.flip(-1), "_b").flip(-1)
    if divide:
        out = out / 2
    return out.permute(0, 2, 1) @ sd[p + "out_proj.weight"].T


def _ref_forward(model: VisionMamba, images: torch.Tensor, scan) -> torch.Tensor:
    """archs.md 1.2/1.3 in float64, reading only the state dict and the constructor options."""
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    x = images.double()
    stride = model.patch_embed.stride
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=stride)
    t = x.flatten(2).transpose(1, 2)
    Bsz, M, D = t.shape
    if model.if_cls_token and model.use_double_cls_token:
        t = torch.cat([sd["cls_token_head"].expand(Bsz, 1, D), t, sd["cls_token_tail"].expand(Bsz, 1, D)], 1)
        pos = (0, M + 1)
    elif model.if_cls_token:
        pos = M // 2 if model.use_middle_cls_token else 0
        t = torch.cat([t[:, :pos], sd["cls_token"].expand(Bsz, 1, D), t[:, pos:]], 1)
    if model.if_abs_pos_embed:
        t = t + sd["pos_embed"]
    rms = isinstance(model.norm_f, RMSNorm)
    d_state = model.layers[0].mixer.d_state
    divide = model.layers[0].mixer.if_divide_out
    residual, hidden = None, t
    for i in range(len(model.layers)):
        residual = hidden if residual is None else residual + hidden  # fused add (prenorm=True)
        normed = _ref_norm(residual, sd, f"layers.{i}.norm.", rms)
        hidden = _ref_mixer(normed, sd, f"layers.{i}.mixer.", scan, d_state, divide)
    residual = hidden if residual is None else residual + hidden
    h = _ref_norm(residual, sd, "norm_f.", rms)
    if model.if_cls_token and model.use_double_cls_token:
        feat = (h[:, pos[0]] + h[:, pos[1]]) / 2
    elif model.if_cls_token:
        feat = h[:, pos]
    elif model.final_pool_type == "none":
        feat = h[:, -1]
    elif model.final_pool_type == "mean":
        feat = h.mean(1)
    else:
        feat = h
    out = feat @ sd["head.weight"].T + sd["head.bias"]
    if model.final_pool_type == "max" and not model.if_cls_token:
        out = out.max(1)[0]
    return out


def _perturbed(**kwargs) -> VisionMamba:
    """A tiny Vim with every parameter moved away from its init (biases, D, A_log, norms...)."""
    torch.manual_seed(0)
    model = VisionMamba(**{**_TINY, **kwargs}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


_NUMERIC_CASES = {
    "official-midcls": {},
    "overlapping-stride-odd-M": dict(stride=4, if_divide_out=False),  # 7x7 = 49 patches, cls at 24
    "front-cls-layernorm": dict(use_middle_cls_token=False, rms_norm=False, fused_add_norm=False),
    "double-cls": dict(use_double_cls_token=True),
    "no-cls-mean": dict(if_cls_token=False, final_pool_type="mean"),
    "no-cls-none": dict(if_cls_token=False, final_pool_type="none"),
    "no-cls-max": dict(if_cls_token=False, final_pool_type="max"),
    "no-cls-all-no-pos": dict(if_cls_token=False, final_pool_type="all", if_abs_pos_embed=False),
}


@pytest.mark.parametrize("case", list(_NUMERIC_CASES))
def test_forward_matches_float64_rederivation(case):
    scan = _selective_scan_ref()
    model = _perturbed(**_NUMERIC_CASES[case])
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(images).double()
    want = _ref_forward(model, images, scan)
    assert got.shape == want.shape
    scale = want.abs().max().item()
    assert scale > 0.1  # non-trivial output
    torch.testing.assert_close(got, want, atol=2e-5 * max(1.0, scale), rtol=1e-5)


def test_fused_add_norm_flag_does_not_change_the_math():
    a = _perturbed(fused_add_norm=True)
    b = _perturbed(fused_add_norm=False)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(images), b(images))


def test_residual_stream_is_fp32_in_a_bf16_model():
    model = VisionMamba(**_TINY, dtype=torch.bfloat16).eval()
    h = torch.randn(2, 17, 32, dtype=torch.bfloat16)
    out, residual = model.layers[0](h, None)
    assert out.dtype == torch.bfloat16 and residual.dtype == torch.float32
    out, residual = model.layers[1](out, residual)
    assert out.dtype == torch.bfloat16 and residual.dtype == torch.float32
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_training_only_behaviours_are_off_in_eval():
    ref = _perturbed(drop_path_rate=0.0)
    flip = _perturbed(drop_path_rate=0.0, flip_img_sequences_ratio=1.0)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ref(images), flip(images))  # eval: never flipped
        flip.train()
        assert not torch.allclose(ref(images), flip(images))  # training: always flipped
        drop = _perturbed(drop_path_rate=0.5)
        assert torch.equal(drop(images), drop(images))  # eval: no stochastic depth


def test_drop_path_drops_whole_samples_in_training():
    from vmfx.models.vim import DropPath

    torch.manual_seed(0)
    x = torch.ones(256, 3, 4)
    drop = DropPath(0.5)
    assert drop.eval()(x) is x
    y = drop.train()(x)
    per_sample = y.flatten(1)
    assert torch.all(per_sample == per_sample[:, :1])  # one decision per sample
    assert set(per_sample[:, 0].tolist()) == {0.0, 2.0}  # dropped, or kept and rescaled by 1/keep
    assert 0.3 < (per_sample[:, 0] == 0).float().mean().item() < 0.7


def test_image_size_is_checked():
    model = VisionMamba(**_TINY).eval()
    with pytest.raises(AssertionError, match=r"expects 32x32.*got 16x32"):
        model(torch.randn(1, 3, 16, 32))


# ------------------------------------------------------------------------------------------------
# torch.fx
# ------------------------------------------------------------------------------------------------


class _LeafRMSNormTracer(torch.fx.Tracer):
    def __init__(self):
        super().__init__(autowrap_functions=(vmfx.ops.selective_scan,))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, RMSNorm) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    graph = _LeafRMSNormTracer().trace(model)
    return torch.fx.GraphModule(model, graph)


@pytest.mark.parametrize(
    "kwargs",
    [{}, dict(use_double_cls_token=True), dict(if_cls_token=False, final_pool_type="mean"),
     dict(stride=4, rms_norm=False)],
    ids=["official", "double-cls", "no-cls-mean", "overlap-layernorm"],
)
def test_forward_traces_with_torch_fx_and_matches_eager(kwargs):
    model = _perturbed(**kwargs)
    gm = _trace(model)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(images), model(images), atol=0, rtol=0)
    nodes = list(gm.graph.nodes)
    scans = [n for n in nodes if n.op == "call_function" and n.target is vmfx.ops.selective_scan]
    assert len(scans) == 2 * len(model.layers)
    norms = [n for n in nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), RMSNorm)]
    assert len(norms) == (len(model.layers) + 1 if kwargs.get("rms_norm", True) else 0)


def test_traced_module_keeps_the_image_size_check():
    gm = _trace(VisionMamba(**_TINY).eval())
    with pytest.raises(AssertionError, match="expects 32x32"):
        gm(torch.randn(1, 3, 16, 16))
