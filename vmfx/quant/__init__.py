"""Quantization building blocks: specs, observers and the modules converted graphs call on their edges
(``FakeQuantize`` quantizers and ``Smooth`` smoothing nodes)."""

from .modules import FakeQuantize, Smooth, weight_quantizer_minmax
from .observers import MinMaxObserver, Observer, QParams, qparams_from_minmax
from .spec import QuantSpec

__all__ = [
    "QuantSpec",
    "QParams",
    "Observer",
    "MinMaxObserver",
    "qparams_from_minmax",
    "FakeQuantize",
    "Smooth",
    "weight_quantizer_minmax",
]
