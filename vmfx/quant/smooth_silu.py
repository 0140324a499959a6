"""``SmoothSiLU``: MambaQuant's "Smooth-SiLU" gate activation ``x -> x * sigmoid(s * x)``, with one
factor ``s_j > 0`` per channel.

With ``x = z / s`` (the gate rows of ``in_proj`` divided by ``s``) it computes
``(z / s) * sigmoid(z) = silu(z) / s`` exactly in real arithmetic: the gate's output arrives
divided by ``s``, and ``out_proj``'s weight columns, multiplied by ``s``, undo it
(:class:`~vmfx.passes.smooth_gate.SmoothFusedGatePass`). The smoothing costs one multiplication per
element inside the gate instead of a graph node of its own. MambaQuant's ``Swiglu`` module does the
same, ``x * sigmoid(x * s)`` (xzktx003/mambaquant-master@2a7887c
``model_vim_quant/tools/main_quant_naive.py:649-655``, a published extraction of MambaQuant's code).

The floating-point order is fixed, ``x * sigmoid(s * x)``, with ``s`` cast to ``x``'s dtype
first; the lowered scan kernel (:mod:`vmfx.lowering.kernels.scan`) and its reference op compute the
gate in the same order.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, InputError
from .registry import register_module_kind

__all__ = ["SmoothSiLU", "smooth_silu"]


def smooth_silu(x: torch.Tensor, factors: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``x * sigmoid(s * x)`` with ``s = factors`` broadcast along ``channel_dim`` of ``x``
    (computed in ``x``'s dtype)."""
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    s = factors.to(device=x.device, dtype=x.dtype).reshape(shape)
    return x * torch.sigmoid(s * x)


class SmoothSiLU(nn.Module):
    """``x -> x * sigmoid(s * x)`` per channel (see the module docstring).

    Args:
        factors: ``s``, shape ``(channels,)``, every entry positive and finite.
        channel_dim: the dim of the input holding the channels, counted from the end (negative:
            ``-2`` for Vim's ``(B, E, L)`` gate input), so that any leading batch shape works.

    Invariants: shape, dtype and token layout in = out; ``factors`` is a persistent buffer (saved
    with the model as state); with all factors 1 it is ``F.silu`` up to rounding.
    """

    #: x * sigmoid(s * x) keeps the shape and token layout of x (detection and layouts walk through it)
    vmfx_preserves_layout = True

    def __init__(self, factors: torch.Tensor, channel_dim: int = -1):
        super().__init__()
        if not isinstance(factors, torch.Tensor) or factors.dim() != 1 or factors.numel() == 0:
            raise ConfigError(f"SmoothSiLU factors must be a non-empty vector (channels,), got {factors!r:.80}")
        if not bool(torch.isfinite(factors).all()) or not bool((factors > 0).all()):
            raise ConfigError("SmoothSiLU factors must be positive and finite (they divide in_proj's gate rows)")
        if isinstance(channel_dim, bool) or not isinstance(channel_dim, int) or channel_dim >= 0:
            raise ConfigError(f"SmoothSiLU.channel_dim counts from the end (a negative int), got {channel_dim!r}")
        self.channel_dim = channel_dim
        self.register_buffer("factors", factors.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < -self.channel_dim or x.shape[self.channel_dim] != self.factors.numel():
            raise InputError(f"SmoothSiLU over {self.factors.numel()} channels (dim {self.channel_dim}) got an input of "
                             f"shape {tuple(x.shape)}: it gates the tensors it was built for")
        return smooth_silu(x, self.factors, self.channel_dim)

    def describe(self) -> str:
        """``"Smooth-SiLU x * sigmoid(s x), 192 channels (dim -2)"``."""
        return f"Smooth-SiLU x * sigmoid(s x), {self.factors.numel()} channels (dim {self.channel_dim})"

    def extra_repr(self) -> str:
        return f"channels={self.factors.numel()}, channel_dim={self.channel_dim}"

    def to_dict(self) -> dict:
        return {"channels": self.factors.numel(), "channel_dim": self.channel_dim}

    @classmethod
    def from_dict(cls, d: dict) -> "SmoothSiLU":
        return cls(torch.ones(int(d["channels"])), int(d["channel_dim"]))


register_module_kind(SmoothSiLU)
