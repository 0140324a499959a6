"""``hadamard_qlinear``: the online Hadamard of a linear's input as the prologue of that linear's
quantized GEMM: float rows in, the linear's float output out, in one launch.

What it computes, for rows ``r`` of a (M, K) float input (``t = r % T``; T = L per-token, 1
per-tensor), ``K = 2^k m`` with ``m`` in :data:`~vmfx.quant.online_hadamard.FAST_BASES` and
``P = 2^k >= 32``, or ``P = 16`` and ``m`` even
(:func:`~vmfx.quant.online_hadamard.fits_gemm_prologue`)::

    a[r]      = codes of x[r] H / sqrt(K)            (kernels.hadamard.hadamard_quantize's formula)
    acc[r, n] = sum_c a[r, c] * Wq[n, c] + (2^(b-1) - z_a[t]) * wsum[n]                     int32
    y[r, n]   = float(acc[r, n]) * (s_a[t] * s_w[n]) + bias[n]          then the epilogue ops

which is :func:`vmfx.lowering.reference.hadamard_qlinear` (``reference.hadamard_quantize``, then
``reference.qlinear`` on the codes) bit for bit: the rotation's float32 operations are those of
:func:`~vmfx.quant.online_hadamard.fast_hadamard_transform` in its order (the column source of
:mod:`vmfx.lowering.kernels.hadamard`, :func:`~vmfx.lowering.kernels.hadamard.rotated_codes_source`,
is spliced in as it is), the accumulator is exact, and the dequantize and the epilogue are
``qlinear``'s (:func:`~vmfx.lowering.kernels.linear.dequantize_source`, the same tile order).

How: one program per (BLOCK_M, BLOCK_N) output tile, in ``qlinear``'s grouped order. Its prologue
loads its BLOCK_M rows as ``m`` tiles ``x_b`` (BLOCK_M, P) of channels ``a m + b``. Then for each
base-product column ``j`` it forms the codes of channels ``a m + j`` (the signed sum of the tiles,
``k`` butterfly stages, ``1 / sqrt(K)``, smoothing, quantize: all in registers) and, because an
integer dot product over K does not depend on the order of K, multiplies them at once with the
weight rows of the same channels: ``acc += tl.dot(codes (BLOCK_M, G P) int8, Wq (G P, BLOCK_N)
int8)``, ``Wq`` a strided load of the weight's columns ``a m + j``. An int8 ``tl.dot`` needs K >= 32
on NVIDIA GPUs (:data:`~vmfx.quant.online_hadamard.GEMM_PROLOGUE_DOT_K`), so where P = 16 each dot
takes G = 2 base-product columns (``j``, ``j + 1``; their codes interleaved, row ``a G + h`` holding
channel ``a m + j + h``); G = 1 where P >= 32. 4-bit weights packed two per byte
(:func:`~vmfx.lowering.reference.pack_int4`: byte ``c`` holds column ``c`` in its low nibble and
column ``c + K / 2`` in its high nibble) are read per row at the byte and nibble of its column.
The zero-point correction, the dequantize, the bias and the epilogue follow as in ``qlinear``.
``x H`` and the codes never reach memory: against ``hadamard_quantize`` + ``qlinear`` on its
codes, one launch less and ``2 M K`` bytes less (the codes written and read back).

Cost: the rotation and the quantize are redone by every program of a row of output tiles, i.e.
``N / BLOCK_N`` times per row: ``O(K (m + log2 P))`` float additions per row and tile against the
tile's ``K BLOCK_N`` int8 multiply-adds (at Vim-S, K = 768 = 12 x 64, BLOCK_N = 128: 768 x 18
additions against 98,304 MACs per row). Registers: the ``m`` tiles hold BLOCK_M x K float32 values,
so the GPU configs keep BLOCK_M small. Reads ``s M K`` bytes of floats (s = 4 float32, 2 half
precision) once per column of output tiles (mostly from L2), the weight once per row of tiles.

Where it does not apply (a dot shallower than 32: widths like 48 = 12 x 4 or 16; bases outside
:data:`~vmfx.quant.online_hadamard.FAST_BASES`), the lowering keeps the two launches
(``hadamard_quantize``, then ``qlinear`` on its codes);
:func:`~vmfx.quant.online_hadamard.fits_gemm_prologue` says which.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ...quant.online_hadamard import FAST_BASES, fast_hadamard_factors, fits_gemm_prologue
from ..codegen import (
    FLOAT_IO,
    Epilogue,
    check_tensor,
    interpreting,
    kernel_cache,
    launch_options,
    next_power_of_2,
    render_preamble,
)
from ..params import ActQuant, QWeight
from ..template import KernelTemplate, lines
from .act_quantize import act_params_source
from .hadamard import rotated_codes_source, tile_loads_source
from .linear import INT_GEMM, TILE_ORDER, epilogue_operands, output_source, weight_operand

__all__ = ["KERNEL_NAME", "AUTOTUNE_CONFIGS", "TEMPLATE", "GROUP", "WEIGHT_ROWS", "render_hadamard_qlinear",
           "hadamard_qlinear"]

KERNEL_NAME = "vmfx_hadamard_qlinear"

#: GPU configs tried by ``@triton.autotune`` (keyed on M, N, K); BLOCK_M stays small because the
#: prologue holds BLOCK_M x K float32 values in registers.
AUTOTUNE_CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_N": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 16, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 32, "BLOCK_N": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 32, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 2},
]

#: The ``hadamard_qlinear`` kernel; slots: the optional pointer arguments, P and m, the tile order
#: (``qlinear``'s), the activation parameters, the loads of the m tiles, the int32 GEMM over the
#: rotated codes (``qlinear``'s :data:`~vmfx.lowering.kernels.linear.INT_GEMM` with
#: :data:`WEIGHT_ROWS` and one :data:`GROUP` per group of base-product columns as its main loop),
#: and ``qlinear``'s :data:`~vmfx.lowering.kernels.linear.OUTPUT` (dequantize, epilogue, stores).
TEMPLATE = KernelTemplate("""
    @triton.jit
    def $kernel_name(
        # pointers: float input x (M, K), int8 weight (N, K) (or 4-bit packed, (N, K / 2)) and its
        # row sums (int32) and scales, activation parameters, bias, epilogue inputs
        x_ptr, w_ptr, wsum_ptr, w_scale_ptr,$smooth_arg
        inv_sa_ptr, sa_ptr, za_ptr,
        $bias_arg
        $epilogue_args
        out_ptr,$acc_arg
        # dimensions (L: number of token positions of the activation parameters)
        M, N, K, L,
        # strides
        stride_xm, stride_xk, stride_wn, stride_wk,
        # meta-parameters
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        P: tl.constexpr = $p  # 2^k: the Sylvester factor; the base factor m = $m is unrolled
        DOT_K: tl.constexpr = $dot_k  # K of each dot: $columns of P channels
        $tile_order
        # activation parameters of each row's token (rows are (batch, token) pairs)
        $act_params

        # prologue: channel a * $m + b of the tile's rows, as $m tiles x_b of shape (BLOCK_M, P)
        offs_a = tl.arange(0, P)
        mask = mask_m[:, None] & (offs_a < P)[None, :]
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        $loads

        # the int8 GEMM on the rotated codes, $columns at a time: codes of channels
        # a * $m + j times the weight rows of the same channels (the dot ignores K's order)
        $int_gemm

        $output
""")

#: One group of G base-product columns ``j .. j + G - 1`` (G = 1, or 2 where P = 16): their codes
#: rotated in registers (:data:`~vmfx.lowering.kernels.hadamard.ROTATED_CODES` each), interleaved
#: into one (BLOCK_M, G P) tile (row ``a G + h``: channel ``a m + j + h``), the weight rows of the
#: same channels (G P, BLOCK_N), one int8 dot into the accumulator.
GROUP = KernelTemplate("""
    $codes
    $weight_tile
    acc = tl.dot(codes, w, acc, out_dtype=tl.int32)
""")

#: The rows of one dot's weight tile, computed once: row ``r`` of the group of column ``j`` is the
#: weight column ``chan_r + j`` (``chan_r = (r // G) m + r % G``); packed 4-bit weights also need
#: each row's byte (``byte_r + j``) and nibble (``high_r``: the column is in the high half, ``>= K / 2``).
WEIGHT_ROWS = KernelTemplate("""
    offs_r = tl.arange(0, DOT_K)
    chan_r = (offs_r // $g) * $m + offs_r % $g  # the weight column of row r, for base-product column 0
    $packed_rows
""")

#: The packed rows: byte ``c`` holds column ``c`` (low nibble) and column ``c + K / 2`` (high nibble).
PACKED_ROWS = KernelTemplate("""
    high_r = chan_r >= $kh  # the column is a high nibble (the same for every column j of a group)
    byte_r = tl.where(high_r, chan_r - $kh, chan_r)
""")

#: The int8 weight rows of the group of column j (a strided load: every m-th column of the weight).
INT8_TILE = KernelTemplate("""
    w = tl.load(w_ptr + (chan_r + $j)[:, None] * stride_wk + offs_n[None, :] * stride_wn, mask=mask_n[None, :], other=0)
""")

#: The packed 4-bit weight rows of the group of column j, unpacked in registers.
PACKED_TILE = KernelTemplate("""
    p = tl.load(w_ptr + (byte_r + $j)[:, None] * stride_wk + offs_n[None, :] * stride_wn, mask=mask_n[None, :], other=0)
    p32 = p.to(tl.int32)  # shifts in int32 (arithmetic >>: sign-extends the nibble)
    w = tl.where(high_r[:, None], (p32 << 24) >> 28, (p32 << 28) >> 28).to(tl.int8)
""")


def _group_size(n: int) -> int:
    """G, the base-product columns per dot: ``tl.dot`` of int8 tiles needs K >= 32 on NVIDIA GPUs,
    so a Sylvester factor P = 16 takes two columns per dot (P >= 32: one)."""
    k, _ = fast_hadamard_factors(n)
    return max(1, 32 // 2**k)


def _group_codes(j: int, g: int, n: int, smooth: bool, act_bits: int) -> str:
    """The codes tile of the group of columns ``j .. j + g - 1``: each column's
    :func:`~vmfx.lowering.kernels.hadamard.rotated_codes_source`, interleaved (``tl.join``)."""
    if g == 1:
        return rotated_codes_source(j, n, smooth, act_bits)
    return lines(rotated_codes_source(j, n, smooth, act_bits), "codes_lo = codes",
                 rotated_codes_source(j + 1, n, smooth, act_bits),
                 "codes = tl.reshape(tl.join(codes_lo, codes), (BLOCK_M, DOT_K))  # row a * 2 + h: column j + h")


def _refuse(n: int) -> None:
    if not fits_gemm_prologue(n):
        raise ValueError(f"hadamard_qlinear needs a width 2^k m with m in {FAST_BASES} and 2^k >= 32, or 2^k = 16 "
                         f"and m even (an int8 tl.dot is at least 32 deep), got {n}; run hadamard_quantize, "
                         "then qlinear on its codes")


def render_hadamard_qlinear(*, n: int, per_token: bool = True, smooth: bool = False, bias: bool = True,
                            act_bits: int = 8, packed: bool = False, epilogue: Sequence[Sequence] | Epilogue = (),
                            store_acc: bool = False, autotune: bool = False, provenance: Sequence[str] = (),
                            out_dtype: str = "float32") -> str:
    """Render the source of one ``hadamard_qlinear`` kernel (:data:`TEMPLATE`).

    Args:
        n: the input width K; ``2^k m`` with ``m`` in :data:`~vmfx.quant.online_hadamard.FAST_BASES`
            and ``2^k >= 32`` or ``2^k = 16`` with ``m`` even
            (:func:`~vmfx.quant.online_hadamard.fits_gemm_prologue`).
        per_token: per-token (T = L) activation parameters, else one scalar.
        smooth: multiply the rotated row by ``inv_s`` (n,) before quantizing.
        bias: add a (N,) bias.
        act_bits: activation bit width b.
        packed: the weight is 4-bit codes packed two per byte.
        epilogue: ops on the float output tile (:func:`vmfx.lowering.codegen.render_epilogue`).
        store_acc: also write the int32 accumulator (for tests and debugging).
        autotune: wrap in ``@triton.autotune`` over :data:`AUTOTUNE_CONFIGS`.
        provenance: the FX nodes this kernel implements (written in the header).
        out_dtype: "float32", "float16" or "bfloat16".

    Returns:
        The module source; the kernel is :data:`KERNEL_NAME`.
    """
    _refuse(n)
    if not 2 <= act_bits <= 8:
        raise ValueError(f"act_bits must be in 2..8, got {act_bits}")
    ep = epilogue if isinstance(epilogue, Epilogue) else Epilogue.parse(epilogue)
    k, m = fast_hadamard_factors(n)
    params = dict(n=n, k=k, m=m, per_token=per_token, smooth=smooth, bias=bias, act_bits=act_bits, packed=packed,
                  epilogue=ep.ops, store_acc=store_acc, autotune=autotune, out_dtype=out_dtype)
    preamble = render_preamble("hadamard_qlinear", provenance, params,
                               ("_vmfx_quantize",) + (("_vmfx_butterfly",) if k else ()) + ep.helpers,
                               (AUTOTUNE_CONFIGS, ["M", "N", "K"]) if autotune else None)
    g = _group_size(n)
    tile = PACKED_TILE if packed else INT8_TILE
    groups = lines(*(GROUP.fill(codes=_group_codes(j, g, n, smooth, act_bits),
                                weight_tile=tile.fill(j=str(j)).rstrip("\n")).rstrip("\n") for j in range(0, m, g)))
    rows = WEIGHT_ROWS.fill(g=str(g), m=str(m), packed_rows=PACKED_ROWS.fill(kh=str(n // 2)) if packed else "")
    main_loop = lines(rows.rstrip("\n"), groups)
    return preamble + TEMPLATE.fill(
        kernel_name=KERNEL_NAME,
        smooth_arg=" inv_s_ptr," if smooth else "",
        bias_arg="bias_ptr," if bias else "",
        epilogue_args=lines(f"{a}," for a in ep.arg_names()),
        acc_arg=" acc_ptr," if store_acc else "",
        p=str(2**k), m=str(m), dot_k=str(g * 2**k),
        columns="one base-product column j" if g == 1 else "two base-product columns j, j + 1",
        tile_order=lines(TILE_ORDER),
        act_params=lines("tok = offs_m % L" if per_token else None,
                         act_params_source(per_token, "tok", "mask_m", "[:, None]")),
        loads=tile_loads_source(m),
        int_gemm=INT_GEMM.fill(main_loop=main_loop, offset=str(2 ** (act_bits - 1))).rstrip("\n"),
        output=output_source(per_token, bias, ep, out_dtype, store_acc),
    )


_kernel = kernel_cache(render_hadamard_qlinear, KERNEL_NAME)


def hadamard_qlinear(
    x: torch.Tensor,
    weight: QWeight,
    act: ActQuant,
    bias: torch.Tensor | None = None,
    *,
    epilogue: Sequence[Sequence] = (),
    epilogue_inputs: Mapping[str, torch.Tensor] | None = None,
    block: Mapping[str, int] | None = None,
    provenance: Sequence[str] = (),
    return_acc: bool = False,
    out_dtype: torch.dtype | None = None,
):
    """Launch the online Hadamard + quantized linear layer (see the module docstring).

    Args:
        x: (…, K) float32 / float16 / bfloat16 activations, any strides; rows are (batch, token)
            pairs (per-token parameters: the second-to-last dimension of a 3-D input is L, a 2-D
            input has a multiple of L rows). ``K`` passes
            :func:`~vmfx.quant.online_hadamard.fits_gemm_prologue`.
        weight: the prepared weight (N, K), of the *rotated* input (it absorbed ``H^T``); its
            packed 4-bit codes are read where it carries them.
        act: the parameters of the rotated input (per-token or per-tensor; optional smoothing (K,),
            applied after the rotation).
        bias: optional (N,) float32.
        epilogue, epilogue_inputs: as for :func:`~vmfx.lowering.kernels.qlinear`.
        block: fixed ``BLOCK_M`` / ``BLOCK_N`` (``BLOCK_M >= 16``; optional ``GROUP_M``,
            ``num_warps``, ``num_stages``); default: autotuned on the GPU, one large-tile config
            under the interpreter.
        provenance: FX node names, for the generated source's header.
        return_acc: also return the int32 accumulator (…, N).
        out_dtype: float32, float16 or bfloat16; default: ``x``'s dtype when it is float16 or
            bfloat16, else float32.

    Returns:
        ``y`` (…, N) in ``out_dtype``, or ``(y, acc)``.

    Raises:
        ValueError: a width the kernel cannot rotate, wrong shapes, dtypes or devices (the message
            names the argument).
    """
    check_tensor(x, "x", tuple(FLOAT_IO))
    if out_dtype is None:
        out_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
    if out_dtype not in FLOAT_IO:
        raise ValueError(f"out_dtype must be one of {list(FLOAT_IO)}, got {out_dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must be (…, K) with rows and channels, got {tuple(x.shape)}")
    dev = x.device
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has K={x.shape[-1]} channels but the weight is {weight.shape}")
    _refuse(k)
    w_store, packed = weight_operand(weight, dev)
    t = act.tokens
    for name in ("scale", "inv_scale", "zero_point"):
        check_tensor(getattr(act, name), f"act.{name}", torch.float32, (t,), dev, True)
    if act.inv_smooth is not None:
        check_tensor(act.inv_smooth, "act.inv_smooth", torch.float32, (k,), dev, True)
    if t > 1 and ((x.dim() >= 3 and x.shape[-2] != t) or (x.dim() == 2 and x.shape[0] % t)):
        raise ValueError(f"x of shape {tuple(x.shape)} does not fit {t} per-token parameters")
    if bias is not None:
        check_tensor(bias, "bias", torch.float32, (n,), dev, True)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out_shape = tuple(x.shape[:-1]) + (n,)
    ep = Epilogue.parse(epilogue)
    args = dict(x_ptr=x2, w_ptr=w_store, wsum_ptr=weight.wsum, w_scale_ptr=weight.scale, inv_sa_ptr=act.inv_scale,
                sa_ptr=act.scale, za_ptr=act.zero_point, M=m, N=n, K=k, L=t,
                stride_xm=x2.stride(0), stride_xk=x2.stride(1),
                stride_wn=w_store.stride(0), stride_wk=w_store.stride(1),
                **epilogue_operands(ep, epilogue_inputs, out_shape, dev))
    out = args["out_ptr"] = torch.empty((m, n), dtype=out_dtype, device=dev)
    if act.inv_smooth is not None:
        args["inv_s_ptr"] = act.inv_smooth
    if bias is not None:
        args["bias_ptr"] = bias
    if return_acc:
        acc = args["acc_ptr"] = torch.empty((m, n), dtype=torch.int32, device=dev)
    autotune = block is None and not interpreting()
    kernel = _kernel(n=k, per_token=t > 1, smooth=act.inv_smooth is not None, bias=bias is not None,
                     act_bits=act.bits, packed=packed, epilogue=ep.ops, store_acc=return_acc, autotune=autotune,
                     provenance=tuple(str(p) for p in provenance), out_dtype=FLOAT_IO[out_dtype])
    if autotune:
        grid = lambda meta: (-(-m // meta["BLOCK_M"]) * -(-n // meta["BLOCK_N"]),)  # noqa: E731
        kernel[grid](**args, **launch_options())
    else:
        cap = lambda v, hi: max(16, min(hi, next_power_of_2(v)))  # noqa: E731
        blk = {"BLOCK_M": cap(m, 64), "BLOCK_N": cap(n, 128), "GROUP_M": 8, **dict(block or {})}
        opts = launch_options(blk.pop("num_warps", 4), blk.pop("num_stages", 2))
        kernel[(-(-m // blk["BLOCK_M"]) * -(-n // blk["BLOCK_N"]),)](**args, **blk, **opts)
    y = out.reshape(out_shape)
    return (y, acc.reshape(out_shape)) if return_acc else y
