"""RMSNorm as Vim and Mamba use it (the Triton ``RMSNorm`` of mamba-ssm, in plain torch)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """``y = x * rsqrt(mean(x**2, -1) + eps) * weight``, computed in fp32, returned in x's dtype.

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
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
