"""The exact CPU reference of every vmfx kernel (torch only): test oracle and CPU backend.

Each function here computes what the matching Triton template in :mod:`vmfx.lowering.kernels`
computes, with the same numerics contract, so that the integer parts (activation codes, the int32
GEMM accumulator) agree bit for bit and the float parts to float32 rounding. The same parameter
objects (:class:`ActQuant`, :class:`QWeight`, defined in :mod:`vmfx.lowering.params`) feed both,
prepared once, at lowering time, not per call. OuroMamba's mixed-precision linear has its own
reference, :mod:`vmfx.lowering.mixed_reference`.

Numerics contract
-----------------
A quantized linear layer of the converted graph computes, in float32,
``y = F.linear(fq_a(x / s), fq_w(W * s)) + b``. The lowered form is:

* **activation codes** (rows ``r`` of a (M, K) matrix are (batch, token) pairs, ``t = r % T``;
  ``T = 1`` is per-tensor, ``T = L`` per-token static)::

      q[r, k] = clamp(rint((x[r, k] * inv_s[k]) * inv_sa[t]) + z_a[t], qmin, qmax)

  with ``inv_s = 1 / s`` (ones without smoothing) and ``inv_sa = 1 / s_a`` precomputed in
  float32, two correctly rounded float32 multiplies in that order, ``rint`` = round half to even
  (``torch.round``), ``(qmin, qmax) = (0, 2^b - 1)``. Codes are stored *shifted* to int8,
  ``q - 2^(b-1)`` (``q - 128`` at 8 bits); :func:`unshift_codes` recovers ``q``. Because of the two
  reciprocal multiplies, a code can differ by one from the graph's ``round(x / s / s_a)`` when
  ``x / s / s_a`` lies within an ulp or two of a rounding tie (the graph divides).
* **weights**: per-output-channel symmetric codes ``Wq`` in ``[-(2^(b-1)-1), 2^(b-1)-1]`` (int8
  storage; 4-bit codes are packed two per byte in lowered models, :func:`pack_int4`, and unpacked
  by the GEMM in registers or by this reference, :meth:`QWeight.unpacked`), step
  ``s_w`` (N,), ``wsum[n] = sum_k Wq[n, k]`` (int32).
* **GEMM**: ``acc[r, n] = sum_k (q[r,k] - off) * Wq[n,k] + (off - z_a[t]) * wsum[n]``
  ``= sum_k (q[r,k] - z_a[t]) * Wq[n,k]`` exactly in int32 (``off = 2^(b-1)``).
* **dequantize**: ``y = float32(acc) * (s_a[t] * s_w[n])``, then ``+ bias[n]``, then the
  epilogue ops in order (see :func:`apply_epilogue`).

The other kernels (causal conv + SiLU, selective scan, merge of the two scan directions) produce
float outputs and, where they feed a quantized linear, the codes of that linear's input by the
same activation formula. The online Hadamard (:func:`hadamard_quantize`) rotates its float input
in float32, in the fixed order of :func:`vmfx.quant.online_hadamard.fast_hadamard_transform`, then
applies the activation formula: the kernel's codes equal this reference's bit for bit; fused
into ``out_proj``'s GEMM as its prologue (:func:`hadamard_qlinear`), it is that op followed by
:func:`qlinear` on the codes.

Two paths, one result
---------------------
On CPU tensors a fast path (see the section "fast path" below: float32 GEMMs on the codes where
a per-weight bound proves them exact, K split where it does not, tables prepared once per
weight, overflow excluded by the bound instead of checked per call, scratch buffers) gives the
slow path's results bit for bit (``tests/lowering/test_reference_fast.py``); ``set_fast_path(False)``
or ``VMFX_REFERENCE_SLOW=1`` selects the slow path, the straightforward oracle.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from ..ops.selective_scan import selective_scan as _selective_scan
from ..quant.online_hadamard import fast_hadamard_transform
from ..quant.smooth_silu import smooth_silu
from .params import ActQuant, QWeight, make_act_quant, pack_int4, unpack_int4

__all__ = [
    "ActQuant",
    "QWeight",
    "pack_int4",
    "unpack_int4",
    "make_act_quant",
    "rint",
    "quantize_act",
    "unshift_codes",
    "dequantize_act",
    "qlinear",
    "QLinearPlan",
    "qlinear_plan",
    "set_fast_path",
    "fast_path_enabled",
    "apply_epilogue",
    "causal_conv1d_silu",
    "selective_scan",
    "merge_quantize",
    "hadamard_quantize",
    "hadamard_qlinear",
    # both directions of a Vim block in one launch each
    "causal_conv1d_silu_bidir",
    "qlinear_group",
    "scan_merge",
]


# ------------------------------------------------------------------------------ quantize


def rint(v: torch.Tensor) -> torch.Tensor:
    """Round half to even (the contract's ``rint``): ``torch.round``."""
    return torch.round(v)


def _rows(x: torch.Tensor, tokens: int, what: str) -> torch.Tensor:
    """(…, K) -> (M, K) rows ordered (batch, token); checks the token count."""
    if x.dim() < 2:
        raise ValueError(f"{what} must have at least 2 dimensions (rows, K), got {tuple(x.shape)}")
    if tokens > 1:
        if x.dim() >= 3 and x.shape[-2] != tokens:
            raise ValueError(f"{what} has {x.shape[-2]} tokens but the per-token parameters have {tokens}")
        if x.dim() == 2 and x.shape[0] % tokens:
            raise ValueError(f"{what}: {x.shape[0]} rows is not a multiple of the {tokens} tokens")
    return x.reshape(-1, x.shape[-1])


def _token_params(act: ActQuant, m: int):
    tok = torch.arange(m, device=act.device) % act.tokens
    return tok


def quantize_act(x: torch.Tensor, act: ActQuant) -> torch.Tensor:
    """Activation codes of ``x`` (…, K), shifted to int8 (``q - 2^(b-1)``).

    Args:
        x: float activations; rows are (batch, token) pairs (see :class:`ActQuant`).
        act: the prepared parameters.

    Returns:
        int8 codes of ``x``'s shape.
    """
    x2 = _rows(x, act.tokens, "x").float()
    if _fast_ok(x2):
        return (_quantize_float(x2, act) if x2.numel() else x2).to(torch.int8).reshape(x.shape)
    tok = _token_params(act, x2.shape[0])
    v = x2 * act.inv_smooth if act.inv_smooth is not None else x2
    v = v * act.inv_scale[tok][:, None]
    q = torch.clamp(rint(v) + act.zero_point[tok][:, None], act.qmin, act.qmax)
    return (q - act.offset).to(torch.int8).reshape(x.shape)


def unshift_codes(codes: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """The unsigned codes ``q`` in ``[0, 2^b - 1]`` (int16) from stored int8 ``q - 2^(b-1)``."""
    return codes.to(torch.int16) + 2 ** (bits - 1)


def dequantize_act(codes: torch.Tensor, act: ActQuant) -> torch.Tensor:
    """``(q - z_a) * s_a`` (float32) of stored codes (…, K): the fake-quantized smoothed input."""
    c2 = _rows(codes, act.tokens, "codes")
    tok = _token_params(act, c2.shape[0])
    q = unshift_codes(c2, act.bits).float()
    return ((q - act.zero_point[tok][:, None]) * act.scale[tok][:, None]).reshape(codes.shape)


# ------------------------------------------------------------------------------ linear


def apply_epilogue(y: torch.Tensor, ops: Sequence[Sequence] | None,
                   inputs: Mapping[str, torch.Tensor] | None = None, *, inplace: bool = False) -> torch.Tensor:
    """Apply epilogue ops (see :func:`vmfx.lowering.codegen.render_epilogue`) in torch.

    Args:
        y: the (M, N) float32 output (whole output).
        ops: e.g. ``[("silu",), ("add", "residual"), ("mul", 0.5), ("mul", "gamma", "channel")]``.
        inputs: the extra tensors by name: ``"full"`` ones shaped like ``y`` (any leading shape
            with the same number of elements), ``"channel"`` ones (N,).
        inplace: overwrite ``y`` where an op allows it (same operations, same roundings; the CPU
            fast path uses it on its own output).
    """
    from .codegen import Epilogue  # light module; imports triton lazily only

    ep = Epilogue.parse(ops)
    inputs = dict(inputs or {})
    fns = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
           "rsub": lambda a, b: torch.sub(b, a), "rdiv": lambda a, b: torch.div(b, a)}
    inplace_fns = {"add": torch.Tensor.add_, "sub": torch.Tensor.sub_, "mul": torch.Tensor.mul_,
                   "div": torch.Tensor.div_}
    for op in ep.ops:
        name = op[0]
        if inplace and name == "silu":
            y = F.silu(y, inplace=True)
        elif inplace and name in inplace_fns:
            rhs = op[1]
            if isinstance(rhs, str):
                t = inputs[rhs].float()
                rhs = t.reshape(1, y.shape[-1]) if ep.layout(rhs) == "channel" else t.reshape(y.shape)
            y = inplace_fns[name](y, rhs)
        elif name == "silu":
            y = F.silu(y)
        elif name == "softplus":
            y = F.softplus(y)  # threshold 20
        else:
            rhs = op[1]
            if isinstance(rhs, str):
                t = inputs[rhs].float()
                rhs = t.reshape(1, y.shape[-1]) if ep.layout(rhs) == "channel" else t.reshape(y.shape)
            y = fns[name](y, rhs)
    return y


def qlinear(x: torch.Tensor, weight: QWeight, act: ActQuant, bias: torch.Tensor | None = None,
            epilogue: Sequence[Sequence] | None = None,
            epilogue_inputs: Mapping[str, torch.Tensor] | None = None,
            return_acc: bool = False):
    """The quantized linear layer: quantize (unless given codes), integer GEMM, zero-point
    correction, dequantize, bias, epilogue.

    Args:
        x: (…, K) float activations, or int8 codes already shifted (``q - 2^(b-1)``).
        weight: the quantized weight (N, K).
        act: activation parameters (its smoothing is ignored for pre-quantized ``x``).
        bias: optional (N,) float.
        epilogue: ops applied to the (M, N) float output, see :func:`apply_epilogue`.
        epilogue_inputs: the extra tensors named by the epilogue: (…, N) like ``y``, or (N,) for
            ``"channel"`` operands.
        return_acc: also return the int32 accumulator.

    Returns:
        ``y`` (…, N) float32, or ``(y, acc)`` with ``acc`` (…, N) int32.
    """
    if _fast_ok(x):
        return _qlinear_fast(x, weight, act, bias, epilogue, epilogue_inputs, return_acc)
    codes = x if x.dtype == torch.int8 else quantize_act(x, act)
    c2 = _rows(codes, act.tokens, "x")
    m, k = c2.shape
    n, kw = weight.shape
    if k != kw:
        raise ValueError(f"x has K={k} but the weight is {weight.shape}")
    tok = _token_params(act, m)
    # float64 products and sums of integers below 2^53 are exact
    acc = (c2.double() @ weight.unpacked().double().T)
    acc = acc + (act.offset - act.zero_point[tok].double())[:, None] * weight.wsum.double()[None, :]
    if acc.numel() and float(acc.abs().max()) >= 2**31:
        raise OverflowError("the int32 accumulator would overflow (K too large)")
    acc = acc.to(torch.int64)
    y = acc.float() * (act.scale[tok][:, None] * weight.scale[None, :])
    if bias is not None:
        y = y + bias.float()[None, :]
    y = apply_epilogue(y, epilogue, epilogue_inputs)
    out_shape = tuple(codes.shape[:-1]) + (n,)
    y = y.reshape(out_shape)
    return (y, acc.to(torch.int32).reshape(out_shape)) if return_acc else y


# ------------------------------------------------------------------------------ fast path
#
# The CPU fast path computes exactly what the slow path above computes (bit for bit: same codes,
# same int32 accumulator, same float32 roundings), with less work per call:
#
# * activation codes are made with broadcasting over the (batch, token) rows instead of gathered
#   per row, and stay float32 (small integers, exact) when they feed the GEMM;
# * the GEMM runs in float32 on the integer codes. A float32 sum of integers is exact while every
#   partial sum stays below 2^24 in magnitude; the partial sums of ``sum_k c[r,k] Wq[n,k]`` with
#   ``|c| <= 2^(b-1)`` are bounded by ``2^(b-1) * max_n sum_k |Wq[n,k]|``, a bound of the weight
#   alone, proved once per (weight, activation parameters) by :func:`qlinear_plan` (the
#   worst case is ``K 2^(a-1) 2^(w-1) < 2^24``). Where it does not hold, K is split
#   into chunks for which it does and the chunks are summed in float64 (exact below 2^53);
# * the zero-point correction ``(2^(b-1) - z_a[t]) wsum[n]`` and the dequantization scale
#   ``s_a[t] s_w[n]`` are (T, N) tables made once per plan and applied in place by broadcasting;
# * the int32 overflow check runs only where the proved bound ``max_n sum_k |Wq[n,k]| *
#   max_t max(z_t - qmin, qmax - z_t)`` does not already exclude an overflow.
#
# It is used for CPU tensors when float32 matmuls run at full precision
# (``torch.get_float32_matmul_precision() == "highest"``: other settings may use bf16/TF32);
# ``set_fast_path(False)`` or ``VMFX_REFERENCE_SLOW=1`` selects the slow path (the oracle the fast
# path is tested against).

_FAST_PATH = os.environ.get("VMFX_REFERENCE_SLOW", "").lower() not in ("1", "true", "yes")
_EXACT_F32 = 2**24  # every integer of magnitude <= 2^24 is a float32
_PLANS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def qlinear_group(codes: torch.Tensor, weights: Sequence[QWeight], acts: Sequence[ActQuant],
                  biases: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """G quantized linears on int8 codes, stacked: ``out[g] = qlinear(codes[g], weights[g], acts[g],
    biases[g])`` as (M, N) rows. The oracle of :func:`vmfx.lowering.kernels.qlinear_group` (one
    launch for, e.g., both directions' ``x_proj`` of a Vim block).

    Args:
        codes: (G, M, K) int8 shifted codes ``q - 2^(b-1)``, rows token-major.
        weights, acts: G of each; biases: None or G entries ((N,) float or None).

    Returns:
        (G, M, N) float32.

    Raises:
        ValueError: codes not (G, M, K) int8, or sequences whose length is not G.
    """
    if codes.dtype != torch.int8 or codes.dim() != 3:
        raise ValueError(f"codes must be (G, M, K) int8, got {tuple(codes.shape)} {codes.dtype}")
    g = codes.shape[0]
    if len(weights) != g or len(acts) != g or (biases is not None and len(biases) != g):
        raise ValueError(f"groups: codes has G={g}, got {len(weights)} weights, {len(acts)} acts"
                         + ("" if biases is None else f", {len(biases)} biases"))
    outs = [qlinear(codes[i], weights[i], acts[i], None if biases is None else biases[i])
            .reshape(codes.shape[1], -1) for i in range(g)]
    return torch.stack(outs) if outs else codes.new_empty((0, codes.shape[1], 0), dtype=torch.float32)


def set_fast_path(enabled: bool) -> bool:
    """Turn the reference's CPU fast path on or off (process-wide); returns the previous setting."""
    global _FAST_PATH
    previous, _FAST_PATH = _FAST_PATH, bool(enabled)
    return previous


def fast_path_enabled() -> bool:
    """Whether the CPU fast path is on (default; ``VMFX_REFERENCE_SLOW=1`` turns it off)."""
    return _FAST_PATH


def _fast_ok(x: torch.Tensor) -> bool:
    return _FAST_PATH and x.device.type == "cpu" and torch.get_float32_matmul_precision() == "highest"


def _by_token(t: torch.Tensor, tokens: int) -> torch.Tensor:
    """(M, C) rows ordered (batch, token) -> a (M / T, T, C) view (T = 1: (M, 1, C))."""
    return t.view(-1, tokens, t.shape[-1])


_SCRATCH = threading.local()


def _scratch(name: str, shape, dtype=torch.float32) -> torch.Tensor:
    """A per-thread work buffer called ``name``, reused between calls (never returned to callers).

    Freshly allocated multi-MiB CPU tensors are page-faulted in on every call, which costs more
    than the elementwise operation done in them (as for the scan's workspace in
    :mod:`vmfx.ops.selective_scan`)."""
    numel = 1
    for d in shape:
        numel *= int(d)
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    buf = bufs.get((name, dtype))
    if buf is None or buf.numel() < numel:
        buf = bufs[(name, dtype)] = torch.empty(max(numel, 1), dtype=dtype)
    return buf[:numel].view(shape)


def _quantize_float(x2: torch.Tensor, act: ActQuant, name: str = "codes", out: torch.Tensor | None = None) -> torch.Tensor:
    """``q - 2^(b-1)`` of (M, K) float32 rows as float32 (exact small integers), by broadcasting:
    the same float32 operations, in the same order, as :func:`quantize_act`, except that adding
    ``z_a`` and subtracting ``2^(b-1)`` are one add of ``z_a - 2^(b-1)`` before a clamp to the
    shifted range (the same result: below 2^24 - 2^8 in magnitude both are exact integer sums, and
    above it both clamp to the same bound). The result lives in ``out`` (an (M, K) view, possibly
    strided) or else in the scratch buffer ``name`` (valid until the next call that uses it)."""
    v = _scratch(name, x2.shape) if out is None else out
    if act.inv_smooth is not None:
        torch.mul(x2, act.inv_smooth, out=v)
    else:
        v.copy_(x2)
    v3 = _by_token(v, act.tokens)
    v3.mul_(act.inv_scale.view(-1, 1))
    v3.round_()
    v3.add_((act.zero_point - act.offset).view(-1, 1))
    v.clamp_(act.qmin - act.offset, act.qmax - act.offset)
    return v


@dataclass(frozen=True, eq=False)
class QLinearPlan:
    """What the fast path of :func:`qlinear` prepares once per (weight, activation parameters).

    Attributes:
        chunks: ((k0, k1, W^T[k0:k1] float32 (k1-k0, N)), ...): one chunk when the float32 GEMM
            on the codes is exact over the whole K, else the K ranges for which it is.
        corr: (T, N) ``(2^(b-1) - z_a[t]) * wsum[n]``, float32 if ``acc_in_f32`` else float64.
        scale: (T, N) float32 ``s_a[t] * s_w[n]`` (the slow path's product, same rounding).
        acc_in_f32: the whole accumulator (GEMM + correction) is exact in float32.
        w_aug: ``[W^T; wsum]`` (K + 1, N) float32 when the correction can ride in the GEMM: the
            codes get one more column holding ``2^(b-1) - z_a[t]``, and one GEMM gives the whole
            accumulator, exactly (every partial sum, in any order, is an integer of magnitude at most
            ``2^(b-1) max_n sum_k |Wq[n,k]| + max |corr| < 2^24``); else None.
        z_col: (T,) float32 ``2^(b-1) - z_a[t]``, the extra column (with ``w_aug``).
        check_overflow: the bound does not exclude an int32 overflow: check each call.
        bound: the proved bound on ``|acc|``.
        keep: the tensors the plan was made from (kept alive so that the cache key stays valid).
    """

    chunks: tuple
    corr: torch.Tensor
    scale: torch.Tensor
    acc_in_f32: bool
    check_overflow: bool
    bound: int
    keep: tuple
    w_aug: torch.Tensor | None = None
    z_col: torch.Tensor | None = None


def _plan_key(weight: QWeight, act: ActQuant) -> tuple:
    ts = (weight.scale, weight.wsum, act.scale, act.zero_point)
    return (weight.store._version, act.bits) + tuple((id(t), t._version) for t in ts)


def qlinear_plan(weight: QWeight, act: ActQuant) -> QLinearPlan:
    """The fast path's prepared tables and proved bounds for ``weight`` and ``act`` (cached on the
    weight's stored codes, packed or not; made again when any of the tensors is modified in place)."""
    per_weight = _PLANS.get(weight.store)
    if per_weight is None:
        per_weight = _PLANS[weight.store] = {}
    key = _plan_key(weight, act)
    plan = per_weight.get(key)
    if plan is None:
        plan = per_weight[key] = _make_plan(weight, act)
    return plan


def _make_plan(weight: QWeight, act: ActQuant) -> QLinearPlan:
    unpacked = weight.unpacked()
    codes = unpacked.to(torch.int64)
    n, k = codes.shape
    off = act.offset
    absw = codes.abs()
    row_abs = int(absw.sum(1).max()) if codes.numel() else 0
    z = act.zero_point.to(torch.float64)
    # |acc| = |sum_k (q - z_t) Wq| <= max_n sum_k |Wq| * max_t max(z_t - qmin, qmax - z_t)
    spread = int(torch.maximum(z - act.qmin, act.qmax - z).max())
    bound = row_abs * spread
    # exact (|.| < 2^53); "+ 0.0" turns -0 into +0, so that acc + corr is never -0 (the slow path's
    # int64 round trip gives +0 for a zero accumulator)
    corr64 = (off - z)[:, None] * weight.wsum.to(torch.float64)[None, :] + 0.0
    corr_max = int(corr64.abs().max()) if corr64.numel() else 0
    wt = unpacked.t().float()
    # chunks of K whose GEMM partial sums stay exact in float32: off * max_n sum_{chunk} |Wq| < 2^24
    chunks, start = [], 0
    if off * row_abs < _EXACT_F32:
        chunks.append((0, k, wt.contiguous()))
    else:
        cums = torch.cat([torch.zeros(n, 1, dtype=torch.int64), absw.cumsum(1)], 1)  # (N, K + 1)
        while start < k:
            widths = (cums[:, start + 1:] - cums[:, start:start + 1]).max(0).values * off  # chunk [start, end)
            fits = int((widths < _EXACT_F32).sum())  # widths grow with the end: a prefix fits
            end = start + max(1, fits)  # one column always fits: 2^(b-1) * 127 < 2^24
            chunks.append((start, end, wt[start:end].contiguous()))
            start = end
    acc_in_f32 = len(chunks) == 1 and bound < _EXACT_F32 and corr_max < _EXACT_F32
    w_aug = z_col = None
    if acc_in_f32 and off * row_abs + corr_max < _EXACT_F32:
        w_aug = torch.cat([wt, weight.wsum.float()[None, :]]).contiguous()
        z_col = (off - z).float()
    return QLinearPlan(
        w_aug=w_aug,
        z_col=z_col,
        chunks=tuple(chunks),
        corr=corr64.float() if acc_in_f32 else corr64,
        scale=act.scale[:, None] * weight.scale[None, :],
        acc_in_f32=acc_in_f32,
        check_overflow=bound >= 2**31,
        bound=bound,
        keep=(weight.store, weight.scale, weight.wsum, act.scale, act.zero_point),
    )


def _qlinear_fast(x, weight, act, bias, epilogue, epilogue_inputs, return_acc):
    """:func:`qlinear` on the CPU fast path (see the section comment); same results, bit for bit."""
    prequantized = x.dtype == torch.int8
    c2 = _rows(x, act.tokens, "x")
    m, k = c2.shape
    n, kw = weight.shape
    if k != kw:
        raise ValueError(f"x has K={k} but the weight is {weight.shape}")
    out_shape = tuple(x.shape[:-1]) + (n,)
    if m == 0:
        y = torch.zeros(out_shape)
        return (y, torch.zeros(out_shape, dtype=torch.int32)) if return_acc else y
    plan = qlinear_plan(weight, act)
    t = act.tokens
    if plan.w_aug is not None:
        # codes and the zero-point column side by side: one exact GEMM is the whole accumulator
        buf = _scratch("codes_aug", (m, k + 1))
        c = buf[:, :k]
        if prequantized:
            c.copy_(c2)
        else:
            _quantize_float(c2.float(), act, out=c)
        _by_token(buf, t)[:, :, k].copy_(plan.z_col.view(1, -1).expand(m // t, t))
        acc = torch.mm(buf, plan.w_aug)
    elif plan.acc_in_f32:
        c = _scratch("codes", c2.shape).copy_(c2) if prequantized else _quantize_float(c2.float(), act)
        k0, k1, wt = plan.chunks[0]
        acc = torch.mm(c, wt)
        _by_token(acc, t).add_(plan.corr)
    else:
        c = _scratch("codes", c2.shape).copy_(c2) if prequantized else _quantize_float(c2.float(), act)
        acc = None
        for k0, k1, wt in plan.chunks:
            part = torch.mm(c[:, k0:k1] if len(plan.chunks) > 1 else c, wt).double()
            acc = part if acc is None else acc.add_(part)
        _by_token(acc, t).add_(plan.corr)
        if plan.check_overflow and float(acc.abs().max()) >= 2**31:
            raise OverflowError("the int32 accumulator would overflow (K too large)")
    acc_int = acc.to(torch.int32).reshape(out_shape) if return_acc else None
    y = acc if acc.dtype == torch.float32 else acc.float()
    _by_token(y, t).mul_(plan.scale)
    if bias is not None:
        y.add_(bias.float()[None, :])
    y = apply_epilogue(y, epilogue, epilogue_inputs, inplace=True).reshape(out_shape)
    return (y, acc_int) if return_acc else y


# ------------------------------------------------------------------------------ mamba pieces


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       flip: bool = False, act: ActQuant | None = None):
    """Causal depthwise conv1d + SiLU, and optionally the codes of its transpose.

    ``out = silu(F.conv1d(x, weight[:, None], bias, padding=W-1, groups=E)[..., :L])``, computed
    as the kernel does: ``acc = sum_{j=0..W-1} x[l - (W-1) + j] * w[j]`` accumulated in tap
    order (zero left padding), then ``+ bias``, then ``acc / (1 + exp(-acc))``.

    Args:
        x: (B, E, L) float.
        weight: (E, W) (or the conv's (E, 1, W)).
        bias: optional (E,).
        flip: read ``x`` reversed along L (``x.flip(-1)``), for the backward scan direction.
        act: if given, also return the codes of ``out.transpose(1, 2)`` as (B*L, E) int8 for the
            next linear (its smoothing (E,) and per-token (L) or per-tensor parameters).

    Returns:
        ``out`` (B, E, L) float32, or ``(out, codes)`` when ``act`` is given.
    """
    x = x.float()
    if flip:
        x = x.flip(-1)
    w = weight.reshape(weight.shape[0], -1).float()
    bsz, e, length = x.shape
    width = w.shape[1]
    if _fast_ok(x) and x.dim() == 3:
        return _conv_fast(x, w, bias, act)
    xp = F.pad(x, (width - 1, 0))
    acc = torch.zeros_like(x)
    for j in range(width):
        acc = acc + xp[..., j:j + length] * w[:, j, None]
    if bias is not None:
        acc = acc + bias.float()[:, None]
    out = F.silu(acc)
    if act is None:
        return out
    return out, quantize_act(out.transpose(1, 2).reshape(bsz * length, e), act)


def _conv_fast(x, w, bias, act):
    """:func:`causal_conv1d_silu` on the CPU fast path, bit for bit the slow path's result.

    No padded copy: tap ``j`` adds ``x[l - (W-1) + j] * w[j]`` only where ``l - (W-1) + j >= 0``.
    The slow path adds ``0 * w[j]`` (a signed zero) elsewhere; its accumulator starts at +0 and so
    never holds -0, and adding a zero to +0 or to a non-zero value leaves it unchanged, so skipping
    those adds changes no bit. Products and the codes are made in scratch buffers, in the slow
    path's order of float32 operations; SiLU is the same ``F.silu`` kernel, in place, on a
    contiguous tensor of the same shape (so the same elements take its vector and scalar loops);
    the codes are made in the (B, E, L) layout (per-channel smoothing along E, per-token parameters
    along L) and converted to int8 in the same pass that transposes them.
    """
    bsz, e, length = x.shape
    width = w.shape[1]
    xc = x if x.is_contiguous() else _scratch("conv_x", x.shape).copy_(x)
    prod = _scratch("conv_prod", x.shape)
    acc = torch.zeros_like(xc)
    for j in range(width):
        s = width - 1 - j
        if s < length:
            p = prod[..., s:]
            torch.mul(xc[..., : length - s], w[:, j, None], out=p)
            acc[..., s:].add_(p)
    if bias is not None:
        acc.add_(bias.float()[:, None])
    out = F.silu(acc, inplace=True)  # the slow path's F.silu, on a tensor of the same shape and layout
    if act is None:
        return out
    v = prod  # free again
    if act.inv_smooth is not None:
        torch.mul(out, act.inv_smooth[:, None], out=v)
    else:
        v.copy_(out)
    if act.per_token:
        if act.tokens != length:
            raise ValueError(f"conv output has {length} tokens but the per-token parameters have {act.tokens}")
        v.mul_(act.inv_scale[None, None, :]).round_().add_((act.zero_point - act.offset)[None, None, :])
    else:
        v.mul_(act.inv_scale).round_().add_(act.zero_point - act.offset)
    v.clamp_(act.qmin - act.offset, act.qmax - act.offset)  # as in _quantize_float
    codes = torch.empty((bsz, length, e), dtype=torch.int8).copy_(v.transpose(1, 2))  # exact integers
    return out, codes.view(bsz * length, e)


def causal_conv1d_silu_bidir(x: torch.Tensor, w_f: torch.Tensor, b_f: torch.Tensor | None, w_b: torch.Tensor,
                             b_b: torch.Tensor | None, act_f: ActQuant | None = None, act_b: ActQuant | None = None):
    """Both directions' :func:`causal_conv1d_silu` of a Vim block, stacked: the oracle of the
    one-launch kernel :func:`vmfx.lowering.kernels.causal_conv1d_silu_bidir`.

    Exactly ``causal_conv1d_silu(x, w_f, b_f, flip=False, act=act_f)`` and
    ``causal_conv1d_silu(x, w_b, b_b, flip=True, act=act_b)``, stacked along a new leading
    direction axis.

    Args:
        x: (B, E, L) float.
        w_f, w_b: (E, W) (or (E, 1, W)); b_f, b_b: optional (E,).
        act_f, act_b: both or neither: each direction's next-linear (``x_proj``) quantizer.

    Returns:
        ``out`` (2, B, E, L) float32 (``out[1]`` in the backward direction's own reversed time
        order), or ``(out, codes)`` with codes (2, B*L, E) int8 when the acts are given.
    """
    if (act_f is None) != (act_b is None):
        raise ValueError("act_f and act_b must both be given or both be None")
    res_f = causal_conv1d_silu(x, w_f, b_f, flip=False, act=act_f)
    res_b = causal_conv1d_silu(x, w_b, b_b, flip=True, act=act_b)
    if act_f is None:
        return torch.stack((res_f, res_b))
    return torch.stack((res_f[0], res_b[0])), torch.stack((res_f[1], res_b[1]))


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   flip_z: bool = False, *, step_scale=None, out_scale=None, state_scales=None,
                   state_bits: int = 8, z_smooth=None):
    """``out = (y + D u) * silu(z)`` of the selective scan (see :mod:`vmfx.ops.selective_scan`).

    Args:
        u, delta, z: (B, E, L); A: (E, N); B, C: (B, N, L); D, delta_bias: (E,).
        delta_softplus: apply softplus (threshold 20) to ``delta (+ delta_bias)``.
        flip_z: gate with ``z.flip(-1)`` (the backward direction's gate, read reversed).
        step_scale, out_scale, state_scales, state_bits: the quantized hidden state of a
            (reparameterized) scan, as :func:`vmfx.ops.selective_scan` takes them (u, B, C
            already reparameterized): the state is fake-quantized per step in float32, the exact
            semantics the Triton kernel follows.
        z_smooth: (E,) factors ``s``: the gate is MambaQuant's Smooth-SiLU ``z * sigmoid(s z)``
            (:func:`vmfx.quant.smooth_silu.smooth_silu`, float32) instead of ``silu(z)``: the
            ungated output times it.

    Returns:
        (B, E, L) float32.
    """
    if z_smooth is not None and z is None:
        raise ValueError("z_smooth needs z (the Smooth-SiLU gates z)")
    if z is not None and flip_z:
        z = z.flip(-1)
    f = lambda t: None if t is None else t.float()  # noqa: E731
    out = _selective_scan(u.float(), delta.float(), A.float(), B.float(), C.float(),
                          f(D), f(z) if z_smooth is None else None, f(delta_bias), delta_softplus,
                          step_scale=f(step_scale), out_scale=f(out_scale), state_scales=f(state_scales),
                          state_bits=state_bits)
    return out if z_smooth is None else out * smooth_silu(z.float(), z_smooth.float(), -2)


def merge_quantize(y_f: torch.Tensor, y_b: torch.Tensor | None = None, scale: float = 0.5,
                   act: ActQuant | None = None):
    """Merge the two scan directions, transposed to token-major, and optionally quantize.

    ``m[b, l, e] = (y_f[b, e, l] + y_b[b, e, L-1-l]) * scale`` (``y_f * scale`` without ``y_b``).

    Args:
        y_f, y_b: (B, E, L) float scan outputs; ``y_b`` in its own (reversed) time order.
        scale: ``c``, 0.5 for Vim's divided output, 1.0 otherwise.
        act: if given, also return the codes of ``m`` as (B*L, E) int8 (the next linear's input).

    Returns:
        ``m`` (B, L, E) float32, or ``(m, codes)``.
    """
    if _fast_ok(y_f) and y_f.dim() == 3:
        return _merge_fast(y_f, y_b, scale, act)
    m = y_f.float()
    if y_b is not None:
        m = m + y_b.float().flip(-1)
    m = (m * torch.tensor(scale, dtype=torch.float32)).transpose(1, 2).contiguous()
    if act is None:
        return m
    return m, quantize_act(m.reshape(-1, m.shape[-1]), act)


def hadamard_quantize(x: torch.Tensor, act: ActQuant) -> torch.Tensor:
    """Codes of the online-Hadamard-rotated input of a linear (``out_proj``).

    ``codes = quantize_act(fast_hadamard_transform(float32(x)), act)``: the rotation
    ``x H / sqrt(n)`` in float32, in the fixed order of
    :func:`vmfx.quant.online_hadamard.fast_hadamard_transform` (what the Triton kernel computes),
    then smoothing (when ``act`` has it) and the activation formula.

    Args:
        x: (…, n) float activations, rows (batch, token) pairs; ``n = 2^k m`` with a Hadamard base ``m``.
        act: the linear's input parameters.

    Returns:
        (rows, n) int8 codes, shifted (see :func:`quantize_act`).
    """
    y = fast_hadamard_transform(x.float())
    return quantize_act(y.reshape(-1, y.shape[-1]), act)



def hadamard_qlinear(x: torch.Tensor, weight: QWeight, act: ActQuant, bias: torch.Tensor | None = None,
                     epilogue: Sequence[Sequence] | None = None,
                     epilogue_inputs: Mapping[str, torch.Tensor] | None = None,
                     return_acc: bool = False):
    """The online Hadamard of a linear's input as the prologue of its quantized GEMM:
    ``qlinear(hadamard_quantize(x, act), weight, act, bias, ...)``, what the fused Triton kernel
    (:mod:`vmfx.lowering.kernels.hadamard_linear`) computes bit for bit.

    Args:
        x: (…, n) float activations, rows (batch, token) pairs; ``n = 2^k m`` with a Hadamard base ``m``.
        weight: the quantized weight (N, n) of the rotated input.
        act: the rotated input's parameters (its smoothing applies after the rotation).
        bias, epilogue, epilogue_inputs, return_acc: as for :func:`qlinear`.

    Returns:
        ``y`` (…, N) float32, or ``(y, acc)``.
    """
    codes = hadamard_quantize(x, act).reshape(x.shape)
    return qlinear(codes, weight, act, bias, epilogue, epilogue_inputs, return_acc)


def _merge_fast(y_f, y_b, scale, act):
    """:func:`merge_quantize` on the CPU fast path: the same float32 operations, in scratch
    buffers; the codes come from the fast quantize. Bit for bit the slow path's result."""
    m = _scratch("merge", y_f.shape)
    if y_b is not None:
        torch.add(y_f.float(), torch.flip(y_b.float(), (-1,)), out=m)
    else:
        m.copy_(y_f)
    out = torch.empty((m.shape[0], m.shape[2], m.shape[1]))
    torch.mul(m.transpose(1, 2), torch.tensor(scale, dtype=torch.float32), out=out)  # scale and transpose in one pass
    if act is None:
        return out
    codes = _quantize_float(out.view(-1, out.shape[-1]), act).to(torch.int8)
    return out, codes


def scan_merge(u_f, delta_f, A_f, B_f, C_f, D_f, u_b, delta_b, A_b, B_b, C_b, D_b, z, *,
               delta_softplus: bool, scale: float, act: ActQuant | None = None, write_float: bool = True,
               dt_in_f: torch.Tensor | None = None, dt_weight_f: QWeight | None = None,
               dt_act_f: ActQuant | None = None, dt_bias_f: torch.Tensor | None = None,
               dt_in_b: torch.Tensor | None = None, dt_weight_b: QWeight | None = None,
               dt_act_b: ActQuant | None = None, dt_bias_b: torch.Tensor | None = None,
               z_smooth: torch.Tensor | None = None):
    """Both scan directions of a bidirectional Vim block, merged (and quantized for out_proj): the
    oracle of the one-launch kernel :func:`vmfx.lowering.kernels.scan_merge`, defined as exactly
    the composition of :func:`selective_scan` (forward; backward with ``flip_z=True``) and
    :func:`merge_quantize` (and, with the dt_proj inputs, of each direction's :func:`qlinear`
    ``dt_proj`` before them).

    Args:
        u_f, delta_f, A_f, B_f, C_f, D_f: the forward direction's scan inputs (see
            :func:`selective_scan`; ``D_f`` may be None; ``delta_f`` None with the dt_proj inputs).
        u_b, delta_b, A_b, B_b, C_b, D_b: the backward direction's, in its own (reversed) time order.
        z: the gate (B, E, L) in forward time order (the backward direction reads it reversed), or None.
        delta_softplus: apply softplus to delta (both directions).
        scale: the merge factor ``c``.
        act: if given, also return the codes of ``m`` (B*L, E) int8 for the next linear.
        write_float: return ``m`` (needs ``act`` when False: ``(None, codes)``).
        dt_in_f, dt_weight_f, dt_act_f, dt_bias_f: the fused form: instead of ``delta_f``, its
            ``dt_proj``: ``delta_f = qlinear(dt_in_f, dt_weight_f, dt_act_f, dt_bias_f).transpose(1, 2)``
            (float32), with ``dt_in_f`` (B, L, R) (the slice ``x_proj_out[..., :R]``).
        dt_in_b, dt_weight_b, dt_act_b, dt_bias_b: the backward direction's, ``dt_in_b`` in its
            own (reversed) time order. Both directions fused or neither.
        z_smooth: (E,) factors of both directions' Smooth-SiLU gates (see :func:`selective_scan`).

    Returns:
        ``m`` (B, L, E) float32, ``(m, codes)``, or ``(None, codes)``.
    """
    if not write_float and act is None:
        raise ValueError("write_float=False needs act (nothing would be returned)")
    fused = {d: any(v is not None for v in vals) for d, vals in (
        ("f", (dt_in_f, dt_weight_f, dt_act_f, dt_bias_f)), ("b", (dt_in_b, dt_weight_b, dt_act_b, dt_bias_b)))}
    if fused["f"] != fused["b"]:
        raise ValueError("fuse dt_proj in both directions or in neither")
    if fused["f"]:
        if delta_f is not None or delta_b is not None:
            raise ValueError("delta_f and delta_b must be None when the dt_proj inputs are given")
        for name, v in (("dt_in_f", dt_in_f), ("dt_weight_f", dt_weight_f), ("dt_act_f", dt_act_f),
                        ("dt_in_b", dt_in_b), ("dt_weight_b", dt_weight_b), ("dt_act_b", dt_act_b)):
            if v is None:
                raise ValueError(f"{name} is required when dt_proj is fused")
        delta_f = qlinear(dt_in_f, dt_weight_f, dt_act_f, dt_bias_f).transpose(1, 2)
        delta_b = qlinear(dt_in_b, dt_weight_b, dt_act_b, dt_bias_b).transpose(1, 2)
    elif delta_f is None or delta_b is None:
        raise ValueError("delta_f and delta_b are required unless the dt_proj inputs are given")
    y_f = selective_scan(u_f, delta_f, A_f, B_f, C_f, D_f, z, None, delta_softplus, z_smooth=z_smooth)
    y_b = selective_scan(u_b, delta_b, A_b, B_b, C_b, D_b, z, None, delta_softplus, flip_z=True, z_smooth=z_smooth)
    result = merge_quantize(y_f, y_b, scale, act)
    if act is None or write_float:
        return result
    return None, result[1]
