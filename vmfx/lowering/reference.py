"""The exact CPU reference of every vmfx kernel (torch only): test oracle and CPU backend.

Each function here computes what the matching Triton template in :mod:`vmfx.lowering.kernels`
computes, with the same numerics contract, so that the integer parts (activation codes, the int32
GEMM accumulator) agree bit for bit and the float parts to float32 rounding. The same parameter
objects (:class:`ActQuant`, :class:`QWeight`) feed both, and they are prepared once, at lowering
time, not per call.

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
  storage also for 4 bits), step ``s_w`` (N,), ``wsum[n] = sum_k Wq[n, k]`` (int32).
* **GEMM**: ``acc[r, n] = sum_k (q[r,k] - off) * Wq[n,k] + (off - z_a[t]) * wsum[n]``
  ``= sum_k (q[r,k] - z_a[t]) * Wq[n,k]`` exactly in int32 (``off = 2^(b-1)``).
* **dequantize**: ``y = float32(acc) * (s_a[t] * s_w[n])``, then ``+ bias[n]``, then the
  epilogue ops in order (see :func:`apply_epilogue`).

The other kernels (causal conv + SiLU, selective scan, merge of the two scan directions) produce
float outputs and, where they feed a quantized linear, the codes of that linear's input by the
same activation formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..ops.selective_scan import selective_scan as _selective_scan

__all__ = [
    "ActQuant",
    "QWeight",
    "make_act_quant",
    "rint",
    "quantize_act",
    "unshift_codes",
    "dequantize_act",
    "qlinear",
    "apply_epilogue",
    "causal_conv1d_silu",
    "selective_scan",
    "merge_quantize",
]


# ------------------------------------------------------------------------------ parameters


@dataclass(frozen=True, eq=False)
class ActQuant:
    """Static asymmetric activation quantization of a (M, K) operand, prepared for the kernels.

    Rows are (batch, token) pairs; row ``r`` uses token ``r % tokens``. Build with
    :func:`make_act_quant`.

    Attributes:
        scale: ``s_a``, (T,) float32, T = 1 (per-tensor) or L (per-token static).
        inv_scale: ``1 / s_a`` in float32, (T,).
        zero_point: ``z_a``, (T,) float32 holding integers in ``[qmin, qmax]``.
        bits: activation bit width, 2..8 (codes ``[0, 2^b - 1]``).
        inv_smooth: ``1 / s`` in float32, (K,), or None (no smoothing).
    """

    scale: torch.Tensor
    inv_scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    inv_smooth: torch.Tensor | None = None

    @property
    def qmin(self) -> int:
        return 0

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def offset(self) -> int:
        """``2^(b-1)``: stored codes are ``q - offset`` (int8)."""
        return 2 ** (self.bits - 1)

    @property
    def tokens(self) -> int:
        """T: 1 for per-tensor, L for per-token parameters."""
        return self.scale.numel()

    @property
    def per_token(self) -> bool:
        return self.tokens > 1

    @property
    def device(self) -> torch.device:
        return self.scale.device

    def to(self, device) -> "ActQuant":
        """A copy with every tensor on ``device``."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ActQuant(mv(self.scale), mv(self.inv_scale), mv(self.zero_point), self.bits,
                        mv(self.inv_smooth))


def make_act_quant(scale, zero_point, bits: int = 8, smooth: torch.Tensor | None = None) -> ActQuant:
    """Prepare static activation quantization parameters for the kernels.

    Args:
        scale: ``s_a``: a number, or a tensor with one element (per-tensor) or L elements
            (per-token, any shape such as ``(1, L, 1)`` or ``(L,)``).
        zero_point: ``z_a``, integer-valued, broadcastable to ``scale`` (e.g. a scalar).
        bits: activation bit width, 2..8.
        smooth: optional per-input-channel smoothing factors ``s`` (K,), positive.

    Returns:
        An :class:`ActQuant` (float32 tensors on ``scale``'s device).

    Raises:
        ValueError: non-positive or non-finite scales or smoothing factors, non-integer or
            out-of-range zero points, bits outside 2..8.
    """
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be an integer in 2..8, got {bits!r}")
    s = torch.as_tensor(scale, dtype=torch.float32).detach().reshape(-1).clone()
    z = torch.as_tensor(zero_point, dtype=torch.float32, device=s.device).detach()
    z = torch.broadcast_to(z.reshape(-1) if z.numel() == s.numel() else z, s.shape).clone()
    if s.numel() == 0 or not bool(torch.isfinite(s).all() and (s > 0).all()):
        raise ValueError("activation scales must be finite and positive")
    if not bool((z == torch.round(z)).all()) or bool(((z < 0) | (z > 2**bits - 1)).any()):
        raise ValueError(f"zero points must be integers in [0, {2**bits - 1}]")
    inv_s = None
    if smooth is not None:
        sm = torch.as_tensor(smooth, dtype=torch.float32, device=s.device).detach()
        if sm.dim() != 1 or not bool(torch.isfinite(sm).all() and (sm > 0).all()):
            raise ValueError("smoothing factors must be a (K,) tensor of finite positive values")
        inv_s = (1.0 / sm).contiguous()
    return ActQuant(s.contiguous(), (1.0 / s).contiguous(), z.contiguous(), bits, inv_s)


@dataclass(frozen=True, eq=False)
class QWeight:
    """A quantized weight prepared for the integer GEMM.

    Attributes:
        codes: (N, K) int8, symmetric codes in ``[-(2^(b-1)-1), 2^(b-1)-1]``.
        scale: ``s_w``, (N,) float32.
        wsum: ``sum_k codes[n, k]``, (N,) int32 (for the zero-point correction).
        bits: weight bit width (8 or 4 in practice; storage is always one int8 per code).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    wsum: torch.Tensor
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, bits: int = 8) -> "QWeight":
        """Wrap integer codes (N, K) and per-channel steps (N,) or (N, 1); computes ``wsum``.

        Raises:
            ValueError: codes out of the symmetric range, or shapes that do not fit.
        """
        q = 2 ** (bits - 1) - 1
        c = codes.detach()
        if c.dim() != 2:
            raise ValueError(f"weight codes must be (N, K), got {tuple(c.shape)}")
        if c.is_floating_point() and not bool((c == torch.round(c)).all()):
            raise ValueError("weight codes must be integers")
        if bool(((c < -q) | (c > q)).any()):
            raise ValueError(f"{bits}-bit weight codes must lie in [-{q}, {q}]")
        c = c.to(torch.int8).contiguous()
        s = torch.as_tensor(scale, dtype=torch.float32).detach().reshape(-1).to(c.device).contiguous()
        if s.numel() != c.shape[0]:
            raise ValueError(f"weight scale must have N={c.shape[0]} elements, got {s.numel()}")
        return cls(c, s, c.sum(1, dtype=torch.int32), bits)

    @classmethod
    def from_float(cls, weight: torch.Tensor, scale: torch.Tensor, bits: int = 8,
                   smooth: torch.Tensor | None = None) -> "QWeight":
        """Quantize a float weight as the graph's ``fq_w(W * s)`` does:
        ``clamp(round((W * s) / s_w), -qmax, qmax)`` (round half to even).

        Args:
            weight: (N, K) float.
            scale: ``s_w``, (N,) or (N, 1).
            bits: weight bit width.
            smooth: optional ``s`` (K,), multiplied into the weight first.
        """
        q = 2 ** (bits - 1) - 1
        w = weight.detach().float()
        if smooth is not None:
            w = w * smooth.detach().float()
        s = torch.as_tensor(scale, dtype=torch.float32, device=w.device).reshape(-1, 1)
        codes = torch.clamp(torch.round(w / s), -q, q)
        return cls.from_codes(codes, s, bits)


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
                   inputs: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Apply epilogue ops (see :func:`vmfx.lowering.codegen.render_epilogue`) in torch.

    Args:
        y: the (M, N) float32 output (whole output).
        ops: e.g. ``[("silu",), ("add", "residual"), ("mul", 0.5), ("mul", "gamma", "channel")]``.
        inputs: the extra tensors by name: ``"full"`` ones shaped like ``y`` (any leading shape
            with the same number of elements), ``"channel"`` ones (N,).
    """
    from .codegen import Epilogue  # light module; imports triton lazily only

    ep = Epilogue.parse(ops)
    inputs = dict(inputs or {})
    fns = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
           "rsub": lambda a, b: torch.sub(b, a), "rdiv": lambda a, b: torch.div(b, a)}
    for op in ep.ops:
        name = op[0]
        if name == "silu":
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
    codes = x if x.dtype == torch.int8 else quantize_act(x, act)
    c2 = _rows(codes, act.tokens, "x")
    m, k = c2.shape
    n, kw = weight.codes.shape
    if k != kw:
        raise ValueError(f"x has K={k} but the weight is {tuple(weight.codes.shape)}")
    tok = _token_params(act, m)
    # float64 products and sums of integers below 2^53 are exact
    acc = (c2.double() @ weight.codes.double().T)
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
    xp = F.pad(x, (width - 1, 0))
    acc = torch.zeros_like(x)
    for j in range(width):
        acc = acc + xp[..., j:j + length] * w[:, j, None]
    if bias is not None:
        acc = acc + bias.float()[:, None]
    out = acc / (1.0 + torch.exp(-acc))
    if act is None:
        return out
    return out, quantize_act(out.transpose(1, 2).reshape(bsz * length, e), act)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   flip_z: bool = False):
    """``out = (y + D u) * silu(z)`` of the selective scan (see :mod:`vmfx.ops.selective_scan`).

    Args:
        u, delta, z: (B, E, L); A: (E, N); B, C: (B, N, L); D, delta_bias: (E,).
        delta_softplus: apply softplus (threshold 20) to ``delta (+ delta_bias)``.
        flip_z: gate with ``z.flip(-1)`` (the backward direction's gate, read reversed).

    Returns:
        (B, E, L) float32.
    """
    if z is not None and flip_z:
        z = z.flip(-1)
    return _selective_scan(u.float(), delta.float(), A.float(), B.float(), C.float(),
                           None if D is None else D.float(), None if z is None else z.float(),
                           None if delta_bias is None else delta_bias.float(), delta_softplus)


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
    m = y_f.float()
    if y_b is not None:
        m = m + y_b.float().flip(-1)
    m = (m * torch.tensor(scale, dtype=torch.float32)).transpose(1, 2).contiguous()
    if act is None:
        return m
    return m, quantize_act(m.reshape(-1, m.shape[-1]), act)
