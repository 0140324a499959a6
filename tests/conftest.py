"""Shared fixtures: small random Vision-Mamba-shaped models and images (fixed seeds).

Without a GPU the kernel tests run in Triton's CPU interpreter, which must be on before Triton is
first imported (timm imports it): the test session switches it on here, before any test module
imports timm. vmfx itself never sets it at import (tests/graph/test_quantized_graph.py checks).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vmfx.nn import MambaMixer, RMSNorm


class TinyVimLike(nn.Module):
    """Patch conv -> [RMSNorm -> bidirectional mixer (+ residual)] x depth -> norm -> mean -> head.

    A stand-in for tests that exercise the graph machinery without the full Vim definition.
    """

    def __init__(self, dim: int = 32, depth: int = 2, channels: int = 3, patch: int = 4, classes: int = 10,
                 bimamba_type: str = "v2"):
        super().__init__()
        self.patch = nn.Conv2d(channels, dim, patch, patch)
        self.norms = nn.ModuleList(RMSNorm(dim) for _ in range(depth))
        self.mixers = nn.ModuleList(
            MambaMixer(dim, d_state=8, bimamba_type=bimamba_type, if_divide_out=bimamba_type == "v2")
            for _ in range(depth)
        )
        self.norm_f = RMSNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        for norm, mixer in zip(self.norms, self.mixers):
            x = x + mixer(norm(x))
        return self.head(self.norm_f(x).mean(1))


@pytest.fixture
def tiny_model() -> TinyVimLike:
    torch.manual_seed(0)
    return TinyVimLike().eval()


@pytest.fixture
def tiny_images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(12, 3, 16, 16, generator=g)
