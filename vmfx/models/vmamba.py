"""VMamba (``VSSM``) with the official classification checkpoint layout, in plain PyTorch.

``VSSM`` takes the constructor arguments of the official ``classification/models/vmamba.py``
(MzeroMiko/VMamba) and reproduces the two released generations:

* **v0** ("Vanilla-VMamba", ``forward_type="v0"``): channel-last LayerNorms, a z gate
  (``in_proj`` emits ``2 * d_inner``), d_state 16, a biased 3x3 depthwise conv, Swin-style
  ``PatchMerging2D`` downsampling, no MLP.
* **v2 / v2v** (``forward_type="v05_noz"``, or its twin ``"v3_noz"``): no z gate, d_state 1, an
  unbiased conv, a GELU MLP in each block, 3x3 stride-2 conv downsampling, the two-conv patch embed,
  and channel-first LayerNorms (``norm_layer="ln2d"``; ``"ln"`` runs the same weights channel-last).

The SS2D mixer is written as the graph every vmfx pass understands, one selective scan per direction::

    h (B, H, W, C) -> in_proj -> x [, z]            # token-major, the canonical raster order
    xc = silu(conv2d(x^T))                          # (B, d, H, W), depthwise 3x3, "same" padding
    u_0 = xc.flatten(2)                             # row-major      (h * W + w)
    u_1 = xc.transpose(2, 3).flatten(2)             # column-major   (w * H + h)
    u_2 = u_0.flip(-1);  u_3 = u_1.flip(-1)         # their reversals
    per direction k:  x_dbl = x_proj_k(u_k^T);  delta = dt_proj_k(x_dbl[..., :R])
                      y_k = selective_scan(u_k, delta^T, A_k, B^T, C^T, D_k, delta_softplus=True)
    y = y_0 + flip(y_2) + untranspose(y_1 + flip(y_3))    # back to row-major, summed
    out = out_proj(out_norm(y^T) [* silu(z)])

This is the official computation (``forwardv0`` / ``forward_corev2``: cross-scan, the einsum or
grouped-conv1d projections, one grouped scan, cross-merge) regrouped per direction: the stacked
``x_proj_weight`` (K, R + 2N, d), ``dt_projs_weight`` (K, d, R) and ``dt_projs_bias`` (K, d) are held
as K ``nn.Linear`` modules (``x_projs.k``, ``dt_projs.k``) so that detection and quantization see
ordinary per-direction linears, and the dt bias is applied by ``dt_projs.k`` instead of as the
scan's ``delta_bias`` (``softplus(W dt + b)`` either way). ``A_logs`` (K*d, N) and ``Ds`` (K*d,)
stay stacked parameters, sliced per direction.

State dict: :meth:`SS2D.state_dict` and loading use the official keys (``op.x_proj_weight``,
``op.dt_projs_weight``, ``op.dt_projs_bias`` stacked; see the hooks below), and ``Linear2d``'s
4-D 1x1-conv weights load into the 2-D linears, so ``vmfx.models.load_checkpoint(model,
"vssm1_tiny_0230s_ckpt_epoch_264.pth")`` loads the published files unchanged. The legacy names of
the Jan-2024 code (``patch_embed.proj``, ``ln_1``, ``self_attention``, top-level ``norm``/``head``)
are renamed on load, as the official ``VSSM._load_from_state_dict`` does.

Differences from the official module, none of which changes the function: 1x1 "Linear2d" convs are
``nn.Linear`` on channel-last views; fp32 forcing of the scan inputs is not done (vmfx's scan
computes in fp32 for half inputs already); ``SS2D`` only builds the v0 and v05/v3 ``_noz`` family
(other ``forward_type`` strings raise :class:`~vmfx.errors.ConfigError`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..ops.selective_scan import selective_scan

__all__ = [
    "VSSM",
    "VSSBlock",
    "SS2D",
    "LayerNorm2d",
    "PatchMerging2D",
    "Permute",
    "VMAMBA_VARIANTS",
    "VMAMBA_ENTRYPOINTS",
]

#: ``forward_type`` strings of the released models; both run the same math.
_V0_TYPES = ("v0",)
_V2_TYPES = ("v05_noz", "v3_noz", "v2_noz", "v04_noz", "v03_noz", "v02_noz", "v01_noz")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a channel-first ``(B, C, H, W)`` tensor (official ``ln2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    """``x.permute(*dims)`` as a module (keeps the official ``nn.Sequential`` indices)."""

    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


class DropPath(nn.Module):
    """Stochastic depth on 4-D feature maps: identity in eval mode or with ``drop_prob`` 0."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = (torch.rand_like(x[:, :1, :1, :1], dtype=torch.float32) < keep).to(x.dtype)
        return x * mask / keep


def _to_last(x: torch.Tensor, channel_first: bool) -> torch.Tensor:
    return x.permute(0, 2, 3, 1) if channel_first else x


def _to_first(x: torch.Tensor, channel_first: bool) -> torch.Tensor:
    return x.permute(0, 3, 1, 2) if channel_first else x


def _load_linear2d(state_dict: dict, key: str) -> None:
    """Official ``Linear2d`` files may hold a 1x1-conv weight ``(out, in, 1, 1)``: flatten it."""
    w = state_dict.get(key)
    if isinstance(w, torch.Tensor) and w.dim() == 4 and w.shape[2:] == (1, 1):
        state_dict[key] = w.flatten(1)


class Linear2d(nn.Linear):
    """A linear over the channels of a ``(B, C, H, W)`` or ``(B, H, W, C)`` tensor (``channel_first``
    says which); loads the official 1x1-conv weights too."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, channel_first: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.channel_first = channel_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.channel_first:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias).permute(0, 3, 1, 2)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _load_linear2d(state_dict, prefix + "weight")
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Mlp(nn.Module):
    """fc1 -> act -> fc2 over channels (official ``Mlp``; keys ``fc1`` / ``fc2``)."""

    def __init__(self, in_features: int, hidden_features: int, act_layer=nn.GELU, drop: float = 0.0,
                 channels_first: bool = False):
        super().__init__()
        self.channels_first = channels_first
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _to_last(x, self.channels_first)
        x = self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
        return _to_first(x, self.channels_first)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("fc1", "fc2"):
            _load_linear2d(state_dict, f"{prefix}{name}.weight")
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PatchMerging2D(nn.Module):
    """Swin patch merging (official ``downsample_version="v1"``): the 2x2 sub-grids concatenated in
    the order (0,0), (1,0), (0,1), (1,1), LayerNorm(4C), Linear(4C, 2C) without bias. Odd sizes are
    zero-padded at the bottom / right."""

    def __init__(self, dim: int, out_dim: int = -1, norm_layer=nn.LayerNorm, channel_first: bool = False):
        super().__init__()
        self.dim = dim
        self.channel_first = channel_first
        self.reduction = nn.Linear(4 * dim, (2 * dim) if out_dim < 0 else out_dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim) if norm_layer in (nn.LayerNorm, LayerNorm2d) else norm_layer(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _to_last(x, self.channel_first)
        if not isinstance(x, torch.fx.Proxy) and (x.shape[1] % 2 or x.shape[2] % 2):
            x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        elif isinstance(x, torch.fx.Proxy):  # traced: the pad sizes are graph values
            x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        x = self.reduction(self.norm(x))
        return _to_first(x, self.channel_first)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _load_linear2d(state_dict, prefix + "reduction.weight")
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ------------------------------------------------------------------------------------------------
# SS2D
# ------------------------------------------------------------------------------------------------

#: The official stacked names of the per-direction projections: (stacked key, module list, param).
_STACKED = (("x_proj_weight", "x_projs", "weight"), ("dt_projs_weight", "dt_projs", "weight"),
            ("dt_projs_bias", "dt_projs", "bias"))


class SS2D(nn.Module):
    """The 2D selective-scan mixer (official ``SS2D``, ``forward_type`` "v0" or "v05_noz"/"v3_noz").

    Args: as the official ``SS2D`` (``d_model``, ``d_state``, ``ssm_ratio``, ``dt_rank``,
    ``act_layer``, ``d_conv``, ``conv_bias``, ``dropout``, ``bias``, the dt initialisation,
    ``initialize``, ``forward_type``, ``channel_first``). Input and output are ``(B, H, W, C)``, or
    ``(B, C, H, W)`` with ``channel_first``.
    """

    k_group = 4

    def __init__(
        self,
        d_model: int = 96,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        dt_rank: Any = "auto",
        act_layer=nn.SiLU,
        d_conv: int = 3,
        conv_bias: bool = True,
        dropout: float = 0.0,
        bias: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        initialize: str = "v0",
        forward_type: str = "v2",
        channel_first: bool = False,
        k_group: int = 4,
        **kwargs,
    ):
        super().__init__()
        self.k_group = int(k_group)  # the number of scan directions (4 here; LocalVSSM's mixers choose theirs)
        if forward_type in _V0_TYPES:
            if channel_first:
                raise ConfigError("SS2D forward_type='v0' is channel-last only (use norm_layer='ln')")
            # the official v0 fixes these whatever is passed
            d_conv, conv_bias, bias, with_z = 3, True, False, True
        elif forward_type in _V2_TYPES:
            with_z = False
        else:
            raise ConfigError(
                f"SS2D forward_type={forward_type!r} is not supported: vmfx builds the released VMamba "
                f"models, 'v0' (Vanilla-VMamba) and 'v05_noz' / 'v3_noz' (VMamba v2, v2v; also {_V2_TYPES[2:]})"
            )
        if act_layer is not nn.SiLU:
            raise ConfigError(f"SS2D act_layer={act_layer!r}: the released models use SiLU (the only one supported)")
        if d_conv < 2:
            raise ConfigError("SS2D d_conv < 2 (no conv) is not supported: the released models use d_conv=3")
        self.forward_type = forward_type
        self.channel_first = channel_first
        self.with_z = with_z
        self.d_model = int(d_model)
        self.d_state = int(d_state)
        self.d_inner = int(ssm_ratio * d_model)
        self.dt_rank = int(math.ceil(self.d_model / 16) if dt_rank == "auto" else dt_rank)
        d, R, N, K = self.d_inner, self.dt_rank, self.d_state, self.k_group

        self.in_proj = nn.Linear(self.d_model, d * 2 if with_z else d, bias=bias)
        self.act = nn.SiLU()
        self.conv2d = nn.Conv2d(d, d, groups=d, bias=conv_bias, kernel_size=d_conv, padding=(d_conv - 1) // 2)
        self.x_projs = nn.ModuleList(nn.Linear(d, R + 2 * N, bias=False) for _ in range(K))
        self.dt_projs = nn.ModuleList(nn.Linear(R, d, bias=True) for _ in range(K))
        self._init_dt_A_D(initialize, dt_scale, dt_init, dt_min, dt_max, dt_init_floor)
        self.out_norm = LayerNorm2d(d) if channel_first else nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, self.d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0.0 else nn.Identity()
        self._register_state_dict_hook(_stack_direction_params)
        self._register_load_state_dict_pre_hook(_split_direction_params, with_module=True)

    def _init_dt_A_D(self, initialize, dt_scale, dt_init, dt_min, dt_max, dt_init_floor) -> None:
        d, R, N, K = self.d_inner, self.dt_rank, self.d_state, self.k_group
        if initialize == "v0":  # Mamba's initialisation, per direction
            std = R ** -0.5 * dt_scale
            for dt_proj in self.dt_projs:
                if dt_init == "constant":
                    nn.init.constant_(dt_proj.weight, std)
                elif dt_init == "random":
                    nn.init.uniform_(dt_proj.weight, -std, std)
                else:
                    raise ConfigError(f"dt_init={dt_init!r}: use 'random' or 'constant'")
                dt = torch.exp(torch.rand(d) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
                dt = dt.clamp(min=dt_init_floor)
                with torch.no_grad():
                    dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            A = torch.arange(1, N + 1, dtype=torch.float32).repeat(K * d, 1)
            self.A_logs = nn.Parameter(torch.log(A))
            self.Ds = nn.Parameter(torch.ones(K * d))
        elif initialize in ("v1", "v2"):
            self.Ds = nn.Parameter(torch.ones(K * d))
            self.A_logs = nn.Parameter(torch.randn(K * d, N) if initialize == "v1" else torch.zeros(K * d, N))
            draw = torch.randn if initialize == "v1" else torch.rand
            with torch.no_grad():
                for dt_proj in self.dt_projs:
                    dt_proj.weight.copy_(0.1 * draw(d, R))
                    dt_proj.bias.copy_(0.1 * draw(d))
        else:
            raise ConfigError(f"SS2D initialize={initialize!r}: use 'v0', 'v1' or 'v2'")
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _to_last(x, self.channel_first)  # (B, H, W, C): the canonical token-major layout
        d = self.d_inner
        xz = self.in_proj(x)
        if self.with_z:
            x, z = xz[..., :d], xz[..., d:]
            z = self.act(z)
        else:
            x, z = xz, None
        xc = self.act(self.conv2d(x.permute(0, 3, 1, 2)))  # (B, d, H, W)
        row = xc.flatten(2)  # (B, d, L), position h * W + w
        col = xc.transpose(2, 3).flatten(2)  # position w * H + h
        ys = [self._direction(k, u) for k, u in enumerate((row, col, row.flip(-1), col.flip(-1)))]
        y_col = ys[1] + ys[3].flip(-1)  # column-major, both column directions
        y_col = y_col.unflatten(-1, (xc.shape[3], xc.shape[2])).transpose(2, 3).flatten(2)
        y = ys[0] + ys[2].flip(-1) + y_col  # (B, d, L), row-major
        if self.channel_first:
            y = self.out_norm(y.unflatten(-1, (xc.shape[2], xc.shape[3])))  # (B, d, H, W)
            y = y.permute(0, 2, 3, 1)
        else:
            y = self.out_norm(y.transpose(1, 2)).unflatten(1, (xc.shape[2], xc.shape[3]))  # (B, H, W, d)
        if z is not None:
            y = y * z
        out = self.dropout(self.out_proj(y))
        return _to_first(out, self.channel_first)

    def _direction(self, k: int, u: torch.Tensor) -> torch.Tensor:
        """The scan of direction ``k`` over ``u`` (B, d, L) in that direction's order; (B, d, L)."""
        d, R, N = self.d_inner, self.dt_rank, self.d_state
        x_dbl = self.x_projs[k](u.transpose(1, 2))  # (B, L, R + 2N)
        delta = self.dt_projs[k](x_dbl[..., :R])  # (B, L, d), before the softplus
        B = x_dbl[..., R:R + N]
        C = x_dbl[..., R + N:]
        A = -torch.exp(self.A_logs[k * d:(k + 1) * d].float())
        D = self.Ds[k * d:(k + 1) * d].float()
        return selective_scan(u, delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D,
                              delta_softplus=True)


def _stack_direction_params(module: SS2D, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict hook: the per-direction ``x_projs.k.weight`` / ``dt_projs.k.{weight,bias}`` are
    written as the official stacked ``x_proj_weight`` / ``dt_projs_weight`` / ``dt_projs_bias``."""
    for stacked, group, param in _STACKED:
        keys = [f"{prefix}{group}.{k}.{param}" for k in range(module.k_group)]
        if all(key in state_dict for key in keys):
            state_dict[prefix + stacked] = torch.stack([state_dict.pop(key) for key in keys])
    # the official order of the keys: A_logs, Ds, dt_projs_* next to x_proj_weight does not matter
    # to loading, so the dict order is left as written


def _split_direction_params(module: SS2D, state_dict: dict, prefix: str, *args) -> None:
    """Load pre-hook: official stacked tensors are split into the per-direction linears. A stacked
    tensor whose first dim is not the number of directions is left for the size check to report."""
    for stacked, group, param in _STACKED:
        value = state_dict.get(prefix + stacked)
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == module.k_group:
            del state_dict[prefix + stacked]
            for k in range(module.k_group):
                state_dict[f"{prefix}{group}.{k}.{param}"] = value[k]
    for name in ("in_proj", "out_proj"):
        _load_linear2d(state_dict, f"{prefix}{name}.weight")


# ------------------------------------------------------------------------------------------------
# VSSBlock and VSSM
# ------------------------------------------------------------------------------------------------


class VSSBlock(nn.Module):
    """Pre-norm residual block: ``x + op(norm(x))`` then, with ``mlp_ratio > 0``,
    ``x + mlp(norm2(x))`` (official ``VSSBlock``; ``post_norm`` moves the norms after the branches)."""

    def __init__(
        self,
        hidden_dim: int = 0,
        drop_path: float = 0.0,
        norm_layer=nn.LayerNorm,
        channel_first: bool = False,
        ssm_d_state: int = 16,
        ssm_ratio: float = 2.0,
        ssm_dt_rank: Any = "auto",
        ssm_act_layer=nn.SiLU,
        ssm_conv: int = 3,
        ssm_conv_bias: bool = True,
        ssm_drop_rate: float = 0.0,
        ssm_init: str = "v0",
        forward_type: str = "v2",
        mlp_ratio: float = 4.0,
        mlp_act_layer=nn.GELU,
        mlp_drop_rate: float = 0.0,
        gmlp: bool = False,
        use_checkpoint: bool = False,
        post_norm: bool = False,
        op_cls: type = None,
        op_kwargs: dict = None,
        **kwargs,
    ):
        super().__init__()
        if gmlp:
            raise ConfigError("VSSBlock gmlp=True is not supported (no released model uses it)")
        self.ssm_branch = ssm_ratio > 0
        self.mlp_branch = mlp_ratio > 0
        self.post_norm = post_norm
        if self.ssm_branch:
            self.norm = norm_layer(hidden_dim)
            # op_cls / op_kwargs: another SS2D kind and its extra arguments (LocalVSSM's LocalSS2D)
            self.op = (op_cls or SS2D)(
                d_model=hidden_dim, d_state=ssm_d_state, ssm_ratio=ssm_ratio, dt_rank=ssm_dt_rank,
                act_layer=ssm_act_layer, d_conv=ssm_conv, conv_bias=ssm_conv_bias, dropout=ssm_drop_rate,
                initialize=ssm_init, forward_type=forward_type, channel_first=channel_first, **(op_kwargs or {}),
            )
        self.drop_path = DropPath(drop_path)
        if self.mlp_branch:
            self.norm2 = norm_layer(hidden_dim)
            self.mlp = Mlp(hidden_dim, int(hidden_dim * mlp_ratio), act_layer=mlp_act_layer, drop=mlp_drop_rate,
                           channels_first=channel_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ssm_branch:
            if self.post_norm:
                x = x + self.drop_path(self.norm(self.op(x)))
            else:
                x = x + self.drop_path(self.op(self.norm(x)))
        if self.mlp_branch:
            if self.post_norm:
                x = x + self.drop_path(self.norm2(self.mlp(x)))
            else:
                x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


_NORM_LAYERS = {"ln": nn.LayerNorm, "ln2d": LayerNorm2d}
_ACT_LAYERS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


class VSSM(nn.Module):
    """VMamba classifier (official ``VSSM``; see the module docstring for what is supported).

    Args: the official constructor arguments (``patch_size``, ``in_chans``, ``num_classes``,
    ``depths``, ``dims`` (an int doubles per stage), ``ssm_*``, ``forward_type``, ``mlp_*``,
    ``drop_path_rate``, ``patch_norm``, ``norm_layer`` ("ln" or "ln2d"), ``downsample_version``
    ("v1", "v2", "v3"), ``patchembed_version`` ("v1", "v2"), ``use_checkpoint``, ``posembed``,
    ``imgsize``). Input ``(B, in_chans, H, W)``, output ``(B, num_classes)`` logits.
    """

    #: PTQ4VM smooths VMamba's linears with alpha 0.65 (0.5 for Vim): ``vmfx.compile`` uses it
    #: when given a preset name (see :func:`vmfx.models.hints.config_for_model`).
    vmfx_smoothing_alpha = 0.65

    def __init__(
        self,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths=(2, 2, 9, 2),
        dims: Any = (96, 192, 384, 768),
        ssm_d_state: int = 16,
        ssm_ratio: float = 2.0,
        ssm_dt_rank: Any = "auto",
        ssm_act_layer: str = "silu",
        ssm_conv: int = 3,
        ssm_conv_bias: bool = True,
        ssm_drop_rate: float = 0.0,
        ssm_init: str = "v0",
        forward_type: str = "v2",
        mlp_ratio: float = 4.0,
        mlp_act_layer: str = "gelu",
        mlp_drop_rate: float = 0.0,
        gmlp: bool = False,
        drop_path_rate: float = 0.1,
        patch_norm: bool = True,
        norm_layer: str = "LN",
        downsample_version: str = "v2",
        patchembed_version: str = "v1",
        use_checkpoint: bool = False,
        posembed: bool = False,
        imgsize: int = 224,
        **kwargs,
    ):
        super().__init__()
        # the constructor arguments, so that vmfx.load rebuilds a saved quantized model without pickles
        self.init_kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in locals().items()
                            if k not in ("self", "kwargs", "__class__")}
        if norm_layer.lower() not in _NORM_LAYERS:
            raise ConfigError(f"VSSM norm_layer={norm_layer!r}: use 'ln' (channel-last) or 'ln2d' (channel-first)")
        for name, value in (("ssm_act_layer", ssm_act_layer), ("mlp_act_layer", mlp_act_layer)):
            if value.lower() not in _ACT_LAYERS:
                raise ConfigError(f"VSSM {name}={value!r}: use one of {sorted(_ACT_LAYERS)}")
        if downsample_version not in ("v1", "v2", "v3", "none"):
            raise ConfigError(f"VSSM downsample_version={downsample_version!r}: use 'v1', 'v2', 'v3' or 'none'")
        if patchembed_version not in ("v1", "v2"):
            raise ConfigError(f"VSSM patchembed_version={patchembed_version!r}: use 'v1' or 'v2'")
        self.channel_first = norm_layer.lower() == "ln2d"
        self.num_classes = num_classes
        self.num_layers = len(depths)
        if isinstance(dims, int):
            dims = [int(dims * 2 ** i) for i in range(self.num_layers)]
        self.dims = list(dims)
        self.num_features = self.dims[-1]
        norm = _NORM_LAYERS[norm_layer.lower()]
        ssm_act = _ACT_LAYERS[ssm_act_layer.lower()]
        mlp_act = _ACT_LAYERS[mlp_act_layer.lower()]
        n_blocks = sum(depths)  # stochastic depth rising linearly (torch.linspace's values)
        dpr = [drop_path_rate * i / (n_blocks - 1) if n_blocks > 1 else 0.0 for i in range(n_blocks)]

        self.pos_embed = None
        if posembed:
            side = imgsize // patch_size
            self.pos_embed = nn.Parameter(torch.zeros(1, self.dims[0], side, side))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

        make_embed = self._patch_embed_v1 if patchembed_version == "v1" else self._patch_embed_v2
        self.patch_embed = make_embed(in_chans, self.dims[0], patch_size, patch_norm, norm, self.channel_first)

        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            if i < self.num_layers - 1 and downsample_version != "none":
                downsample = self._downsample(downsample_version, self.dims[i], self.dims[i + 1], norm)
            else:
                downsample = nn.Identity()
            blocks = [
                self._make_block(
                    i, sum(depths[:i]) + j, kwargs,
                    hidden_dim=self.dims[i], drop_path=dpr[sum(depths[:i]) + j], norm_layer=norm,
                    channel_first=self.channel_first, ssm_d_state=ssm_d_state, ssm_ratio=ssm_ratio,
                    ssm_dt_rank=ssm_dt_rank, ssm_act_layer=ssm_act, ssm_conv=ssm_conv, ssm_conv_bias=ssm_conv_bias,
                    ssm_drop_rate=ssm_drop_rate, ssm_init=ssm_init, forward_type=forward_type,
                    mlp_ratio=mlp_ratio, mlp_act_layer=mlp_act, mlp_drop_rate=mlp_drop_rate, gmlp=gmlp,
                )
                for j in range(depths[i])
            ]
            self.layers.append(nn.Sequential(OrderedDict(blocks=nn.Sequential(*blocks), downsample=downsample)))

        self.classifier = nn.Sequential(OrderedDict(
            norm=norm(self.num_features),
            permute=(nn.Identity() if self.channel_first else Permute(0, 3, 1, 2)),
            avgpool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(1),
            head=nn.Linear(self.num_features, num_classes),
        ))
        self._init_weights()

    def _make_block(self, stage: int, block: int, extra: dict, **block_kwargs) -> VSSBlock:
        """Block ``block`` (counted over all stages) of stage ``stage``. ``extra`` holds the keyword
        arguments VSSM does not take itself: subclasses override this to build their blocks from
        them (LocalVSSM's per-block scan directions); VSSM ignores them."""
        return VSSBlock(**block_kwargs)

    def _init_weights(self) -> None:
        """The official init: linears trunc-normal(0.02) with zero bias, LayerNorms (1, 0). The
        per-direction ``x_projs`` / ``dt_projs`` are raw stacked parameters in the official code,
        which this init does not reach: they keep nn.Linear's default / Mamba's dt init."""
        skip = set()
        for m in self.modules():
            if isinstance(m, SS2D):
                skip.update(id(p) for p in list(m.x_projs.modules()) + list(m.dt_projs.modules()))
        for m in self.modules():
            if id(m) in skip:
                continue
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:  # (LocalVSSM's search norms are not)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
                nn.init.constant_(m.weight, 1.0)

    @staticmethod
    def _patch_embed_v1(in_chans, embed_dim, patch_size, patch_norm, norm, channel_first):
        return nn.Sequential(
            nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True),
            (nn.Identity() if channel_first else Permute(0, 2, 3, 1)),
            (norm(embed_dim) if patch_norm else nn.Identity()),
        )

    @staticmethod
    def _patch_embed_v2(in_chans, embed_dim, patch_size, patch_norm, norm, channel_first):
        stride = patch_size // 2
        kernel = stride + 1
        first_last = channel_first or not patch_norm
        return nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=kernel, stride=stride, padding=1),
            (nn.Identity() if first_last else Permute(0, 2, 3, 1)),
            (norm(embed_dim // 2) if patch_norm else nn.Identity()),
            (nn.Identity() if first_last else Permute(0, 3, 1, 2)),
            nn.GELU(),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=kernel, stride=stride, padding=1),
            (nn.Identity() if channel_first else Permute(0, 2, 3, 1)),
            (norm(embed_dim) if patch_norm else nn.Identity()),
        )

    def _downsample(self, version, dim, out_dim, norm):
        cf = self.channel_first
        if version == "v1":
            return PatchMerging2D(dim, out_dim, norm_layer=norm, channel_first=cf)
        kernel, padding = (2, 0) if version == "v2" else (3, 1)
        return nn.Sequential(
            (nn.Identity() if cf else Permute(0, 3, 1, 2)),
            nn.Conv2d(dim, out_dim, kernel_size=kernel, stride=2, padding=padding),
            (nn.Identity() if cf else Permute(0, 2, 3, 1)),
            norm(out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + (self.pos_embed if self.channel_first else self.pos_embed.permute(0, 2, 3, 1))
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Rename the legacy (Jan-2024) keys as the official loader does, then load."""
        renames = [("patch_embed.proj", "patch_embed.0"), ("patch_embed.norm", "patch_embed.2"),
                   ("norm.", "classifier.norm."), ("head.", "classifier.head.")]
        for key in list(state_dict):
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            new = rest.replace(".ln_1.", ".norm.").replace(".self_attention.", ".op.")
            for old, repl in renames:
                if new.startswith(old):
                    new = repl + new[len(old):]
                    break
            if new != rest:
                state_dict[prefix + new] = state_dict.pop(key)
        pos = state_dict.get(prefix + "pos_embed")
        if isinstance(pos, torch.Tensor) and self.pos_embed is not None and pos.shape[2:] != self.pos_embed.shape[2:]:
            state_dict[prefix + "pos_embed"] = F.interpolate(
                pos.float(), size=self.pos_embed.shape[2:4], align_corners=False, mode="bicubic").to(pos.dtype)
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ------------------------------------------------------------------------------------------------
# The published configurations and their timm entry points
# ------------------------------------------------------------------------------------------------

_GH = "https://github.com/MzeroMiko/VMamba/releases/download"

_V0 = dict(ssm_d_state=16, ssm_ratio=2.0, ssm_conv_bias=True, forward_type="v0", mlp_ratio=0.0,
           norm_layer="ln", downsample_version="v1", patchembed_version="v1")
_V2 = dict(ssm_d_state=1, ssm_conv_bias=False, forward_type="v05_noz", mlp_ratio=4.0,
           norm_layer="ln2d", downsample_version="v3", patchembed_version="v2")

#: name -> (VSSM arguments, official config file, checkpoint file (GitHub release asset), top-1)
VMAMBA_VARIANTS = {
    "vanilla_vmamba_tiny": (dict(_V0, depths=[2, 2, 9, 2], dims=96, drop_path_rate=0.2),
                            "vmambav0_tiny_224", "v0cls/vssmtiny_dp01_ckpt_epoch_292.pth", 82.2),
    "vanilla_vmamba_small": (dict(_V0, depths=[2, 2, 27, 2], dims=96, drop_path_rate=0.3),
                             "vmambav0_small_224", "v0cls/vssmsmall_dp03_ckpt_epoch_238.pth", 83.5),
    "vanilla_vmamba_base": (dict(_V0, depths=[2, 2, 27, 2], dims=128, drop_path_rate=0.6),
                            "vmambav0_base_224", "v0cls/vssmbase_dp06_ckpt_epoch_241.pth", 83.7),
    "vmamba_tiny_s2l5": (dict(_V2, depths=[2, 2, 5, 2], dims=96, ssm_ratio=2.0, drop_path_rate=0.2),
                         "vmambav2_tiny_224", "v2cls/vssm_tiny_0230_ckpt_epoch_262.pth", 82.5),
    "vmamba_small_s2l15": (dict(_V2, depths=[2, 2, 15, 2], dims=96, ssm_ratio=2.0, drop_path_rate=0.3),
                           "vmambav2_small_224", "v2cls/vssm_small_0229_ckpt_epoch_222.pth", 83.6),
    "vmamba_base_s2l15": (dict(_V2, depths=[2, 2, 15, 2], dims=128, ssm_ratio=2.0, drop_path_rate=0.6),
                          "vmambav2_base_224", "v2cls/vssm_base_0229_ckpt_epoch_237.pth", 83.9),
    "vmamba_tiny_s1l8": (dict(_V2, depths=[2, 2, 8, 2], dims=96, ssm_ratio=1.0, drop_path_rate=0.2),
                         "vmambav2v_tiny_224", "v2cls/vssm1_tiny_0230s_ckpt_epoch_264.pth", 82.6),
    "vmamba_small_s1l20": (dict(_V2, depths=[2, 2, 20, 2], dims=96, ssm_ratio=1.0, drop_path_rate=0.3),
                           "vmambav2v_small_224", "v2cls/vssm1_small_0229s_ckpt_epoch_240.pth", 83.3),
    "vmamba_base_s1l20": (dict(_V2, depths=[2, 2, 20, 2], dims=128, ssm_ratio=1.0, drop_path_rate=0.5),
                          "vmambav2v_base_224", "v2cls/vssm1_base_0229s_ckpt_epoch_225.pth", 83.8),
}

_PRETRAINED_CFG = {
    "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
    "interpolation": "bicubic", "fixed_input_size": True, "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225), "first_conv": "patch_embed.0", "classifier": "classifier.head",
}
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _create_vmamba(name: str, pretrained: bool, kwargs: dict) -> VSSM:
    args, config, ckpt, _ = VMAMBA_VARIANTS[name]
    if pretrained:
        raise CheckpointError(
            f"{name}: pretrained=True cannot download weights (vmfx downloads nothing). Download "
            f"{ckpt.split('/')[-1]} from {_GH}/{ckpt} yourself, then: model = timm.create_model({name!r}); "
            f"vmfx.models.load_checkpoint(model, '{ckpt.split('/')[-1]}')"
        )
    for k in _TIMM_ONLY_KWARGS:
        kwargs.pop(k, None)
    model = VSSM(**{**args, **kwargs})
    model.pretrained_cfg = model.default_cfg = dict(_PRETRAINED_CFG, architecture=name, config=config,
                                                     checkpoint_file=ckpt.split("/")[-1], url_hint=f"{_GH}/{ckpt}")
    return model


def _entrypoint(name: str):
    args, config, ckpt, top1 = VMAMBA_VARIANTS[name]

    def entry(pretrained: bool = False, **kwargs) -> VSSM:
        return _create_vmamba(name, pretrained, kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = (f"VMamba {name} (official config {config}.yaml, top-1 {top1}); checkpoint "
                     f"``{ckpt.split('/')[-1]}``. ``pretrained`` must be False; ``**kwargs`` override VSSM arguments.")
    return entry


#: The timm entry points (registered by :mod:`vmfx.models`), in the official order.
VMAMBA_ENTRYPOINTS = tuple(_entrypoint(name) for name in VMAMBA_VARIANTS)
