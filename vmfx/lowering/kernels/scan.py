"""``scan``: the selective scan (S6) of Mamba with its output gate, state held in registers.

What it computes (the semantics of :func:`vmfx.ops.selective_scan` with input-dependent
``B``, ``C`` of shape (B, N, L)), for every batch ``b`` and channel ``e``::

    dt[t]  = softplus(delta[t] + delta_bias[e])           (bias and softplus optional)
    h[t]   = exp(dt[t] A[e, :]) * h[t-1] + dt[t] u[t] B[:, t],      h[-1] = 0,   h: (N,)
    y[t]   = sum_n h[t, n] C[n, t]
    out[t] = (y[t] + D[e] u[t]) * silu(z[t])              (D and z optional)

With ``smooth_gate`` the gate is MambaQuant's Smooth-SiLU ``z[t] * sigmoid(s[e] z[t])`` with an
(E,) factor per channel (:mod:`vmfx.quant.smooth_silu`), computed as ``z / (1 + exp(-(s z)))``.

``exp(dt A)`` is ``exp2(dt * (A log2 e))`` as in vmfx's CPU op; softplus has threshold 20 and
computes log1p with Goldberg's trick. With ``flip_z`` the gate reads ``z`` reversed along L (the
backward direction of a Vim block, whose ``z`` is the forward ``z`` flipped).

Quantized hidden state (Shi et al.; :func:`vmfx.ops.selective_scan`'s ``step_scale``,
``out_scale``, ``state_scales``): with ``step_scale`` ``exp(dt A)`` is multiplied by
``step[t]`` (the step ratio of a reparameterized scan, whose u, B, C arrive already divided /
multiplied by the factors); with ``quant_state`` the state is fake-quantized in registers right after
each update, ``h = rint(h / s[t])`` clamped to ``[-QMAX, QMAX]`` times ``s[t]`` (one static scale
per step, read from an (L,) tensor), before ``y[t]`` and ``h[t+1]`` read it; with ``out_scale``
``y + D u`` is multiplied by ``r_C[e]`` before the gate.

One program per (batch, BLOCK_E channels): the (BLOCK_E, N) state lives in registers and a
sequential loop runs over L, each step loading one column of u, delta, z (BLOCK_E values each,
any strides, so transposed views of the producers' (B, L, E) outputs can be passed) and of B, C
(N values, shared by all channels of the batch element). Memory traffic: reads s B E L bytes for
each of u, delta, z once, 2 x s B N L bytes of B and C once per channel block, writes s B E L
bytes (s = 4 for float32, 2 for half precision); the (B, E, L, N) states never touch memory.

u, delta, B, C and z may each be float32, float16 or bfloat16 (converted to float32 in registers;
A, D, delta_bias and the state's factors are float32); the state and every step run in float32,
and ``out`` is written in ``out_dtype`` (default ``u``'s dtype), rounded once at the store. The parallelism is B x E / BLOCK_E programs,
so small BLOCK_E (16-32) keeps a GPU busy at Vim sizes (E = 384..768).
"""

from __future__ import annotations

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
from ..template import KernelTemplate, lines

__all__ = ["KERNEL_NAME", "AUTOTUNE_CONFIGS", "TEMPLATE", "render_scan", "selective_scan"]

KERNEL_NAME = "vmfx_scan"

#: GPU configs tried by ``@triton.autotune`` (keyed on E, N, L).
AUTOTUNE_CONFIGS = [
    {"BLOCK_E": 16, "num_warps": 2},
    {"BLOCK_E": 32, "num_warps": 4},
    {"BLOCK_E": 64, "num_warps": 4},
    {"BLOCK_E": 128, "num_warps": 8},
]

_LOG2E = 1.4426950408889634


#: The ``scan`` kernel: one program per (batch, BLOCK_E channels), the state of each channel in
#: registers, a loop over time (the main loop); slots: the optional arguments, the per-channel
#: parameters, delta's bias and softplus, the state's step factor and quantization, the output
#: (skip term, scale, gate) and its store.
TEMPLATE = KernelTemplate("""
    @triton.jit
    def $kernel_name(
        # pointers: u, delta, z (B, E, L); A (E, N); B, C (B, N, L); D, delta_bias (E,)
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr,$optional_args
        $state_args
        out_ptr,
        # dimensions
        E, N, L,
        # strides (batch, channel-or-state, time)
        stride_ub, stride_ue, stride_ul, stride_db, stride_de, stride_dl,
        $z_strides
        stride_Bb, stride_Bn, stride_Bl, stride_Cb, stride_Cn, stride_Cl,
        # meta-parameters (BLOCK_N >= N: the whole state of a channel in registers)
        BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_b = tl.program_id(0)
        offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_n = tl.arange(0, BLOCK_N)
        mask_e = offs_e < E
        mask_n = offs_n < N
        # A * log2(e): exp(dt A) = exp2(dt A log2 e); padded states have A = 0, B = 0: h stays 0
        A2 = tl.load(A_ptr + offs_e[:, None] * N + offs_n[None, :],
                     mask=mask_e[:, None] & mask_n[None, :], other=0.0) * $log2e
        $channel_params
        u_base = u_ptr + pid_b * stride_ub + offs_e * stride_ue
        d_base = delta_ptr + pid_b * stride_db + offs_e * stride_de
        B_base = B_ptr + pid_b * stride_Bb + offs_n * stride_Bn
        C_base = C_ptr + pid_b * stride_Cb + offs_n * stride_Cn
        out_base = out_ptr + pid_b * E * L + offs_e * L
        h = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
        $z_base
        for t in range(0, L):
            u = tl.load(u_base + t * stride_ul, mask=mask_e, other=0.0).to(tl.float32)
            dt = tl.load(d_base + t * stride_dl, mask=mask_e, other=0.0).to(tl.float32)
            $delta
            Bt = tl.load(B_base + t * stride_Bl, mask=mask_n, other=0.0).to(tl.float32)
            Ct = tl.load(C_base + t * stride_Cl, mask=mask_n, other=0.0).to(tl.float32)
            dA = tl.exp2(dt[:, None] * A2)
            $step_scale
            h = dA * h + (dt * u)[:, None] * Bt[None, :]
            $quant_state
            y = tl.sum(h * Ct[None, :], axis=1)
            $output
            tl.store(out_base + t, $stored, mask=mask_e)
""")


def render_scan(*, has_D: bool = True, has_z: bool = True, delta_bias: bool = False,
                delta_softplus: bool = True, flip_z: bool = False, autotune: bool = False,
                provenance: Sequence[str] = (), step_scale: bool = False, out_scale: bool = False,
                quant_state: bool = False, state_bits: int = 8, out_dtype: str = "float32",
                smooth_gate: bool = False) -> str:
    """Render the source of one ``scan`` kernel.

    Args:
        has_D: add the skip term ``D u``.
        has_z: gate with ``silu(z)``.
        delta_bias: add a (E,) bias to delta.
        delta_softplus: apply softplus to delta (after the bias).
        flip_z: read ``z`` reversed along L.
        step_scale: multiply ``exp(dt A)`` by an (L,) per-step factor.
        out_scale: multiply ``y + D u`` by an (E,) factor.
        quant_state: fake-quantize the state at every step with an (L,) tensor of step sizes.
        state_bits: the state's bit width (symmetric, ``QMAX = 2^(bits-1) - 1``).
        out_dtype: the dtype of ``out`` ("float32", "float16" or "bfloat16").
        smooth_gate: gate with the Smooth-SiLU ``z * sigmoid(s z)``, ``s`` an (E,) float32 tensor
            (``zs_ptr``), instead of ``silu(z)`` (needs ``has_z``).
        autotune: wrap in ``@triton.autotune`` over :data:`AUTOTUNE_CONFIGS`.
        provenance: FX nodes, for the header.

    Returns:
        The module source; the kernel is :data:`KERNEL_NAME`.
    """
    if smooth_gate and not has_z:
        raise ValueError("smooth_gate needs has_z (the Smooth-SiLU gates z)")
    stored = store_value("y", out_dtype)  # checks out_dtype
    params = dict(has_D=has_D, has_z=has_z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                  flip_z=flip_z, autotune=autotune, step_scale=step_scale, out_scale=out_scale,
                  quant_state=quant_state, state_bits=state_bits)
    if out_dtype != "float32":
        params["out_dtype"] = out_dtype
    if smooth_gate:
        params["smooth_gate"] = True
    gate = "_vmfx_smooth_silu" if smooth_gate else "_vmfx_silu"
    helpers = ((["_vmfx_softplus"] if delta_softplus else []) + ([gate] if has_z else [])
               + (["_vmfx_rint"] if quant_state else []))
    preamble = render_preamble("scan", provenance, params, helpers,
                               (AUTOTUNE_CONFIGS, ["E", "N", "L"]) if autotune else None)
    state_args = ((" step_ptr," if step_scale else "") + (" os_ptr," if out_scale else "")
                  + (" hs_ptr," if quant_state else ""))
    return preamble + TEMPLATE.fill(
        kernel_name=KERNEL_NAME,
        optional_args=(" D_ptr," if has_D else "") + (" z_ptr," if has_z else "") + (" zs_ptr," if smooth_gate else "")
        + (" db_ptr," if delta_bias else ""),
        state_args=lines("# quantized state: step (L,), r_C (E,), state step sizes (L,)", state_args.strip())
        if state_args else "",
        z_strides="stride_zb, stride_ze, stride_zl," if has_z else "",
        log2e=repr(_LOG2E),
        channel_params=lines("D = tl.load(D_ptr + offs_e, mask=mask_e, other=0.0)" if has_D else None,
                             "db = tl.load(db_ptr + offs_e, mask=mask_e, other=0.0)" if delta_bias else None,
                             "rc = tl.load(os_ptr + offs_e, mask=mask_e, other=0.0)" if out_scale else None,
                             "zs = tl.load(zs_ptr + offs_e, mask=mask_e, other=1.0)" if smooth_gate else None),
        z_base="z_base = z_ptr + pid_b * stride_zb + offs_e * stride_ze" if has_z else "",
        delta=lines("dt = dt + db" if delta_bias else None, "dt = _vmfx_softplus(dt)" if delta_softplus else None),
        step_scale="dA = dA * tl.load(step_ptr + t)" if step_scale else "",
        quant_state=_quant_state(state_bits) if quant_state else "",
        output=_output(has_D, out_scale, has_z, flip_z, smooth_gate),
        stored=stored,
    )


def _quant_state(state_bits: int) -> str:
    """Fake-quantize the state ``h`` with step ``t``'s step size (symmetric, ``state_bits`` bits)."""
    qmax = float(2 ** (state_bits - 1) - 1)
    return lines("hs = tl.load(hs_ptr + t)",
                 f"h = tl.minimum(tl.maximum(_vmfx_rint(h / hs), {-qmax!r}), {qmax!r}) * hs")


def _output(has_D: bool, out_scale: bool, has_z: bool, flip_z: bool, smooth_gate: bool = False) -> str:
    """The step's output ``y``: the skip term ``D u``, the scale ``r_C``, the gate ``silu(z)`` (or
    the Smooth-SiLU ``z * sigmoid(zs z)``)."""
    tz = "L - 1 - t" if flip_z else "t"
    return lines(
        "y = y + D * u" if has_D else None,
        "y = y * rc" if out_scale else None,
        f"z = tl.load(z_base + ({tz}) * stride_zl, mask=mask_e, other=0.0).to(tl.float32)" if has_z else None,
        ("y = y * _vmfx_smooth_silu(z, zs)" if smooth_gate else "y = y * _vmfx_silu(z)") if has_z else None,
    )


_kernel = kernel_cache(render_scan, KERNEL_NAME)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    flip_z: bool = False,
    block: Mapping[str, int] | None = None,
    provenance: Sequence[str] = (),
    step_scale: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
    state_scales: torch.Tensor | None = None,
    state_bits: int = 8,
    out_dtype: torch.dtype | None = None,
    z_smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the selective scan.

    Args:
        u, delta: (B, E, L) float32, float16 or bfloat16, any strides.
        A: (E, N) float32 (real; ``-exp(A_log)``).
        B, C: (B, N, L) float32, float16 or bfloat16, any strides.
        D: optional (E,) float32.
        z: optional (B, E, L) float32, float16 or bfloat16 gate, any strides.
        delta_bias: optional (E,) float32.
        delta_softplus: apply softplus to delta.
        flip_z: read ``z`` reversed along L.
        step_scale: optional (L,) float32 factor on ``exp(dt A)`` per step.
        out_scale: optional (E,) float32 factor on ``y + D u``.
        state_scales: optional (L,) float32 positive step sizes: the state is quantized to
            ``state_bits`` bits at every step.
        state_bits: bit width of the state quantization.
        block: fixed ``BLOCK_E`` (optional ``num_warps``); default: autotuned on the GPU, one
            block of all channels (at most 64) under the interpreter.
        provenance: FX node names, for the header.
        out_dtype: the dtype of ``out``: float32, float16 or bfloat16; default ``u``'s.
        z_smooth: optional (E,) float32 factors ``s``: the gate is the Smooth-SiLU
            ``z * sigmoid(s z)`` (needs ``z``).

    Returns:
        ``out`` (B, E, L), contiguous.
    """
    io = tuple(FLOAT_IO)
    check_tensor(u, "u", io)
    out_dtype = output_dtype(out_dtype, u.dtype)
    if u.dim() != 3:
        raise ValueError(f"u must be (B, E, L), got {tuple(u.shape)}")
    bsz, e, length = u.shape
    dev = u.device
    check_tensor(delta, "delta", io, (bsz, e, length), dev)
    check_tensor(A, "A", torch.float32, device=dev)
    if A.dim() != 2 or A.shape[0] != e:
        raise ValueError(f"A must be (E, N) with E={e}, got {tuple(A.shape)}")
    n = A.shape[1]
    A = A.contiguous()
    check_tensor(B, "B", io, (bsz, n, length), dev)
    check_tensor(C, "C", io, (bsz, n, length), dev)
    out = torch.empty((bsz, e, length), dtype=out_dtype, device=dev)
    args = dict(u_ptr=u, delta_ptr=delta, A_ptr=A, B_ptr=B, C_ptr=C, out_ptr=out, E=e, N=n, L=length,
                stride_ub=u.stride(0), stride_ue=u.stride(1), stride_ul=u.stride(2),
                stride_db=delta.stride(0), stride_de=delta.stride(1), stride_dl=delta.stride(2),
                stride_Bb=B.stride(0), stride_Bn=B.stride(1), stride_Bl=B.stride(2),
                stride_Cb=C.stride(0), stride_Cn=C.stride(1), stride_Cl=C.stride(2))
    if D is not None:
        args["D_ptr"] = check_tensor(D, "D", torch.float32, (e,), dev, True)
    if z is not None:
        check_tensor(z, "z", io, (bsz, e, length), dev)
        args.update(z_ptr=z, stride_zb=z.stride(0), stride_ze=z.stride(1), stride_zl=z.stride(2))
    if z_smooth is not None:
        if z is None:
            raise ValueError("z_smooth needs z (the Smooth-SiLU gates z)")
        args["zs_ptr"] = check_tensor(z_smooth, "z_smooth", torch.float32, (e,), dev, True)
    if delta_bias is not None:
        args["db_ptr"] = check_tensor(delta_bias, "delta_bias", torch.float32, (e,), dev, True)
    if step_scale is not None:
        args["step_ptr"] = check_tensor(step_scale, "step_scale", torch.float32, (length,), dev, True)
    if out_scale is not None:
        args["os_ptr"] = check_tensor(out_scale, "out_scale", torch.float32, (e,), dev, True)
    if state_scales is not None:
        args["hs_ptr"] = check_tensor(state_scales, "state_scales", torch.float32, (length,), dev, True)
        if isinstance(state_bits, bool) or not isinstance(state_bits, int) or not 2 <= state_bits <= 16:
            raise ValueError(f"state_bits must be an integer in 2..16, got {state_bits!r}")
    autotune = block is None and not interpreting()
    kernel = _kernel(has_D=D is not None, has_z=z is not None, delta_bias=delta_bias is not None,
                     delta_softplus=bool(delta_softplus), flip_z=flip_z and z is not None,
                     autotune=autotune, provenance=tuple(str(p) for p in provenance),
                     step_scale=step_scale is not None, out_scale=out_scale is not None,
                     quant_state=state_scales is not None,
                     state_bits=int(state_bits) if state_scales is not None else 8,
                     out_dtype=FLOAT_IO[out_dtype], smooth_gate=z_smooth is not None)
    bn = max(2, next_power_of_2(n))
    if autotune:
        grid = lambda meta: (bsz, -(-e // meta["BLOCK_E"]))  # noqa: E731
        kernel[grid](**args, BLOCK_N=bn, **launch_options())
    else:
        blk = dict(block or {})
        be = blk.pop("BLOCK_E", max(2, min(64, next_power_of_2(e))))
        opts = launch_options(blk.pop("num_warps", 4), blk.pop("num_stages", None))
        kernel[(bsz, -(-e // be))](**args, BLOCK_E=be, BLOCK_N=bn, **opts)
    return out
