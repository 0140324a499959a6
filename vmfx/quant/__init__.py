"""Quantization building blocks: specs, observers and the quantized modules of converted graphs."""

from .modules import FakeQuantize, QuantLinear, weight_quantizer_minmax
from .observers import MinMaxObserver, Observer, QParams, qparams_from_minmax
from .spec import QuantSpec

__all__ = [
    "QuantSpec",
    "QParams",
    "Observer",
    "MinMaxObserver",
    "qparams_from_minmax",
    "FakeQuantize",
    "QuantLinear",
    "weight_quantizer_minmax",
]
