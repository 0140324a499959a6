"""Canonical forms of the two MambaVision modules whose forward cannot be traced as written.

MambaVision (NVlabs, package ``mambavision``) is a hybrid: its ``MambaVisionMixer`` is a Mamba
mixer with a **non-causal** depthwise conv on both halves of ``in_proj`` and a **concatenation**
of the scan output with the z branch instead of the SiLU(z) gate; its ``MambaVisionLayer`` pads
the feature map to whole windows with Python ``if``s on shapes. The originals use einops on traced
values, ``int()`` of a shape ratio and ``if pad > 0``, none of which ``torch.fx`` can trace, and
call mamba-ssm's CUDA-only ``selective_scan_fn``.

* :class:`ConcatMambaMixer` holds the mixer's parameters under the same names (``in_proj``,
  ``conv1d_x``, ``conv1d_z``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``) and computes
  the same function with :func:`vmfx.ops.selective_scan`, in the graph shape detection expects::

      x, z  = chunk(in_proj(h)^T, 2)                       # (B, E/2, L) each
      xc    = silu(conv1d_x(x)); zc = silu(conv1d_z(z))   # 'same' padding, no bias
      x_dbl = x_proj(xc^T); dt, B, C = split(x_dbl)
      y     = selective_scan(xc, dt_proj(dt)^T, -exp(A_log), B^T, C^T, D,
                             delta_bias=dt_proj.bias, delta_softplus=True)
      out   = out_proj(cat([y, zc], channels)^T)

  ``dt_proj``'s bias is applied twice (by the linear and again as ``delta_bias``): that is what
  the official code computes, and the checkpoints are trained with it.
* :class:`WindowedStage` is ``MambaVisionLayer``'s forward (pad to whole windows, window
  partition, blocks, window reverse, crop, downsample) written without Python control flow on
  shapes: padding by zero and cropping to the full size are no-ops, so it always pads and crops.

Invariant: same ``state_dict`` keys and shapes as the originals, same outputs (tested against the
real package in ``tests/frontends/test_mambavision.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.selective_scan import selective_scan

__all__ = ["ConcatMambaMixer", "WindowedStage"]


class ConcatMambaMixer(nn.Module):
    """MambaVision's mixer (see the module docstring); arguments as ``MambaVisionMixer``'s.

    Args:
        d_model: width D of the tokens.
        d_state: SSM state size N.
        d_conv: kernel size of the two depthwise convs.
        expand: inner width E = expand * D (each half E/2).
        dt_rank: rank R of the dt projection ("auto": ceil(D / 16)).
        conv_bias: the official code builds the convs with ``bias=conv_bias // 2``, i.e. no bias
            for the default ``True``; this argument is that already-halved flag.
        bias: biases of in_proj / out_proj.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank="auto",
                 conv_bias: bool = False, bias: bool = False, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        half = self.d_inner // 2
        self.dt_rank = -(-d_model // 16) if dt_rank == "auto" else int(dt_rank)
        self.in_proj = nn.Linear(d_model, self.d_inner, bias=bias, **kw)
        self.x_proj = nn.Linear(half, self.dt_rank + 2 * d_state, bias=False, **kw)
        self.dt_proj = nn.Linear(self.dt_rank, half, bias=True, **kw)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32, device=device)).repeat(half, 1))
        self.D = nn.Parameter(torch.ones(half, device=device))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **kw)
        self.conv1d_x = nn.Conv1d(half, half, d_conv, padding="same", groups=half, bias=bool(conv_bias), **kw)
        self.conv1d_z = nn.Conv1d(half, half, d_conv, padding="same", groups=half, bias=bool(conv_bias), **kw)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, E, L)
        x, z = xz.chunk(2, dim=1)
        x = F.silu(self.conv1d_x(x))
        z = F.silu(self.conv1d_z(z))
        x_dbl = self.x_proj(x.transpose(1, 2))  # (B, L, R + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = self.dt_proj(dt).transpose(1, 2)
        A = -torch.exp(self.A_log.float())
        y = selective_scan(x, delta, A, B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
                           self.D.float(), delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        y = torch.cat([y, z], dim=1)
        return self.out_proj(y.transpose(1, 2))


class WindowedStage(nn.Module):
    """MambaVision's stage: blocks run on non-overlapping windows of the (zero-padded) feature map.

    Args:
        blocks: the stage's blocks (a ``ModuleList``).
        downsample: the module after the blocks, or None.
        window_size: side of the square windows.
        windowed: run the blocks on windows (MambaVision's transformer stages); False runs them on
            the (B, C, H, W) map as is (its conv stages).
    """

    def __init__(self, blocks: nn.ModuleList, downsample: nn.Module | None, window_size: int, windowed: bool):
        super().__init__()
        self.blocks = blocks
        self.downsample = downsample
        self.window_size = int(window_size)
        self.windowed = bool(windowed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ws = self.window_size
        if self.windowed:
            batch, channels, height, width = x.shape
            x = F.pad(x, (0, (ws - width % ws) % ws, 0, (ws - height % ws) % ws))
            padded_h, padded_w = x.shape[2], x.shape[3]
            x = x.view(batch, channels, padded_h // ws, ws, padded_w // ws, ws)
            x = x.permute(0, 2, 4, 3, 5, 1).reshape(-1, ws * ws, channels)
        for blk in self.blocks:
            x = blk(x)
        if self.windowed:
            x = x.reshape(batch, padded_h // ws, padded_w // ws, ws, ws, -1)
            x = x.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, padded_h, padded_w)
            x = x[:, :, :height, :width].contiguous()
        return x if self.downsample is None else self.downsample(x)
