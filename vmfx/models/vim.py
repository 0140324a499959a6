"""Vision Mamba (Vim, hustvl/Vim) in plain PyTorch, with the official checkpoint layout.

``VisionMamba`` takes the constructor arguments of the official ``vim/models_mamba.py`` with the
official defaults and builds the same module tree, so that an official ``checkpoint["model"]`` loads
with ``load_state_dict(strict=True)`` and no renaming. It uses the canonical vmfx modules
(:class:`vmfx.nn.MambaMixer` with ``bimamba_type="v2"``, :class:`vmfx.nn.RMSNorm`), so a traced Vim
speaks the graph vocabulary every vmfx pass expects.

Invariants:

* **State dict.** Keys, shapes and order are exactly the official ones: ``cls_token``, ``pos_embed``,
  ``patch_embed.proj.{weight,bias}``, ``head.{weight,bias}``, then per layer ``layers.{i}.mixer.``
  ``A_log, D, A_b_log, D_b, in_proj.weight, conv1d.{weight,bias}, x_proj.weight,``
  ``dt_proj.{weight,bias}, conv1d_b.{weight,bias}, x_proj_b.weight, dt_proj_b.{weight,bias},``
  ``out_proj.weight`` and ``layers.{i}.norm.weight``, then ``norm_f.weight`` (415 keys for Vim-T).
  No persistent buffers.
* **Forward = the official fast path** (``use_fast_path=True``, what the released checkpoints were
  evaluated with): patch embedding, class token inserted at ``num_patches // 2``, absolute position
  embedding added *after* the insertion, the blocks (Add -> RMSNorm -> bidirectional mixer, residual
  kept in fp32), a final Add + RMSNorm, the class token's feature, the head. ``fused_add_norm``
  selects a Triton kernel in the official code; here both settings run the same plain-torch math.
* **torch.fx.** ``forward(x)`` traces with ``torch.fx`` symbolic tracing when
  ``vmfx.ops.selective_scan`` is auto-wrapped and ``vmfx.nn.RMSNorm`` is a leaf: there is no Python
  control flow on tensor values or shapes (token positions come from the static
  ``patch_embed.num_patches``), the image-size check is a ``torch._assert``, and random training-only
  behaviour (drop path, sequence flipping) runs only when ``self.training``.
* Options no released Vim checkpoint uses and that are not implemented (``if_rope``,
  ``if_bidirectional``, bimamba v1 / ``if_bimamba``) raise :class:`vmfx.errors.ConfigError`
  (a ``ValueError``) at construction instead of silently computing something else.

The five official timm entry points are defined here (``vim_tiny_patch16_224_...`` etc.); they are
registered in timm's registry by :mod:`vmfx.models`.
"""

from __future__ import annotations

import math
import random
from functools import partial
from typing import Callable, Optional, Tuple, Union

import torch
from torch import nn
from timm.layers import lecun_normal_, to_2tuple, trunc_normal_

from ..errors import CheckpointError, ConfigError
from ..nn.mamba import MambaMixer
from ..nn.norm import RMSNorm

__all__ = [
    "VisionMamba",
    "PatchEmbed",
    "Block",
    "DropPath",
    "create_block",
    "VIM_VARIANTS",
    "VIM_ENTRYPOINTS",
    "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
    "vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
    "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
    "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
    "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2",
]

_FINAL_POOL_TYPES = ("none", "mean", "max", "all")


def _weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module.weight``, read without going through ``nn.Module.__getattr__``.

    torch.fx patches ``nn.Module.__getattr__`` while tracing so that parameters come back as
    Proxies; reading ``_parameters`` directly gives the real dtype, so the decision to cast is made
    at trace time and leaves no node in the graph.
    """
    return module._parameters["weight"].dtype


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------


class DropPath(nn.Module):
    """Stochastic depth on token sequences (B, L, D): drop whole samples of the residual branch.

    Identity in eval mode or when ``drop_prob`` is 0, so it adds no node to an eval-mode trace. In
    training it keeps each sample with probability ``1 - drop_prob`` and rescales by ``1 / keep``,
    like timm's ``DropPath``; the per-sample mask is drawn with ``rand_like`` on a (B, 1, 1) slice, so
    no shape arithmetic is needed and the module stays traceable.

    Args:
        drop_prob: probability of dropping a sample's branch.
    """

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = (torch.rand_like(x[:, :1, :1], dtype=torch.float32) < keep).to(x.dtype)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class PatchEmbed(nn.Module):
    """Image to patch tokens: Conv2d(k=patch_size, stride) then flatten to (B, M, D).

    Args:
        img_size: expected input size (int or (H, W)); the forward asserts it.
        patch_size: conv kernel size (int or (h, w)).
        stride: conv stride (int or (sh, sw)); Vim "+" models use 8 with patch 16 (overlapping).
        in_chans: image channels.
        embed_dim: token width D.
        norm_layer: optional norm applied to the tokens (None in Vim).
        flatten: flatten to (B, M, D); otherwise return the (B, D, gh, gw) map.

    Attributes:
        grid_size: (gh, gw) = ((H - h) // sh + 1, (W - w) // sw + 1).
        num_patches: gh * gw, the number of patch tokens M (static, used for token positions).
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: Union[int, Tuple[int, int]] = 16,
        stride: Union[int, Tuple[int, int]] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
        flatten: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.stride = to_2tuple(stride)
        self.grid_size = tuple(
            (self.img_size[i] - self.patch_size[i]) // self.stride[i] + 1 for i in range(2)
        )
        if min(self.grid_size) < 1:
            raise ConfigError(
                f"img_size={self.img_size} is smaller than patch_size={self.patch_size}: "
                "no patch fits; use a larger image or a smaller patch"
            )
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten
        self.proj = nn.Conv2d(
            in_chans, embed_dim, kernel_size=self.patch_size, stride=self.stride,
            device=device, dtype=dtype,
        )
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()
        self._has_norm = norm_layer is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, M, D); raises AssertionError if (H, W) is not ``img_size``."""
        h, w = self.img_size
        H, W = x.shape[-2], x.shape[-1]
        # While tracing, H and W are Proxies: the condition becomes graph nodes and the message is
        # fixed at trace time, so it cannot quote the received size.
        got = f"{H}x{W}" if isinstance(H, int) else "a different size (see the input's shape)"
        torch._assert(
            (H == h) & (W == w),
            f"Input image size mismatch: the model expects {h}x{w} (img_size), got {got}. "
            f"Resize/crop the input to {h}x{w} or build the model with img_size=(H, W).",
        )
        x = self.proj(x)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # (B, D, gh, gw) -> (B, M, D)
        if self._has_norm:
            x = self.norm(x)
        return x


class Block(nn.Module):
    """Vim's residual block: Add -> Norm -> Mixer, returning ``(mixer_out, residual)``.

    With ``residual`` None (the first block) the residual is the input itself; otherwise it is
    ``residual + drop_path(hidden_states)``. The norm sees the residual (cast to the norm's dtype);
    with ``residual_in_fp32`` the residual stream is carried in fp32. This is the math of the official
    fused ``rms_norm_fn(..., prenorm=True)`` kernel and of its non-fused branch alike, so
    ``fused_add_norm`` is stored for reference only.

    Args:
        dim: model width D.
        mixer_cls: builds the mixer from ``dim``.
        norm_cls: builds the norm from ``dim`` (RMSNorm or nn.LayerNorm in Vim).
        fused_add_norm: kept for compatibility; no effect on the math.
        residual_in_fp32: keep the residual stream in fp32.
        drop_path: stochastic-depth rate on the incoming hidden states (training only).
    """

    def __init__(
        self,
        dim: int,
        mixer_cls: Callable[[int], nn.Module],
        norm_cls: Callable[[int], nn.Module] = nn.LayerNorm,
        fused_add_norm: bool = False,
        residual_in_fp32: bool = False,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.mixer = mixer_cls(dim)
        self.norm = norm_cls(dim)
        self.drop_path = DropPath(drop_path)

    def forward(
        self, hidden_states: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Args: hidden_states (B, L, D), the previous block's mixer output (or the embedded tokens
        for the first block); residual (B, L, D) or None. Returns (mixer output, new residual)."""
        if residual is None:
            residual = hidden_states
        else:
            residual = residual + self.drop_path(hidden_states)
        normed, residual = _norm_residual(self.norm, residual, self.residual_in_fp32)
        return self.mixer(normed), residual


def _norm_residual(norm: nn.Module, residual: torch.Tensor, residual_in_fp32: bool):
    """Normalise the residual stream; cast only when the model is not fp32 (no graph node in fp32).

    The official kernels compute the norm in fp32 from an fp32 residual and return it in the
    activations' dtype. In an fp32 model the activations and the residual are already fp32, so no
    cast is emitted; in a low-precision model the norm input is cast to the norm's dtype and the
    residual to fp32 (the official non-fused branch).
    """
    dtype = _weight_dtype(norm)
    if residual_in_fp32 and dtype != torch.float32:
        return norm(residual.to(dtype)), residual.to(torch.float32)
    return norm(residual), residual


def create_block(
    d_model: int,
    d_state: int = 16,
    ssm_cfg: Optional[dict] = None,
    norm_epsilon: float = 1e-5,
    drop_path: float = 0.0,
    rms_norm: bool = False,
    residual_in_fp32: bool = False,
    fused_add_norm: bool = False,
    layer_idx: Optional[int] = None,
    device=None,
    dtype=None,
    bimamba_type: str = "none",
    if_divide_out: bool = False,
    init_layer_scale: Optional[float] = None,
) -> Block:
    """Build one Vim block (the official ``create_block`` minus the unsupported ``if_bimamba``).

    Args:
        d_model: model width D.
        d_state: SSM state size N.
        ssm_cfg: extra keyword arguments for :class:`vmfx.nn.MambaMixer` (``d_conv``, ``expand``,
            ``dt_rank``, ...). ``use_fast_path`` is accepted and ignored: vmfx always computes the
            fast-path math.
        norm_epsilon: eps of the block norm.
        drop_path: stochastic-depth rate (training only).
        rms_norm: RMSNorm if True, else nn.LayerNorm.
        residual_in_fp32, fused_add_norm: see :class:`Block`.
        layer_idx: index of the block, stored on the block and the mixer.
        device, dtype: factory arguments.
        bimamba_type, if_divide_out, init_layer_scale: see :class:`vmfx.nn.MambaMixer`.

    Returns:
        The :class:`Block`.
    """
    ssm_cfg = dict(ssm_cfg or {})
    ssm_cfg.pop("use_fast_path", None)
    factory = {"device": device, "dtype": dtype}
    mixer_cls = partial(
        MambaMixer, d_state=d_state, layer_idx=layer_idx, bimamba_type=bimamba_type,
        if_divide_out=if_divide_out, init_layer_scale=init_layer_scale, **ssm_cfg, **factory,
    )
    norm_cls = partial(RMSNorm if rms_norm else nn.LayerNorm, eps=norm_epsilon, **factory)
    block = Block(
        d_model, mixer_cls, norm_cls=norm_cls, fused_add_norm=fused_add_norm,
        residual_in_fp32=residual_in_fp32, drop_path=drop_path,
    )
    block.layer_idx = layer_idx
    return block


# ------------------------------------------------------------------------------------------------
# Initialisation (official recipe)
# ------------------------------------------------------------------------------------------------


def _segm_init_weights(m: nn.Module) -> None:
    """Official init of the patch embedding and head: trunc-normal(.02) Linear weights, LeCun-normal
    Conv2d weights, zero biases, unit/zero LayerNorm-like affine parameters."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        lecun_normal_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)):
        nn.init.zeros_(m.bias)
        nn.init.ones_(m.weight)


def _mamba_init_weights(
    module: nn.Module,
    n_layer: int,
    initializer_range: float = 0.02,
    rescale_prenorm_residual: bool = True,
    n_residuals_per_layer: int = 1,
) -> None:
    """Mamba's init, applied to every module (official ``_init_weights``).

    Zeroes every Linear bias except those marked ``_no_reinit`` (the forward ``dt_proj.bias``),
    normal(initializer_range) for embeddings, and, with ``rescale_prenorm_residual``, re-initialises
    the weight of a direct child named ``out_proj`` (or ``fc2``) with kaiming-uniform(a=sqrt 5)
    divided by sqrt(n_residuals_per_layer * n_layer) (GPT-2 scheme).
    """
    if isinstance(module, nn.Linear):
        if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    if rescale_prenorm_residual:
        for name, child in module.named_children():
            weight = child._parameters.get("weight") if name in ("out_proj", "fc2") else None
            if weight is not None:
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
                with torch.no_grad():
                    weight /= math.sqrt(n_residuals_per_layer * n_layer)


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


def _unsupported(option: str, what: str) -> ConfigError:
    return ConfigError(
        f"{option} is not implemented in vmfx's VisionMamba ({what}); no released Vim checkpoint "
        "uses it. The released Vim-T/S/B models use the defaults: if_rope=False, "
        "if_bidirectional=False, if_bimamba=False, bimamba_type='v2'."
    )


class VisionMamba(nn.Module):
    """Vision Mamba (Vim) with the official constructor arguments, defaults and state_dict layout.

    Args:
        img_size: input image size (int or (H, W)); the forward asserts it.
        patch_size: patch (conv kernel) size.
        stride: patch stride; 8 for the "+" (``*_stride8_*``, ``*_ft_*``) models.
        depth: number of blocks.
        embed_dim: model width D.
        d_state: SSM state size N.
        channels: image channels.
        num_classes: classes of the head; 0 gives an identity head.
        ssm_cfg: extra :class:`vmfx.nn.MambaMixer` arguments (``use_fast_path`` is ignored).
        drop_rate: dropout after the position embedding (training only).
        drop_path_rate: stochastic depth, linearly increasing over the blocks (training only; block
            i gets the rate of block i-1 in the linear schedule, as in the official code).
        norm_epsilon: eps of every norm.
        rms_norm: RMSNorm (True) or nn.LayerNorm (False) for the block norms and ``norm_f``.
        initializer_cfg: keyword overrides for the Mamba init (``initializer_range``,
            ``rescale_prenorm_residual``, ``n_residuals_per_layer``).
        fused_add_norm: accepted for compatibility; both settings compute the same plain-torch math.
        residual_in_fp32: keep the residual stream in fp32.
        device, dtype: factory arguments for every parameter (the mixer keeps ``A_log``/``D`` fp32).
            ``device="meta"`` builds a shape-only model quickly (load a checkpoint into it with
            :func:`vmfx.models.load_checkpoint`, which then assigns the loaded tensors).
        ft_seq_len, pt_hw_seq_len: rope settings; only used with ``if_rope`` (not implemented).
        if_bidirectional: layer-level bidirectional pairs; not implemented (ConfigError if True).
        final_pool_type: pooling when there is no class token: 'none' (last token), 'mean', 'max'
            (head on every token, then max over tokens) or 'all' (head on every token).
        if_abs_pos_embed: learnable absolute position embedding, added after the class token(s).
        if_rope, if_rope_residual: rotary embedding; not implemented (ConfigError if ``if_rope``).
        flip_img_sequences_ratio: probability of reversing the token sequence, training only (the
            class token is read at the unflipped position, as in the official code).
        if_bimamba: official switch to bimamba v1; not implemented (ConfigError if True).
        bimamba_type: 'v2' (Vim) or 'none' (forward scan only); 'v1' raises ConfigError.
        if_cls_token: add a class token and return its feature.
        if_divide_out: divide the sum of both scan directions by 2.
        init_layer_scale: optional per-channel output scale ``gamma`` in every mixer.
        use_double_cls_token: class tokens at the start and the end; the feature is their mean.
        use_middle_cls_token: class token at ``num_patches // 2`` (all released models); otherwise
            at the start.
        **kwargs: swallowed like the official constructor does (e.g. the Vim-B entry point's typo
            ``if_devide_out``); kept in ``self.ignored_kwargs``.

    Attributes:
        token_position: index of the class token in the sequence (an int), a pair for the double
            class token, or None without a class token. Static, computed from ``num_patches``.
        num_tokens: number of class tokens (0, 1 or 2).
        num_features, embed_dim, d_model: D.
    """

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        stride=16,
        depth=24,
        embed_dim=192,
        d_state=16,
        channels=3,
        num_classes=1000,
        ssm_cfg=None,
        drop_rate=0.0,
        drop_path_rate=0.1,
        norm_epsilon: float = 1e-5,
        rms_norm: bool = True,
        initializer_cfg=None,
        fused_add_norm=True,
        residual_in_fp32=True,
        device=None,
        dtype=None,
        ft_seq_len=None,
        pt_hw_seq_len=14,
        if_bidirectional=False,
        final_pool_type="none",
        if_abs_pos_embed=True,
        if_rope=False,
        if_rope_residual=False,
        flip_img_sequences_ratio=-1.0,
        if_bimamba=False,
        bimamba_type="v2",
        if_cls_token=True,
        if_divide_out=True,
        init_layer_scale=None,
        use_double_cls_token=False,
        use_middle_cls_token=True,
        **kwargs,
    ):
        super().__init__()
        # The constructor arguments, so that a quantized model can be rebuilt from a saved file
        # (vmfx.save / vmfx.load) without pickling code.
        self.init_kwargs = {
            k: v for k, v in locals().items() if k not in ("self", "kwargs", "device", "dtype", "__class__")
        }
        if if_rope:
            raise _unsupported("if_rope=True", "rotary position embedding")
        if if_bidirectional:
            raise _unsupported("if_bidirectional=True", "layer-level bidirectional block pairs")
        if if_bimamba or bimamba_type == "v1":
            raise _unsupported(
                "if_bimamba=True" if if_bimamba else "bimamba_type='v1'",
                "bimamba v1, a backward scan sharing all but A with the forward one",
            )
        if bimamba_type not in ("v2", "none"):
            raise ConfigError(f"bimamba_type={bimamba_type!r}: use 'v2' (Vim) or 'none'")
        if final_pool_type not in _FINAL_POOL_TYPES:
            raise ConfigError(
                f"final_pool_type={final_pool_type!r}: use one of {', '.join(map(repr, _FINAL_POOL_TYPES))}"
            )
        factory = {"device": device, "dtype": dtype}
        self.ignored_kwargs = dict(kwargs)
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.if_bidirectional = if_bidirectional
        self.final_pool_type = final_pool_type
        self.if_abs_pos_embed = if_abs_pos_embed
        self.if_rope = if_rope
        self.if_rope_residual = if_rope_residual
        self.flip_img_sequences_ratio = flip_img_sequences_ratio
        self.if_cls_token = if_cls_token
        self.use_double_cls_token = use_double_cls_token
        self.use_middle_cls_token = use_middle_cls_token
        self.num_classes = num_classes
        self.d_model = self.num_features = self.embed_dim = embed_dim

        # Registration order fixes the state_dict order: own parameters (cls_token, pos_embed)
        # first, then patch_embed, head, layers, norm_f.
        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, stride=stride, in_chans=channels,
            embed_dim=embed_dim, **factory,
        )
        num_patches = self.patch_embed.num_patches
        self.num_tokens = 0
        self.token_position: Union[int, Tuple[int, int], None] = None
        if if_cls_token:
            if use_double_cls_token:
                self.cls_token_head = nn.Parameter(torch.zeros(1, 1, embed_dim, **factory))
                self.cls_token_tail = nn.Parameter(torch.zeros(1, 1, embed_dim, **factory))
                self.num_tokens = 2
                self.token_position = (0, num_patches + 1)
            else:
                self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **factory))
                self.num_tokens = 1
                self.token_position = num_patches // 2 if use_middle_cls_token else 0
        if if_abs_pos_embed:
            self.pos_embed = nn.Parameter(
                torch.zeros(1, num_patches + self.num_tokens, embed_dim, **factory)
            )
            self.pos_drop = nn.Dropout(p=drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **factory) if num_classes > 0 else nn.Identity()

        dpr = [float(r) for r in torch.linspace(0, drop_path_rate, depth)]
        inter_dpr = [0.0] + dpr  # official: block i gets dpr[i - 1]
        self.drop_path = DropPath(drop_path_rate)
        self.layers = nn.ModuleList(
            [
                create_block(
                    embed_dim, d_state=d_state, ssm_cfg=ssm_cfg, norm_epsilon=norm_epsilon,
                    rms_norm=rms_norm, residual_in_fp32=residual_in_fp32,
                    fused_add_norm=fused_add_norm, layer_idx=i, bimamba_type=bimamba_type,
                    drop_path=inter_dpr[i], if_divide_out=if_divide_out,
                    init_layer_scale=init_layer_scale, **factory,
                )
                for i in range(depth)
            ]
        )
        self.norm_f = (RMSNorm if rms_norm else nn.LayerNorm)(embed_dim, eps=norm_epsilon, **factory)

        # Official initialisation, in the official order.
        self.patch_embed.apply(_segm_init_weights)
        self.head.apply(_segm_init_weights)
        if if_abs_pos_embed:
            trunc_normal_(self.pos_embed, std=0.02)
        if if_cls_token:
            if use_double_cls_token:
                trunc_normal_(self.cls_token_head, std=0.02)
                trunc_normal_(self.cls_token_tail, std=0.02)
            else:
                trunc_normal_(self.cls_token, std=0.02)
        self.apply(partial(_mamba_init_weights, n_layer=depth, **(initializer_cfg or {})))

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Parameter names excluded from weight decay (official list)."""
        return {"pos_embed", "cls_token", "dist_token", "cls_token_head", "cls_token_tail"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> features: (B, D) for a class token or 'none'/'mean' pooling,
        (B, L, D) for final_pool_type 'max'/'all'. Same as the official ``forward_features``."""
        x = self.patch_embed(x)
        M = self.patch_embed.num_patches
        if self.if_cls_token:
            if self.use_double_cls_token:
                head = self.cls_token_head.expand(x.shape[0], -1, -1)
                tail = self.cls_token_tail.expand(x.shape[0], -1, -1)
                x = torch.cat((head, x, tail), dim=1)
            else:
                cls = self.cls_token.expand(x.shape[0], -1, -1)
                if self.use_middle_cls_token:
                    pos = M // 2
                    x = torch.cat((x[:, :pos, :], cls, x[:, pos:, :]), dim=1)
                else:
                    x = torch.cat((cls, x), dim=1)
        if self.if_abs_pos_embed:
            x = x + self.pos_embed
            if self.pos_drop.p > 0:
                x = self.pos_drop(x)

        if (
            self.training
            and self.flip_img_sequences_ratio > 0
            and (self.flip_img_sequences_ratio - random.random()) > 1e-5
        ):
            x = x.flip([1])

        residual = None
        hidden_states = x
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual)

        # Final Add + Norm (official: fused rms_norm_fn with prenorm=False; only the output is kept).
        if residual is None:
            residual = hidden_states
        else:
            residual = residual + self.drop_path(hidden_states)
        hidden_states, _ = _norm_residual(self.norm_f, residual, self.residual_in_fp32)

        if self.if_cls_token:
            if self.use_double_cls_token:
                first, last = self.token_position
                return (hidden_states[:, first, :] + hidden_states[:, last, :]) / 2
            return hidden_states[:, self.token_position, :]
        if self.final_pool_type == "none":
            return hidden_states[:, -1, :]
        if self.final_pool_type == "mean":
            return hidden_states.mean(dim=1)
        return hidden_states  # 'max' and 'all'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, num_classes) ((B, L, num_classes) for 'all').

        The official ``forward(x, return_features=False, inference_params=None, ...)`` extras are
        not arguments here (a traced forward takes only the image): use :meth:`forward_features`
        for ``return_features=True``; step-wise decoding and the random-token-order debugging
        options are not supported. ``final_pool_type='max'`` takes the max over tokens only when
        there is no class token (the official code also applies it to the (B, num_classes) logits
        of a class-token model, reducing them to (B,)).
        """
        x = self.head(self.forward_features(x))
        if self.final_pool_type == "max" and not self.if_cls_token:
            x = x.max(dim=1)[0]
        return x


# ------------------------------------------------------------------------------------------------
# Official timm entry points
# ------------------------------------------------------------------------------------------------

_HF = "https://huggingface.co/hustvl"

#: name -> (embed_dim, stride, official checkpoint file, HuggingFace repo)
VIM_VARIANTS = {
    "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2":
        (192, 16, "vim_t_midclstok_76p1acc.pth", f"{_HF}/Vim-tiny-midclstok"),
    "vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2":
        (192, 8, "vim_t_midclstok_ft_78p3acc.pth", f"{_HF}/Vim-tiny-midclstok"),
    "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2":
        (384, 16, "vim_s_midclstok_80p5acc.pth", f"{_HF}/Vim-small-midclstok"),
    "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2":
        (384, 8, "vim_s_midclstok_ft_81p6acc.pth", f"{_HF}/Vim-small-midclstok"),
    "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2":
        (768, 16, "vim_b_midclstok_81p9acc.pth", f"{_HF}/Vim-base-midclstok"),
}

# The evaluation protocol of vim/main.py + datasets.py: Resize(256, bicubic), CenterCrop(224),
# ImageNet-default mean/std. (The official entry points attach timm's ViT ``_cfg()``, whose crop_pct
# and Inception mean/std do not match how the checkpoints were evaluated.)
_PRETRAINED_CFG = {
    "url": "",
    "num_classes": 1000,
    "input_size": (3, 224, 224),
    "pool_size": None,
    "crop_pct": 0.875,
    "interpolation": "bicubic",
    "fixed_input_size": True,
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "first_conv": "patch_embed.proj",
    "classifier": "head",
}

_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _create_vim(name: str, pretrained: bool, kwargs: dict) -> VisionMamba:
    embed_dim, stride, ckpt_file, hf_repo = VIM_VARIANTS[name]
    if pretrained:
        raise CheckpointError(
            f"{name}: pretrained=True cannot download weights (the official entry points point to "
            f"no URL, and vmfx downloads nothing). Download {ckpt_file} from {hf_repo} yourself, "
            f"then: model = timm.create_model({name!r}); "
            f"vmfx.models.load_checkpoint(model, '{ckpt_file}')"
        )
    for k in _TIMM_ONLY_KWARGS:
        kwargs.pop(k, None)
    args = dict(
        patch_size=16, stride=stride, embed_dim=embed_dim, depth=24, d_state=16, rms_norm=True,
        residual_in_fp32=True, fused_add_norm=True, final_pool_type="mean", if_abs_pos_embed=True,
        if_rope=False, if_rope_residual=False, bimamba_type="v2", if_cls_token=True,
        if_divide_out=True, use_middle_cls_token=True,
    )
    args.update(kwargs)  # explicit keywords win (the official entry points raise TypeError instead)
    model = VisionMamba(**args)
    model.pretrained_cfg = model.default_cfg = dict(
        _PRETRAINED_CFG, architecture=name, checkpoint_file=ckpt_file, hf_hub=hf_repo
    )
    return model


def vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2(
    pretrained: bool = False, **kwargs
) -> VisionMamba:
    """Vim-T (D=192, 24 blocks, stride 16, 197 tokens); checkpoint ``vim_t_midclstok_76p1acc.pth``.

    Args:
        pretrained: must be False (no weights can be downloaded; use ``load_checkpoint``).
        **kwargs: :class:`VisionMamba` arguments overriding the variant's (e.g. ``num_classes``).
    """
    return _create_vim(
        "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
        pretrained, kwargs,
    )


def vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2(
    pretrained: bool = False, **kwargs
) -> VisionMamba:
    """Vim-T+ (D=192, stride 8, 27x27 + 1 = 730 tokens); checkpoint ``vim_t_midclstok_ft_78p3acc.pth``.

    Args:
        pretrained: must be False (no weights can be downloaded; use ``load_checkpoint``).
        **kwargs: :class:`VisionMamba` arguments overriding the variant's (e.g. ``num_classes``).
    """
    return _create_vim(
        "vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
        pretrained, kwargs,
    )


def vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2(
    pretrained: bool = False, **kwargs
) -> VisionMamba:
    """Vim-S (D=384, stride 16); checkpoint ``vim_s_midclstok_80p5acc.pth``.

    Args:
        pretrained: must be False (no weights can be downloaded; use ``load_checkpoint``).
        **kwargs: :class:`VisionMamba` arguments overriding the variant's (e.g. ``num_classes``).
    """
    return _create_vim(
        "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
        pretrained, kwargs,
    )


def vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2(
    pretrained: bool = False, **kwargs
) -> VisionMamba:
    """Vim-S+ (D=384, stride 8, 730 tokens); checkpoint ``vim_s_midclstok_ft_81p6acc.pth``.

    Args:
        pretrained: must be False (no weights can be downloaded; use ``load_checkpoint``).
        **kwargs: :class:`VisionMamba` arguments overriding the variant's (e.g. ``num_classes``).
    """
    return _create_vim(
        "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
        pretrained, kwargs,
    )


def vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2(
    pretrained: bool = False, **kwargs
) -> VisionMamba:
    """Vim-B (D=768, stride 16); checkpoint ``vim_b_midclstok_81p9acc.pth``.

    The official entry point passes the misspelt ``if_devide_out=True``, which its ``**kwargs``
    swallows; ``if_divide_out`` keeps its default True, as here.

    Args:
        pretrained: must be False (no weights can be downloaded; use ``load_checkpoint``).
        **kwargs: :class:`VisionMamba` arguments overriding the variant's (e.g. ``num_classes``).
    """
    return _create_vim(
        "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2",
        pretrained, kwargs,
    )


#: The entry points, in the official order, for registration in timm.
VIM_ENTRYPOINTS: Tuple[Callable[..., VisionMamba], ...] = (
    vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2,
    vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2,
    vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2,
    vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2,
    vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2,
)
