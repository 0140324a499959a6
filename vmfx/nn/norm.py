"""RMSNorm as Vim and Mamba use it (the Triton ``RMSNorm`` of mamba-ssm, in plain torch)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RMSNorm", "rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x**2, -1) + eps) * weight`` in fp32 (fp64 for a float64 input), returned
    in x's dtype: :class:`RMSNorm`'s computation with the weight as an argument (the form a
    quantized graph calls, so that the weight is an edge a quantizer can sit on)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(xf.dtype)).to(x.dtype)


class RMSNorm(nn.Module):
    """``y = x * rsqrt(mean(x**2, -1) + eps) * weight``, computed in fp32 (fp64 for a float64 input),
    returned in x's dtype.

    Only ``weight`` is a parameter (no bias key), as in the official checkpoints. The tracer keeps
    this module as one leaf node (role ``norm``).

    Args:
        dim: size of the normalised (last) dimension.
        eps: added to the mean square; Vim and Mamba use 1e-5.
    """

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
