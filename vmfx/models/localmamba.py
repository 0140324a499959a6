"""LocalMamba's plain (ViM-style) model, ``LocalVim`` (hunto/LocalMamba ``local_vim.py``), in plain
PyTorch with the official constructor arguments and state_dict layout.

Every block is Vim's Add -> RMSNorm -> mixer, with the mixer :class:`MultiMamba`: one ``in_proj``,
then for each of the layer's ``directions`` a full Mamba inner path with its own parameters
(``conv1d_{k}``, ``x_proj_{k}``, ``dt_proj_{k}``, ``A_log_{k}``, ``D_{k}``) run on the tokens in that
direction's *scan order*, the outputs put back in raster order, each scaled by the shared channel
attention ``attn`` (:class:`BiAttn`), summed, and ``out_proj``. The scan orders
(:func:`scan_order`):

* ``h`` raster order, ``v`` column-major order;
* ``wK`` windowed: the grid is zero-padded on the bottom / right to multiples of K (when K does not
  divide it), cut into K x K windows visited in raster order, each window read in raster order;
* ``*_flip`` the same order reversed;
* with a middle class token (``local_vim_tiny_middle_cls_token``) the class token is taken out, the
  patch tokens are scanned, and the class token is put back at the middle position of every scanned
  sequence (after padding, as the official code does).

Each scan order is a permutation of the mixer's tokens (``-1``: a zero padding token), so a
direction is one ``index_select`` with a constant index (``multi_scan.scan_index_{k}``, a
non-persistent buffer), after ``F.pad`` appends one zero token when the order has padding; the way
back is ``index_select`` with the inverse permutation, which drops the padding. Detection sees each
direction's scan order as the permutation in its token layout (``order<k>`` directions), so
per-token statistics are kept in each scan order.

Invariants:

* **State dict.** Keys, shapes and order are the official ones: ``cls_token`` (middle-cls models),
  ``pos_embed``, ``patch_embed.proj.*``, ``rope.freqs_cos`` / ``rope.freqs_sin`` (persistent
  buffers, rope models), ``head.*``, per layer ``layers.{i}.mixer.{A_log_k, D_k}`` (k = 0..K-1),
  ``in_proj.weight``, ``multi_scan.weights`` (search supernet only), ``conv1d_k.*``,
  ``x_proj_k.weight``, ``dt_proj_k.*``, ``out_proj.weight``, ``attn.{norm, global_reduce,
  channel_select}.*``, ``layers.{i}.norm.weight``, then ``norm_f.weight``.
* **Forward = the official one** (``mamba_inner_fn_no_out_proj`` per direction, fused add+norm,
  rope on the hidden states and the residual before every block, mean pooling or the middle class
  token), for inputs of exactly ``img_size``.
* **torch.fx.** ``forward(x)`` traces symbolically: scan orders are buffers computed at
  construction from the static token grid, and there is no control flow on tensor values.
* Official quirks kept or refused, never silently changed: the official ``A_log_k`` of one layer are
  one shared tensor (``nn.Parameter`` of the same ``A_log``), so a checkpoint it trains has them
  equal; here they are separate parameters that load those equal values. Configurations the official
  forward cannot run (a class token at the front with 2D scans, rope with a class token, an image
  size the patch size does not divide) raise :class:`vmfx.errors.ConfigError`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import to_2tuple, trunc_normal_

from ..errors import CheckpointError, ConfigError
from ..nn.norm import RMSNorm
from ..ops.selective_scan import selective_scan
from .vim import Block, DropPath, PatchEmbed, _norm_residual

__all__ = [
    "LocalVim",
    "MultiMamba",
    "MultiScan",
    "BiAttn",
    "VisionRotaryEmbeddingFast",
    "scan_order",
    "ALL_DIRECTIONS",
    "LOCAL_VIM_VARIANTS",
    "LOCAL_VIM_ENTRYPOINTS",
    "local_vim_tiny_search",
    "local_vim_tiny",
    "local_vim_tiny_middle_cls_token",
    "local_vim_small",
    "local_vim_tiny_wo_search",
]

#: The official ``MultiScan.ALL_CHOICES``: the eight directions of the search space.
ALL_DIRECTIONS = ("h", "h_flip", "v", "v_flip", "w2", "w2_flip", "w7", "w7_flip")


# ------------------------------------------------------------------------------------------------
# Scan orders
# ------------------------------------------------------------------------------------------------


def _parse_direction(direction: str) -> Tuple[str, int, bool]:
    """'h' / 'v' / 'wK', optionally with '_flip' -> (kind, window, flip); ConfigError otherwise."""
    flip = direction.endswith("_flip")
    base = direction[: -len("_flip")] if flip else direction
    if base in ("h", "v"):
        return base, 0, flip
    if base.startswith("w") and base[1:].isdigit() and int(base[1:]) > 0:
        return "w", int(base[1:]), flip
    raise ConfigError(
        f"unknown LocalMamba scan direction {direction!r}: use 'h', 'v' or 'w<K>' (K a window size), "
        f"optionally with '_flip', e.g. one of {', '.join(ALL_DIRECTIONS)}"
    )


def scan_order(direction: str, grid: Tuple[int, int], cls_position: Optional[int] = None) -> Tuple[int, ...]:
    """The tokens a direction visits, in order: ``order[p]`` is the canonical index (the index in the
    mixer's input sequence) of the token at scan position ``p``, ``-1`` a zero padding token.

    Args:
        direction: 'h', 'v', 'wK', each optionally '_flip' (official ``MultiScan``).
        grid: (H, W) of the patch grid.
        cls_position: index of a middle class token in the input sequence (None: no class token).
            It is taken out before the scan and put back at this position of the scanned sequence.
    """
    kind, k, flip = _parse_direction(direction)
    H, W = grid
    if kind == "h":
        patches = list(range(H * W))
    elif kind == "v":
        patches = [r * W + c for c in range(W) for r in range(H)]
    else:
        hg, wg = -(-H // k), -(-W // k)
        patches = []
        for gi in range(hg):
            for gj in range(wg):
                for i in range(k):
                    for j in range(k):
                        r, c = gi * k + i, gj * k + j
                        patches.append(r * W + c if r < H and c < W else -1)
    if flip:
        patches.reverse()
    if cls_position is None:
        return tuple(patches)
    canonical = [p if p < cls_position else p + 1 for p in patches]  # the class token sits at cls_position
    canonical = [-1 if p == -1 else c for p, c in zip(patches, canonical)]
    return tuple(canonical[:cls_position] + [cls_position] + canonical[cls_position:])


class MultiScan(nn.Module):
    """The directions of one mixer and their scan orders (official ``MultiScan``).

    ``scan(xz, k)`` puts token-major ``(B, L, C)`` tokens into direction ``k``'s order (one
    ``index_select``; a reversal is a ``flip``, raster order no op), with a zero token appended first
    when the order has padding. ``reverse(y, k)`` puts ``(B, L_k, C)`` outputs back in raster order
    and drops the padding. In the search supernet (``choices=None``: all eight directions) the merge
    normalises each direction (non-affine LayerNorm) and weights it by ``softmax(weights)``; otherwise
    it is a sum.

    Args:
        dim: channels of the merged outputs (d_inner).
        choices: the directions, or None for the search supernet.
        token_size: the (H, W) patch grid.
        cls_position: the middle class token's index in the sequence, or None.
    """

    def __init__(self, dim: int, choices: Optional[Sequence[str]] = None, token_size=(14, 14),
                 cls_position: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        self.token_size = tuple(token_size)
        self.cls_position = cls_position
        self.search = choices is None
        self.choices = tuple(ALL_DIRECTIONS if choices is None else choices)
        if not self.choices:
            raise ConfigError("a LocalMamba mixer needs at least one scan direction")
        if self.search:
            self.norms = nn.ModuleList([nn.LayerNorm(dim, elementwise_affine=False) for _ in self.choices])
            self.weights = nn.Parameter(1e-3 * torch.randn(len(self.choices), 1, 1, 1, device=device, dtype=dtype))
        tokens = self.token_size[0] * self.token_size[1] + (cls_position is not None)
        self.tokens = tokens
        self.orders = []
        self._kinds = []
        if (torch.device(device) if device is not None else torch.empty(0).device).type == "meta":
            device = "cpu"  # the scan orders are computed, never loaded: keep them real (also under torch.device("meta"))
        for k, direction in enumerate(self.choices):
            order = scan_order(direction, self.token_size, cls_position)
            self.orders.append(order)
            if order == tuple(range(tokens)):
                kind = "identity"
            elif order == tuple(range(tokens - 1, -1, -1)):
                kind = "flip"
            else:
                kind = "gather"
            self._kinds.append(kind)
            padded = any(i < 0 for i in order)
            index = torch.tensor([tokens if i < 0 else i for i in order], dtype=torch.long, device=device)
            inverse = torch.empty(tokens, dtype=torch.long, device=device)
            inverse[torch.tensor([i for i in order if i >= 0], dtype=torch.long, device=device)] = torch.tensor(
                [p for p, i in enumerate(order) if i >= 0], dtype=torch.long, device=device)
            self.register_buffer(f"scan_index_{k}", index, persistent=False)
            self.register_buffer(f"reverse_index_{k}", inverse, persistent=False)
            setattr(self, f"_padded_{k}", padded)

    def scan(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """(B, L, C) in raster order -> (B, L_k, C) in direction k's order."""
        kind = self._kinds[k]
        if kind == "identity":
            return x
        if kind == "flip":
            return x.flip(1)
        if getattr(self, f"_padded_{k}"):
            x = F.pad(x, (0, 0, 0, 1))  # one zero token at index L, read by the padding positions
        return x.index_select(1, getattr(self, f"scan_index_{k}"))

    def reverse(self, y: torch.Tensor, k: int) -> torch.Tensor:
        """(B, L_k, C) in direction k's order -> (B, L, C) in raster order (padding dropped)."""
        kind = self._kinds[k]
        if kind == "identity":
            return y
        if kind == "flip":
            return y.flip(1)
        return y.index_select(1, getattr(self, f"reverse_index_{k}"))

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Merge the per-direction outputs (each (B, L, C), raster order)."""
        if self.search:
            weights = self.weights.softmax(0)
            out = None
            for k, x in enumerate(xs):
                term = self.norms[k](x) * weights[k]
                out = term if out is None else out + term
            return out
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out

    def extra_repr(self) -> str:
        return f"choices={list(self.choices)}, token_size={self.token_size}, cls_position={self.cls_position}"


class BiAttn(nn.Module):
    """The channel attention LocalMamba applies to every direction's output (official ``BiAttn``):
    ``x * sigmoid(channel_select(gelu(global_reduce(mean_tokens(LayerNorm(x))))))``.

    Args:
        in_channels: channels C.
        act_ratio: the bottleneck width is ``int(C * act_ratio)``.
    """

    def __init__(self, in_channels: int, act_ratio: float = 0.125, act_fn=nn.GELU, gate_fn=nn.Sigmoid,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        reduce_channels = int(in_channels * act_ratio)
        self.norm = nn.LayerNorm(in_channels, **factory)
        self.global_reduce = nn.Linear(in_channels, reduce_channels, **factory)
        self.act_fn = act_fn()
        self.channel_select = nn.Linear(reduce_channels, in_channels, **factory)
        self.gate_fn = gate_fn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> (B, L, C)."""
        pooled = self.norm(x).mean(1, keepdim=True)
        attn = self.gate_fn(self.channel_select(self.act_fn(self.global_reduce(pooled))))
        return x * attn


class MultiMamba(nn.Module):
    """LocalMamba's mixer: one ``in_proj``, a Mamba inner path per scan direction, the channel
    attention and ``out_proj`` (official ``MultiMamba``, see the module docstring).

    Args:
        d_model: model width D.
        d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init, dt_scale, dt_init_floor,
            conv_bias, bias: as in Mamba (:class:`vmfx.nn.MambaMixer`).
        use_fast_path, bimamba_type: accepted for compatibility; unused by the official mixer too.
        layer_idx: the block index.
        directions: the layer's scan directions, or None for the search supernet (all eight).
        token_size: the (H, W) patch grid.
        use_middle_cls_token: the sequence holds a class token at ``(L - 1) // 2``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank="auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        layer_idx=None,
        device=None,
        dtype=None,
        bimamba_type: str = "none",
        directions: Optional[Sequence[str]] = None,
        token_size=(14, 14),
        use_middle_cls_token: bool = False,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.layer_idx = layer_idx
        self.bimamba_type = bimamba_type
        self.token_size = tuple(token_size)
        self.use_middle_cls_token = use_middle_cls_token
        cls_position = (token_size[0] * token_size[1]) // 2 if use_middle_cls_token else None

        # Registration order = the official one, so state_dict keys come out in its order.
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory)
        self.act = nn.SiLU()
        self.multi_scan = MultiScan(self.d_inner, choices=directions, token_size=token_size,
                                    cls_position=cls_position, **factory)
        A_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32, device=device)).repeat(self.d_inner, 1)
        for k in range(len(self.multi_scan.choices)):
            a = nn.Parameter(A_log.clone())
            a._no_weight_decay = True
            setattr(self, f"A_log_{k}", a)
            setattr(self, f"conv1d_{k}", nn.Conv1d(
                self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner, padding=d_conv - 1,
                bias=conv_bias, **factory))
            setattr(self, f"x_proj_{k}", nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory))
            setattr(self, f"dt_proj_{k}", self._make_dt_proj(dt_init, dt_scale, dt_min, dt_max, dt_init_floor,
                                                             factory))
            d = nn.Parameter(torch.ones(self.d_inner, device=device))
            d._no_weight_decay = True
            setattr(self, f"D_{k}", d)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self.attn = BiAttn(self.d_inner, **factory)

    @property
    def directions(self) -> Tuple[str, ...]:
        return self.multi_scan.choices

    def _make_dt_proj(self, dt_init, dt_scale, dt_min, dt_max, dt_init_floor, factory) -> nn.Linear:
        dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(dt_proj.weight, -std, std)
        else:
            raise ConfigError(f"dt_init={dt_init!r}: use 'random' or 'constant'")
        dt = torch.exp(
            torch.rand(self.d_inner, device=factory["device"]) * (math.log(dt_max) - math.log(dt_min))
            + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        with torch.no_grad():
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        dt_proj.bias._no_reinit = True
        return dt_proj

    def forward(self, hidden_states: torch.Tensor, inference_params=None) -> torch.Tensor:
        """(B, L, D) -> (B, L, D)."""
        if inference_params is not None:
            raise NotImplementedError("LocalMamba's MultiMamba runs whole sequences only (no inference_params)")
        xz = self.in_proj(hidden_states)  # (B, L, 2E), raster order
        outs = []
        for k in range(len(self.multi_scan.choices)):
            scanned = self.multi_scan.scan(xz, k)  # (B, L_k, 2E), direction k's order
            y = self._direction(scanned, k)  # (B, L_k, E)
            outs.append(self.attn(self.multi_scan.reverse(y, k)))
        return self.out_proj(self.multi_scan(outs))

    def _direction(self, xz: torch.Tensor, k: int) -> torch.Tensor:
        """One direction's Mamba inner path on token-major xz (B, L, 2E); returns (B, L, E)
        (``mamba_inner_fn_no_out_proj``: causal conv + SiLU, x_proj, dt_proj, scan, SiLU(z) gate)."""
        E, R, N = self.d_inner, self.dt_rank, self.d_state
        conv1d, x_proj, dt_proj = (getattr(self, f"{n}_{k}") for n in ("conv1d", "x_proj", "dt_proj"))
        x = xz[..., :E]
        z = xz[..., E:]
        xc = conv1d(x.transpose(1, 2))
        if self.d_conv > 1:
            xc = xc[..., : 1 - self.d_conv]
        xc = F.silu(xc)
        x_dbl = x_proj(xc.transpose(1, 2))
        delta = dt_proj(x_dbl[..., :R])
        B = x_dbl[..., R : R + N]
        C = x_dbl[..., R + N :]
        A = -torch.exp(getattr(self, f"A_log_{k}").float())
        y = selective_scan(xc, delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
                           getattr(self, f"D_{k}").float(), delta_softplus=True)
        y = y * F.silu(z.transpose(1, 2))
        return y.transpose(1, 2)


# ------------------------------------------------------------------------------------------------
# Rotary embedding (EVA-02's VisionRotaryEmbeddingFast, as LocalVim uses it)
# ------------------------------------------------------------------------------------------------


class VisionRotaryEmbeddingFast(nn.Module):
    """2D rotary position embedding over a square token grid, with persistent buffers
    ``freqs_cos`` / ``freqs_sin`` of shape (ft_seq_len**2, 2 * dim) (they are in the state_dict).

    ``forward(t) = t * freqs_cos + rotate_half(t) * freqs_sin``, ``rotate_half`` rotating the
    interleaved channel pairs (x1, x2) -> (-x2, x1).

    Args:
        dim: half of the rotated width (LocalVim passes ``embed_dim // 2``).
        pt_seq_len: the grid side the frequencies were defined for (14).
        ft_seq_len: the grid side of this model (default ``pt_seq_len``).
        theta: frequency base.
    """

    def __init__(self, dim: int, pt_seq_len: int = 16, ft_seq_len: Optional[int] = None, theta: float = 10000,
                 device=None):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device)[: dim // 2].float() / dim))
        ft_seq_len = pt_seq_len if ft_seq_len is None else ft_seq_len
        t = torch.arange(ft_seq_len, device=device) / ft_seq_len * pt_seq_len
        freqs = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)  # (ft, dim)
        grid = torch.cat((freqs[:, None, :].expand(ft_seq_len, ft_seq_len, -1),
                          freqs[None, :, :].expand(ft_seq_len, ft_seq_len, -1)), dim=-1)
        grid = grid.reshape(-1, grid.shape[-1])
        self.register_buffer("freqs_cos", grid.cos())
        self.register_buffer("freqs_sin", grid.sin())

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        pairs = t.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return t * self.freqs_cos + rotated * self.freqs_sin


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


def _segm_init_weights(m: nn.Module) -> None:
    """Official LocalVim init, applied to every module: trunc-normal(.02) Linear weights and zero
    biases (the dt_proj biases too, as in the official code), unit / zero LayerNorm affine."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        if m.bias is not None:
            nn.init.zeros_(m.bias)
        if m.weight is not None:
            nn.init.ones_(m.weight)


def _rescale_out_proj(module: nn.Module, n_layer: int, initializer_range: float = 0.02,
                      rescale_prenorm_residual: bool = True, n_residuals_per_layer: int = 1) -> None:
    """Mamba's init: zero Linear biases not marked ``_no_reinit``; kaiming-uniform / sqrt(n_layer)
    for a direct ``out_proj`` / ``fc2`` child's weight."""
    if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
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


_FINAL_POOL_TYPES = ("none", "mean", "max", "all")


class LocalVim(nn.Module):
    """LocalVim with the official ``VisionMamba`` constructor arguments of ``local_vim.py``.

    Args:
        img_size: input size (int or (H, W)); must be a multiple of ``patch_size`` (the forward
            asserts the size).
        patch_size: patch size (stride = patch size).
        depth: number of blocks.
        embed_dim: model width D.
        channels, num_classes: image channels; classes of the head (0: identity head).
        ssm_cfg: extra :class:`MultiMamba` arguments (``d_state``, ``d_conv``, ``expand``, ...).
        drop_rate, drop_path_rate: dropout after the position embedding and stochastic depth
            (training only).
        norm_epsilon, rms_norm: eps and kind (RMSNorm or LayerNorm) of the block norms and norm_f.
        initializer_cfg: keyword overrides of Mamba's init.
        fused_add_norm: accepted; both settings compute the same math.
        residual_in_fp32: carry the residual stream in fp32.
        device, dtype: factory arguments.
        ft_seq_len: unused by the official model too.
        pt_hw_seq_len: the grid side rope's frequencies are defined for.
        final_pool_type: 'none' (last token), 'mean', 'max' (max over tokens) or 'all'.
        if_abs_pos_embed: learnable absolute position embedding.
        if_rope, if_rope_residual: rotary embedding of the hidden states (and the residual) before
            every block.
        bimamba_type: accepted; unused by MultiMamba.
        if_cls_token, use_middle_cls_token: a class token in the middle of the sequence, whose
            feature is returned (a class token at the front cannot be scanned in 2D: ConfigError).
        directions: per block, its list of scan directions (at least ``depth`` lists; block i uses
            the i-th); None for the search supernet (all eight directions in every block, merged by
            learned weights).
        mamba_cls: the mixer class; only :class:`MultiMamba` (or None) is supported.
        **kwargs: swallowed like the official constructor does; kept in ``self.ignored_kwargs``.
    """

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        depth=24,
        embed_dim=192,
        channels=3,
        num_classes=1000,
        ssm_cfg=None,
        drop_rate=0.0,
        drop_path_rate=0.1,
        norm_epsilon: float = 1e-5,
        rms_norm: bool = False,
        initializer_cfg=None,
        fused_add_norm=False,
        residual_in_fp32=False,
        device=None,
        dtype=None,
        ft_seq_len=None,
        pt_hw_seq_len=14,
        final_pool_type="none",
        if_abs_pos_embed=False,
        if_rope=False,
        if_rope_residual=False,
        bimamba_type="none",
        if_cls_token=False,
        use_middle_cls_token=False,
        directions=None,
        mamba_cls=None,
        **kwargs,
    ):
        super().__init__()
        self.init_kwargs = {
            k: v for k, v in locals().items()
            if k not in ("self", "kwargs", "device", "dtype", "mamba_cls", "__class__")
        }
        if isinstance(self.init_kwargs.get("directions"), (list, tuple)):
            self.init_kwargs["directions"] = [list(d) if d is not None else None for d in directions]
        if mamba_cls not in (None, MultiMamba):
            raise ConfigError(f"mamba_cls={mamba_cls!r}: vmfx's LocalVim supports MultiMamba only")
        if final_pool_type not in _FINAL_POOL_TYPES:
            raise ConfigError(f"final_pool_type={final_pool_type!r}: use one of {', '.join(map(repr, _FINAL_POOL_TYPES))}")
        if if_cls_token and not use_middle_cls_token:
            raise ConfigError("if_cls_token=True without use_middle_cls_token: a class token at the front cannot be "
                              "placed on the 2D grid the directions scan (the official code fails too); use "
                              "use_middle_cls_token=True")
        if use_middle_cls_token and not if_cls_token:
            raise ConfigError("use_middle_cls_token=True needs if_cls_token=True (otherwise the mixers would take a "
                              "patch token for the class token)")
        if if_rope and if_cls_token:
            raise ConfigError("if_rope=True with a class token: the rope buffers cover the patch tokens only (the "
                              "official code fails too); the released middle-cls model uses if_rope=False")
        img = to_2tuple(img_size)
        patch = to_2tuple(patch_size)
        if img[0] % patch[0] or img[1] % patch[1]:
            raise ConfigError(f"img_size={img} is not a multiple of patch_size={patch}: the official model pads "
                              "such images, which vmfx's LocalVim does not; resize the input to a multiple")
        factory = {"device": device, "dtype": dtype}
        self.ignored_kwargs = dict(kwargs)
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.final_pool_type = final_pool_type
        self.if_abs_pos_embed = if_abs_pos_embed
        self.if_rope = if_rope
        self.if_rope_residual = if_rope_residual
        self.if_cls_token = if_cls_token
        self.use_middle_cls_token = use_middle_cls_token
        self.num_tokens = 1 if if_cls_token else 0
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.d_model = self.num_features = self.embed_dim = embed_dim

        self.patch_embed = PatchEmbed(img_size=img, patch_size=patch, stride=patch, in_chans=channels,
                                      embed_dim=embed_dim, **factory)
        num_patches = self.patch_embed.num_patches
        self.token_size = self.patch_embed.grid_size
        self.token_position = num_patches // 2 if if_cls_token else None
        if if_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **factory))
        if if_abs_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim, **factory))
            self.pos_drop = nn.Dropout(p=drop_rate)
        if if_rope:
            if self.token_size[0] != self.token_size[1]:
                raise ConfigError(f"if_rope=True needs a square patch grid, got {self.token_size}")
            self.rope = VisionRotaryEmbeddingFast(dim=embed_dim // 2, pt_seq_len=pt_hw_seq_len,
                                                  ft_seq_len=img[0] // patch[0], device=device)
        self.head = nn.Linear(embed_dim, num_classes, **factory) if num_classes > 0 else nn.Identity()

        dpr = [float(r) for r in torch.linspace(0, drop_path_rate, depth)]
        inter_dpr = [0.0] + dpr
        self.drop_path = DropPath(drop_path_rate)
        if directions is None:
            directions = [None] * depth
        if len(directions) < depth:  # the official code reads directions[i] for i < depth: extra ones are unused
            raise ConfigError(f"directions lists {len(directions)} layers, but depth={depth}: give one list per block")
        ssm_cfg = dict(ssm_cfg or {})
        self.layers = nn.ModuleList()
        for i in range(depth):
            mixer_cls = partial(
                MultiMamba, layer_idx=i, bimamba_type=bimamba_type, directions=directions[i],
                token_size=self.token_size, use_middle_cls_token=use_middle_cls_token, **ssm_cfg, **factory,
            )
            norm_cls = partial(RMSNorm if rms_norm else nn.LayerNorm, eps=norm_epsilon, **factory)
            block = Block(embed_dim, mixer_cls, norm_cls=norm_cls, fused_add_norm=fused_add_norm,
                          residual_in_fp32=residual_in_fp32, drop_path=inter_dpr[i])
            block.layer_idx = i
            self.layers.append(block)
        self.norm_f = (RMSNorm if rms_norm else nn.LayerNorm)(embed_dim, eps=norm_epsilon, **factory)

        # Official initialisation, in the official order.
        self.apply(_segm_init_weights)
        if if_abs_pos_embed:
            trunc_normal_(self.pos_embed, std=0.02)
        self.apply(partial(_rescale_out_proj, n_layer=depth, **(initializer_cfg or {})))

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token", "dist_token"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> features ((B, D), or (B, L, D) for 'all')."""
        x = self.patch_embed(x)
        if self.if_cls_token:
            cls = self.cls_token.expand(x.shape[0], -1, -1)
            pos = self.token_position
            x = torch.cat((x[:, :pos, :], cls, x[:, pos:, :]), dim=1)
        if self.if_abs_pos_embed:
            x = x + self.pos_embed
            if self.pos_drop.p > 0:
                x = self.pos_drop(x)
        residual = None
        hidden_states = x
        for layer in self.layers:
            if self.if_rope:
                hidden_states = self.rope(hidden_states)
                if residual is not None and self.if_rope_residual:
                    residual = self.rope(residual)
            hidden_states, residual = layer(hidden_states, residual)
        residual = hidden_states if residual is None else residual + self.drop_path(hidden_states)
        hidden_states, _ = _norm_residual(self.norm_f, residual, self.residual_in_fp32)
        if self.if_cls_token:
            return hidden_states[:, self.token_position, :]
        if self.final_pool_type == "none":
            return hidden_states[:, -1, :]
        if self.final_pool_type == "mean":
            return hidden_states.mean(dim=1)
        if self.final_pool_type == "max":
            return hidden_states.max(dim=1)[0]
        return hidden_states

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, num_classes)."""
        return self.head(self.forward_features(x))


# ------------------------------------------------------------------------------------------------
# Official timm entry points
# ------------------------------------------------------------------------------------------------

_SEARCHED_DIRECTIONS = (
    ("h", "v_flip", "w7", "w7_flip"),
    ("h_flip", "w2_flip", "w7", "w7_flip"),
    ("h", "h_flip", "v", "w7"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "h_flip", "v", "v_flip"),
    ("h_flip", "v", "v_flip", "w7"),
    ("h_flip", "v", "v_flip", "w2_flip"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "v", "v_flip", "w2"),
    ("h", "v", "v_flip", "w2_flip"),
    ("h", "h_flip", "v_flip", "w7"),
    ("h_flip", "v", "v_flip", "w2"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "v", "w2", "w2_flip"),
    ("v", "v_flip", "w2", "w7"),
    ("h", "h_flip", "v", "w2"),
    ("h", "h_flip", "w2_flip", "w7"),
    ("v", "v_flip", "w2", "w2_flip"),
)
_UNIFORM_DIRECTIONS = (("h", "h_flip", "w2", "w2_flip"),) * 20

_RELEASE = "https://github.com/hunto/LocalMamba/releases/tag/v1.0.0"
_COMMON = dict(patch_size=16, depth=20, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
               final_pool_type="mean", if_abs_pos_embed=True, bimamba_type="v2")
_ROPE = dict(if_rope=True, if_rope_residual=True)

#: name -> (constructor arguments, official checkpoint file or None)
LOCAL_VIM_VARIANTS = {
    "local_vim_tiny_search": (dict(_COMMON, **_ROPE, embed_dim=128, directions=None), None),
    "local_vim_tiny": (dict(_COMMON, **_ROPE, embed_dim=192, directions=_SEARCHED_DIRECTIONS), "local_vim_tiny.ckpt"),
    "local_vim_tiny_middle_cls_token": (
        dict(_COMMON, embed_dim=192, directions=_SEARCHED_DIRECTIONS, if_rope=False, if_rope_residual=False,
             if_cls_token=True, use_middle_cls_token=True),
        "local_vim_tiny_middle_cls_token.ckpt"),
    # The official file defines local_vim_small twice; the second (uniform directions) is the one
    # that is registered. The README links local_vssm_small.ckpt for it, apparently a copy-paste slip.
    "local_vim_small": (dict(_COMMON, **_ROPE, embed_dim=384, directions=_UNIFORM_DIRECTIONS), None),
    "local_vim_tiny_wo_search": (dict(_COMMON, **_ROPE, embed_dim=192, directions=_UNIFORM_DIRECTIONS), None),
}

_PRETRAINED_CFG = {
    "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
    "interpolation": "bicubic", "fixed_input_size": True, "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225), "first_conv": "patch_embed.proj", "classifier": "head",
}
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def create_variant(cls: type, variants: dict, pretrained_cfg: dict, name: str, pretrained: bool, kwargs: dict):
    """``cls`` built with the published arguments of variant ``name`` (``variants[name] = (args,
    checkpoint file)``) updated by ``kwargs``, its timm ``pretrained_cfg`` set; ``pretrained=True`` is
    refused, naming the release to download the checkpoint from (vmfx downloads nothing). Shared by
    the LocalMamba families (LocalVim, LocalVSSM)."""
    args, ckpt = variants[name]
    if pretrained:
        where = f"download {ckpt} from {_RELEASE}" if ckpt else "no official checkpoint is published for it"
        raise CheckpointError(
            f"{name}: pretrained=True cannot download weights (vmfx downloads nothing); {where}, then: "
            f"model = timm.create_model({name!r}); vmfx.models.load_checkpoint(model, PATH)"
        )
    for k in _TIMM_ONLY_KWARGS:
        kwargs.pop(k, None)
    model = cls(**dict(args, **kwargs))
    model.pretrained_cfg = model.default_cfg = dict(pretrained_cfg, architecture=name, checkpoint_file=ckpt)
    return model


def _create(name: str, pretrained: bool, kwargs: dict) -> LocalVim:
    return create_variant(LocalVim, LOCAL_VIM_VARIANTS, _PRETRAINED_CFG, name, pretrained, kwargs)


def local_vim_tiny_search(pretrained: bool = False, **kwargs) -> LocalVim:
    """The LocalVim-T search supernet (D=128, all eight directions in every block)."""
    return _create("local_vim_tiny_search", pretrained, kwargs)


def local_vim_tiny(pretrained: bool = False, **kwargs) -> LocalVim:
    """LocalVim-T (D=192, 20 blocks, searched directions, rope); checkpoint ``local_vim_tiny.ckpt``."""
    return _create("local_vim_tiny", pretrained, kwargs)


def local_vim_tiny_middle_cls_token(pretrained: bool = False, **kwargs) -> LocalVim:
    """LocalVim-T with a middle class token and no rope; checkpoint ``local_vim_tiny_middle_cls_token.ckpt``."""
    return _create("local_vim_tiny_middle_cls_token", pretrained, kwargs)


def local_vim_small(pretrained: bool = False, **kwargs) -> LocalVim:
    """LocalVim-S (D=384, 20 blocks, directions h, h_flip, w2, w2_flip in every block, rope)."""
    return _create("local_vim_small", pretrained, kwargs)


def local_vim_tiny_wo_search(pretrained: bool = False, **kwargs) -> LocalVim:
    """LocalVim-T without search (h, h_flip, w2, w2_flip in every block, rope)."""
    return _create("local_vim_tiny_wo_search", pretrained, kwargs)


#: The entry points, in the official order, for registration in timm.
LOCAL_VIM_ENTRYPOINTS: Tuple[Callable[..., LocalVim], ...] = (
    local_vim_tiny_search,
    local_vim_tiny,
    local_vim_tiny_middle_cls_token,
    local_vim_small,
    local_vim_tiny_wo_search,
)
