"""``scan_merge``: both scan directions of a bidirectional Vim block, their merge and out_proj's
input quantization, in one launch.

What it computes, exactly the composition of three launches (and of the reference functions
:func:`vmfx.lowering.reference.scan_merge` calls)::

    y_f = scan(u_f, delta_f, A_f, B_f, C_f, D_f, z)                  forward direction
    y_b = scan(u_b, delta_b, A_b, B_b, C_b, D_b, z, flip_z=True)     backward direction
    m[b, l, e] = (y_f[b, e, l] + y_b[b, e, L-1-l]) * c               (B, L, E), token-major

where ``scan`` is :mod:`~vmfx.lowering.kernels.scan`'s selective scan with ``silu(z)`` gate (or,
with ``smooth_gate``, MambaQuant's Smooth-SiLU ``z * sigmoid(s z)``, ``s`` an (E,) factor) and
optional softplus on delta (no delta bias, float hidden state), the backward direction's u, delta,
B, C are in its own (reversed) time order and its gate reads ``z`` reversed, and optionally the
activation codes of ``m`` for the next linear (``out_proj``), (B*L, E) int8, row ``b*L + l``, by
the formula of :mod:`~vmfx.lowering.kernels.merge` (smoothing per channel, per-token or per-tensor
static asymmetric scales, round half to even, clamped). The float output can be switched off when
only the codes are needed.

Fused dt_proj (optional, both directions or neither): instead of reading delta, each direction
computes it, at each step, from its ``dt_proj`` input, exactly as the separate quantized linear
would (:func:`vmfx.lowering.reference.qlinear`, the formula of :mod:`~vmfx.lowering.kernels.linear`)::

    delta_d[b, :, t] = qlinear(dt_in_d, W_d, act_d, bias_d)[b, t, :]     dt_in_d (B, L, R), R = dt_rank

(``dt_in_d`` is the slice ``x_proj_out[..., :R]`` of the direction's x_proj output, the backward
one in its own reversed time order like u_b, B_b, C_b, so both read token t at step t). The
program holds its (BLOCK_E, R) int8 weight codes in registers (as int32, R padded to a power of 2
``BLOCK_R`` with zero codes) and, per step, loads the R inputs of token t, smooths and quantizes
them with the per-token (token t) or per-tensor parameters (``_vmfx_quantize``: the qlinear
kernel's codes), takes the R-long integer dot products in int32 (exact), adds the zero-point
correction ``(2^(b-1) - z_a) wsum``, dequantizes by ``s_a s_w`` and adds the bias (the qlinear
kernel's float32 operations, in its order), then applies softplus as for a read delta. The float32
delta is thus reference.qlinear's (bit for bit under the interpreter; on the GPU up to the
contraction of the dequantize and bias into one FMA, as in the qlinear kernel).

One program per (batch, BLOCK_E channels); the (BLOCK_E, N) state of each direction lives in
registers. The program first runs the forward recurrence over t = 0..L-1 and writes
``y_f[t] + D_f u_f[t]`` (not yet gated) in float32 to a token-major workspace (the float32 output
``m`` itself when ``m`` is float32 and written; else a float32 (B, L, E) scratch buffer), then
runs the backward recurrence over t' = 0..L-1, whose step belongs to token ``l = L-1-t'``: it
reads back the forward value at that token (written by the same program, so no cross-program
synchronization is needed; a ``tl.debug_barrier()`` between the loops, and between the read and
the write of each step when the workspace is ``m``, orders the accesses of the program's threads on
the GPU), loads ``z[l]`` once and gates both directions with the same ``silu(z[l])`` (the value
the two scans compute for that token, so the float32 products are the composition's), adds,
multiplies by ``c``, rounds once to ``out_dtype`` at the store, and quantizes elementwise (the
per-token parameters are those of token ``l``, the smoothing factors those of channel ``e``).

Memory traffic: reads s B E L bytes of each of u_f, delta_f, u_b, delta_b and z once (z once for
both directions), 2 x s B N L bytes of B and C per direction once per channel block; writes and
reads back 4 B L E bytes of the workspace; writes s_out B L E bytes of ``m`` and B L E bytes of
codes (s = 4 for float32, 2 for half precision). The three-launch path instead writes and reads
both scan outputs and reads z twice. The (B, E, L, N) states never touch memory.

With the fused dt_proj, delta is neither written nor read: the two dt_proj launches each wrote
B L E values of delta (and the scan read them back, s B E L bytes per direction, the term above
that disappears). Instead the kernel reads, per direction, the s B L R bytes of the dt_proj input
once per channel block (like B and C: every channel block of a batch reads the same (L, R) slice,
mostly from L2; R / E of delta's bytes, 1/32 for Vim where dt_rank = E / 32), the E R bytes of
weight codes once per batch element, and O(E + L + R) quantization parameters.

u, delta, B, C, z and the dt_proj inputs may each be float32, float16 or bfloat16 (converted to
float32 in registers; A, D and the quantization parameters are float32); the states, every step
and the merge run in float32, ``m`` is written in ``out_dtype`` (default ``u_f``'s dtype), rounded
once at the store, and the codes are those of the float32 ``m``. The parallelism is
B x E / BLOCK_E programs, as for the per-direction scan.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

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
from ..params import ActQuant, QWeight
from ..template import KernelTemplate, lines
from .scan import _LOG2E
from .scan import AUTOTUNE_CONFIGS as _SCAN_CONFIGS

__all__ = ["KERNEL_NAME", "AUTOTUNE_CONFIGS", "DtProj", "TEMPLATE", "DIRECTION_SETUP", "STEP", "render_scan_merge",
           "scan_merge"]

KERNEL_NAME = "vmfx_scan_merge"

#: GPU configs tried by ``@triton.autotune`` (keyed on E, N, L): the per-direction scan's.
AUTOTUNE_CONFIGS = _SCAN_CONFIGS


class DtProj(NamedTuple):
    """The render flags of one direction's fused ``dt_proj`` (see :func:`render_scan_merge`)."""

    per_token: bool = True  #: per-token (L) activation parameters, else one (per-tensor)
    smooth: bool = False  #: multiply the input by the smoothing factors ``inv_s`` (R,) first
    act_bits: int = 8  #: activation bit width (codes [0, 2^b - 1], offset 2^(b-1))
    bias: bool = True  #: add the (E,) bias


#: Direction ``$d``'s loop-invariant loads and bases (before its time loop); ``$delta_setup``:
#: delta's base pointer, or the fused dt_proj's weights and parameters.
DIRECTION_SETUP = KernelTemplate("""
    A2${d} = tl.load(A${d}_ptr + offs_e[:, None] * N + offs_n[None, :], mask=mask_en, other=0.0) * $log2e
    u${d}_base = u${d}_ptr + pid_b * stride_u${d}b + offs_e * stride_u${d}e
    B${d}_base = B${d}_ptr + pid_b * stride_B${d}b + offs_n * stride_B${d}n
    C${d}_base = C${d}_ptr + pid_b * stride_C${d}b + offs_n * stride_C${d}n
    $delta_setup
    $skip
    h = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
""")

#: The fused dt_proj's loop-invariant part: the weight codes in registers, row sums, scales and
#: the input's base; then the optional smoothing, bias and per-tensor parameters.
DT_PROJ_SETUP = KernelTemplate("""
    # dt_proj: the (BLOCK_E, R) int8 weight codes in registers (int32; 0 in the padding)
    mask_r${d} = offs_r < R${d}
    Wq${d} = tl.load(dtw${d}_ptr + offs_e[:, None] * stride_dtw${d}e + offs_r[None, :] * stride_dtw${d}r,
                  mask=mask_e[:, None] & mask_r${d}[None, :], other=0).to(tl.int32)
    wsum${d} = tl.load(dtwsum${d}_ptr + offs_e, mask=mask_e, other=0)
    sw${d} = tl.load(dtsw${d}_ptr + offs_e, mask=mask_e, other=0.0)
    dtx${d}_base = dtx${d}_ptr + pid_b * stride_dtx${d}b + offs_r * stride_dtx${d}r
    $smooth
    $bias
    $per_tensor
""")

#: Per-tensor dt_proj parameters, loaded once: the zero-point correction and the combined scale.
DT_PROJ_PER_TENSOR = KernelTemplate("""
    dinv_sa${d} = tl.load(dtinv_sa${d}_ptr)
    dza${d} = tl.load(dtza${d}_ptr)
    dcorr${d} = ($offset - dza${d}.to(tl.int32)) * wsum${d}  # zero-point correction
    dscale${d} = tl.load(dtsa${d}_ptr) * sw${d}  # s_a * s_w
""")

#: ``dt`` (BLOCK_E,) = the fused dt_proj of direction ``$d``'s token ``$t``, as the qlinear kernel
#: computes it: quantize the R inputs, int32 dot products, zero-point correction, dequantize, bias.
DT_PROJ_STEP = KernelTemplate("""
    xr = tl.load(dtx${d}_base + ${t} * stride_dtx${d}l, mask=mask_r${d}, other=0.0).to(tl.float32)
    $smooth
    $product
    $bias
""")

#: The product with per-token parameters (loaded at the step's token).
DT_PROJ_PRODUCT_PER_TOKEN = KernelTemplate("""
    dza = tl.load(dtza${d}_ptr + ${t})
    dinv_sa = tl.load(dtinv_sa${d}_ptr + ${t})
    q = _vmfx_quantize(xr, dinv_sa, dza, 0.0, $qmax, $offset_literal)
    acc = tl.sum(Wq${d} * q.to(tl.int32)[None, :], axis=1) + ($offset - dza.to(tl.int32)) * wsum${d}
    dt = acc.to(tl.float32) * (tl.load(dtsa${d}_ptr + ${t}) * sw${d})
""")

#: The product with per-tensor parameters (loaded before the loop, :data:`DT_PROJ_PER_TENSOR`).
DT_PROJ_PRODUCT_PER_TENSOR = KernelTemplate("""
    q = _vmfx_quantize(xr, dinv_sa${d}, dza${d}, 0.0, $qmax, $offset_literal)
    acc = tl.sum(Wq${d} * q.to(tl.int32)[None, :], axis=1) + dcorr${d}
    dt = acc.to(tl.float32) * dscale${d}
""")

#: One step of direction ``$d`` at its own time ``$t``: ``y = C h + D u`` (ungated).
STEP = KernelTemplate("""
    u = tl.load(u${d}_base + ${t} * stride_u${d}l, mask=mask_e, other=0.0).to(tl.float32)
    $delta
    $softplus
    Bt = tl.load(B${d}_base + ${t} * stride_B${d}l, mask=mask_n, other=0.0).to(tl.float32)
    Ct = tl.load(C${d}_base + ${t} * stride_C${d}l, mask=mask_n, other=0.0).to(tl.float32)
    h = tl.exp2(dt[:, None] * A2${d}) * h + (dt * u)[:, None] * Bt[None, :]
    y = tl.sum(h * Ct[None, :], axis=1)
    $skip
""")


def _block(template: KernelTemplate, **values: str) -> str:
    """``template`` filled, as a block value (no final newline)."""
    return template.fill(**values).rstrip("\n")


def direction_setup_source(d: str, has_D: bool, dt: DtProj | None) -> str:
    """The loop-invariant loads and bases of direction ``d`` ("f" or "b"), :data:`DIRECTION_SETUP`."""
    if dt is None:
        delta_setup = f"d{d}_base = d{d}_ptr + pid_b * stride_d{d}b + offs_e * stride_d{d}e"
    else:
        off = 2 ** (dt.act_bits - 1)
        delta_setup = _block(
            DT_PROJ_SETUP, d=d,
            smooth=f"inv_sr{d} = tl.load(dtinv_s{d}_ptr + offs_r, mask=mask_r{d}, other=1.0)" if dt.smooth else "",
            bias=f"bias{d} = tl.load(dtbias{d}_ptr + offs_e, mask=mask_e, other=0.0)" if dt.bias else "",
            per_tensor="" if dt.per_token else _block(DT_PROJ_PER_TENSOR, d=d, offset=str(off)))
    return _block(DIRECTION_SETUP, d=d, log2e=repr(_LOG2E), delta_setup=delta_setup,
                  skip=f"D{d} = tl.load(D{d}_ptr + offs_e, mask=mask_e, other=0.0)" if has_D else "")


def dt_proj_source(d: str, t: str, dt: DtProj) -> str:
    """``dt`` of direction ``d``'s token ``t`` computed by its fused dt_proj (:data:`DT_PROJ_STEP`)."""
    qmax, off = 2**dt.act_bits - 1, 2 ** (dt.act_bits - 1)
    product = DT_PROJ_PRODUCT_PER_TOKEN if dt.per_token else DT_PROJ_PRODUCT_PER_TENSOR
    values = dict(d=d, qmax=float_literal(qmax), offset_literal=float_literal(off))
    if dt.per_token:
        values.update(t=t, offset=str(off))
    return _block(DT_PROJ_STEP, d=d, t=t, smooth=f"xr = xr * inv_sr{d}" if dt.smooth else "",
                  product=_block(product, **values), bias=f"dt = dt + bias{d}" if dt.bias else "")


def step_source(d: str, t: str, has_D: bool, delta_softplus: bool, dt: DtProj | None) -> str:
    """One step of direction ``d`` at its own time ``t`` (:data:`STEP`)."""
    delta = (f"dt = tl.load(d{d}_base + {t} * stride_d{d}l, mask=mask_e, other=0.0).to(tl.float32)" if dt is None
             else dt_proj_source(d, t, dt))
    return _block(STEP, d=d, t=t, delta=delta, softplus="dt = _vmfx_softplus(dt)" if delta_softplus else "",
                  skip=f"y = y + D{d} * u" if has_D else "")


#: The ``scan_merge`` kernel: the forward direction's time loop (its ungated outputs to the
#: workspace), a barrier, the backward direction's time loop with the merge, the float store and
#: the next linear's quantize at each token; slots for the arguments, each direction's setup and
#: step, the gate and the stores.
TEMPLATE = KernelTemplate("""
    @triton.jit
    def $kernel_name(
        $pointer_args
        # gate z (B, E, L), forward time order; workspace, merged output (B, L, E); codes (B*L, E)
        $gate_output_args
        $codes_args
        # the merge factor c, dimensions$rank_comment
        c, E, N, L,$rank_args
        # strides (batch, channel-or-state, time)$dt_stride_comment
        $strides
        $z_strides
        # meta-parameters (BLOCK_N >= N: the whole state of a channel in registers$block_r_comment)
        BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,$block_r_arg
    ):
        pid_b = tl.program_id(0)
        offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_n = tl.arange(0, BLOCK_N)
        mask_e = offs_e < E
        mask_n = offs_n < N
        # padded states have A = 0, B = 0: h stays 0
        mask_en = mask_e[:, None] & mask_n[None, :]
        $prologue
        # forward direction: token t at step t; y_f + D_f u_f (ungated) to the workspace
        $forward_setup
        for t in range(0, L):
            $forward_step
            tl.store(ws_base + t * E, y, mask=mask_e)
        tl.debug_barrier()  # the forward values are visible to all of the program's threads
        # backward direction: step t belongs to token l = L - 1 - t; merge and quantize there
        $backward_setup
        for t in range(0, L):
            $backward_step
            l = L - 1 - t
            yf = tl.load(ws_base + l * E, mask=mask_e, other=0.0)
            $gate
            m = (yf + y) * c
            $store_float
            $emit_codes
""")

#: Both directions' outputs gated by ``silu(z)`` at token ``l``.
_GATE = """
    g = _vmfx_silu(tl.load(z_base + l * stride_zl, mask=mask_e, other=0.0).to(tl.float32))
    yf = yf * g
    y = y * g
"""

#: Both directions' outputs gated by the Smooth-SiLU ``z * sigmoid(zs z)`` at token ``l``.
_SMOOTH_GATE = """
    g = _vmfx_smooth_silu(tl.load(z_base + l * stride_zl, mask=mask_e, other=0.0).to(tl.float32), zs)
    yf = yf * g
    y = y * g
"""


def render_scan_merge(*, has_D_f: bool = True, has_D_b: bool = True, has_z: bool = True,
                      delta_softplus: bool = True, write_float: bool = True, emit_codes: bool = False,
                      per_token: bool = True, smooth: bool = False, act_bits: int = 8,
                      workspace_is_out: bool = False, autotune: bool = False,
                      provenance: Sequence[str] = (), out_dtype: str = "float32",
                      dt_proj_f: DtProj | tuple | None = None, dt_proj_b: DtProj | tuple | None = None,
                      smooth_gate: bool = False) -> str:
    """Render the source of one ``scan_merge`` kernel.

    Args:
        has_D_f, has_D_b: add the skip term ``D u`` in the forward / backward direction.
        has_z: gate both directions with ``silu(z)`` (the backward one reversed).
        delta_softplus: apply softplus to delta.
        write_float: write ``m`` (B, L, E).
        emit_codes: write the next linear's int8 codes (B*L, E).
        per_token, smooth, act_bits: that quantization (ignored without ``emit_codes``).
        workspace_is_out: the forward values are kept in ``m``'s own (float32) storage (no
            ``ws_ptr`` argument); each backward step then reads before it overwrites, with a
            barrier between.
        autotune: wrap in ``@triton.autotune`` over :data:`AUTOTUNE_CONFIGS`.
        provenance: FX nodes, for the header.
        out_dtype: the dtype of ``m`` ("float32", "float16" or "bfloat16").
        dt_proj_f, dt_proj_b: both or neither: compute each direction's delta in the kernel as its
            ``dt_proj`` (a quantized linear of the (B, L, R) input ``dtx``) instead of reading it;
            a :class:`DtProj` (or a tuple of its fields): per-token or per-tensor activation
            parameters, smoothing, activation bits, bias. R may differ between the directions;
            ``BLOCK_R`` >= both.
        smooth_gate: gate with the Smooth-SiLU ``z * sigmoid(s z)``, ``s`` an (E,) float32 tensor
            (``zs_ptr``), instead of ``silu(z)`` (needs ``has_z``).

    Returns:
        The module source; the kernel is :data:`KERNEL_NAME`.
    """
    if smooth_gate and not has_z:
        raise ValueError("smooth_gate needs has_z (the Smooth-SiLU gates z)")
    if (dt_proj_f is None) != (dt_proj_b is None):
        raise ValueError("dt_proj_f and dt_proj_b must both be given or both be None")
    dts = {}
    if dt_proj_f is not None:
        dts = {"f": DtProj(*dt_proj_f), "b": DtProj(*dt_proj_b)}
        for d, dt in dts.items():
            if not 2 <= dt.act_bits <= 8:
                raise ValueError(f"dt_proj_{d}.act_bits must be in 2..8, got {dt.act_bits}")
    fused = bool(dts)
    if not (write_float or emit_codes):
        raise ValueError("scan_merge must write the float output, the codes, or both")
    stored = store_value("m", out_dtype)  # checks out_dtype
    if workspace_is_out and not (write_float and out_dtype == "float32"):
        raise ValueError("workspace_is_out needs a float32 m that is written")
    qmax, off = 2**act_bits - 1, 2 ** (act_bits - 1)
    params = dict(has_D_f=has_D_f, has_D_b=has_D_b, has_z=has_z, delta_softplus=delta_softplus,
                  write_float=write_float, emit_codes=emit_codes)
    if emit_codes:
        params.update(per_token=per_token, smooth=smooth, act_bits=act_bits)
    params.update(workspace_is_out=workspace_is_out, autotune=autotune)
    if out_dtype != "float32" and write_float:
        params["out_dtype"] = out_dtype
    if fused:
        params.update(dt_proj_f=dts["f"], dt_proj_b=dts["b"])
    if smooth_gate:
        params["smooth_gate"] = True
    gate = "_vmfx_smooth_silu" if smooth_gate else "_vmfx_silu"
    helpers = ((["_vmfx_softplus"] if delta_softplus else []) + ([gate] if has_z else [])
               + (["_vmfx_quantize"] if emit_codes or fused else []))
    preamble = render_preamble("scan_merge", provenance, params, helpers,
                               (AUTOTUNE_CONFIGS, ["E", "N", "L"]) if autotune else None)
    has_D = {"f": has_D_f, "b": has_D_b}
    return preamble + TEMPLATE.fill(
        kernel_name=KERNEL_NAME,
        pointer_args=_pointer_args(has_D, dts),
        gate_output_args=("z_ptr, " if has_z else "") + ("zs_ptr, " if smooth_gate else "")
        + ("" if workspace_is_out else "ws_ptr, ")
        + ("out_ptr," if write_float else ""),
        codes_args=(("inv_s_ptr, " if smooth else "") + "inv_sa_ptr, za_ptr, codes_ptr,") if emit_codes else "",
        rank_comment=" (R: each direction's dt rank)" if fused else "",
        rank_args=" Rf, Rb," if fused else "",
        dt_stride_comment="; dt_proj input (batch, time, rank), weight (channel, rank)" if fused else "",
        strides=lines(_strides(d, fused) for d in ("f", "b")),
        z_strides="stride_zb, stride_ze, stride_zl," if has_z else "",
        block_r_comment="; BLOCK_R >= Rf, Rb" if fused else "",
        block_r_arg=" BLOCK_R: tl.constexpr," if fused else "",
        prologue=_prologue(fused, workspace_is_out, write_float, has_z, emit_codes, smooth, per_token, smooth_gate),
        forward_setup=direction_setup_source("f", has_D_f, dts.get("f")),
        forward_step=step_source("f", "t", has_D_f, delta_softplus, dts.get("f")),
        backward_setup=direction_setup_source("b", has_D_b, dts.get("b")),
        backward_step=step_source("b", "t", has_D_b, delta_softplus, dts.get("b")),
        gate=lines(_SMOOTH_GATE if smooth_gate else _GATE) if has_z else "",
        store_float=_store_float(stored, workspace_is_out) if write_float else "",
        emit_codes=_codes_epilogue(smooth, per_token, qmax, off) if emit_codes else "",
    )


def _pointer_args(has_D: dict, dts: dict) -> str:
    """The per-direction pointer arguments (with the fused dt_proj's when ``dts`` is given)."""
    fused = bool(dts)
    if fused:
        out = ["# pointers, per direction: u (B, E, L); A (E, N); B, C (B, N, L); D (E,); dt_proj's",
               "# input (B, L, R), int8 weight codes (E, R), int32 row sums and scales (E,), activation",
               "# smoothing (R,), 1 / s_a, s_a, z_a (L or 1), bias (E,)"]
    else:
        out = ["# pointers, per direction: u, delta (B, E, L); A (E, N); B, C (B, N, L); D (E,)"]
    for d in ("f", "b"):
        out.append(f"u{d}_ptr, " + ("" if fused else f"d{d}_ptr, ") + f"A{d}_ptr, B{d}_ptr, C{d}_ptr,"
                   + (f" D{d}_ptr," if has_D[d] else ""))
        if fused:
            dt = dts[d]
            out.append(f"dtx{d}_ptr, dtw{d}_ptr, dtwsum{d}_ptr, dtsw{d}_ptr, "
                       + (f"dtinv_s{d}_ptr, " if dt.smooth else "")
                       + f"dtinv_sa{d}_ptr, dtsa{d}_ptr, dtza{d}_ptr," + (f" dtbias{d}_ptr," if dt.bias else ""))
    return lines(out)


def _strides(d: str, fused: bool) -> str:
    """Direction ``d``'s stride arguments."""
    return lines(
        f"stride_u{d}b, stride_u{d}e, stride_u{d}l," if fused
        else f"stride_u{d}b, stride_u{d}e, stride_u{d}l, stride_d{d}b, stride_d{d}e, stride_d{d}l,",
        f"stride_B{d}b, stride_B{d}n, stride_B{d}l, stride_C{d}b, stride_C{d}n, stride_C{d}l,",
        f"stride_dtx{d}b, stride_dtx{d}l, stride_dtx{d}r, stride_dtw{d}e, stride_dtw{d}r," if fused else None,
    )


def _prologue(fused: bool, workspace_is_out: bool, write_float: bool, has_z: bool, emit_codes: bool,
              smooth: bool, per_token: bool, smooth_gate: bool = False) -> str:
    """The bases of the workspace, output, gate and codes, the Smooth-SiLU factors, and the
    loop-invariant quantize parameters."""
    ws = "out_ptr" if workspace_is_out else "ws_ptr"
    return lines(
        "offs_r = tl.arange(0, BLOCK_R)  # dt_proj's input channels (padded weight codes are 0)" if fused else None,
        f"ws_base = {ws} + pid_b * L * E + offs_e  # token-major (B, L, E) float32",
        "out_base = out_ptr + pid_b * L * E + offs_e" if write_float and not workspace_is_out else None,
        "z_base = z_ptr + pid_b * stride_zb + offs_e * stride_ze" if has_z else None,
        "zs = tl.load(zs_ptr + offs_e, mask=mask_e, other=1.0)" if smooth_gate else None,
        "codes_base = codes_ptr + pid_b * L * E + offs_e" if emit_codes else None,
        "inv_s = tl.load(inv_s_ptr + offs_e, mask=mask_e, other=1.0)" if emit_codes and smooth else None,
        lines("inv_sa = tl.load(inv_sa_ptr)", "za = tl.load(za_ptr)") if emit_codes and not per_token else None,
    )


def _store_float(stored: str, workspace_is_out: bool) -> str:
    """Store ``m`` at token ``l``: into the workspace itself (after a barrier) or into ``out``."""
    if workspace_is_out:
        return lines("tl.debug_barrier()  # every thread has read y_f[l] before m[l] overwrites it",
                     f"tl.store(ws_base + l * E, {stored}, mask=mask_e)")
    return f"tl.store(out_base + l * E, {stored}, mask=mask_e)"


def _codes_epilogue(smooth: bool, per_token: bool, qmax: int, off: int) -> str:
    """The next linear's quantize of ``m`` at token ``l``."""
    return lines(
        "# next linear's quantize: token l, channel e",
        "m = m * inv_s" if smooth else None,
        lines("inv_sa = tl.load(inv_sa_ptr + l)", "za = tl.load(za_ptr + l)") if per_token else None,
        f"codes = _vmfx_quantize(m, inv_sa, za, 0.0, {float_literal(qmax)}, {float_literal(off)})",
        "tl.store(codes_base + l * E, codes, mask=mask_e)",
    )


_kernel = kernel_cache(render_scan_merge, KERNEL_NAME)


def scan_merge(
    u_f: torch.Tensor,
    delta_f: torch.Tensor | None,
    A_f: torch.Tensor,
    B_f: torch.Tensor,
    C_f: torch.Tensor,
    D_f: torch.Tensor | None,
    u_b: torch.Tensor,
    delta_b: torch.Tensor | None,
    A_b: torch.Tensor,
    B_b: torch.Tensor,
    C_b: torch.Tensor,
    D_b: torch.Tensor | None,
    z: torch.Tensor | None,
    *,
    delta_softplus: bool,
    scale: float,
    act: ActQuant | None = None,
    write_float: bool = True,
    block: Mapping[str, int] | None = None,
    provenance: Sequence[str] = (),
    out_dtype: torch.dtype | None = None,
    dt_in_f: torch.Tensor | None = None,
    dt_weight_f: QWeight | None = None,
    dt_act_f: ActQuant | None = None,
    dt_bias_f: torch.Tensor | None = None,
    dt_in_b: torch.Tensor | None = None,
    dt_weight_b: QWeight | None = None,
    dt_act_b: ActQuant | None = None,
    dt_bias_b: torch.Tensor | None = None,
    z_smooth: torch.Tensor | None = None,
):
    """Launch both scan directions, their merge and the next linear's quantize, in one kernel.

    Args:
        u_f, delta_f: (B, E, L) float32, float16 or bfloat16, any strides (forward direction);
            ``delta_f`` None when the dt_proj inputs are given.
        A_f: (E, N) float32.
        B_f, C_f: (B, N, L) float32, float16 or bfloat16, any strides.
        D_f: optional (E,) float32.
        u_b, delta_b, A_b, B_b, C_b, D_b: the backward direction's, same shapes, its u, delta, B,
            C in its own (reversed) time order.
        z: optional (B, E, L) float32, float16 or bfloat16 gate, any strides, in forward time
            order (the backward direction reads it reversed).
        delta_softplus: apply softplus to delta (both directions).
        scale: ``c`` (a Python float, passed as a float32 kernel argument).
        act: if given, also emit codes for the next linear (smoothing (E,), per-token (L,) or
            per-tensor).
        write_float: write ``m`` (needs ``act`` when False).
        block: fixed ``BLOCK_E`` (optional ``num_warps``); default: autotuned on the GPU, one
            block of all channels (at most 64) under the interpreter.
        provenance: FX node names, for the header.
        out_dtype: the dtype of ``m``: float32, float16 or bfloat16; default ``u_f``'s.
        dt_in_f, dt_weight_f, dt_act_f, dt_bias_f: instead of ``delta_f``, compute it in the
            kernel as ``reference.qlinear(dt_in_f, dt_weight_f, dt_act_f, dt_bias_f)`` transposed:
            ``dt_in_f`` (B, L, R) float32, float16 or bfloat16, any strides (e.g. the slice
            ``x_proj_out[..., :R]``); ``dt_weight_f`` a :class:`QWeight` (E, R) with unpacked int8
            codes (8- or 4-bit); ``dt_act_f`` its :class:`ActQuant` (per-token over L or
            per-tensor, optional smoothing (R,)); ``dt_bias_f`` optional (E,) float32.
        dt_in_b, dt_weight_b, dt_act_b, dt_bias_b: the backward direction's, ``dt_in_b`` in its
            own (reversed) time order (its token t is step t, as for ``u_b``). Both directions
            fused or neither.
        z_smooth: optional (E,) float32 factors ``s``: both gates are the Smooth-SiLU
            ``z * sigmoid(s z)`` (needs ``z``).

    Returns:
        ``m`` (B, L, E), contiguous; ``(m, codes)`` with codes (B*L, E) int8 when ``act`` is
        given; ``(None, codes)`` when ``write_float`` is False.

    Raises:
        ValueError: wrong shapes, dtypes or devices (the message names the argument); a delta
            and the dt_proj inputs of the same direction both given (or neither); one direction
            fused and not the other; a dt_proj weight stored packed only.
    """
    io = tuple(FLOAT_IO)
    check_tensor(u_f, "u_f", io)
    out_dtype = output_dtype(out_dtype, u_f.dtype)
    if u_f.dim() != 3:
        raise ValueError(f"u_f must be (B, E, L), got {tuple(u_f.shape)}")
    if not write_float and act is None:
        raise ValueError("write_float=False needs act (nothing would be written)")
    bsz, e, length = u_f.shape
    dev = u_f.device
    dt_given = {d: (w is not None or i is not None or a is not None or bias is not None)
                for d, (i, w, a, bias) in (("f", (dt_in_f, dt_weight_f, dt_act_f, dt_bias_f)),
                                           ("b", (dt_in_b, dt_weight_b, dt_act_b, dt_bias_b)))}
    if dt_given["f"] != dt_given["b"]:
        raise ValueError("fuse dt_proj in both directions or in neither: the dt_proj inputs of only the "
                         f"{'forward' if dt_given['f'] else 'backward'} direction are given")
    fused = dt_given["f"]
    check_tensor(A_f, "A_f", torch.float32, device=dev)
    if A_f.dim() != 2 or A_f.shape[0] != e:
        raise ValueError(f"A_f must be (E, N) with E={e}, got {tuple(A_f.shape)}")
    n = A_f.shape[1]
    check_tensor(A_b, "A_b", torch.float32, (e, n), dev)
    args = dict(c=float(scale), E=e, N=n, L=length)
    dts, ranks = {}, {}
    for d, (u, delta, A, Bm, Cm, D, dt) in (
            ("f", (u_f, delta_f, A_f, B_f, C_f, D_f, (dt_in_f, dt_weight_f, dt_act_f, dt_bias_f))),
            ("b", (u_b, delta_b, A_b, B_b, C_b, D_b, (dt_in_b, dt_weight_b, dt_act_b, dt_bias_b)))):
        check_tensor(u, f"u_{d}", io, (bsz, e, length), dev)
        check_tensor(Bm, f"B_{d}", io, (bsz, n, length), dev)
        check_tensor(Cm, f"C_{d}", io, (bsz, n, length), dev)
        args.update({f"u{d}_ptr": u, f"A{d}_ptr": A.contiguous(), f"B{d}_ptr": Bm, f"C{d}_ptr": Cm})
        strided = [("u", "bel", u), ("B", "bnl", Bm), ("C", "bnl", Cm)]
        if fused:
            if delta is not None:
                raise ValueError(f"delta_{d} must be None when dt_proj is fused (dt_in_{d}, dt_weight_{d}, "
                                 f"dt_act_{d} given): the kernel computes delta itself")
            dts[d], ranks[d] = _dt_proj_args(d, *dt, bsz, e, length, dev, args)
        else:
            if delta is None:
                raise ValueError(f"delta_{d} is required unless dt_proj is fused (dt_in_{d}, dt_weight_{d}, "
                                 f"dt_act_{d} given)")
            check_tensor(delta, f"delta_{d}", io, (bsz, e, length), dev)
            args[f"d{d}_ptr"] = delta
            strided.append(("d", "bel", delta))
        for name, dims, t in strided:
            args.update({f"stride_{name}{d}{k}": s for k, s in zip(dims, t.stride())})
        if D is not None:
            args[f"D{d}_ptr"] = check_tensor(D, f"D_{d}", torch.float32, (e,), dev, True)
    if z is not None:
        check_tensor(z, "z", io, (bsz, e, length), dev)
        args.update(z_ptr=z, stride_zb=z.stride(0), stride_ze=z.stride(1), stride_zl=z.stride(2))
    if z_smooth is not None:
        if z is None:
            raise ValueError("z_smooth needs z (the Smooth-SiLU gates z)")
        args["zs_ptr"] = check_tensor(z_smooth, "z_smooth", torch.float32, (e,), dev, True)
    out = torch.empty((bsz, length, e), dtype=out_dtype, device=dev) if write_float else None
    workspace_is_out = write_float and out_dtype == torch.float32
    if out is not None:
        args["out_ptr"] = out
    if not workspace_is_out:
        args["ws_ptr"] = torch.empty((bsz, length, e), dtype=torch.float32, device=dev)
    codes, smooth, per_token, bits = codes_epilogue_args(act, bsz, length, e, dev, args)
    autotune = block is None and not interpreting()
    kernel = _kernel(has_D_f=D_f is not None, has_D_b=D_b is not None, has_z=z is not None,
                     delta_softplus=bool(delta_softplus), write_float=write_float, emit_codes=act is not None,
                     per_token=per_token, smooth=smooth, act_bits=bits, workspace_is_out=workspace_is_out,
                     autotune=autotune, provenance=tuple(str(p) for p in provenance),
                     out_dtype=FLOAT_IO[out_dtype] if write_float else "float32",
                     dt_proj_f=dts.get("f"), dt_proj_b=dts.get("b"), smooth_gate=z_smooth is not None)
    meta = dict(BLOCK_N=max(2, next_power_of_2(n)))
    if fused:
        args.update(Rf=ranks["f"], Rb=ranks["b"])
        meta["BLOCK_R"] = max(2, next_power_of_2(max(ranks.values())))
    if autotune:
        grid = lambda cfg: (bsz, -(-e // cfg["BLOCK_E"]))  # noqa: E731
        kernel[grid](**args, **meta, **launch_options())
    else:
        blk = dict(block or {})
        be = blk.pop("BLOCK_E", max(2, min(64, next_power_of_2(e))))
        opts = launch_options(blk.pop("num_warps", 4), blk.pop("num_stages", None))
        kernel[(bsz, -(-e // be))](**args, BLOCK_E=be, **meta, **opts)
    return out if act is None else (out, codes)


def _dt_proj_args(d: str, dt_in, weight, act, bias, bsz: int, e: int, length: int, dev, args: dict):
    """Check direction ``d``'s dt_proj inputs and add their pointers and strides to ``args``.

    Returns:
        ``(DtProj, R)``: the render flags and the rank.
    """
    for value, name in ((dt_in, "dt_in"), (weight, "dt_weight"), (act, "dt_act")):
        if value is None:
            raise ValueError(f"{name}_{d} is required when dt_proj is fused")
    if not isinstance(weight, QWeight):
        raise ValueError(f"dt_weight_{d} must be a QWeight, got {type(weight).__name__}")
    if not isinstance(act, ActQuant):
        raise ValueError(f"dt_act_{d} must be an ActQuant, got {type(act).__name__}")
    if weight.codes is None:
        raise ValueError(f"dt_weight_{d} is stored packed only: the fused dt_proj reads unpacked int8 codes "
                         "(QWeight.codes; pack(keep_codes=True) keeps them)")
    codes = check_tensor(weight.codes, f"dt_weight_{d}.codes", torch.int8, device=dev)
    if codes.dim() != 2 or codes.shape[0] != e:
        raise ValueError(f"dt_weight_{d}.codes must be (E, R) with E={e}, got {tuple(codes.shape)}")
    rank = codes.shape[1]
    check_tensor(weight.wsum, f"dt_weight_{d}.wsum", torch.int32, (e,), dev, True)
    check_tensor(weight.scale, f"dt_weight_{d}.scale", torch.float32, (e,), dev, True)
    check_tensor(dt_in, f"dt_in_{d}", tuple(FLOAT_IO), (bsz, length, rank), dev)
    if not isinstance(act.bits, int) or not 2 <= act.bits <= 8:
        raise ValueError(f"dt_act_{d}.bits must be in 2..8, got {act.bits!r}")
    t = act.tokens
    if t not in (1, length):
        raise ValueError(f"dt_act_{d} has per-token parameters for {t} tokens, but L={length}")
    for name in ("scale", "inv_scale", "zero_point"):
        check_tensor(getattr(act, name), f"dt_act_{d}.{name}", torch.float32, (t,), dev, True)
    smooth = act.inv_smooth is not None
    if smooth:
        args[f"dtinv_s{d}_ptr"] = check_tensor(act.inv_smooth, f"dt_act_{d}.inv_smooth", torch.float32, (rank,),
                                               dev, True)
    if bias is not None:
        args[f"dtbias{d}_ptr"] = check_tensor(bias, f"dt_bias_{d}", torch.float32, (e,), dev, True)
    args.update({f"dtx{d}_ptr": dt_in, f"dtw{d}_ptr": codes, f"dtwsum{d}_ptr": weight.wsum,
                 f"dtsw{d}_ptr": weight.scale, f"dtinv_sa{d}_ptr": act.inv_scale, f"dtsa{d}_ptr": act.scale,
                 f"dtza{d}_ptr": act.zero_point})
    args.update({f"stride_dtx{d}{k}": s for k, s in zip("blr", dt_in.stride())})
    args.update({f"stride_dtw{d}{k}": s for k, s in zip("er", codes.stride())})
    return DtProj(t > 1, smooth, act.bits, bias is not None), rank
