"""``qlinear``: fused smoothing + static activation quantize + int8 GEMM + dequantize + epilogue.

What it computes (see :mod:`vmfx.lowering.reference` for the full numerics contract), for the
rows ``r`` of a (M, K) activation (``t = r % T``; T = 1 per-tensor, T = L per-token)::

    a[r, k]  = clamp(rint((x[r, k] * inv_s[k]) * inv_sa[t]) + z_a[t], 0, 2^b - 1) - 2^(b-1)   int8
    acc[r,n] = sum_k a[r, k] * Wq[n, k]  +  (2^(b-1) - z_a[t]) * wsum[n]                     int32
    y[r, n]  = float(acc[r, n]) * (s_a[t] * s_w[n]) + bias[n]          then the epilogue ops

``acc`` equals ``sum_k (q - z_a) * Wq`` exactly: shifting the unsigned codes to int8 lets the
product run on int8 tensor cores (``tl.dot`` of int8 tiles into int32), and the zero point is
folded back with one rank-1 correction per output tile. 4-bit weights are codes in [-7, 7],
stored one per int8 byte or, with ``packed=True`` (:meth:`~vmfx.lowering.reference.QWeight.pack`),
two per byte and unpacked in registers (half the weight bytes); 4-bit activations are codes in
[-8, 7]. With ``prequantized=True`` the kernel reads int8 codes (``q - 2^(b-1)``, written by an
upstream kernel's epilogue, e.g. ``conv`` or ``merge_quantize``) instead of float ``x``.

Input and output dtypes: float ``x`` may be float32, float16 or bfloat16 (converted to float32 in
registers); ``out`` is float32, float16 or bfloat16 (the float32 result rounded once at the store).

Blocking (Triton tutorial 03): one program per (BLOCK_M, BLOCK_N) output tile, in grouped order
(GROUP_M row tiles share each column of weight tiles, for L2 reuse); a loop over K in BLOCK_K
steps loads an int8 (or float, quantized in registers) (BLOCK_M, BLOCK_K) activation tile and
multiplies it with an int8 (BLOCK_K, BLOCK_N) weight tile.

Quantize once: quantizing float ``x`` inside the K loop redoes it once per column of output tiles
(N / BLOCK_N times). On a GPU the launcher therefore runs the standalone ``quantize`` kernel first
and the GEMM on its codes (``quantize_once``; measured 3.6x faster at the Vim-B in_proj shape on an
H200, ``benchmarks/results/kernels.md``); the fused form stays for the interpreter and the tests.

Memory traffic: reads M K bytes of codes (or 2-4 M K bytes of floats) once per column of output
tiles (mostly from L2), N K (N K / 2 packed) bytes of weights once per row of tiles, O(N + T + K)
parameters; writes 2 or 4 M N bytes (plus 4 M N for ``store_acc``, a debugging output).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..codegen import (
    FLOAT_IO,
    Epilogue,
    check_tensor,
    epilogue_source,
    float_literal,
    interpreting,
    kernel_cache,
    launch_options,
    next_power_of_2,
    render_preamble,
    store_value,
)
from ..params import ActQuant, QWeight
from ..template import KernelTemplate, lines
from .act_quantize import act_params_source

__all__ = ["KERNEL_NAME", "AUTOTUNE_CONFIGS", "TILE_ORDER", "TEMPLATE", "INT_GEMM", "INT8_LOOP", "PACKED_LOOP",
           "OUTPUT", "render_qlinear", "act_tile_source", "int_gemm_source", "dequantize_source", "output_source",
           "weight_operand",
           "epilogue_operands", "qlinear"]

KERNEL_NAME = "vmfx_qlinear"

#: GPU configs tried by ``@triton.autotune`` (keyed on M, N, K).
AUTOTUNE_CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    # larger tiles for Hopper-class GPUs (int8 wgmma tiles; more operand reuse per byte loaded)
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
]

#: Output dtypes the kernel can write (the float32 result of the epilogue, rounded once at the store).
OUT_DTYPES = FLOAT_IO


#: The program's output tile in the grouped ordering of Triton's matmul tutorial (GROUP_M row tiles
#: per column sweep, for L2 reuse): ``offs_m`` / ``offs_n`` and their masks. Shared by the GEMM
#: templates (``qlinear``, ``qlinear_group``).
TILE_ORDER = """
# grouped ordering of the output tiles (tutorial 03): GROUP_M row tiles per column sweep
pid = tl.program_id(0)
num_pid_m = tl.cdiv(M, BLOCK_M)
num_pid_n = tl.cdiv(N, BLOCK_N)
num_pid_in_group = GROUP_M * num_pid_n
group_id = pid // num_pid_in_group
first_pid_m = group_id * GROUP_M
group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
pid_n = (pid % num_pid_in_group) // group_size_m

offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
mask_m = offs_m < M
mask_n = offs_n < N
"""


#: The ``qlinear`` kernel; slots: the optional pointer arguments, the tile order
#: (:data:`TILE_ORDER`), the activation parameters, the int32 GEMM (:func:`int_gemm_source`) and
#: the output (:data:`OUTPUT`: dequantize, epilogue ops, stores).
TEMPLATE = KernelTemplate("""
    @triton.jit
    def $kernel_name(
        # pointers: activation (float x or int8 codes), int8 weight (N, K) and its
        # row sums (int32) and scales, activation parameters, bias, epilogue inputs
        x_ptr, w_ptr, wsum_ptr, w_scale_ptr,
        $smooth_arg
        ${inv_sa_arg}sa_ptr, za_ptr,
        $bias_arg
        $epilogue_args
        out_ptr,$acc_arg
        # dimensions (L: number of token positions of the activation parameters)
        M, N, K, L,
        # strides
        stride_xm, stride_xk, stride_wn, stride_wk,
        # meta-parameters
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        $tile_order
        # activation parameters of each row's token (rows are (batch, token) pairs)
        $act_params

        $int_gemm

        $output
""")

#: The end of a GEMM kernel that keeps an int32 accumulator ``acc`` of a (BLOCK_M, BLOCK_N) tile:
#: dequantize (:func:`dequantize_source`), bias, the epilogue ops, the store of ``y`` (and of ``acc``
#: where asked); filled by :func:`output_source`, shared with ``hadamard_qlinear``.
OUTPUT = KernelTemplate("""
    # dequantize: token x channel scales, then bias and the epilogue
    $dequantize
    offs_out = offs_m[:, None] * N + offs_n[None, :]  # out is contiguous (M, N)
    mask_out = mask_m[:, None] & mask_n[None, :]
    $epilogue
    tl.store(out_ptr + offs_out, $stored, mask=mask_out)
    $store_acc
""")

#: The int32 accumulator of a (BLOCK_M, BLOCK_N) tile: the K loop (``$main_loop``), then the
#: zero-point correction.
INT_GEMM = KernelTemplate("""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    $main_loop

    # zero point: acc += ($offset - z_a) * wsum, giving sum_k (q - z_a) * Wq exactly
    wsum = tl.load(wsum_ptr + offs_n, mask=mask_n, other=0)
    acc += ($offset - za.to(tl.int32)) * wsum[None, :]
""")

#: The K loop over int8 weight tiles; ``$act_tile`` loads the activation tile ``a``.
INT8_LOOP = KernelTemplate("""
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        $act_tile
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
""")

#: The K loop over packed 4-bit weight tiles: each byte's two nibbles are unpacked in registers
#: and multiplied with the activation columns ``j`` and ``j + KH`` (``$act_tile`` at each).
PACKED_LOOP = KernelTemplate("""
    KH = (K + 1) // 2  # packed columns: low nibble column j, high nibble column j + KH
    for k0 in range(0, KH, BLOCK_K):
        offs_j = k0 + tl.arange(0, BLOCK_K)
        mask_j = offs_j < KH
        w_ptrs = w_ptr + offs_j[:, None] * stride_wk + offs_n[None, :] * stride_wn
        p = tl.load(w_ptrs, mask=mask_j[:, None] & mask_n[None, :], other=0)
        p32 = p.to(tl.int32)  # shifts in int32 (arithmetic >>: sign-extends the nibble)
        w_lo = ((p32 << 28) >> 28).to(tl.int8)  # low nibble: column j
        w_hi = ((p32 << 24) >> 28).to(tl.int8)  # high nibble: column j + KH
        offs_k = offs_j
        mask_k = mask_j & (offs_k < K)
        $act_tile
        acc = tl.dot(a, w_lo, acc, out_dtype=tl.int32)
        offs_k = offs_j + KH
        mask_k = mask_j & (offs_k < K)
        $act_tile
        acc = tl.dot(a, w_hi, acc, out_dtype=tl.int32)
""")


def render_qlinear(
    *,
    per_token: bool = True,
    smooth: bool = False,
    bias: bool = True,
    prequantized: bool = False,
    act_bits: int = 8,
    epilogue: Sequence[Sequence] | Epilogue = (),
    store_acc: bool = False,
    autotune: bool = False,
    provenance: Sequence[str] = (),
    out_dtype: str = "float32",
    packed: bool = False,
) -> str:
    """Render the source of one ``qlinear`` kernel.

    Args:
        per_token: per-token (T = L) activation parameters, else one scalar (per-tensor).
        smooth: multiply ``x`` by ``inv_s`` (K,) before quantizing (not with ``prequantized``).
        bias: add a (N,) bias.
        prequantized: read int8 codes instead of float ``x``.
        act_bits: activation bit width b (codes [0, 2^b - 1], offset 2^(b-1)).
        epilogue: ops on the float output tile (see :func:`vmfx.lowering.codegen.render_epilogue`).
        store_acc: also write the int32 accumulator (for tests and debugging).
        autotune: wrap in ``@triton.autotune`` over :data:`AUTOTUNE_CONFIGS`; otherwise the block
            sizes are ``tl.constexpr`` arguments the launcher passes.
        provenance: the FX nodes this kernel implements (written in the header).
        out_dtype: "float32", "float16" or "bfloat16": the dtype of ``out`` (the float32 result is
            rounded once, at the store).
        packed: the weight is 4-bit codes packed two per byte (:meth:`QWeight.pack`): byte
            ``(n, j)`` holds column ``j`` in its low nibble and column ``j + Kh`` in its high nibble
            (``Kh = ceil(K / 2)``); the loop runs over ``Kh``, unpacks both nibbles in registers
            (sign-extending shifts) and does two dots per step, against the activation columns
            ``j`` and ``j + Kh``. Half the weight bytes of the int8 layout.

    Returns:
        The module source; the kernel is called :data:`KERNEL_NAME`.
    """
    if out_dtype not in OUT_DTYPES.values():
        raise ValueError(f"out_dtype must be one of {sorted(OUT_DTYPES.values())}, got {out_dtype!r}")
    if prequantized and smooth:
        raise ValueError("pre-quantized input is already smoothed: smooth must be False")
    if not 2 <= act_bits <= 8:
        raise ValueError(f"act_bits must be in 2..8, got {act_bits}")
    ep = epilogue if isinstance(epilogue, Epilogue) else Epilogue.parse(epilogue)
    qmax, off = 2**act_bits - 1, 2 ** (act_bits - 1)
    params = dict(per_token=per_token, smooth=smooth, bias=bias, prequantized=prequantized, act_bits=act_bits,
                  epilogue=ep.ops, store_acc=store_acc, autotune=autotune, out_dtype=out_dtype, packed=packed)
    preamble = render_preamble("qlinear", provenance, params,
                               (() if prequantized else ("_vmfx_quantize",)) + ep.helpers,
                               (AUTOTUNE_CONFIGS, ["M", "N", "K"]) if autotune else None)
    if prequantized:
        act_params = lines("tok = offs_m % L" if per_token else None,
                           "za = tl.load(za_ptr + tok, mask=mask_m, other=0.0)[:, None]" if per_token
                           else "za = tl.load(za_ptr)")
    else:
        act_params = lines("tok = offs_m % L" if per_token else None,
                           act_params_source(per_token, "tok", "mask_m", "[:, None]"))
    return preamble + TEMPLATE.fill(
        kernel_name=KERNEL_NAME,
        smooth_arg="inv_s_ptr," if smooth else "",
        inv_sa_arg="" if prequantized else "inv_sa_ptr, ",
        bias_arg="bias_ptr," if bias else "",
        epilogue_args=lines(f"{a}," for a in ep.arg_names()),
        acc_arg=" acc_ptr," if store_acc else "",
        tile_order=lines(TILE_ORDER),
        act_params=act_params,
        int_gemm=int_gemm_source(packed, prequantized, smooth, qmax, off),
        output=output_source(per_token, bias, ep, out_dtype, store_acc),
    )


def act_tile_source(prequantized: bool, smooth: bool, qmax: int, off: int) -> str:
    """The (BLOCK_M, BLOCK_K) int8 activation tile ``a`` at columns ``offs_k`` (mask ``mask_k``):
    int8 codes loaded as they are, or a float tile (optionally smoothed) quantized in registers."""
    head = lines("x_mask = mask_m[:, None] & mask_k[None, :]",
                 "x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk")
    if prequantized:
        return lines(head, "a = tl.load(x_ptrs, mask=x_mask, other=0)  # int8 codes q - OFFSET")
    return lines(
        head,
        "# read a float BLOCK_M x BLOCK_K tile; quantize in registers (padding: w is 0 there)",
        "x = tl.load(x_ptrs, mask=x_mask, other=0.0).to(tl.float32)",
        "x = x * tl.load(inv_s_ptr + offs_k, mask=mask_k, other=1.0)[None, :]" if smooth else None,
        f"a = _vmfx_quantize(x, inv_sa, za, 0.0, {float_literal(qmax)}, {float_literal(off)})",
    )


def int_gemm_source(packed: bool, prequantized: bool, smooth: bool, qmax: int, off: int) -> str:
    """The int32 accumulator ``acc`` of a (BLOCK_M, BLOCK_N) tile (:data:`INT_GEMM` with
    :data:`INT8_LOOP` or :data:`PACKED_LOOP`): ``sum_k (q - z_a) * Wq`` exactly. Reads ``offs_m``,
    ``offs_n``, ``mask_m``, ``mask_n``, ``za`` and the pointers; shared by ``qlinear`` and
    ``qlinear_group``."""
    loop = PACKED_LOOP if packed else INT8_LOOP
    main_loop = loop.fill(act_tile=act_tile_source(prequantized, smooth, qmax, off))
    return INT_GEMM.fill(main_loop=main_loop.rstrip("\n"), offset=str(off)).rstrip("\n")


def output_source(per_token: bool, bias: bool, ep: Epilogue, out_dtype: str, store_acc: bool) -> str:
    """:data:`OUTPUT` filled: the dequantize of ``acc`` into ``y``, the epilogue, the store in
    ``out_dtype`` (and ``acc`` into ``acc_ptr`` with ``store_acc``)."""
    return OUTPUT.fill(
        dequantize=dequantize_source(per_token, bias),
        epilogue=epilogue_source(ep, acc="y", offsets="offs_out", mask="mask_out"),
        stored=store_value("y", out_dtype),
        store_acc="tl.store(acc_ptr + offs_out, acc, mask=mask_out)" if store_acc else "",
    ).rstrip("\n")


def dequantize_source(per_token: bool, bias: bool) -> str:
    """``y = acc * (s_a s_w) (+ bias)`` in float32: per-token (``tok``) or per-tensor activation scale."""
    return lines(
        "sa = tl.load(sa_ptr + tok, mask=mask_m, other=0.0)[:, None]" if per_token else "sa = tl.load(sa_ptr)",
        "sw = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]",
        "y = acc.to(tl.float32) * (sa * sw)",
        "y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]" if bias else None,
    )


@dataclass(frozen=True)
class _Spec:
    per_token: bool
    smooth: bool
    bias: bool
    prequantized: bool
    act_bits: int
    epilogue: tuple
    store_acc: bool
    autotune: bool
    provenance: tuple
    out_dtype: str = "float32"
    packed: bool = False


_load = kernel_cache(render_qlinear, KERNEL_NAME)


def _kernel(spec: _Spec):
    """The compiled kernel of ``spec`` (memoized by :func:`~vmfx.lowering.codegen.kernel_cache`)."""
    return _load(**{k: getattr(spec, k) for k in spec.__dataclass_fields__})


def _default_blocks(m: int, n: int, k: int) -> dict:
    """Fixed blocks for the interpreter: large tiles (few, big numpy ops)."""
    cap = lambda v, hi: max(16, min(hi, next_power_of_2(v)))  # noqa: E731
    return {"BLOCK_M": cap(m, 128), "BLOCK_N": cap(n, 128), "BLOCK_K": cap(k, 64), "GROUP_M": 8}


def qlinear(
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
    quantize_once: bool | None = None,
):
    """Launch the fused quantized linear layer.

    Args:
        x: (…, K) float32 / float16 / bfloat16 activations, or int8 codes ``q - 2^(b-1)`` from an upstream kernel
            (the pre-quantized variant is chosen by dtype). Rows are (batch, token) pairs: for
            per-token parameters the second-to-last dimension (3-D input) must be L, and a 2-D
            input must have a multiple of L rows. Any strides.
        weight: the prepared weight (N, K); when it carries packed 4-bit codes
            (:meth:`QWeight.pack`) the GEMM reads those (half the bytes).
        act: activation parameters (per-token or per-tensor; smoothing ignored for codes).
        bias: optional (N,) float32.
        epilogue: ops on the float output (``("silu",)``, ``("add", "res")``, ``("mul", 0.5)``,
            ``("rsub", 1.0)``, ``("mul", "gamma", "channel")``...; see
            :func:`vmfx.lowering.codegen.render_epilogue`).
        epilogue_inputs: the tensors named by the epilogue, float32, contiguous: (…, N) like the
            output, or (N,) for ``"channel"`` operands.
        block: fixed ``BLOCK_M`` / ``BLOCK_N`` / ``BLOCK_K`` (and optional ``GROUP_M``,
            ``num_warps``, ``num_stages``); default: autotuned on the GPU, one large-tile config
            under the interpreter.
        provenance: FX node names, for the generated source's header.
        return_acc: also return the int32 accumulator (…, N).
        out_dtype: float32, float16 or bfloat16; default: ``x``'s dtype when it is float16 or
            bfloat16 (the model's dtype), else float32.
        quantize_once: for float ``x``, first quantize it with the standalone :func:`quantize`
            kernel and run the GEMM on the codes, instead of quantizing inside the GEMM's K loop
            (which redoes it once per column of output tiles). Same codes, same results. Default:
            on a GPU (measured on an H200 at the Vim-B in_proj shape: 0.53 ms against 1.73 ms
            fused, ``benchmarks/results/kernels.md``); fused under the interpreter.

    Returns:
        ``y`` (…, N) in ``out_dtype``, or ``(y, acc)``.

    Raises:
        ValueError: wrong shapes, dtypes or devices (the message names the argument).
    """
    check_tensor(x, "x", (torch.float32, torch.float16, torch.bfloat16, torch.int8))
    if out_dtype is None:
        out_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {list(OUT_DTYPES)}, got {out_dtype}")
    if quantize_once is None:
        quantize_once = not interpreting()
    if quantize_once and x.dtype != torch.int8 and x.dim() >= 2 and x.shape[-1] == weight.shape[1]:
        from .act_quantize import quantize

        x = quantize(x, act, provenance=provenance)
    prequantized = x.dtype == torch.int8
    if x.dim() < 2:
        raise ValueError(f"x must be (…, K) with rows and channels, got {tuple(x.shape)}")
    dev = x.device
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has K={x.shape[-1]} channels but the weight is {weight.shape}")
    w_store, packed = weight_operand(weight, dev)
    t = act.tokens
    for name in ("scale", "inv_scale", "zero_point"):
        check_tensor(getattr(act, name), f"act.{name}", torch.float32, (t,), dev, True)
    smooth = act.inv_smooth is not None and not prequantized
    if smooth:
        check_tensor(act.inv_smooth, "act.inv_smooth", torch.float32, (k,), dev, True)
    if t > 1:
        if x.dim() >= 3 and x.shape[-2] != t:
            raise ValueError(f"x has {x.shape[-2]} tokens but the per-token parameters have {t}")
        if x.dim() == 2 and x.shape[0] % t:
            raise ValueError(f"x has {x.shape[0]} rows, not a multiple of the {t} tokens")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out_shape = tuple(x.shape[:-1]) + (n,)
    if bias is not None:
        check_tensor(bias, "bias", torch.float32, (n,), dev, True)
    ep = Epilogue.parse(epilogue)
    ep_args = epilogue_operands(ep, epilogue_inputs, out_shape, dev)

    out = torch.empty((m, n), dtype=out_dtype, device=dev)
    acc = torch.empty((m, n), dtype=torch.int32, device=dev) if return_acc else None
    spec = _Spec(t > 1, smooth, bias is not None, prequantized, act.bits, ep.ops, return_acc,
                 block is None and not interpreting(), tuple(str(p) for p in provenance), OUT_DTYPES[out_dtype],
                 packed)
    kernel = _kernel(spec)

    args = dict(x_ptr=x2, w_ptr=w_store, wsum_ptr=weight.wsum, w_scale_ptr=weight.scale,
                sa_ptr=act.scale, za_ptr=act.zero_point, out_ptr=out,
                M=m, N=n, K=k, L=t,
                stride_xm=x2.stride(0), stride_xk=x2.stride(1),
                stride_wn=w_store.stride(0), stride_wk=w_store.stride(1))
    if not prequantized:
        args["inv_sa_ptr"] = act.inv_scale
    if smooth:
        args["inv_s_ptr"] = act.inv_smooth
    if bias is not None:
        args["bias_ptr"] = bias
    args.update(ep_args)
    if return_acc:
        args["acc_ptr"] = acc

    if spec.autotune:
        grid = lambda meta: (_cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        kernel[grid](**args, **launch_options())
    else:
        blk = {**_default_blocks(m, n, k), **dict(block or {})}
        opts = launch_options(blk.pop("num_warps", 4), blk.pop("num_stages", 3))
        grid = (_cdiv(m, blk["BLOCK_M"]) * _cdiv(n, blk["BLOCK_N"]),)
        kernel[grid](**args, **blk, **opts)
    y = out.reshape(out_shape)
    return (y, acc.reshape(out_shape)) if return_acc else y


def weight_operand(weight: QWeight, device: torch.device) -> tuple[torch.Tensor, bool]:
    """The weight tensor a GEMM reads, checked: the packed 4-bit codes (N, ceil(K / 2)) where the
    weight carries them, else the int8 codes (N, K); and whether it is the packed one. Also checks
    ``wsum`` and ``scale`` (N,)."""
    n, k = weight.shape
    packed = weight.packed is not None and weight.bits <= 4
    if weight.codes is None and not packed:
        raise ValueError("the weight has neither unpacked codes nor 4-bit packed ones")
    if packed:
        check_tensor(weight.packed, "weight.packed", torch.int8, (n, (k + 1) // 2), device)
    else:
        check_tensor(weight.codes, "weight.codes", torch.int8, device=device)
    check_tensor(weight.wsum, "weight.wsum", torch.int32, (n,), device, True)
    check_tensor(weight.scale, "weight.scale", torch.float32, (n,), device, True)
    return (weight.packed if packed else weight.codes), packed


def epilogue_operands(ep: Epilogue, epilogue_inputs: Mapping[str, torch.Tensor] | None, out_shape: tuple,
                      device: torch.device) -> dict[str, torch.Tensor]:
    """The epilogue's tensor arguments ``{"ep_<name>_ptr": tensor}``, checked: each input the
    epilogue names is given, float, contiguous, on ``device``, and shaped like the output
    ``out_shape`` (or (N,) for a ``"channel"`` operand)."""
    inputs = dict(epilogue_inputs or {})
    missing = set(ep.inputs) - set(inputs)
    if missing:
        raise ValueError(f"epilogue inputs {sorted(missing)} not given")
    n, rows = out_shape[-1], math.prod(out_shape[:-1])
    args = {}
    for name in ep.inputs:
        e = check_tensor(inputs[name], f"epilogue input {name!r}", tuple(OUT_DTYPES), device=device, contiguous=True)
        if ep.layout(name) == "channel":
            if tuple(e.shape) != (n,):
                raise ValueError(f"per-channel epilogue input {name!r} must be ({n},), got {tuple(e.shape)}")
        elif e.numel() != rows * n or e.shape[-1] != n:
            raise ValueError(f"epilogue input {name!r} must be shaped like the output {out_shape}, "
                             f"got {tuple(e.shape)}")
        args[f"ep_{name}_ptr"] = e
    return args


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
