"""Quantized modules that a converted graph calls: ``FakeQuantize`` and ``QuantLinear``.

``FakeQuantize`` simulates quantization of one tensor with stored (static) or run-time (dynamic)
parameters. ``QuantLinear`` is one quantized linear layer, the unit a fused integer kernel
implements::

    y = linear( Q_a(x / s),  Q_w(W * s) ) + b        s: optional per-input-channel smoothing

``(x / s) @ (W * s)^T == x @ W^T``, so smoothing changes nothing in floating point; it moves
range from the activation to the weight before both are quantized (SmoothQuant).

Step sizes are ``nn.Parameter``s with ``requires_grad=False``; learning passes (JLSS) switch
them on. Zero points are buffers holding integers and are never learned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..ops.quantize import MIN_SCALE, dequantize, fake_quantize, quantize
from .observers import QParams, qparams_from_minmax, reduce_minmax
from .spec import QuantSpec

__all__ = ["FakeQuantize", "QuantLinear", "weight_quantizer_minmax", "SMOOTH_MIN"]

#: Smoothing factors are kept at least this large (PTQ4VM's clamp), also while they are learned.
SMOOTH_MIN = 1e-5


class FakeQuantize(nn.Module):
    """Quantize-dequantize one tensor in floating point.

    Args:
        spec: how to quantize.
        qparams: static scale and zero point (shaped to broadcast against the input); ``None``
            for a dynamic spec.
        is_weight: the tensor is a weight (``channel`` means dim 0).
        layout: the activation's :class:`~vmfx.layout.TokenLayout`: which dims a dynamic
            per-token spec keeps, and which dims are tokens in shape errors (see
            :meth:`QuantSpec.kept_dims`).

    Static per-token parameters fix the token length: an input of another length raises a
    ``ValueError`` naming both lengths.
    """

    def __init__(self, spec: QuantSpec, qparams: QParams | None = None, is_weight: bool = False, layout=None):
        super().__init__()
        self.spec = spec
        self.is_weight = is_weight
        self.layout = layout
        self.enabled = True
        if spec.dynamic:
            if qparams is not None:
                raise ConfigError("a dynamic FakeQuantize computes its parameters at run time; pass qparams=None")
            self.scale = None
            self.register_buffer("zero_point", None)
        else:
            if qparams is None:
                raise ConfigError(f"a static FakeQuantize ({spec.describe()}) needs qparams from calibration")
            self.scale = nn.Parameter(qparams.scale.detach().clone().float(), requires_grad=False)
            self.register_buffer("zero_point", qparams.zero_point.detach().clone().float())

    @property
    def qmin(self) -> int:
        return self.spec.qmin

    @property
    def qmax(self) -> int:
        return self.spec.qmax

    def qparams(self, x: torch.Tensor | None = None) -> QParams:
        """The parameters used for ``x`` (required for a dynamic spec)."""
        if not self.spec.dynamic:
            return QParams(self.scale, self.zero_point, self.qmin, self.qmax)
        if x is None:
            raise ValueError("a dynamic FakeQuantize needs the input to compute its parameters")
        if self.layout is not None and not self.is_weight:
            self.layout.check_shape(x.shape, f"the input of shape {tuple(x.shape)} of a dynamic FakeQuantize")
        kept = self.spec.kept_dims(x.dim(), is_weight=self.is_weight, layout=self.layout)
        lo, hi = reduce_minmax(x.detach().float(), kept)
        return qparams_from_minmax(lo, hi, self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        qp = self.qparams(x)
        if not self.spec.dynamic:
            self._check_shape(x)
        scale = qp.scale
        if scale.requires_grad:  # a learned step size must stay positive
            scale = scale.clamp(min=MIN_SCALE)
        return fake_quantize(x, scale, qp.zero_point, qp.qmin, qp.qmax).to(x.dtype)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes of ``x`` (used by the integer reference backend and tests)."""
        qp = self.qparams(x)
        return quantize(x, qp.scale, qp.zero_point, qp.qmin, qp.qmax)

    def dequantize(self, q: torch.Tensor, x_for_dynamic: torch.Tensor | None = None) -> torch.Tensor:
        qp = self.qparams(x_for_dynamic)
        return dequantize(q, qp.scale, qp.zero_point)

    def _check_shape(self, x: torch.Tensor) -> None:
        s = self.scale
        if s.dim() == 0:
            return
        if s.dim() != x.dim():
            raise ValueError(
                f"quantization parameters of shape {tuple(s.shape)} ({self.spec.describe()}) do not fit "
                f"an input of shape {tuple(x.shape)}"
            )
        for d in range(x.dim()):
            if s.shape[d] != 1 and s.shape[d] != x.shape[d]:
                token_dims = self.layout.token_dims if self.layout is not None else (x.dim() - 2,)
                if self.spec.granularity == "token" and d in token_dims:
                    raise ValueError(
                        f"per-token static scales were calibrated for {s.shape[d]} tokens, but this input "
                        f"has {x.shape[d]} tokens (shape {tuple(x.shape)}). Per-token static quantization "
                        "fixes the sequence length: run the model at the calibrated length (image size and "
                        "patching), or quantize again with calibration data of the new length"
                    )
                raise ValueError(
                    f"{self.spec.describe()} parameters of shape {tuple(s.shape)} do not fit an input "
                    f"of shape {tuple(x.shape)} (dim {d}: {s.shape[d]} vs {x.shape[d]})"
                )

    def extra_repr(self) -> str:
        shape = "dynamic" if self.scale is None else f"scale{tuple(self.scale.shape)}"
        return f"{self.spec.describe()}, {shape}"


class QuantLinear(nn.Module):
    """A linear layer with quantized input and weight and optional smoothing.

    Args:
        weight: ``(out, in)`` float weight (kept in floating point; fake-quantized on use).
        bias: ``(out,)`` or None.
        input_quantizer: quantizer of the (smoothed) input, or None to keep it in float.
        weight_quantizer: quantizer of the (smoothed) weight, or None.
        smooth: per-input-channel smoothing factors ``s`` (``(in,)``), or None.
        smooth_input: divide the input by ``s`` here; False when ``1/s`` has been folded into the
            op that produces the input (then the input already arrives smoothed).

    Invariant: with both quantizers disabled, the output equals ``F.linear(x, weight, bias)``
    up to rounding, whatever ``s`` is (when ``smooth_input`` is True).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        input_quantizer: FakeQuantize | None = None,
        weight_quantizer: FakeQuantize | None = None,
        smooth: torch.Tensor | None = None,
        smooth_input: bool = True,
    ):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.input_quantizer = input_quantizer
        self.weight_quantizer = weight_quantizer
        if smooth is not None and smooth.shape != (self.in_features,):
            raise ConfigError(f"smoothing factors must have shape ({self.in_features},), got {tuple(smooth.shape)}")
        self.smooth = None if smooth is None else nn.Parameter(smooth.detach().clone().float(), requires_grad=False)
        self.smooth_input = smooth_input

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "QuantLinear":
        return cls(linear.weight, linear.bias, **kwargs)

    def smoothing(self) -> torch.Tensor | None:
        """The smoothing factors in use (clamped to stay positive while they are learned)."""
        if self.smooth is None:
            return None
        return self.smooth.clamp(min=SMOOTH_MIN) if self.smooth.requires_grad else self.smooth

    def smoothed_weight(self) -> torch.Tensor:
        return self.weight if self.smooth is None else self.weight * self.smoothing()

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized (smoothed) weight used in ``forward``."""
        w = self.smoothed_weight()
        return w if self.weight_quantizer is None else self.weight_quantizer(w)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """Smooth and fake-quantize the input as ``forward`` does."""
        if self.smooth is not None and self.smooth_input:
            x = x / self.smoothing().to(x.dtype)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.prepare_input(x), self.quantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        a = self.input_quantizer.spec.describe() if self.input_quantizer is not None else "float"
        w = self.weight_quantizer.spec.describe() if self.weight_quantizer is not None else "float"
        s = ", smoothed" if self.smooth is not None else ""
        return f"in={self.in_features}, out={self.out_features}, act={a}, weight={w}{s}"


def weight_quantizer_minmax(weight: torch.Tensor, spec: QuantSpec) -> FakeQuantize:
    """A static weight quantizer with min-max parameters computed from ``weight`` itself."""
    lo, hi = reduce_minmax(weight.detach().float(), spec.kept_dims(weight.dim(), is_weight=True))
    return FakeQuantize(spec, qparams_from_minmax(lo, hi, spec), is_weight=True)

