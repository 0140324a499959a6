"""``quantize``: standalone static activation quantization of a (M, K) float tensor to int8 codes.

What it computes, for rows ``r`` (``t = r % T``; T = 1 per-tensor, T = L per-token)::

    codes[r, k] = clamp(rint((x[r, k] * inv_s[k]) * inv_sa[t]) + z_a[t], 0, 2^b - 1) - 2^(b-1)

stored as int8 (the unsigned code is ``codes + 2^(b-1)``, see
:func:`vmfx.lowering.reference.unshift_codes`). It is the "next layer's quantize" when the
producer of a linear's input is not itself a vmfx kernel (e.g. a norm left in eager torch), and
the codes feed ``qlinear`` with ``prequantized=True``. The same per-tile math (the
``_vmfx_quantize`` helper of :mod:`vmfx.lowering.codegen`) is inlined as an epilogue by ``conv``
and ``merge_quantize``.

One program per (BLOCK_M, BLOCK_K) tile. Memory traffic: reads 4 M K bytes (any strides), writes
M K bytes, plus O(K + T) parameters.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

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

__all__ = ["KERNEL_NAME", "AUTOTUNE_CONFIGS", "TEMPLATE", "act_params_source", "render_quantize", "quantize"]

KERNEL_NAME = "vmfx_quantize"

#: GPU configs tried by ``@triton.autotune`` (keyed on M, K).
AUTOTUNE_CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_K": 256, "num_warps": 4},
    {"BLOCK_M": 32, "BLOCK_K": 128, "num_warps": 4},
    {"BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 8},
    {"BLOCK_M": 8, "BLOCK_K": 512, "num_warps": 4},
]


#: The ``quantize`` kernel; slots: the smoothing pointer argument, the smoothing multiply, the
#: activation parameters' loads and the code range.
TEMPLATE = KernelTemplate("""
    @triton.jit
    def $kernel_name(
        # pointers: float input, parameters, int8 codes (M, K) contiguous
        x_ptr,$smooth_arg inv_sa_ptr, za_ptr, codes_ptr,
        # dimensions and strides
        M, K, L, stride_xm, stride_xk,
        # meta-parameters
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_k = offs_k < K
        mask = mask_m[:, None] & mask_k[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask, other=0.0).to(tl.float32)
        $smooth
        $act_params
        codes = _vmfx_quantize(x, inv_sa, za, 0.0, $qmax, $offset)
        tl.store(codes_ptr + offs_m[:, None] * K + offs_k[None, :], codes, mask=mask)
""")


def act_params_source(per_token: bool, tokens: str, mask: str, broadcast: str, comment: str = "") -> str:
    """The loads of the activation parameters ``inv_sa`` and ``za``: per-token, at the token
    indices ``tokens`` (mask ``mask``, then indexed by ``broadcast``, e.g. ``[:, None]``), or one
    scalar each (per-tensor). ``comment`` ends the first per-token line."""
    if not per_token:
        return lines("inv_sa = tl.load(inv_sa_ptr)", "za = tl.load(za_ptr)")
    return lines(f"inv_sa = tl.load(inv_sa_ptr + {tokens}, mask={mask}, other=1.0){broadcast}{comment}",
                 f"za = tl.load(za_ptr + {tokens}, mask={mask}, other=0.0){broadcast}")


def render_quantize(*, per_token: bool = True, smooth: bool = False, act_bits: int = 8,
                    autotune: bool = False, provenance: Sequence[str] = ()) -> str:
    """Render the source of one ``quantize`` kernel (:data:`TEMPLATE`).

    Args:
        per_token: per-token (T = L) parameters, else one scalar.
        smooth: multiply by ``inv_s`` (K,) first.
        act_bits: bit width b.
        autotune: wrap in ``@triton.autotune`` over :data:`AUTOTUNE_CONFIGS`.
        provenance: FX nodes, for the header.

    Returns:
        The module source; the kernel is :data:`KERNEL_NAME`.
    """
    if not 2 <= act_bits <= 8:
        raise ValueError(f"act_bits must be in 2..8, got {act_bits}")
    qmax, off = 2**act_bits - 1, 2 ** (act_bits - 1)
    preamble = render_preamble("quantize", provenance,
                               dict(per_token=per_token, smooth=smooth, act_bits=act_bits, autotune=autotune),
                               ["_vmfx_quantize"], (AUTOTUNE_CONFIGS, ["M", "K"]) if autotune else None)
    return preamble + TEMPLATE.fill(
        kernel_name=KERNEL_NAME,
        smooth_arg=" inv_s_ptr," if smooth else "",
        smooth="x = x * tl.load(inv_s_ptr + offs_k, mask=mask_k, other=1.0)[None, :]" if smooth else "",
        act_params=lines("tok = offs_m % L  # rows are (batch, token) pairs" if per_token else None,
                         act_params_source(per_token, "tok", "mask_m", "[:, None]")),
        qmax=float_literal(qmax), offset=float_literal(off))


_kernel = kernel_cache(render_quantize, KERNEL_NAME)


def quantize(x: torch.Tensor, act: ActQuant, *, block: Mapping[str, int] | None = None,
             provenance: Sequence[str] = ()) -> torch.Tensor:
    """Launch the activation quantizer.

    Args:
        x: (…, K) float32, float16 or bfloat16, any strides; rows are (batch, token) pairs (3-D: (B, L, K)).
        act: the parameters (per-token T = L or per-tensor; optional smoothing (K,)).
        block: fixed ``BLOCK_M`` / ``BLOCK_K`` (optional ``num_warps``); default: autotuned on
            the GPU, one large tile under the interpreter.
        provenance: FX node names, for the header.

    Returns:
        int8 codes ``q - 2^(b-1)``, contiguous, shaped like ``x``.
    """
    check_tensor(x, "x", (torch.float32, torch.float16, torch.bfloat16))
    if x.dim() < 2:
        raise ValueError(f"x must be (…, K), got {tuple(x.shape)}")
    dev, k, t = x.device, x.shape[-1], act.tokens
    for name in ("inv_scale", "zero_point"):
        check_tensor(getattr(act, name), f"act.{name}", torch.float32, (t,), dev, True)
    if act.inv_smooth is not None:
        check_tensor(act.inv_smooth, "act.inv_smooth", torch.float32, (k,), dev, True)
    if t > 1 and ((x.dim() >= 3 and x.shape[-2] != t) or (x.dim() == 2 and x.shape[0] % t)):
        raise ValueError(f"x of shape {tuple(x.shape)} does not fit {t} per-token parameters")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    codes = torch.empty((m, k), dtype=torch.int8, device=dev)
    autotune = block is None and not interpreting()
    kernel = _kernel(per_token=t > 1, smooth=act.inv_smooth is not None, act_bits=act.bits, autotune=autotune,
                     provenance=tuple(str(p) for p in provenance))
    args = dict(x_ptr=x2, inv_sa_ptr=act.inv_scale, za_ptr=act.zero_point, codes_ptr=codes,
                M=m, K=k, L=t, stride_xm=x2.stride(0), stride_xk=x2.stride(1))
    if act.inv_smooth is not None:
        args["inv_s_ptr"] = act.inv_smooth
    if autotune:
        grid = lambda meta: (-(-m // meta["BLOCK_M"]), -(-k // meta["BLOCK_K"]))  # noqa: E731
        kernel[grid](**args, **launch_options())
    else:
        blk = dict(block or {})
        bm = blk.pop("BLOCK_M", max(1, min(64, next_power_of_2(m))))
        bk = blk.pop("BLOCK_K", max(16, min(256, next_power_of_2(k))))
        opts = launch_options(blk.pop("num_warps", 4), blk.pop("num_stages", None))
        kernel[(-(-m // bm), -(-k // bk))](**args, BLOCK_M=bm, BLOCK_K=bk, **opts)
    return codes.reshape(x.shape)
