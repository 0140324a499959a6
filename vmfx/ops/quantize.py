"""Quantization primitives: integer ranges, fake quantization with a straight-through estimator,
and exact integer quantize / dequantize.

All functions take the quantization parameters as tensors that broadcast against ``x`` (a scalar
for per-tensor, ``(C, 1)`` for per-output-channel weights, ``(1, L, 1)`` for per-token activations
of a ``(B, L, C)`` tensor, ...), so one code path serves every granularity.

The affine map is ``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and
``x_hat = (q - zero_point) * scale``. ``round`` is round-half-to-even (``torch.round``) in both the
simulated and the integer path, so ``dequantize(quantize(x)) == fake_quantize(x)`` bit for bit.

Invariants (property-tested in ``tests/ops/test_quantize.py``):

* inside the representable range, ``|fake_quantize(x) - x| <= scale / 2``;
* outside it, the result is clamped to ``(qmin - zp) * scale`` or ``(qmax - zp) * scale``;
* ``fake_quantize`` is idempotent;
* the gradient is the straight-through estimator: 1 for ``x`` inside the range and 0 outside,
  and the LSQ gradient for ``scale`` (``q - zp - x / scale`` inside, the clamp bound outside).
"""

from __future__ import annotations

import torch

__all__ = [
    "qrange",
    "round_ste",
    "fake_quantize",
    "quantize",
    "dequantize",
    "MIN_SCALE",
]

#: Scales are clamped to at least this, so an all-zero tensor quantizes without dividing by zero.
MIN_SCALE = 1e-8


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer range of a quantizer.

    Symmetric quantizers are signed and use the restricted range ``[-(2^(b-1) - 1), 2^(b-1) - 1]``
    (-127..127 at 8 bits, -7..7 at 4 bits), so that zero is exact and the range is symmetric.
    Asymmetric quantizers are unsigned, ``[0, 2^b - 1]``, with a zero point.

    Args:
        bits: bit width, 2..16.
        symmetric: signed restricted range if True, unsigned full range if False.

    Returns:
        ``(qmin, qmax)``.
    """
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer in 2..16, got {bits!r}")
    if symmetric:
        q = 2 ** (bits - 1) - 1
        return -q, q
    return 0, 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | float,
    qmin: int,
    qmax: int,
    straight_through: bool = True,
) -> torch.Tensor:
    """Quantize and dequantize ``x`` in floating point (differentiable).

    Gradients flow to ``x`` (straight through inside the range, zero where clamped) and to
    ``scale`` (LSQ). ``zero_point`` holds integers and gets no gradient. With
    ``straight_through=False`` the rounding has its true (zero) gradient: ``x`` gets none and
    ``scale`` gets ``q - zero_point`` (the official OuroMamba learning of activation step sizes).

    Args:
        x: the tensor to quantize.
        scale: positive step size, broadcastable to ``x``.
        zero_point: integer-valued offset (0 for symmetric), broadcastable to ``x``.
        qmin, qmax: the integer range (see :func:`qrange`).
        straight_through: round with the straight-through estimator (True) or plain ``round``.

    Returns:
        ``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``.
    """
    if isinstance(zero_point, torch.Tensor):
        zero_point = zero_point.detach()
    rounded = round_ste(x / scale) if straight_through else torch.round(x / scale)
    q = torch.clamp(rounded + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | float,
    qmin: int,
    qmax: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Quantize ``x`` to integers (no gradient).

    Args:
        x, scale, zero_point, qmin, qmax: as in :func:`fake_quantize`.
        dtype: integer dtype of the result; by default the smallest of int8 / uint8 / int16 /
            int32 that holds ``[qmin, qmax]``.

    Returns:
        An integer tensor ``clamp(round(x / scale) + zero_point, qmin, qmax)``.
    """
    if dtype is None:
        dtype = _smallest_int_dtype(qmin, qmax)
    with torch.no_grad():
        q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return q.to(dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float) -> torch.Tensor:
    """Map integers back to real values: ``(q - zero_point) * scale`` in the dtype of ``scale``."""
    return (q.to(scale.dtype) - zero_point) * scale


def _smallest_int_dtype(qmin: int, qmax: int) -> torch.dtype:
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype
    raise ValueError(f"no integer dtype holds [{qmin}, {qmax}]")
