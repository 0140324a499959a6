"""LocalMamba's hierarchical model, ``LocalVSSM`` (hunto/LocalMamba ``local_vmamba.py``), in plain
PyTorch with the official constructor arguments and state_dict layout.

The backbone is VMamba v0 (:class:`vmfx.models.VSSM` with ``forward_type="v0"``): a 4x4 conv +
LayerNorm patch embed, channel-last pre-norm blocks ``x + op(norm(x))`` without MLP, Swin
``PatchMerging2D`` downsampling, ``classifier.norm`` -> average pool -> ``classifier.head``. Only the
mixer differs: :class:`LocalSS2D` is VMamba's SS2D whose K directions are chosen per block from
LocalMamba's eight (``h``, ``h_flip``, ``v``, ``v_flip``, ``w2``, ``w2_flip``, ``w7``,
``w7_flip``; all eight in the search supernet), each direction's output put back in raster order
and scaled by the channel attention ``multi_scan.attn`` (:class:`~vmfx.models.localmamba.BiAttn`)
before the sum::

    h (B, H, W, C) -> in_proj -> x, z;  z = silu(z)
    xc = silu(conv2d(x^T))                             # (B, d, H, W), depthwise 3x3
    t = xc.flatten(2)^T                                # (B, L, d) raster order
    per direction k:  u_k = scan_k(t)                   # F.pad (one zero token) + index_select, or flip
                      y_k = selective_scan(u_k, ...)    # x_projs.k, dt_projs.k, A_logs / Ds slice k
                      y_k = attn(reverse_k(y_k))        # back to raster order, padding dropped
    out = out_proj(out_norm(sum_k y_k) * z)

The scan orders are LocalVim's (:func:`vmfx.models.localmamba.scan_order`, :class:`MultiScan`):
windows that do not divide the grid are zero-padded on the bottom / right (``w2`` on a 7x7 grid: 64
positions), as the official ``local_scan_bchw`` pads ``xc``; a padding position holds a zero token,
so it adds nothing to the state but its ``exp(delta A)`` decay still applies, exactly as in the
official scan. The official code pads every direction to the longest one to run one grouped scan
and cuts the tail off again; a causal scan's outputs do not depend on such a tail, so running each
direction at its own length is the same computation. The orders are non-persistent buffers
computed for the stage grids of ``img_size`` (an argument the official constructor does not have:
its default 224 gives the 56 / 28 / 14 / 7 grids); an eager forward at another size computes the
orders of that size on the fly, a traced model is specialised to ``img_size`` (``vmfx.compile`` with
images of another size stops with a :class:`~vmfx.errors.CalibrationDataError` naming the shapes).

State dict: the official keys (``layers.{i}.blocks.{j}.op.{x_proj_weight, dt_projs_weight,
dt_projs_bias}`` stacked over the block's K directions, ``op.A_logs`` (K*d, N), ``op.Ds``,
``op.in_proj``, ``op.conv2d``, ``op.out_norm``, ``op.out_proj``, ``op.multi_scan.attn.{norm,
global_reduce, channel_select}``, ``op.multi_scan.weights`` in the search supernet), so the
published ``local_vssm_small.ckpt`` loads through :func:`vmfx.models.load_checkpoint`.

Kept from the official code: a ``v`` direction on a non-square grid is refused
(:class:`~vmfx.errors.ConfigError`): the official ``MultiScan.reverse`` un-transposes ``v`` with
the grid's sides swapped, which is only the inverse of its scan on square grids.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import ConfigError, InputError
from .localmamba import ALL_DIRECTIONS, BiAttn, MultiScan, _parse_direction, create_variant
from .vmamba import SS2D, VSSM, VSSBlock

__all__ = [
    "LocalVSSM",
    "LocalSS2D",
    "MultiScanVSSM",
    "LOCAL_VSSM_VARIANTS",
    "LOCAL_VSSM_ENTRYPOINTS",
    "local_vssm_tiny_search",
    "local_vssm_tiny",
    "local_vssm_small_search",
    "local_vssm_small",
]


class MultiScanVSSM(MultiScan):
    """A LocalSS2D's directions, their scan orders over the stage grid and the channel attention
    ``attn`` applied to every direction's output (official ``MultiScanVSSM``: the attention lives
    here, hence the key ``op.multi_scan.attn.*``).

    Args:
        dim: channels (d_inner).
        choices: the directions, or None for the search supernet (all eight, merged by
            ``softmax(weights)`` after a non-affine LayerNorm each).
        token_size: the (H, W) grid the orders are built for.
    """

    def __init__(self, dim: int, choices: Optional[Sequence[str]] = None, token_size=(56, 56)):
        super().__init__(dim, choices=choices, token_size=token_size)
        self.attn = BiAttn(dim)


class LocalSS2D(SS2D):
    """SS2D with LocalMamba's per-block directions (official ``local_vmamba.SS2D``; see the module
    docstring). Input and output ``(B, H, W, C)``.

    Args: the official ones (``d_model``, ``d_state``, ``ssm_ratio``, ``dt_rank``, ``act_layer``,
    ``d_conv``, ``conv_bias``, ``dropout``, ``bias``, the dt initialisation, ``simple_init``,
    ``directions``: the block's directions, None for all eight), and ``token_size``: the (H, W)
    grid of the block's stage.
    """

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
        simple_init: bool = False,
        directions: Optional[Sequence[str]] = None,
        token_size=(56, 56),
        forward_type: str = "v0",
        channel_first: bool = False,
        **kwargs,
    ):
        if forward_type != "v0" or channel_first:
            raise ConfigError("LocalSS2D is VMamba v0's SS2D (channel-last, z gate): forward_type='v0' only")
        choices = tuple(ALL_DIRECTIONS if directions is None else directions)
        for direction in choices:
            if _parse_direction(direction)[0] == "v" and token_size[0] != token_size[1]:
                raise ConfigError(
                    f"direction {direction!r} on the non-square grid {tuple(token_size)}: the official code "
                    "reverses 'v' scans with the sides swapped (right on square grids only); use square images")
        if d_conv < 2:
            raise ConfigError("LocalSS2D d_conv < 2 (no conv) is not supported: the released models use d_conv=3")
        super().__init__(
            d_model=d_model, d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank, act_layer=act_layer,
            dropout=dropout, dt_min=dt_min, dt_max=dt_max, dt_init=dt_init, dt_scale=dt_scale,
            dt_init_floor=dt_init_floor, initialize="v0", forward_type="v0", k_group=len(choices),
        )
        d = self.d_inner
        if bias:  # v0 fixes bias=False; the local SS2D honours the argument
            self.in_proj = nn.Linear(self.d_model, 2 * d, bias=True)
            self.out_proj = nn.Linear(d, self.d_model, bias=True)
        if (d_conv, conv_bias) != (3, True):  # likewise the conv (same key, same place)
            self.conv2d = nn.Conv2d(d, d, groups=d, bias=conv_bias, kernel_size=d_conv, padding=(d_conv - 1) // 2)
        if simple_init:  # the official simple_init
            K, N, R = self.k_group, self.d_state, self.dt_rank
            self.Ds = nn.Parameter(torch.ones(K * d))
            self.A_logs = nn.Parameter(torch.randn(K * d, N))
            with torch.no_grad():
                for dt_proj in self.dt_projs:
                    dt_proj.weight.copy_(torch.randn(d, R))
                    dt_proj.bias.copy_(torch.randn(d))
        self.multi_scan = MultiScanVSSM(d, choices=directions, token_size=token_size)
        self._other_grids: dict = {}  # eager forwards at other sizes: (H, W) -> MultiScan (not state)

    @property
    def directions(self) -> Tuple[str, ...]:
        return self.multi_scan.choices

    def _scans_for(self, xc: torch.Tensor) -> MultiScan:
        """The scan orders for ``xc``'s grid: the built ones, or (eager, another size) new ones."""
        if isinstance(xc, torch.fx.Proxy):
            return self.multi_scan
        grid = (int(xc.shape[2]), int(xc.shape[3]))
        if grid == self.multi_scan.token_size:
            return self.multi_scan
        key = (grid, xc.device)
        if key not in self._other_grids:
            if grid[0] != grid[1] and any(_parse_direction(c)[0] == "v" for c in self.directions):
                raise InputError(f"LocalSS2D: direction 'v' on the non-square grid {grid}: the official code "
                                 "reverses it with the sides swapped; use square images")
            self._other_grids[key] = MultiScan(self.d_inner, choices=self.directions, token_size=grid).to(xc.device)
        return self._other_grids[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.d_inner
        xz = self.in_proj(x)  # (B, H, W, 2d), the canonical raster order
        x, z = xz[..., :d], xz[..., d:]
        z = self.act(z)
        xc = self.act(self.conv2d(x.permute(0, 3, 1, 2)))  # (B, d, H, W)
        scans = self._scans_for(xc)
        tokens = xc.flatten(2).transpose(1, 2)  # (B, L, d), position h * W + w
        ys = []
        for k in range(self.k_group):
            u = scans.scan(tokens, k).transpose(1, 2)  # (B, d, L_k) in direction k's order
            y = self._direction(k, u).transpose(1, 2)  # (B, L_k, d)
            ys.append(self.multi_scan.attn(scans.reverse(y, k)))  # (B, L, d) raster order
        y = self.multi_scan(ys)  # the sum (search supernet: weighted)
        y = self.out_norm(y).unflatten(1, (xc.shape[2], xc.shape[3]))  # (B, H, W, d)
        return self.dropout(self.out_proj(y * z))


def _stage_grids(img_size, patch_size: int, stages: int) -> list:
    """The (H, W) token grid of every stage: the patch embed's, then halved (rounded up: the patch
    merging pads odd sides) per stage."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    h, w = h // patch_size, w // patch_size
    grids = []
    for _ in range(stages):
        grids.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    return grids


class LocalVSSM(VSSM):
    """LocalVMamba classifier with the official ``local_vmamba.VSSM`` constructor arguments.

    Args:
        patch_size, in_chans, num_classes, depths, dims (an int doubles per stage): as VSSM.
        ssm_d_state, ssm_ratio, ssm_dt_rank, ssm_act_layer ("silu"), ssm_conv, ssm_conv_bias,
            ssm_drop_rate, ssm_simple_init: the mixers' arguments.
        drop_path_rate, patch_norm, norm_layer ("LN"), use_checkpoint: as the official VSSM.
        directions: per block (over all stages, in order), its list of directions; None for the
            search supernet (all eight in every block).
        img_size: the input size the scan orders are built for (not an official argument; see the
            module docstring). Default 224.
        **kwargs: swallowed like the official constructor does (``d_state`` of the official entry
            points among them); kept in ``self.ignored_kwargs``.
    """

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
        ssm_simple_init: bool = False,
        drop_path_rate: float = 0.1,
        patch_norm: bool = True,
        norm_layer: str = "LN",
        use_checkpoint: bool = False,
        directions: Optional[Sequence[Sequence[str]]] = None,
        img_size: Any = 224,
        **kwargs,
    ):
        init_kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in locals().items()
                       if k not in ("self", "kwargs", "__class__")}
        if directions is not None:
            init_kwargs["directions"] = [list(d) for d in directions]
            if len(directions) < sum(depths):
                raise ConfigError(f"directions lists {len(directions)} blocks, but depths={list(depths)} has "
                                  f"{sum(depths)}: give one list per block")
        if norm_layer.lower() != "ln":
            raise ConfigError(f"LocalVSSM norm_layer={norm_layer!r}: the official model supports 'LN' only")
        grids = _stage_grids(img_size, patch_size, len(depths))
        super().__init__(
            patch_size=patch_size, in_chans=in_chans, num_classes=num_classes, depths=list(depths), dims=dims,
            ssm_d_state=ssm_d_state, ssm_ratio=ssm_ratio, ssm_dt_rank=ssm_dt_rank, ssm_act_layer=ssm_act_layer,
            ssm_conv=ssm_conv, ssm_conv_bias=ssm_conv_bias, ssm_drop_rate=ssm_drop_rate, ssm_init="v0",
            forward_type="v0", mlp_ratio=0.0, drop_path_rate=drop_path_rate, patch_norm=patch_norm,
            norm_layer="ln", downsample_version="v1", patchembed_version="v1", use_checkpoint=use_checkpoint,
            # read by _make_block
            local_directions=directions, local_grids=grids, local_simple_init=ssm_simple_init,
        )
        self.init_kwargs = init_kwargs
        self.ignored_kwargs = dict(kwargs)
        self.img_size = img_size
        self.stage_grids = grids

    def _make_block(self, stage: int, block: int, extra: dict, **block_kwargs) -> VSSBlock:
        directions = extra["local_directions"]
        op_kwargs = dict(directions=None if directions is None else list(directions[block]),
                         token_size=extra["local_grids"][stage], simple_init=extra["local_simple_init"])
        return VSSBlock(op_cls=LocalSS2D, op_kwargs=op_kwargs, **block_kwargs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # VSSM's renames of the Jan-2024 VMamba keys do not apply to LocalMamba's files
        return nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)


# ------------------------------------------------------------------------------------------------
# The official configurations (the searched direction lists are data) and timm entry points
# ------------------------------------------------------------------------------------------------

_TINY_DIRECTIONS = (
    ("h", "h_flip", "w7", "w7_flip"),
    ("h_flip", "v_flip", "w2", "w2_flip"),
    ("h_flip", "v_flip", "w2_flip", "w7"),
    ("h_flip", "v", "v_flip", "w2"),
    ("h", "h_flip", "v_flip", "w2_flip"),
    ("h_flip", "v_flip", "w2", "w2_flip"),
    ("h", "w2_flip", "w7", "w7_flip"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "v_flip", "w7", "w7_flip"),
    ("h_flip", "v", "w2", "w7_flip"),
    ("v", "v_flip", "w2", "w7_flip"),
    ("h", "h_flip", "v_flip", "w2_flip"),
    ("v_flip", "w2_flip", "w7", "w7_flip"),
    ("h_flip", "v_flip", "w2_flip", "w7_flip"),
    ("h_flip", "v", "w7", "w7_flip"),
)

_SMALL_DIRECTIONS = (
    ("h", "v", "v_flip", "w7_flip"),
    ("h", "h_flip", "v", "w7"),
    ("h_flip", "v", "v_flip", "w7"),
    ("h_flip", "v", "w2_flip", "w7"),
    ("h_flip", "v", "w2_flip", "w7"),
    ("h_flip", "v_flip", "w2", "w7_flip"),
    ("h_flip", "v", "v_flip", "w7"),
    ("h", "v", "v_flip", "w7"),
    ("h", "v", "v_flip", "w7"),
    ("h", "v", "v_flip", "w7_flip"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "v", "v_flip", "w2"),
    ("v", "v_flip", "w2_flip", "w7"),
    ("h", "h_flip", "v", "w2"),
    ("h_flip", "v", "v_flip", "w7_flip"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "v", "v_flip", "w7_flip"),
    ("h", "v", "v_flip", "w7_flip"),
    ("h", "h_flip", "v_flip", "w7"),
    ("h_flip", "v_flip", "w2_flip", "w7"),
    ("h_flip", "v", "v_flip", "w7_flip"),
    ("v", "v_flip", "w7", "w7_flip"),
    ("h", "v", "v_flip", "w7_flip"),
    ("h_flip", "v", "v_flip", "w2"),
    ("h", "v", "v_flip", "w2_flip"),
    ("h", "h_flip", "v", "w7"),
    ("h", "h_flip", "w7", "w7_flip"),
    ("h", "v_flip", "w2", "w2_flip"),
    ("h", "v_flip", "w2", "w7"),
    ("h", "v", "v_flip", "w7_flip"),
    ("h_flip", "v", "w2_flip", "w7"),
    ("h_flip", "v_flip", "w7", "w7_flip"),
    ("h", "v", "w7", "w7_flip"),
)

#: name -> (constructor arguments, official checkpoint file or None)
LOCAL_VSSM_VARIANTS = {
    "local_vssm_tiny_search": (dict(dims=[32, 64, 128, 256], depths=[2, 2, 9, 2], drop_path_rate=0.1), None),
    # LocalVMamba-T: the README lists no checkpoint ("retraining")
    "local_vssm_tiny": (dict(dims=[96, 192, 384, 768], depths=[2, 2, 9, 2], drop_path_rate=0.2,
                             directions=[list(d) for d in _TINY_DIRECTIONS]), None),
    "local_vssm_small_search": (dict(dims=[32, 64, 128, 256], depths=[2, 2, 27, 2], drop_path_rate=0.1), None),
    "local_vssm_small": (dict(dims=[96, 192, 384, 768], depths=[2, 2, 27, 2], drop_path_rate=0.2,
                              directions=[list(d) for d in _SMALL_DIRECTIONS]), "local_vssm_small.ckpt"),
}

_PRETRAINED_CFG = {
    "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
    "interpolation": "bicubic", "fixed_input_size": False, "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225), "first_conv": "patch_embed.0", "classifier": "classifier.head",
}


def _create(name: str, pretrained: bool, kwargs: dict) -> LocalVSSM:
    return create_variant(LocalVSSM, LOCAL_VSSM_VARIANTS, _PRETRAINED_CFG, name, pretrained, kwargs)


def local_vssm_tiny_search(pretrained: bool = False, **kwargs) -> LocalVSSM:
    """The LocalVMamba-T search supernet (dims 32..256, all eight directions in every block)."""
    return _create("local_vssm_tiny_search", pretrained, kwargs)


def local_vssm_tiny(pretrained: bool = False, **kwargs) -> LocalVSSM:
    """LocalVMamba-T (dims 96..768, depths 2-2-9-2, searched directions); no published checkpoint."""
    return _create("local_vssm_tiny", pretrained, kwargs)


def local_vssm_small_search(pretrained: bool = False, **kwargs) -> LocalVSSM:
    """The LocalVMamba-S search supernet (dims 32..256, depths 2-2-27-2, all eight directions)."""
    return _create("local_vssm_small_search", pretrained, kwargs)


def local_vssm_small(pretrained: bool = False, **kwargs) -> LocalVSSM:
    """LocalVMamba-S (dims 96..768, depths 2-2-27-2, searched directions); checkpoint ``local_vssm_small.ckpt``."""
    return _create("local_vssm_small", pretrained, kwargs)


#: The entry points, in the official order, for registration in timm.
LOCAL_VSSM_ENTRYPOINTS: Tuple[Callable[..., LocalVSSM], ...] = (
    local_vssm_tiny_search,
    local_vssm_tiny,
    local_vssm_small_search,
    local_vssm_small,
)
