"""A small float64 oracle for the quantization math, re-derived independently of vmfx.ops."""

from __future__ import annotations

import torch


def fake_quant_ref(x, scale, zero_point, qmin, qmax):
    """(clamp(round_half_even(x / s) + zp, qmin, qmax) - zp) * s in float64."""
    x, scale = x.double(), torch.as_tensor(scale, dtype=torch.float64)
    zero_point = torch.as_tensor(zero_point, dtype=torch.float64)
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.double(), test.double()
    noise = ((ref - test) ** 2).sum()
    return float(10 * torch.log10((ref**2).sum() / noise)) if noise > 0 else float("inf")


def local_scan_ref(grid: torch.Tensor, window: int) -> torch.Tensor:
    """LocalMamba's windowed scan of a (B, H, W, C) grid, re-derived with explicit loops in float64:
    zero-pad H and W up to multiples of ``window``, visit the windows in raster order and the tokens
    of each window in raster order. Returns (B, L_padded, C)."""
    B, H, W, C = grid.shape
    hg, wg = -(-H // window), -(-W // window)
    out = []
    for gi in range(hg):
        for gj in range(wg):
            for i in range(window):
                for j in range(window):
                    r, c = gi * window + i, gj * window + j
                    inside = r < H and c < W
                    out.append(grid[:, r, c].double() if inside else grid.new_zeros(B, C, dtype=torch.float64))
    return torch.stack(out, dim=1)
