"""``merge_quantize``: merge the scan directions, transpose to token-major, quantize for out_proj.

What it computes, for scan outputs y_f, y_b (B, E, L) (y_b in its own, reversed, time order)::

    m[b, l, e] = (y_f[b, e, l] + y_b[b, e, L-1-l]) * c       (B, L, E)

(``y_f * c`` for one-directional models; ``c = 0.5`` for Vim's divided output, which equals the
graph's ``/ 2`` exactly), and optionally the activation codes of ``m`` for the next linear
(``out_proj``), (B*L, E) int8, row ``b*L + l`` (token ``l``), by the contract of
:mod:`vmfx.lowering.reference`. The float output can be switched off when only the codes are
needed. y_f and y_b may be float32, float16 or bfloat16 (converted to float32 in registers); ``m``
is computed in float32 and written in ``out_dtype`` (default ``y_f``'s dtype), rounded once at the
store; the codes are those of the float32 ``m``.

One program per (batch, BLOCK_L positions, BLOCK_E channels) tile. The reads are along L (y_f,
y_b are channel-major) and the writes along E (token-major): choose tiles with both sides >= 32
for coalescing on the GPU. Memory traffic: reads s B E L bytes per direction, writes s B L E
bytes of ``m`` (s = 4 for float32, 2 for half precision) and B L E bytes of codes.
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

__all__ = ["KERNEL_NAME", "AUTOTUNE_CONFIGS", "TEMPLATE", "render_merge", "merge_quantize"]

KERNEL_NAME = "vmfx_merge"

#: GPU configs tried by ``@triton.autotune`` (keyed on E, L).
AUTOTUNE_CONFIGS = [
    {"BLOCK_L": 32, "BLOCK_E": 64, "num_warps": 4},
    {"BLOCK_L": 64, "BLOCK_E": 64, "num_warps": 4},
    {"BLOCK_L": 32, "BLOCK_E": 128, "num_warps": 8},
]


#: The ``merge_quantize`` kernel; slots: the optional pointer and stride arguments, the backward
#: direction's add, the float store and the codes epilogue.
TEMPLATE = KernelTemplate("""
    @triton.jit
    def $kernel_name(
        # pointers: scan outputs (B, E, L), merged output (B, L, E), codes (B*L, E)
        $pointer_args
        $codes_args
        # the merge factor c, dimensions and strides
        c, E, L, stride_fb, stride_fe, stride_fl,$backward_strides
        # meta-parameters
        BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        pid_b = tl.program_id(0)
        offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        offs_e = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
        mask_l = offs_l < L
        mask_e = offs_e < E
        mask = mask_l[:, None] & mask_e[None, :]
        y = tl.load(yf_ptr + pid_b * stride_fb + offs_e[None, :] * stride_fe + offs_l[:, None] * stride_fl,
                    mask=mask, other=0.0).to(tl.float32)
        $backward
        m = y * c
        rows = pid_b * L + offs_l  # token-major (B*L, E)
        $store_float
        $emit_codes
""")

#: The backward direction, read flipped back along L and added.
_BACKWARD = """
    rev = L - 1 - offs_l  # the backward direction, flipped back along L
    y = y + tl.load(yb_ptr + pid_b * stride_bb + offs_e[None, :] * stride_be + rev[:, None] * stride_bl,
                    mask=mask, other=0.0).to(tl.float32)
"""


def _codes_epilogue(smooth: bool, per_token: bool, qmax: int, off: int) -> str:
    """The next linear's quantize of the (BLOCK_L, BLOCK_E) tile ``m``, token-major rows."""
    return lines(
        "# next linear's quantize: token l, channel e",
        "m = m * tl.load(inv_s_ptr + offs_e, mask=mask_e, other=1.0)[None, :]" if smooth else None,
        act_params_source(per_token, "offs_l", "mask_l", "[:, None]"),
        f"codes = _vmfx_quantize(m, inv_sa, za, 0.0, {float_literal(qmax)}, {float_literal(off)})",
        "tl.store(codes_ptr + rows[:, None] * E + offs_e[None, :], codes, mask=mask)",
    )


def render_merge(*, backward: bool = True, write_float: bool = True, emit_codes: bool = False,
                 per_token: bool = True, smooth: bool = False, act_bits: int = 8,
                 autotune: bool = False, provenance: Sequence[str] = (), out_dtype: str = "float32") -> str:
    """Render the source of one ``merge_quantize`` kernel (:data:`TEMPLATE`).

    Args:
        backward: there is a backward-direction input ``y_b``.
        write_float: write ``m`` (B, L, E).
        emit_codes: write the next linear's int8 codes (B*L, E).
        per_token, smooth, act_bits: that quantization (ignored without ``emit_codes``).
        autotune: wrap in ``@triton.autotune`` over :data:`AUTOTUNE_CONFIGS`.
        provenance: FX nodes, for the header.
        out_dtype: the dtype of ``m`` ("float32", "float16" or "bfloat16").

    Returns:
        The module source; the kernel is :data:`KERNEL_NAME`.
    """
    if not (write_float or emit_codes):
        raise ValueError("merge_quantize must write the float output, the codes, or both")
    qmax, off = 2**act_bits - 1, 2 ** (act_bits - 1)
    params = dict(backward=backward, write_float=write_float, emit_codes=emit_codes)
    if emit_codes:
        params.update(per_token=per_token, smooth=smooth, act_bits=act_bits)
    params["autotune"] = autotune
    stored = store_value("m", out_dtype)  # checks out_dtype
    if out_dtype != "float32" and write_float:
        params["out_dtype"] = out_dtype
    preamble = render_preamble("merge_quantize", provenance, params, ["_vmfx_quantize"] if emit_codes else [],
                               (AUTOTUNE_CONFIGS, ["E", "L"]) if autotune else None)
    return preamble + TEMPLATE.fill(
        kernel_name=KERNEL_NAME,
        pointer_args="yf_ptr," + (" yb_ptr," if backward else "") + (" out_ptr," if write_float else ""),
        codes_args=(("inv_s_ptr, " if smooth else "") + "inv_sa_ptr, za_ptr, codes_ptr,") if emit_codes else "",
        backward_strides=" stride_bb, stride_be, stride_bl," if backward else "",
        backward=lines(_BACKWARD) if backward else "",
        store_float=(f"tl.store(out_ptr + rows[:, None] * E + offs_e[None, :], {stored}, mask=mask)"
                     if write_float else ""),
        emit_codes=_codes_epilogue(smooth, per_token, qmax, off) if emit_codes else "",
    )


_kernel = kernel_cache(render_merge, KERNEL_NAME)


def merge_quantize(
    y_f: torch.Tensor,
    y_b: torch.Tensor | None = None,
    scale: float = 0.5,
    act: ActQuant | None = None,
    *,
    write_float: bool = True,
    block: Mapping[str, int] | None = None,
    provenance: Sequence[str] = (),
    out_dtype: torch.dtype | None = None,
):
    """Launch the merge of the scan directions (and the next linear's quantize).

    Args:
        y_f: (B, E, L) float32, float16 or bfloat16, any strides.
        y_b: optional (B, E, L) float32, float16 or bfloat16, any strides, in reversed time order.
        scale: ``c`` (a Python float, passed as a float32 kernel argument).
        act: if given, also emit codes for the next linear (smoothing (E,), per-token (L,) or
            per-tensor).
        write_float: write ``m`` (needs ``act`` when False).
        block: fixed ``BLOCK_L`` / ``BLOCK_E`` (optional ``num_warps``); default: autotuned on
            the GPU, one large tile under the interpreter.
        provenance: FX node names, for the header.
        out_dtype: the dtype of ``m``: float32, float16 or bfloat16; default ``y_f``'s.

    Returns:
        ``m`` (B, L, E); ``(m, codes)`` with codes (B*L, E) int8 when ``act`` is given;
        ``(None, codes)`` when ``write_float`` is False.
    """
    check_tensor(y_f, "y_f", tuple(FLOAT_IO))
    out_dtype = output_dtype(out_dtype, y_f.dtype)
    if y_f.dim() != 3:
        raise ValueError(f"y_f must be (B, E, L), got {tuple(y_f.shape)}")
    bsz, e, length = y_f.shape
    dev = y_f.device
    if not write_float and act is None:
        raise ValueError("write_float=False needs act (nothing would be written)")
    args = dict(yf_ptr=y_f, c=float(scale), E=e, L=length,
                stride_fb=y_f.stride(0), stride_fe=y_f.stride(1), stride_fl=y_f.stride(2))
    if y_b is not None:
        check_tensor(y_b, "y_b", tuple(FLOAT_IO), (bsz, e, length), dev)
        args.update(yb_ptr=y_b, stride_bb=y_b.stride(0), stride_be=y_b.stride(1), stride_bl=y_b.stride(2))
    out = torch.empty((bsz, length, e), dtype=out_dtype, device=dev) if write_float else None
    if out is not None:
        args["out_ptr"] = out
    codes, smooth, per_token, bits = codes_epilogue_args(act, bsz, length, e, dev, args)
    autotune = block is None and not interpreting()
    kernel = _kernel(backward=y_b is not None, write_float=write_float, emit_codes=act is not None,
                     per_token=per_token, smooth=smooth, act_bits=bits, autotune=autotune,
                     provenance=tuple(str(p) for p in provenance),
                     out_dtype=FLOAT_IO[out_dtype] if write_float else "float32")
    if autotune:
        grid = lambda meta: (bsz, -(-length // meta["BLOCK_L"]), -(-e // meta["BLOCK_E"]))  # noqa: E731
        kernel[grid](**args, **launch_options())
    else:
        blk = dict(block or {})
        bl = blk.pop("BLOCK_L", max(16, min(64, next_power_of_2(length))))
        be = blk.pop("BLOCK_E", max(16, min(128, next_power_of_2(e))))
        opts = launch_options(blk.pop("num_warps", 4), blk.pop("num_stages", None))
        kernel[(bsz, -(-length // bl), -(-e // be))](**args, BLOCK_L=bl, BLOCK_E=be, **opts)
    return out if act is None else (out, codes)
