"""The exact reference of OuroMamba's mixed-precision linear (inlier GEMM + outlier-column GEMM),
the oracle of :mod:`vmfx.lowering.kernels.mixed_linear` and its CPU backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .params import QWeight
from .reference import rint

__all__ = ["MixedCodes", "mixed_codes", "tile_outlier_columns", "mixed_qlinear"]


# ------------------------------------------------------------------------------ OuroMamba's mixed-precision linear
#
# The mixed-precision linear of OuroMamba-Quant. Its activation (rows r = (sample, step) pairs,
# t = r % T) is split by the quantizer's outlier mask into
#
#     inliers   qi[r, k] = clamp(rint(x[r, k] / s_i[t]), -(2^(b-1)-1), 2^(b-1)-1)   (0 where outlier)
#     outliers  qo[r, k] = clamp(rint(x[r, k] / s_o[r]), -(2^(o-1)-1), 2^(o-1)-1)   (0 where inlier)
#
# (symmetric, one static inlier scale per token, one dynamic outlier scale per row), and
#
#     acc_i[r, n] = sum_k qi[r, k] Wq[n, k]                      int32, every column
#     acc_o[r, n] = sum_{k in U(tile)} qo[r, k] Wq[n, k]         int32, the tile's outlier columns
#     y[r, n]     = float(acc_i) * (s_i[t] s_w[n]) + float(acc_o) * (s_o[r] s_w[n]) + bias[n]
#
# U(tile) is the union of the outlier columns of the rows of one BLOCK_M row tile (the kernel's
# per-window index list, :func:`tile_outlier_columns`); a row whose own set lacks a column of the
# union has qo = 0 there, so acc_o does not depend on the tiling. Outlier codes of more than 8 bits
# (W4A8O16) are split in the kernel into two int8 planes, q = 256 hi + (lo + 128), so the second
# product also runs on int8 operands.


@dataclass(frozen=True, eq=False)
class MixedCodes:
    """The integer form of one mixed-precision activation, (M, K) rows (sample, step).

    Attributes:
        codes_in: (M, K) int8 symmetric inlier codes, 0 at outlier positions.
        scale_in: (T,) float32 static inlier scales (T = 1 or the number of steps).
        codes_out: (M, K) int8 (outlier bits <= 8) or int16 codes, 0 at inlier positions.
        scale_out: (M,) float32 dynamic outlier scales.
        mask: (M, K) bool, True at outlier positions.
        in_bits, out_bits: the two bit widths.
    """

    codes_in: torch.Tensor
    scale_in: torch.Tensor
    codes_out: torch.Tensor
    scale_out: torch.Tensor
    mask: torch.Tensor
    in_bits: int
    out_bits: int

    @property
    def tokens(self) -> int:
        return self.scale_in.numel()


def mixed_codes(x: torch.Tensor, quantizer) -> MixedCodes:
    """Quantize ``x`` (the input of a linear, e.g. (B, L, K) token-major) with a
    :class:`~vmfx.quant.mixed.MixedPrecisionQuantize` into :class:`MixedCodes` (rows in the
    quantizer's (sample, step) order). Only symmetric quantizers feed linears.

    Raises:
        ValueError: an asymmetric quantizer (OuroMamba's delta variant feeds the scan, not a GEMM).
    """
    if not quantizer.spec.symmetric:
        raise ValueError("the mixed-precision linear takes symmetric inlier codes; this quantizer is asymmetric")
    parts = quantizer.quantize_parts(x)
    s, p, k = parts["mask"].shape
    out_dtype = torch.int8 if quantizer.outlier_bits <= 8 else torch.int16
    return MixedCodes(
        parts["codes_in"].reshape(s * p, k).to(torch.int8).contiguous(),
        parts["scale_in"].reshape(-1).contiguous(),
        parts["codes_out"].reshape(s * p, k).to(out_dtype).contiguous(),
        parts["scale_out"].reshape(-1).contiguous(),
        parts["mask"].reshape(s * p, k).contiguous(),
        quantizer.spec.bits, quantizer.outlier_bits,
    )


def tile_outlier_columns(mask: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-tile outlier column lists of an (M, K) mask for row tiles of ``block_m`` rows.

    Returns:
        ``(columns, counts)``: (tiles, J) int32, each row the sorted outlier columns of one tile
        padded with 0 (J = the largest count, at least 1), and (tiles,) int32 counts.
    """
    m, k = mask.shape
    tiles = -(-m // block_m)
    pad = tiles * block_m - m
    mm = torch.cat([mask, mask.new_zeros(pad, k)]) if pad else mask
    union = mm.view(tiles, block_m, k).any(dim=1)
    counts = union.sum(dim=1, dtype=torch.int32)
    j = max(int(counts.max()) if counts.numel() else 0, 1)
    cols = torch.arange(k, device=mask.device).expand(tiles, k)
    order = torch.where(union, cols, cols + k).sort(dim=1).values[:, :j]  # outlier columns first, in order
    columns = torch.where(order < k, order, torch.zeros_like(order)).to(torch.int32).contiguous()
    return columns, counts.contiguous()


def mixed_qlinear(codes: MixedCodes, weight: QWeight, bias: torch.Tensor | None = None, return_acc: bool = False):
    """The mixed-precision linear (see the section comment): exact integer products (float64 sums
    of integers, exact below 2^53), then the float32 dequantization in the kernel's order.

    Returns:
        ``y`` (M, N) float32, or ``(y, acc_in, acc_out)`` with the two int32 accumulators.
    """
    m, k = codes.codes_in.shape
    n, kw = weight.codes.shape
    if k != kw:
        raise ValueError(f"the activation has K={k} but the weight is {tuple(weight.codes.shape)}")
    wq = weight.codes.double()
    acc_in = codes.codes_in.double() @ wq.T
    acc_out = codes.codes_out.double() @ wq.T
    for name, acc in (("inlier", acc_in), ("outlier", acc_out)):
        if acc.numel() and float(acc.abs().max()) >= 2**31:
            raise OverflowError(f"the int32 {name} accumulator would overflow (K or the outlier bits too large)")
    t = codes.tokens
    tok = torch.arange(m, device=codes.codes_in.device) % t
    sw = weight.scale[None, :]
    y = acc_in.float() * (codes.scale_in[tok][:, None] * sw)
    y = y + acc_out.float() * (codes.scale_out[:, None] * sw)
    if bias is not None:
        y = y + bias.float()[None, :]
    return (y, acc_in.to(torch.int32), acc_out.to(torch.int32)) if return_acc else y
