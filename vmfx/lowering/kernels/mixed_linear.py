"""``mixed_qlinear``: OuroMamba's mixed-precision linear, inlier GEMM + outlier-column GEMM.

What it computes (the contract is in :mod:`vmfx.lowering.reference`, section "OuroMamba"), for
rows ``r`` = (sample, step) of an (M, K) activation given as codes (:class:`MixedCodes`)::

    acc_i[r, n] = sum_k qi[r, k] Wq[n, k]                              int8 x int8 -> int32
    acc_o[r, n] = sum_{j < count[tile]} qo[r, c_j] Wq[n, c_j]          c_j = columns[tile, j]
    y[r, n]     = float(acc_i) (s_i[t] s_w[n]) + float(acc_o) (s_o[r] s_w[n]) + bias[n]

One program per (BLOCK_M, BLOCK_N) output tile: a K loop of int8 dots over the inlier codes (the
ordinary int8 / int4 GEMM; 4-bit weights are int8 codes in [-7, 7] here, unpacked), then a loop of
BLOCK_J gathered outlier columns of the tile's index list: the outlier codes and the weight rows
of those columns are gathered (``c_j``) and multiplied in a second int8 dot, with their own
per-row scales in the epilogue. Outlier codes of more than 8 bits (W4A8O16) are int16 and split
in registers into two int8 planes, ``q = 256 hi + lo + 128`` (``hi = q >> 8``, ``lo = (q & 255) -
128``, both in [-128, 127]), so the second product is ``256 dot(hi, W) + dot(lo, W) + 128 sum_j W``,
exact in int32 while ``2^(o-1) max_n sum_k |Wq[n, k]| < 2^31`` (checked by the launcher).

The index list is per row tile (the union of the outlier sets of the tile's rows; a row whose own
set lacks a column has code 0 there): :func:`~vmfx.lowering.mixed_reference.tile_outlier_columns` builds
it for the launch's BLOCK_M, so the results do not depend on the tiling. ``y`` is computed in
float32 and written in ``out_dtype`` (float32, float16 or bfloat16: the model's dtype), rounded once
at the store.

Memory traffic: M K int8 inlier codes and N K weight bytes as the plain GEMM, plus per row tile
J gathered columns of outlier codes (1 or 2 bytes) and J gathered weight rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..codegen import (
    FLOAT_IO,
    check_tensor,
    interpreting,
    kernel_cache,
    launch_options,
    next_power_of_2,
    output_dtype,
    render_preamble,
    store_value,
)
from ..mixed_reference import MixedCodes, tile_outlier_columns
from ..params import QWeight
from ..template import KernelTemplate, lines

__all__ = ["KERNEL_NAME", "TEMPLATE", "render_mixed_qlinear", "mixed_qlinear"]

KERNEL_NAME = "vmfx_mixed_qlinear"


#: The ``mixed_qlinear`` kernel: the inlier GEMM (main loop), the outlier columns' gathered GEMM
#: (``$outlier_product``: int8 codes, or 16-bit codes as two int8 planes), the epilogue; slots also
#: for the optional arguments, the bias and the accumulators' stores.
TEMPLATE = KernelTemplate("""
    @triton.jit
    def $kernel_name(
        qi_ptr, qo_ptr, si_ptr, so_ptr, cols_ptr, counts_ptr,
        w_ptr, w_scale_ptr,
        $bias_arg
        out_ptr,$acc_args
        M, N, K, L, J,
        stride_wn, stride_wk,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
    ):
        num_pid_n = tl.cdiv(N, BLOCK_N)
        pid = tl.program_id(0)
        pid_m = pid // num_pid_n
        pid_n = pid % num_pid_n
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N

        # inliers: the int8 GEMM over every column (codes are 0 at outlier positions)
        acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            a = tl.load(qi_ptr + offs_m[:, None] * K + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0)
            w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                        mask=mask_k[:, None] & mask_n[None, :], other=0)
            acc_i = tl.dot(a, w, acc_i, out_dtype=tl.int32)

        # outliers: the tile's index list of outlier columns, gathered, a second int8 product
        count = tl.load(counts_ptr + pid_m)
        acc_o = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for j0 in range(0, J, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            mask_j = offs_j < count
            c = tl.load(cols_ptr + pid_m * J + offs_j, mask=mask_j, other=0)
            wg = tl.load(w_ptr + c[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                         mask=mask_j[:, None] & mask_n[None, :], other=0)
            qo = tl.load(qo_ptr + offs_m[:, None] * K + c[None, :],
                         mask=mask_m[:, None] & mask_j[None, :], other=0)
            $outlier_product
        # epilogue: inliers with the static per-token scale, outliers with their per-row scale
        si = tl.load(si_ptr + offs_m % L, mask=mask_m, other=0.0)[:, None]
        so = tl.load(so_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
        sw = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        y = acc_i.to(tl.float32) * (si * sw)
        y = y + acc_o.to(tl.float32) * (so * sw)
        $bias
        offs_out = offs_m[:, None] * N + offs_n[None, :]
        mask_out = mask_m[:, None] & mask_n[None, :]
        tl.store(out_ptr + offs_out, $stored, mask=mask_out)
        $store_acc
""")

#: The outlier product of 16-bit codes, split into two int8 planes.
_WIDE_OUTLIER_PRODUCT = """
    # 16-bit codes as two int8 planes: q = 256 hi + lo + 128
    q32 = qo.to(tl.int32)
    hi = (q32 >> 8).to(tl.int8)
    lo = ((q32 & 255) - 128).to(tl.int8)
    part = tl.dot(hi, wg, out_dtype=tl.int32) * 256 + tl.dot(lo, wg, out_dtype=tl.int32)
    acc_o += part + 128 * tl.sum(wg.to(tl.int32), axis=0)[None, :]
"""


def render_mixed_qlinear(*, bias: bool = True, wide_outliers: bool = False, store_acc: bool = False,
                         provenance: Sequence[str] = (), out_dtype: str = "float32") -> str:
    """Render the source of one ``mixed_qlinear`` kernel.

    Args:
        bias: add a (N,) bias.
        wide_outliers: outlier codes are int16 (9..16 bits), split into two int8 planes.
        store_acc: also write the two int32 accumulators (tests, debugging).
        provenance: the FX nodes this kernel implements (written in the header).
        out_dtype: the dtype of ``y`` ("float32", "float16" or "bfloat16").
    """
    stored = store_value("y", out_dtype)  # checks out_dtype
    params = dict(bias=bias, wide_outliers=wide_outliers, store_acc=store_acc)
    if out_dtype != "float32":
        params["out_dtype"] = out_dtype
    return render_preamble("mixed_qlinear", provenance, params) + TEMPLATE.fill(
        kernel_name=KERNEL_NAME,
        bias_arg="bias_ptr," if bias else "",
        acc_args=" acc_i_ptr, acc_o_ptr," if store_acc else "",
        outlier_product=lines(_WIDE_OUTLIER_PRODUCT) if wide_outliers
        else "acc_o = tl.dot(qo, wg, acc_o, out_dtype=tl.int32)",
        bias="y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]" if bias else "",
        stored=stored,
        store_acc=lines("tl.store(acc_i_ptr + offs_out, acc_i, mask=mask_out)",
                        "tl.store(acc_o_ptr + offs_out, acc_o, mask=mask_out)") if store_acc else "",
    )


@dataclass(frozen=True)
class _Spec:
    bias: bool
    wide_outliers: bool
    store_acc: bool
    provenance: tuple
    out_dtype: str = "float32"


_load = kernel_cache(render_mixed_qlinear, KERNEL_NAME)


def _kernel(spec: _Spec):
    """The compiled kernel of ``spec`` (memoized by :func:`~vmfx.lowering.codegen.kernel_cache`)."""
    return _load(bias=spec.bias, wide_outliers=spec.wide_outliers, store_acc=spec.store_acc,
                 provenance=spec.provenance, out_dtype=spec.out_dtype)


def _default_blocks(m: int, n: int, k: int) -> dict:
    cap = lambda v, hi: max(16, min(hi, next_power_of_2(v)))  # noqa: E731
    return {"BLOCK_M": cap(m, 64), "BLOCK_N": cap(n, 128), "BLOCK_K": cap(k, 64), "BLOCK_J": 32}


def mixed_qlinear(codes: MixedCodes, weight: QWeight, bias: torch.Tensor | None = None, *,
                  block: Mapping[str, int] | None = None, provenance: Sequence[str] = (), return_acc: bool = False,
                  out_dtype: torch.dtype = torch.float32):
    """Launch the mixed-precision linear on :class:`MixedCodes` (M, K); the reference is
    :func:`vmfx.lowering.mixed_reference.mixed_qlinear`.

    Args:
        codes: the activation's inlier and outlier codes and scales.
        weight: the quantized weight (N, K), int8 codes (4-bit codes unpacked).
        bias: optional (N,) float32.
        block: BLOCK_M / BLOCK_N / BLOCK_K / BLOCK_J (and num_warps, num_stages); default: large
            tiles (the interpreter) or 64 x 128 x 64, J 32 on a GPU.
        return_acc: also return the two int32 accumulators.
        out_dtype: the dtype of ``y``: float32 (default), float16 or bfloat16.

    Returns:
        ``y`` (M, N) in ``out_dtype``, or ``(y, acc_in, acc_out)``.

    Raises:
        ValueError: shapes, dtypes or devices that do not fit (named), or outlier codes wide enough
            to overflow the int32 accumulator.
    """
    out_dtype = output_dtype(out_dtype, torch.float32)
    dev = codes.codes_in.device
    m, k = codes.codes_in.shape
    n = weight.codes.shape[0]
    check_tensor(codes.codes_in, "codes.codes_in", torch.int8, (m, k), dev, True)
    wide = codes.codes_out.dtype == torch.int16
    check_tensor(codes.codes_out, "codes.codes_out", torch.int16 if wide else torch.int8, (m, k), dev, True)
    check_tensor(codes.scale_out, "codes.scale_out", torch.float32, (m,), dev, True)
    t = codes.tokens
    check_tensor(codes.scale_in, "codes.scale_in", torch.float32, (t,), dev, True)
    if m % t:
        raise ValueError(f"the activation has {m} rows, not a multiple of the {t} tokens of its scales")
    check_tensor(weight.codes, "weight.codes", torch.int8, (n, k), dev)
    check_tensor(weight.scale, "weight.scale", torch.float32, (n,), dev, True)
    if bias is not None:
        check_tensor(bias, "bias", torch.float32, (n,), dev, True)
    bound = 2 ** (codes.out_bits - 1) * int(weight.codes.abs().sum(1, dtype=torch.int64).max()) if n else 0
    if wide and bound >= 2**31:
        raise ValueError(f"{codes.out_bits}-bit outlier codes with these weights could overflow the int32 "
                         f"accumulator (bound {bound}); use 8-bit outliers or narrower weights")
    blk = {**_default_blocks(m, n, k), **dict(block or {})}
    opts = launch_options(blk.pop("num_warps", 4), blk.pop("num_stages", 2))
    columns, counts = tile_outlier_columns(codes.mask, blk["BLOCK_M"])
    out = torch.empty((m, n), dtype=out_dtype, device=dev)
    spec = _Spec(bias is not None, wide, return_acc, tuple(str(p) for p in provenance), FLOAT_IO[out_dtype])
    args = dict(qi_ptr=codes.codes_in, qo_ptr=codes.codes_out, si_ptr=codes.scale_in, so_ptr=codes.scale_out,
                cols_ptr=columns, counts_ptr=counts, w_ptr=weight.codes, w_scale_ptr=weight.scale, out_ptr=out,
                M=m, N=n, K=k, L=t, J=columns.shape[1],
                stride_wn=weight.codes.stride(0), stride_wk=weight.codes.stride(1))
    if bias is not None:
        args["bias_ptr"] = bias
    if return_acc:
        acc_i = torch.empty((m, n), dtype=torch.int32, device=dev)
        acc_o = torch.empty((m, n), dtype=torch.int32, device=dev)
        args.update(acc_i_ptr=acc_i, acc_o_ptr=acc_o)
    grid = (-(-m // blk["BLOCK_M"]) * -(-n // blk["BLOCK_N"]),)
    _kernel(spec)[grid](**args, **blk, **opts)
    return (out, acc_i, acc_o) if return_acc else out
