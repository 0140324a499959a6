"""``conv_bidir``: both directions' causal depthwise conv1d + SiLU of a Vim block in one launch,
optionally with each direction's ``x_proj`` quantize fused in.

What it computes, for x (B, E, L) and per direction d (0 forward, 1 backward) a weight w_d (E, W)
and an optional bias b_d (E,)::

    out[0] = causal_conv1d_silu(x, w_f, b_f)                 (B, E, L)
    out[1] = causal_conv1d_silu(x.flip(-1), w_b, b_b)        (B, E, L), in its own reversed order

i.e. exactly :mod:`vmfx.lowering.kernels.conv` twice (``flip=False`` / ``flip=True``), stacked to
``out`` (2, B, E, L): ``acc[l] = sum_{j=0..W-1} x_d[l - (W-1) + j] * w_d[j]`` accumulated in tap
order (zero left padding), ``+ b_d``, ``acc / (1 + exp(-acc))``, with ``x_1`` read reversed along
L in the addressing (the flip is never materialized). Each direction's result is bit for bit what
the single-direction launcher :func:`~vmfx.lowering.kernels.causal_conv1d_silu` returns. The oracle
is :func:`vmfx.lowering.reference.causal_conv1d_silu_bidir`.

With ``emit_codes=True`` it also writes, per direction, the activation codes of ``out[d]``
transposed for that direction's ``x_proj``: ``codes`` (2, B*L, E) int8, ``codes[d]`` row ``b*L + l``
(token ``l`` of direction d's own time order), by the contract of :mod:`vmfx.lowering.reference`
with direction d's quantizer (``act_f`` / ``act_b``: their own smoothing (E,) or none, their own
per-token (L,) or per-tensor scales and zero points). The two quantizers must agree on
per-token vs per-tensor and on the bit width (compile-time choices of the one kernel); smoothing
may be present on one side only.

Program layout: one program per (batch, direction, BLOCK_E channels, BLOCK_L positions) tile, grid
``(2 B, cdiv(E, BLOCK_E), cdiv(L, BLOCK_L))`` with ``program_id(0) = 2 b + d`` (both directions of
a batch element are neighbours in launch order, so the second read of its x slice tends to hit
L2). The direction id selects, without branches, the read order of x (``tl.where`` on the
positions) and the per-direction parameters: each program loads only its own direction's weights,
bias, smoothing and per-token parameters (the other direction's loads are masked off) and picks
them with ``tl.where``; per-tensor parameters are two scalars loaded by every program. The
launcher passes both directions' tensors as they are (no stacking, no host-side work beyond the
output allocation): one launch in all. The W taps are W shifted loads of the same tile (L1/L2
hits), as in ``conv``.

Memory traffic: reads x once per direction, 2 s B E L bytes at most (s = 4 for float32, 2 for half
precision; plus a W-1 halo per tile), writes 2 s B E L bytes of ``out`` and 2 B L E bytes of codes.

Dtypes: ``x`` float32, float16 or bfloat16, any strides (typically the transposed (B, L, E) half
of ``in_proj``'s output), converted to float32 in registers; weights, biases and quantization
parameters float32; ``out`` written in ``out_dtype`` (default ``x``'s dtype), the float32 result
rounded once at the store; the codes are those of the float32 result.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..codegen import (
    FLOAT_IO,
    check_tensor,
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
from .conv import AUTOTUNE_CONFIGS

__all__ = ["KERNEL_NAME", "AUTOTUNE_CONFIGS", "TEMPLATE", "pick_source", "render_conv_bidir", "causal_conv1d_silu_bidir"]

KERNEL_NAME = "vmfx_conv_bidir"


def pick_source(var: str, name: str, offs: str, mask: str, other: str,
                has_f: bool = True, has_b: bool = True) -> str:
    """``var = `` direction d's ``tl.load(<name>_{f,b}_ptr + offs)``: each program reads only its
    own direction's tensor (the other direction's load is masked off, so it costs no memory traffic)
    and picks it with ``tl.where``; a direction without the tensor gets ``other`` (the identity of
    the op that uses it)."""
    if has_f and has_b:
        pick = f"{var} = tl.where(bwd, {var}_b, {var}_f)"
    else:
        missing = "backward" if has_f else "forward"
        pick = f"{var} = {var}_{'f' if has_f else 'b'}  # {other} in the {missing} direction"
    return lines(f"{var}_f = tl.load({name}_f_ptr + {offs}, mask={mask} & fwd, other={other})" if has_f else None,
                 f"{var}_b = tl.load({name}_b_ptr + {offs}, mask={mask} & bwd, other={other})" if has_b else None,
                 pick)


#: The ``conv_bidir`` kernel; slots: the optional pointer arguments, the bias, the store's value
#: and the codes epilogue.
TEMPLATE = KernelTemplate("""
    @triton.jit
    def $kernel_name(
        # pointers: x (B, E, L) any strides; per direction weight (E, W), bias (E,); out (2, B, E, L)
        x_ptr, w_f_ptr, w_b_ptr,$bias_args out_ptr,
        $codes_args
        # dimensions and strides
        B, E, L, stride_xb, stride_xe, stride_xl,
        # meta-parameters
        WIDTH: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        pid = tl.program_id(0)  # 2 * b + d: both directions of a batch element are neighbours
        pid_b = pid // 2
        pid_d = pid % 2
        fwd = pid_d == 0
        bwd = pid_d == 1  # the backward direction reads x reversed along L
        row = pid_d * B + pid_b  # (direction, batch) slice of out (2B, E, L) and of codes (2B*L, E)
        offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_l = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_e = offs_e < E
        mask_l = offs_l < L
        x_base = x_ptr + pid_b * stride_xb + offs_e[:, None] * stride_xe
        acc = tl.zeros((BLOCK_E, BLOCK_L), dtype=tl.float32)
        for j in tl.static_range(WIDTH):
            src = offs_l - (WIDTH - 1) + j  # causal: position l sees l - W + 1 .. l
            pos = tl.where(bwd, L - 1 - src, src)
            m = mask_e[:, None] & (mask_l & (src >= 0))[None, :]
            xv = tl.load(x_base + pos[None, :] * stride_xl, mask=m, other=0.0).to(tl.float32)
            $weight_tap
            acc = acc + xv * wj[:, None]
        $bias
        out = _vmfx_silu(acc)
        mask = mask_e[:, None] & mask_l[None, :]
        tl.store(out_ptr + row * E * L + offs_e[:, None] * L + offs_l[None, :], $stored, mask=mask)
        $emit_codes
""")


def _codes_args(smooth_f: bool, smooth_b: bool) -> str:
    """The codes epilogue's pointer arguments (smoothing only for the directions that have one)."""
    return lines("# each direction's x_proj activation parameters, and the int8 codes (2, B*L, E)",
                 " ".join(f"inv_s_{d}_ptr," for d, on in (("f", smooth_f), ("b", smooth_b)) if on) or None,
                 "inv_sa_f_ptr, za_f_ptr, inv_sa_b_ptr, za_b_ptr, codes_ptr,")


def _bias(bias_f: bool, bias_b: bool) -> str:
    """Add each direction's bias (0.0 for a direction without one)."""
    if not (bias_f or bias_b):
        return ""
    return lines(pick_source("bias", "b", "offs_e", "mask_e", "0.0", bias_f, bias_b),
                 None if bias_f and bias_b else "# acc is never -0 (it starts at +0), so adding 0.0 leaves it unchanged",
                 "acc = acc + bias[:, None]")


def _codes_epilogue(smooth_f: bool, smooth_b: bool, per_token: bool, qmax: int, off: int) -> str:
    """Direction d's x_proj quantize of the (BLOCK_E, BLOCK_L) tile ``out``, stored transposed."""
    smooth = smooth_f or smooth_b
    if per_token:
        act_params = lines(pick_source("inv_sa", "inv_sa", "offs_l", "mask_l", "1.0"),
                           pick_source("za", "za", "offs_l", "mask_l", "0.0"),
                           "inv_sa = inv_sa[None, :]", "za = za[None, :]")
    else:
        act_params = lines("inv_sa = tl.where(bwd, tl.load(inv_sa_b_ptr), tl.load(inv_sa_f_ptr))",
                           "za = tl.where(bwd, tl.load(za_b_ptr), tl.load(za_f_ptr))")
    return lines(
        "# direction d's x_proj quantize of out^T: row (d*B + b)*L + l (token l), channel e",
        pick_source("inv_s", "inv_s", "offs_e", "mask_e", "1.0", smooth_f, smooth_b) if smooth else None,
        ("out = out * inv_s[:, None]" + ("" if smooth_f and smooth_b else "  # * 1.0: exact")) if smooth else None,
        act_params,
        f"codes = _vmfx_quantize(out, inv_sa, za, 0.0, {float_literal(qmax)}, {float_literal(off)})",
        "rows = row * L + offs_l",
        "tl.store(codes_ptr + rows[None, :] * E + offs_e[:, None], codes, mask=mask)",
    )


def render_conv_bidir(*, width: int, bias_f: bool = True, bias_b: bool = True, emit_codes: bool = False,
                      per_token: bool = True, smooth_f: bool = False, smooth_b: bool = False, act_bits: int = 8,
                      autotune: bool = False, provenance: Sequence[str] = (), out_dtype: str = "float32") -> str:
    """Render the source of one ``conv_bidir`` kernel (:data:`TEMPLATE`).

    Args:
        width: the kernel size W of both directions (a compile-time constant; the taps are unrolled).
        bias_f, bias_b: add the forward / backward (E,) bias.
        emit_codes: also write each direction's int8 codes of ``out[d]^T`` (2, B*L, E).
        per_token: per-token (L,) quantization parameters (else per-tensor), both directions.
        smooth_f, smooth_b: the forward / backward quantizer has a smoothing (E,).
        act_bits: the activation bit width, both directions.
        autotune: wrap in ``@triton.autotune`` over :data:`AUTOTUNE_CONFIGS` (``conv``'s).
        provenance: FX nodes, for the header.
        out_dtype: the dtype of ``out`` ("float32", "float16" or "bfloat16").

    (``per_token``, ``smooth_*`` and ``act_bits`` are ignored without ``emit_codes``.)

    Returns:
        The module source; the kernel is :data:`KERNEL_NAME`.
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    qmax, off = 2**act_bits - 1, 2 ** (act_bits - 1)
    stored = store_value("out", out_dtype)  # checks out_dtype
    params = dict(width=width, bias_f=bias_f, bias_b=bias_b, emit_codes=emit_codes)
    if emit_codes:
        params.update(per_token=per_token, smooth_f=smooth_f, smooth_b=smooth_b, act_bits=act_bits)
    params["autotune"] = autotune
    if out_dtype != "float32":
        params["out_dtype"] = out_dtype
    preamble = render_preamble("conv_bidir", provenance, params,
                               ["_vmfx_silu"] + (["_vmfx_quantize"] if emit_codes else []),
                               (AUTOTUNE_CONFIGS, ["E", "L"]) if autotune else None)
    return preamble + TEMPLATE.fill(
        kernel_name=KERNEL_NAME,
        bias_args=(" b_f_ptr," if bias_f else "") + (" b_b_ptr," if bias_b else ""),
        codes_args=_codes_args(smooth_f, smooth_b) if emit_codes else "",
        weight_tap=pick_source("wj", "w", "offs_e * WIDTH + j", "mask_e", "0.0"),
        bias=_bias(bias_f, bias_b),
        stored=stored,
        emit_codes=_codes_epilogue(smooth_f, smooth_b, per_token, qmax, off) if emit_codes else "",
    )


_kernel = kernel_cache(render_conv_bidir, KERNEL_NAME)


def _weight(weight, name: str, e: int, dev) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(weight).__name__}")
    w = weight.reshape(weight.shape[0], -1) if weight.dim() == 3 else weight
    check_tensor(w, name, torch.float32, device=dev)
    if w.dim() != 2 or w.shape[0] != e or w.shape[1] < 1:
        raise ValueError(f"{name} must be (E, W) (or (E, 1, W)) with E={e}, got {tuple(weight.shape)}")
    return w.contiguous()


def _act_args(act: ActQuant, d: str, length: int, e: int, dev, args: dict) -> bool:
    """Check direction ``d``'s quantizer, add its pointers to ``args``; return whether it smooths."""
    t = act.tokens
    if t not in (1, length):
        raise ValueError(f"act_{d}: per-token parameters for {t} tokens, but L={length}")
    for field in ("inv_scale", "zero_point"):
        check_tensor(getattr(act, field), f"act_{d}.{field}", torch.float32, (t,), dev, True)
    args[f"inv_sa_{d}_ptr"], args[f"za_{d}_ptr"] = act.inv_scale, act.zero_point
    if act.inv_smooth is None:
        return False
    check_tensor(act.inv_smooth, f"act_{d}.inv_smooth", torch.float32, (e,), dev, True)
    args[f"inv_s_{d}_ptr"] = act.inv_smooth
    return True


def causal_conv1d_silu_bidir(
    x: torch.Tensor,
    w_f: torch.Tensor,
    b_f: torch.Tensor | None,
    w_b: torch.Tensor,
    b_b: torch.Tensor | None,
    *,
    act_f: ActQuant | None = None,
    act_b: ActQuant | None = None,
    block: Mapping[str, int] | None = None,
    provenance: Sequence[str] = (),
    out_dtype: torch.dtype | None = None,
):
    """Launch both directions' causal depthwise conv + SiLU (and their x_proj quantizes) at once.

    Args:
        x: (B, E, L) float32, float16 or bfloat16, any strides; the backward direction reads it
            reversed along L.
        w_f, w_b: (E, W) or (E, 1, W) float32, the forward / backward ``nn.Conv1d`` weights (same W).
        b_f, b_b: optional (E,) float32 biases.
        act_f, act_b: both or neither: each direction's ``x_proj`` quantizer; its smoothing (E,)
            (optional, independently), its per-token parameters (L,) or per-tensor. The two must
            agree on per-token vs per-tensor and on the bit width.
        block: fixed ``BLOCK_E`` / ``BLOCK_L`` (optional ``num_warps``); default: autotuned on the
            GPU, one large tile per direction and batch element under the interpreter.
        provenance: FX node names, for the header.
        out_dtype: the dtype of ``out``: float32, float16 or bfloat16; default ``x``'s.

    Returns:
        ``out`` (2, B, E, L) contiguous (``out[0]`` forward, ``out[1]`` backward in its own reversed
        time order), or ``(out, codes)`` with codes (2, B*L, E) int8 (``codes[d]`` for direction
        d's ``x_proj``, each a contiguous (B*L, E) matrix).

    Raises:
        ValueError: a bad dtype, shape or device; only one of ``act_f`` / ``act_b``; quantizers
            that differ in per-token vs per-tensor or in bit width.
    """
    check_tensor(x, "x", tuple(FLOAT_IO))
    out_dtype = output_dtype(out_dtype, x.dtype)
    if x.dim() != 3:
        raise ValueError(f"x must be (B, E, L), got {tuple(x.shape)}")
    bsz, e, length = x.shape
    dev = x.device
    wf, wb = _weight(w_f, "w_f", e, dev), _weight(w_b, "w_b", e, dev)
    width = wf.shape[1]
    if wb.shape[1] != width:
        raise ValueError(f"w_f and w_b must have the same width W, got {width} and {wb.shape[1]}")
    for name, bias in (("b_f", b_f), ("b_b", b_b)):
        if bias is not None:
            check_tensor(bias, name, torch.float32, (e,), dev, True)
    if (act_f is None) != (act_b is None):
        raise ValueError("act_f and act_b must both be given (codes for both directions' x_proj) or both be None")
    out = torch.empty((2, bsz, e, length), dtype=out_dtype, device=dev)
    args = dict(x_ptr=x, w_f_ptr=wf, w_b_ptr=wb, out_ptr=out, B=bsz, E=e, L=length,
                stride_xb=x.stride(0), stride_xe=x.stride(1), stride_xl=x.stride(2))
    if b_f is not None:
        args["b_f_ptr"] = b_f
    if b_b is not None:
        args["b_b_ptr"] = b_b
    codes, smooth_f, smooth_b, per_token, bits = None, False, False, False, 8
    if act_f is not None:
        if act_f.per_token != act_b.per_token:
            kinds = ["per-token" if a.per_token else "per-tensor" for a in (act_f, act_b)]
            raise ValueError(f"act_f is {kinds[0]} but act_b is {kinds[1]}: both directions' x_proj quantizers "
                             "must be per-token or both per-tensor (one kernel serves both)")
        if act_f.bits != act_b.bits:
            raise ValueError(f"act_f has {act_f.bits} bits but act_b has {act_b.bits}: both directions' x_proj "
                             "quantizers must have the same bit width (one kernel serves both)")
        smooth_f = _act_args(act_f, "f", length, e, dev, args)
        smooth_b = _act_args(act_b, "b", length, e, dev, args)
        per_token, bits = act_f.per_token, act_f.bits
        codes = torch.empty((2, bsz * length, e), dtype=torch.int8, device=dev)
        args["codes_ptr"] = codes
    autotune = block is None and not interpreting()
    kernel = _kernel(width=width, bias_f=b_f is not None, bias_b=b_b is not None, emit_codes=act_f is not None,
                     per_token=per_token, smooth_f=smooth_f, smooth_b=smooth_b, act_bits=bits, autotune=autotune,
                     provenance=tuple(str(p) for p in provenance), out_dtype=FLOAT_IO[out_dtype])
    if autotune:
        grid = lambda meta: (2 * bsz, -(-e // meta["BLOCK_E"]), -(-length // meta["BLOCK_L"]))  # noqa: E731
        kernel[grid](**args, WIDTH=width, **launch_options())
    else:
        blk = dict(block or {})
        be = blk.pop("BLOCK_E", max(16, min(64, next_power_of_2(e))))
        bl = blk.pop("BLOCK_L", max(16, min(128, next_power_of_2(length))))
        opts = launch_options(blk.pop("num_warps", 4), blk.pop("num_stages", None))
        kernel[(2 * bsz, -(-e // be), -(-length // bl))](**args, WIDTH=width, BLOCK_E=be, BLOCK_L=bl, **opts)
    return out if act_f is None else (out, codes)
