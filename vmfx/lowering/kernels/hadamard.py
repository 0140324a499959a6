"""``hadamard_quantize``: the online Hadamard of a linear's input fused with that linear's
activation quantize: float rows in, int8 codes out, in one pass over memory.

What it computes, for rows ``r`` of a (M, n) float input (``t = r % T``; T = L per-token, 1
per-tensor), ``n = 2^k m`` (:func:`vmfx.quant.online_hadamard.fast_hadamard_factors`)::

    y[r]        = x[r] H / sqrt(n),     H = S_{2^k} (x) H_m
    codes[r, c] = clamp(rint((y[r, c] * inv_s[c]) * inv_sa[t]) + z_a[t], 0, 2^b - 1) - 2^(b-1)

which is :func:`vmfx.lowering.reference.hadamard_quantize` bit for bit: the float32 operations are
those of :func:`~vmfx.quant.online_hadamard.fast_hadamard_transform`, in its order. It replaces the
quantize step of the linear it feeds (``out_proj``, whose GEMM then reads the codes,
``qlinear(prequantized=True)``): the producer before it (the scan's merge) writes its float output
once, this kernel reads it once and writes the codes once; ``x H`` itself never reaches memory.

The rendered source is specialised to ``(k, m)``. A program owns ``BLOCK_M`` whole rows: it loads
the row as ``m`` tiles ``x_b`` of shape (BLOCK_M, 2^k) (channels ``a m + b``), forms the base
product ``t_j = ±x_0 ± ... ± x_{m-1}`` as an unrolled sum (``H_m``'s signs are written into the
source; no multiplications), runs ``k`` butterfly stages on each ``t_j`` in registers (reshape to
(BLOCK_M, 2^k / 2h, 2, h), split the pair axis, join ``lo + hi`` and ``lo - hi``), scales by
``1 / sqrt(n)``, smooths, quantizes and stores column ``j`` of every ``2^k`` block. Memory traffic:
reads ``s M n`` bytes (s = 4 for float32, 2 for half precision), writes ``M n`` bytes of codes,
plus O(n + T) parameters. Registers: ``2 m`` tiles of BLOCK_M x 2^k float32 values, so the base
orders are limited to :data:`vmfx.quant.online_hadamard.FAST_BASES`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ...quant.online_hadamard import FAST_BASES, fast_hadamard_factors, hadamard_base
from ..codegen import (
    check_tensor,
    float_literal,
    interpreting,
    kernel_cache,
    launch_options,
    next_power_of_2,
    render_preamble,
)
from ..params import ActQuant
from ..template import KernelTemplate, lines
from .act_quantize import act_params_source

__all__ = ["KERNEL_NAME", "AUTOTUNE_CONFIGS", "TEMPLATE", "ROTATED_CODES", "COLUMN", "rotated_codes_source",
           "tile_loads_source", "render_hadamard_quantize", "hadamard_quantize"]

KERNEL_NAME = "vmfx_hadamard_quantize"

#: GPU configs tried by ``@triton.autotune`` (keyed on M).
AUTOTUNE_CONFIGS = [
    {"BLOCK_M": 4, "num_warps": 4},
    {"BLOCK_M": 8, "num_warps": 4},
    {"BLOCK_M": 16, "num_warps": 8},
    {"BLOCK_M": 32, "num_warps": 8},
]

#: The ``hadamard_quantize`` kernel; slots: the smoothing pointer argument, the Sylvester order P,
#: the base order m, the loads of the m tiles, the activation parameters' loads and the m output
#: columns (:data:`COLUMN` each).
TEMPLATE = KernelTemplate("""
    @triton.jit
    def $kernel_name(
        # pointers: float input (M, n), parameters, int8 codes (M, n) contiguous
        x_ptr,$smooth_arg inv_sa_ptr, za_ptr, codes_ptr,
        # dimensions and strides
        M, L, stride_xm, stride_xk,
        # meta-parameters
        BLOCK_M: tl.constexpr,
    ):
        P: tl.constexpr = $p  # 2^k: the Sylvester factor; the base factor m = $m is unrolled
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_a = tl.arange(0, P)
        mask = (offs_m < M)[:, None] & (offs_a < P)[None, :]
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        # channel a * $m + b of every row, as $m tiles x_b of shape (BLOCK_M, P)
        $loads
        $act_params
        $columns
""")

#: Column j of the base product, rotated and quantized in registers: its signed sum of the m
#: tiles, the butterflies, 1 / sqrt(n), the smoothing multiply and the quantize, giving the int8
#: codes ``codes`` (BLOCK_M, P) of channels ``chan = a * m + j``. Shared with the fused GEMM
#: (:mod:`vmfx.lowering.kernels.hadamard_linear`), which multiplies them instead of storing them.
ROTATED_CODES = KernelTemplate("""
    # column $j of the base product, the butterflies, 1 / sqrt($n), quantize
    t = $base_sum
    $butterflies
    t = t * $scale
    chan = offs_a * $m + $j
    $smooth
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, $qmax, $offset)
""")

#: One output column j (:data:`ROTATED_CODES`), stored at channels a * m + j.
COLUMN = KernelTemplate("""
    $rotated_codes
    tl.store(codes_ptr + offs_m[:, None] * $n + chan[None, :], codes, mask=mask)
""")


def _base_sum(column: int, m: int) -> str:
    """``x0 - x1 + ...``: column ``column`` of ``x H_m`` as a left-to-right sum of signed tiles."""
    positive = (hadamard_base(m) > 0).tolist()
    terms = [("" if positive[0][column] else "-") + "x0"]
    terms += [(" + " if positive[i][column] else " - ") + f"x{i}" for i in range(1, m)]
    return "".join(terms)


def rotated_codes_source(column: int, n: int, smooth: bool, act_bits: int) -> str:
    """:data:`ROTATED_CODES` for base-product column ``column`` of a width ``n = 2^k m``: reads the
    tiles ``x0 .. x{m-1}`` (:func:`tile_loads_source`), ``offs_a``, ``inv_sa``, ``za`` (and
    ``inv_s_ptr`` with ``smooth``) and the constexprs ``BLOCK_M`` and ``P``; leaves ``codes`` and
    ``chan``. The float32 operations are those of
    :func:`~vmfx.quant.online_hadamard.fast_hadamard_transform`, in its order."""
    k, m = fast_hadamard_factors(n)
    scale = float_literal(float(torch.tensor(1.0 / n**0.5, dtype=torch.float32)))
    return ROTATED_CODES.fill(
        j=str(column), n=str(n), m=str(m), base_sum=_base_sum(column, m), scale=scale,
        butterflies=lines(*(f"t = _vmfx_butterfly(t, BLOCK_M, P, {2**i})" for i in range(k))),
        smooth="t = t * tl.load(inv_s_ptr + chan)[None, :]" if smooth else "",
        qmax=float_literal(2**act_bits - 1), offset=float_literal(2 ** (act_bits - 1))).rstrip("\n")


def tile_loads_source(m: int) -> str:
    """The loads of the ``m`` tiles ``x_b`` (BLOCK_M, P) of channels ``a * m + b`` of every row, in
    float32; reads ``x_rows`` (the rows' pointers), ``offs_a``, ``mask`` and ``stride_xk``."""
    return lines(*(f"x{b} = tl.load(x_rows + (offs_a[None, :] * {m} + {b}) * stride_xk, mask=mask, "
                   "other=0.0).to(tl.float32)" for b in range(m)))


def render_hadamard_quantize(*, n: int, per_token: bool = True, smooth: bool = False, act_bits: int = 8,
                             autotune: bool = False, provenance: Sequence[str] = ()) -> str:
    """Render the source of one ``hadamard_quantize`` kernel (:data:`TEMPLATE`).

    Args:
        n: the row width; ``2^k m`` with ``m`` in :data:`~vmfx.quant.online_hadamard.FAST_BASES`.
        per_token: per-token (T = L) parameters, else one scalar.
        smooth: multiply the rotated row by ``inv_s`` (n,) before quantizing.
        act_bits: bit width b.
        autotune: wrap in ``@triton.autotune`` over :data:`AUTOTUNE_CONFIGS`.
        provenance: FX nodes, for the header.

    Returns:
        The module source; the kernel is :data:`KERNEL_NAME`.
    """
    factors = fast_hadamard_factors(n)
    if factors is None or factors[1] not in FAST_BASES:
        raise ValueError(f"hadamard_quantize needs a width 2^k m with m in {FAST_BASES}, got {n}")
    if not 2 <= act_bits <= 8:
        raise ValueError(f"act_bits must be in 2..8, got {act_bits}")
    k, m = factors
    p = 2**k
    preamble = render_preamble("hadamard_quantize", provenance,
                               dict(n=n, k=k, m=m, per_token=per_token, smooth=smooth, act_bits=act_bits,
                                    autotune=autotune),
                               ["_vmfx_quantize"] + (["_vmfx_butterfly"] if k else []),
                               (AUTOTUNE_CONFIGS, ["M"]) if autotune else None)
    columns = lines(*(COLUMN.fill(rotated_codes=rotated_codes_source(j, n, smooth, act_bits), n=str(n)).rstrip("\n")
                      for j in range(m)))
    return preamble + TEMPLATE.fill(
        kernel_name=KERNEL_NAME, smooth_arg=" inv_s_ptr," if smooth else "", p=str(p), m=str(m),
        loads=tile_loads_source(m),
        act_params=lines("tok = offs_m % L  # rows are (batch, token) pairs" if per_token else None,
                         act_params_source(per_token, "tok", "offs_m < M", "[:, None]")),
        columns=columns)


_kernel = kernel_cache(render_hadamard_quantize, KERNEL_NAME)


def hadamard_quantize(x: torch.Tensor, act: ActQuant, *, block: Mapping[str, int] | None = None,
                      provenance: Sequence[str] = ()) -> torch.Tensor:
    """Launch the online Hadamard + activation quantize.

    Args:
        x: (…, n) float32, float16 or bfloat16, any strides; rows are (batch, token) pairs
            (3-D: (B, L, n)); ``n = 2^k m``, ``m`` in :data:`~vmfx.quant.online_hadamard.FAST_BASES`.
        act: the parameters of the linear's input (per-token T = L or per-tensor; optional smoothing (n,)).
        block: a fixed ``BLOCK_M`` (optional ``num_warps``); default: autotuned on the GPU, one
            tile of up to 16 rows under the interpreter.
        provenance: FX node names, for the header.

    Returns:
        (rows, n) int8 codes ``q - 2^(b-1)``, contiguous (the layout ``qlinear`` reads with
        ``prequantized=True``).
    """
    check_tensor(x, "x", (torch.float32, torch.float16, torch.bfloat16))
    if x.dim() < 2:
        raise ValueError(f"x must be (…, n), got {tuple(x.shape)}")
    dev, n, t = x.device, x.shape[-1], act.tokens
    factors = fast_hadamard_factors(n)
    if factors is None or factors[1] not in FAST_BASES:
        raise ValueError(f"hadamard_quantize needs a width 2^k m with m in {FAST_BASES}, got {n}")
    for name in ("inv_scale", "zero_point"):
        check_tensor(getattr(act, name), f"act.{name}", torch.float32, (t,), dev, True)
    if act.inv_smooth is not None:
        check_tensor(act.inv_smooth, "act.inv_smooth", torch.float32, (n,), dev, True)
    if t > 1 and ((x.dim() >= 3 and x.shape[-2] != t) or (x.dim() == 2 and x.shape[0] % t)):
        raise ValueError(f"x of shape {tuple(x.shape)} does not fit {t} per-token parameters")
    x2 = x.reshape(-1, n)
    rows = x2.shape[0]
    codes = torch.empty((rows, n), dtype=torch.int8, device=dev)
    autotune = block is None and not interpreting()
    kernel = _kernel(n=n, per_token=t > 1, smooth=act.inv_smooth is not None, act_bits=act.bits, autotune=autotune,
                     provenance=tuple(str(p) for p in provenance))
    args = dict(x_ptr=x2, inv_sa_ptr=act.inv_scale, za_ptr=act.zero_point, codes_ptr=codes,
                M=rows, L=t, stride_xm=x2.stride(0), stride_xk=x2.stride(1))
    if act.inv_smooth is not None:
        args["inv_s_ptr"] = act.inv_smooth
    if autotune:
        kernel[lambda meta: (-(-rows // meta["BLOCK_M"]),)](**args, **launch_options())
    else:
        blk = dict(block or {})
        bm = blk.pop("BLOCK_M", max(1, min(16, next_power_of_2(rows))))
        opts = launch_options(blk.pop("num_warps", 4), blk.pop("num_stages", None))
        kernel[(-(-rows // bm),)](**args, BLOCK_M=bm, **opts)
    return codes
