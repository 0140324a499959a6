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

import functools
from typing import Mapping, Sequence

import torch

from ...quant.online_hadamard import FAST_BASES, fast_hadamard_factors, hadamard_base
from ..codegen import (
    IndentedBuffer,
    check_tensor,
    float_literal,
    interpreting,
    launch_options,
    load_kernel,
    next_power_of_2,
    render_autotune,
    render_header,
    render_helpers,
)
from ..params import ActQuant

__all__ = ["KERNEL_NAME", "AUTOTUNE_CONFIGS", "render_hadamard_quantize", "hadamard_quantize"]

KERNEL_NAME = "vmfx_hadamard_quantize"

#: GPU configs tried by ``@triton.autotune`` (keyed on M).
AUTOTUNE_CONFIGS = [
    {"BLOCK_M": 4, "num_warps": 4},
    {"BLOCK_M": 8, "num_warps": 4},
    {"BLOCK_M": 16, "num_warps": 8},
    {"BLOCK_M": 32, "num_warps": 8},
]

_BUTTERFLY = '''
    @triton.jit
    def _vmfx_butterfly(t, BLOCK_M: tl.constexpr, P: tl.constexpr, HALF: tl.constexpr):
        """One Walsh-Hadamard stage over the last axis (P) of a (BLOCK_M, P) tile: entries a and
        a + HALF (bit log2(HALF) of a clear / set) become their sum and difference."""
        t = tl.reshape(t, (BLOCK_M, P // (2 * HALF), 2, HALF))
        lo, hi = tl.split(tl.permute(t, (0, 1, 3, 2)))
        t = tl.permute(tl.join(lo + hi, lo - hi), (0, 1, 3, 2))
        return tl.reshape(t, (BLOCK_M, P))
'''


def _base_sum(column: int, m: int) -> str:
    """``x0 - x1 + ...``: column ``column`` of ``x H_m`` as a left-to-right sum of signed tiles."""
    positive = (hadamard_base(m) > 0).tolist()
    terms = [("" if positive[0][column] else "-") + "x0"]
    terms += [(" + " if positive[i][column] else " - ") + f"x{i}" for i in range(1, m)]
    return "".join(terms)


def render_hadamard_quantize(*, n: int, per_token: bool = True, smooth: bool = False, act_bits: int = 8,
                             autotune: bool = False, provenance: Sequence[str] = ()) -> str:
    """Render the source of one ``hadamard_quantize`` kernel.

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
    qmax, off = 2**act_bits - 1, 2 ** (act_bits - 1)
    buf = IndentedBuffer()
    render_header(buf, "hadamard_quantize", provenance,
                  dict(n=n, k=k, m=m, per_token=per_token, smooth=smooth, act_bits=act_bits, autotune=autotune))
    render_helpers(buf, ["_vmfx_quantize"])
    if k:
        buf.splice(_BUTTERFLY)
        buf.newline()
    if autotune:
        render_autotune(buf, AUTOTUNE_CONFIGS, ["M"])
    buf.writeline("@triton.jit")
    buf.writeline(f"def {KERNEL_NAME}(")
    with buf.indent():
        buf.writeline("# pointers: float input (M, n), parameters, int8 codes (M, n) contiguous")
        buf.writeline("x_ptr," + (" inv_s_ptr," if smooth else "") + " inv_sa_ptr, za_ptr, codes_ptr,")
        buf.writeline("# dimensions and strides")
        buf.writeline("M, L, stride_xm, stride_xk,")
        buf.writeline("# meta-parameters")
        buf.writeline("BLOCK_M: tl.constexpr,")
    buf.writeline("):")
    with buf.indent():
        buf.writeline(f"P: tl.constexpr = {p}  # 2^k: the Sylvester factor; the base factor m = {m} is unrolled")
        buf.splice("""
            offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_a = tl.arange(0, P)
            mask = (offs_m < M)[:, None] & (offs_a < P)[None, :]
            x_rows = x_ptr + offs_m[:, None] * stride_xm
        """)
        buf.writeline(f"# channel a * {m} + b of every row, as {m} tiles x_b of shape (BLOCK_M, P)")
        for b in range(m):
            buf.writeline(f"x{b} = tl.load(x_rows + (offs_a[None, :] * {m} + {b}) * stride_xk, mask=mask, "
                          "other=0.0).to(tl.float32)")
        if per_token:
            buf.writeline("tok = offs_m % L  # rows are (batch, token) pairs")
            buf.writeline("inv_sa = tl.load(inv_sa_ptr + tok, mask=offs_m < M, other=1.0)[:, None]")
            buf.writeline("za = tl.load(za_ptr + tok, mask=offs_m < M, other=0.0)[:, None]")
        else:
            buf.writeline("inv_sa = tl.load(inv_sa_ptr)")
            buf.writeline("za = tl.load(za_ptr)")
        scale = float_literal(float(torch.tensor(1.0 / n**0.5, dtype=torch.float32)))
        for j in range(m):
            buf.writeline(f"# column {j} of the base product, the butterflies, 1 / sqrt({n}), quantize")
            buf.writeline(f"t = {_base_sum(j, m)}")
            half = 1
            while half < p:
                buf.writeline(f"t = _vmfx_butterfly(t, BLOCK_M, P, {half})")
                half *= 2
            buf.writeline(f"t = t * {scale}")
            buf.writeline(f"chan = offs_a * {m} + {j}")
            if smooth:
                buf.writeline("t = t * tl.load(inv_s_ptr + chan)[None, :]")
            buf.writeline(f"codes = _vmfx_quantize(t, inv_sa, za, 0.0, {float_literal(qmax)}, {float_literal(off)})")
            buf.writeline(f"tl.store(codes_ptr + offs_m[:, None] * {n} + chan[None, :], codes, mask=mask)")
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def _kernel(n: int, per_token: bool, smooth: bool, act_bits: int, autotune: bool, provenance: tuple):
    src = render_hadamard_quantize(n=n, per_token=per_token, smooth=smooth, act_bits=act_bits, autotune=autotune,
                                   provenance=provenance)
    return load_kernel(src, KERNEL_NAME)


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
    kernel = _kernel(n, t > 1, act.inv_smooth is not None, act.bits, autotune, tuple(str(p) for p in provenance))
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
