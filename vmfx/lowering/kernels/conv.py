"""``conv``: causal depthwise conv1d + SiLU, optionally with the next linear's quantize fused in.

What it computes, for x (B, E, L), weight (E, W), bias (E,)::

    acc[b, e, l] = sum_{j=0..W-1} x[b, e, l - (W-1) + j] * w[e, j]      (zero left padding)
    out[b, e, l] = silu(acc + bias[e])                                     (B, E, L)

i.e. ``silu(F.conv1d(x, w[:, None], b, padding=W-1, groups=E)[..., :L])``, the taps accumulated in
order. With ``flip=True`` the kernel reads ``x`` reversed along L (``x.flip(-1)``, the backward
scan direction of a bidirectional Vim block) without materializing the flip. ``x`` may have any
strides, e.g. the transposed (B, L, E) slice of ``in_proj``'s output. ``x`` is float32, float16 or
bfloat16 (converted to float32 in registers; the weight and bias are float32); ``out`` is written in
``out_dtype`` (default ``x``'s dtype), the float32 result rounded once at the store. The codes are
those of the float32 result, as the reference computes them from the same (exactly converted) input.

With ``emit_codes=True`` it also writes the activation codes of ``out`` transposed, (B*L, E)
int8, row ``b*L + l``, by the contract of :mod:`vmfx.lowering.reference` with the *next*
linear's (``x_proj``'s) smoothing (E,) and per-token (L) or per-tensor parameters, so that linear
runs ``qlinear(..., prequantized)`` and never reads the float tensor.

One program per (batch, BLOCK_E channels, BLOCK_L positions) tile; the W taps are W shifted loads
of the same tile (hits in L1/L2). Memory traffic: reads s B E L bytes (plus a W-1 halo per tile),
writes s B E L bytes (s = 4 for float32, 2 for half precision), plus B L E bytes of codes.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..codegen import (
    FLOAT_IO,
    check_tensor,
    codes_epilogue_args,
    float_literal,
    interpreting,
    kernel_cache,
    launch_options,
    next_power_of_2,
    output_dtype,
    render_preamble,
    store_value,
)
from ..params import ActQuant
from ..template import KernelTemplate, lines
from .act_quantize import act_params_source

__all__ = ["KERNEL_NAME", "AUTOTUNE_CONFIGS", "TEMPLATE", "render_conv", "causal_conv1d_silu"]

KERNEL_NAME = "vmfx_conv"

#: GPU configs tried by ``@triton.autotune`` (keyed on E, L).
AUTOTUNE_CONFIGS = [
    {"BLOCK_E": 32, "BLOCK_L": 64, "num_warps": 4},
    {"BLOCK_E": 64, "BLOCK_L": 32, "num_warps": 4},
    {"BLOCK_E": 64, "BLOCK_L": 64, "num_warps": 8},
    {"BLOCK_E": 128, "BLOCK_L": 16, "num_warps": 4},
]


#: The ``conv`` kernel; slots: the optional pointer arguments, the read position of tap ``j``
#: (``$tap_position``, reversed with ``flip``), the bias, the store's value and the codes epilogue.
TEMPLATE = KernelTemplate("""
    @triton.jit
    def $kernel_name(
        # pointers: x (B, E, L) any strides, weight (E, W), bias (E,), out (B, E, L)
        x_ptr, w_ptr,$bias_arg out_ptr,
        $codes_args
        # dimensions and strides
        E, L, stride_xb, stride_xe, stride_xl,
        # meta-parameters
        WIDTH: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        pid_b = tl.program_id(0)
        offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_l = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_e = offs_e < E
        mask_l = offs_l < L
        x_base = x_ptr + pid_b * stride_xb + offs_e[:, None] * stride_xe
        acc = tl.zeros((BLOCK_E, BLOCK_L), dtype=tl.float32)
        for j in tl.static_range(WIDTH):
            src = offs_l - (WIDTH - 1) + j  # causal: position l sees l - W + 1 .. l
            $tap_position
            m = mask_e[:, None] & (mask_l & (src >= 0))[None, :]
            xv = tl.load(x_base + pos[None, :] * stride_xl, mask=m, other=0.0).to(tl.float32)
            wj = tl.load(w_ptr + offs_e * WIDTH + j, mask=mask_e, other=0.0)
            acc = acc + xv * wj[:, None]
        $bias
        out = _vmfx_silu(acc)
        mask = mask_e[:, None] & mask_l[None, :]
        tl.store(out_ptr + pid_b * E * L + offs_e[:, None] * L + offs_l[None, :], $stored, mask=mask)
        $emit_codes
""")


def _codes_epilogue(smooth: bool, per_token: bool, qmax: int, off: int) -> str:
    """The next linear's quantize of the (BLOCK_E, BLOCK_L) tile ``out``, stored transposed as
    rows ``b*L + l`` of the (B*L, E) codes."""
    return lines(
        "# next linear's quantize of out^T: row b*L + l (token l), channel e",
        "out = out * tl.load(inv_s_ptr + offs_e, mask=mask_e, other=1.0)[:, None]" if smooth else None,
        act_params_source(per_token, "offs_l", "mask_l", "[None, :]"),
        f"codes = _vmfx_quantize(out, inv_sa, za, 0.0, {float_literal(qmax)}, {float_literal(off)})",
        "rows = pid_b * L + offs_l",
        "tl.store(codes_ptr + rows[None, :] * E + offs_e[:, None], codes, mask=mask)",
    )


def render_conv(*, width: int, bias: bool = True, flip: bool = False, emit_codes: bool = False,
                per_token: bool = True, smooth: bool = False, act_bits: int = 8,
                autotune: bool = False, provenance: Sequence[str] = (), out_dtype: str = "float32") -> str:
    """Render the source of one ``conv`` kernel (:data:`TEMPLATE`).

    Args:
        width: the kernel size W (a compile-time constant; the taps are unrolled).
        bias: add a (E,) bias.
        flip: read ``x`` reversed along L.
        emit_codes: also write the next linear's int8 codes of ``out^T`` (B*L, E).
        per_token, smooth, act_bits: that quantization (ignored without ``emit_codes``).
        autotune: wrap in ``@triton.autotune`` over :data:`AUTOTUNE_CONFIGS`.
        provenance: FX nodes, for the header.
        out_dtype: the dtype of ``out`` ("float32", "float16" or "bfloat16").

    Returns:
        The module source; the kernel is :data:`KERNEL_NAME`.
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    qmax, off = 2**act_bits - 1, 2 ** (act_bits - 1)
    stored = store_value("out", out_dtype)  # checks out_dtype
    params = dict(width=width, bias=bias, flip=flip, emit_codes=emit_codes)
    if emit_codes:
        params.update(per_token=per_token, smooth=smooth, act_bits=act_bits)
    params["autotune"] = autotune
    if out_dtype != "float32":
        params["out_dtype"] = out_dtype
    preamble = render_preamble("conv", provenance, params, ["_vmfx_silu"] + (["_vmfx_quantize"] if emit_codes else []),
                               (AUTOTUNE_CONFIGS, ["E", "L"]) if autotune else None)
    codes_args = lines("# the next linear's activation parameters and its int8 codes (B*L, E)",
                       ("inv_s_ptr, " if smooth else "") + "inv_sa_ptr, za_ptr, codes_ptr,") if emit_codes else ""
    return preamble + TEMPLATE.fill(
        kernel_name=KERNEL_NAME,
        bias_arg=" b_ptr," if bias else "",
        codes_args=codes_args,
        tap_position="pos = L - 1 - src  # read x reversed along L" if flip else "pos = src",
        bias="acc = acc + tl.load(b_ptr + offs_e, mask=mask_e, other=0.0)[:, None]" if bias else "",
        stored=stored,
        emit_codes=_codes_epilogue(smooth, per_token, qmax, off) if emit_codes else "",
    )


_kernel = kernel_cache(render_conv, KERNEL_NAME)


def causal_conv1d_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    flip: bool = False,
    act: ActQuant | None = None,
    block: Mapping[str, int] | None = None,
    provenance: Sequence[str] = (),
    out_dtype: torch.dtype | None = None,
):
    """Launch the causal depthwise conv + SiLU (and the next linear's quantize).

    Args:
        x: (B, E, L) float32, float16 or bfloat16, any strides.
        weight: (E, W) or (E, 1, W) float32 (the ``nn.Conv1d`` weight).
        bias: optional (E,) float32.
        flip: read ``x`` reversed along L.
        act: if given, also emit the codes of ``out^T`` for the next linear: its smoothing must
            be (E,), its per-token parameters (L,) (or per-tensor).
        block: fixed ``BLOCK_E`` / ``BLOCK_L`` (optional ``num_warps``); default: autotuned on the
            GPU, one large tile under the interpreter.
        provenance: FX node names, for the header.
        out_dtype: the dtype of ``out``: float32, float16 or bfloat16; default ``x``'s.

    Returns:
        ``out`` (B, E, L) contiguous, or ``(out, codes)`` with codes (B*L, E) int8.
    """
    check_tensor(x, "x", tuple(FLOAT_IO))
    out_dtype = output_dtype(out_dtype, x.dtype)
    if x.dim() != 3:
        raise ValueError(f"x must be (B, E, L), got {tuple(x.shape)}")
    bsz, e, length = x.shape
    dev = x.device
    w = weight.reshape(weight.shape[0], -1) if weight.dim() == 3 else weight
    check_tensor(w, "weight", torch.float32, device=dev)
    if w.dim() != 2 or w.shape[0] != e:
        raise ValueError(f"weight must be (E, W) with E={e}, got {tuple(weight.shape)}")
    w = w.contiguous()
    width = w.shape[1]
    if bias is not None:
        check_tensor(bias, "bias", torch.float32, (e,), dev, True)
    out = torch.empty((bsz, e, length), dtype=out_dtype, device=dev)
    args = dict(x_ptr=x, w_ptr=w, out_ptr=out, E=e, L=length,
                stride_xb=x.stride(0), stride_xe=x.stride(1), stride_xl=x.stride(2))
    if bias is not None:
        args["b_ptr"] = bias
    codes, smooth, per_token, bits = codes_epilogue_args(act, bsz, length, e, dev, args)
    autotune = block is None and not interpreting()
    kernel = _kernel(width=width, bias=bias is not None, flip=flip, emit_codes=act is not None,
                     per_token=per_token, smooth=smooth, act_bits=bits, autotune=autotune,
                     provenance=tuple(str(p) for p in provenance), out_dtype=FLOAT_IO[out_dtype])
    if autotune:
        grid = lambda meta: (bsz, -(-e // meta["BLOCK_E"]), -(-length // meta["BLOCK_L"]))  # noqa: E731
        kernel[grid](**args, WIDTH=width, **launch_options())
    else:
        blk = dict(block or {})
        be = blk.pop("BLOCK_E", max(16, min(64, next_power_of_2(e))))
        bl = blk.pop("BLOCK_L", max(16, min(128, next_power_of_2(length))))
        opts = launch_options(blk.pop("num_warps", 4), blk.pop("num_stages", None))
        kernel[(bsz, -(-e // be), -(-length // bl))](**args, WIDTH=width, BLOCK_E=be, BLOCK_L=bl, **opts)
    return out if act is None else (out, codes)
