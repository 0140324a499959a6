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
* the gradient is the straight-through estimator: 1 for ``x`` strictly inside the range and 0
  outside it or on its bounds (``torch.clamp``'s convention),
  and the LSQ gradient for ``scale`` (``q - zp - x / scale`` inside, the clamp bound outside).

When a gradient is wanted, :func:`fake_quantize` runs as one autograd node
(:class:`FakeQuantizeFunction`) that keeps the rounding residual and the in-range mask from its
forward pass, instead of the eight elementwise nodes of the composed form (divide, round, the
straight-through add, shift, clamp, unshift, multiply): the forward values are the same bit for bit,
the gradients the same up to float rounding (``tests/ops/test_quantize.py`` checks both against the
composed form in float64). Step-size learning (JLSS, OuroMamba) runs it on every quantized edge of
a block in every step; ``benchmarks/jlss_step.py`` times the two forms side by side. Under
``torch.compile`` the composed form is traced instead, for the compiler to fuse.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = [
    "qrange",
    "round_ste",
    "fake_quantize",
    "fake_quantize_composed",
    "FakeQuantizeFunction",
    "composed_fake_quantize",
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
    if not _fused[0] or torch.compiler.is_compiling():  # under torch.compile the compiler fuses the composed ops
        return fake_quantize_composed(x, scale, zero_point, qmin, qmax, straight_through)
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return FakeQuantizeFunction.apply(x, scale, zero_point, qmin, qmax, straight_through)
    return (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


#: whether :func:`fake_quantize` records one fused autograd node (see :func:`composed_fake_quantize`)
_fused = [True]


@contextlib.contextmanager
def composed_fake_quantize():
    """Within the block, :func:`fake_quantize` runs as the composed elementwise form
    (:func:`fake_quantize_composed`) instead of :class:`FakeQuantizeFunction`: the reference that
    ``benchmarks/jlss_step.py`` times the fused node against, and a way to rule the fused backward in
    or out while debugging a learning pass. Not thread-safe (a process-wide switch)."""
    saved = _fused[0]
    _fused[0] = False
    try:
        yield
    finally:
        _fused[0] = saved


def fake_quantize_composed(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | float,
    qmin: int,
    qmax: int,
    straight_through: bool = True,
) -> torch.Tensor:
    """:func:`fake_quantize` written as elementwise torch ops, each with its own autograd node: the
    reference the fused :class:`FakeQuantizeFunction` is tested against (and timed against in
    ``benchmarks/jlss_step.py``)."""
    if isinstance(zero_point, torch.Tensor):
        zero_point = zero_point.detach()
    rounded = round_ste(x / scale) if straight_through else torch.round(x / scale)
    q = torch.clamp(rounded + zero_point, qmin, qmax)
    return (q - zero_point) * scale


class FakeQuantizeFunction(torch.autograd.Function):
    """``fake_quantize`` as one autograd node; see :func:`fake_quantize` for the arguments.

    The forward pass computes ``t = x / scale``, ``r = round(t)``, ``q = clamp(r + zp, qmin, qmax)``
    and returns ``(q - zp) * scale``, the composed form's values bit for bit
    (``t + (round(t) - t)`` is exactly ``round(t)`` in floating point). It keeps for the backward pass
    the in-range mask ``qmin < r + zp < qmax`` (strict, as ``torch.clamp``'s gradient is 0 on the
    bounds) and the scale's per-element derivative ``e``: ``r - t`` inside the range and ``q - zp``
    (the clamp bound) outside with the straight-through estimator, ``q - zp``
    everywhere with plain rounding. The backward pass is then ``grad_x = grad * mask`` (zeros with
    plain rounding, as ``round``'s own gradient gives) and ``grad_scale = sum(grad * e)`` over the
    dimensions the scale broadcasts along. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, straight_through):
        x_grad, scale_grad = ctx.needs_input_grad[:2]
        shifted_zero = not (isinstance(zero_point, (int, float)) and zero_point == 0)
        t = x / scale
        level = torch.round(t)  # r, then r + zp, then q, then q - zp: one buffer, updated in place
        if shifted_zero:
            if torch.broadcast_shapes(level.shape, torch.as_tensor(zero_point).shape) != level.shape:
                level = level.expand(torch.broadcast_shapes(level.shape, zero_point.shape)).clone()
                t = t.expand(level.shape).clone()
            level.add_(zero_point)
        inside = ((level > qmin) & (level < qmax)) if straight_through and (x_grad or scale_grad) else None
        level.clamp_(qmin, qmax)
        if shifted_zero:
            level.sub_(zero_point)
        out = level * scale
        derivative = None
        if scale_grad and straight_through:  # r - t inside, q - zp outside (t's buffer reused)
            residual = torch.sub(level, t, out=t)  # inside the range q - zp == r
            derivative = torch.where(inside, residual, level, out=residual)
        elif scale_grad:
            derivative = level
        ctx.save_for_backward(inside if x_grad else None, derivative)
        ctx.shapes = (x.shape, x.dtype, scale.shape, scale.dtype)
        ctx.straight_through = straight_through
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        inside, derivative = ctx.saved_tensors
        x_shape, x_dtype, scale_shape, scale_dtype = ctx.shapes
        grad_x = grad_scale = None
        if ctx.needs_input_grad[0]:
            if ctx.straight_through:
                grad_x = (grad * inside).to(x_dtype).sum_to_size(x_shape)
            else:
                grad_x = torch.zeros(x_shape, dtype=x_dtype, device=grad.device)
        if ctx.needs_input_grad[1]:  # called once (once_differentiable): the saved buffer is free to reuse
            grad_scale = derivative.mul_(grad).sum_to_size(scale_shape).to(scale_dtype)
        return grad_x, grad_scale, None, None, None, None


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
