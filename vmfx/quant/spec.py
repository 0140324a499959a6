"""``QuantSpec``: how one tensor is quantized (bits, sign, granularity, static or dynamic).

A spec is a frozen, validated value. It says *what* to do; observers and fake-quantize modules
(:mod:`vmfx.quant.observers`, :mod:`vmfx.quant.modules`) do it.

Granularity decides which dimensions keep their own scale (``kept_dims``):

=========== ======================= ===================================================
granularity static                  dynamic (computed from each input at run time)
=========== ======================= ===================================================
tensor      one scale               one scale per call
channel     one per channel (the    one per channel per call
            last dim of an
            activation, dim 0 of a
            weight)
token       one per token position  one per (sample, token): the usual "per-token
            (the token dims of the  dynamic" of LLM quantization
            tensor's layout),
            shared by every
            sample and channel:
            PTQ4VM's PTS
=========== ======================= ===================================================

Which dims are tokens comes from the tensor's :class:`~vmfx.layout.TokenLayout`; without one a
per-token spec raises :class:`~vmfx.errors.LayoutError`: vmfx never guesses the token axis.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from typing import TYPE_CHECKING

from ..errors import ConfigError, LayoutError
from ..layout import token_kept_dims
from ..ops.quantize import qrange

if TYPE_CHECKING:
    from ..layout import TokenLayout

__all__ = ["QuantSpec", "GRANULARITIES", "MIN_BITS", "MAX_BITS"]

GRANULARITIES = ("tensor", "channel", "token")
MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor.

    Args:
        bits: bit width, 2..8.
        symmetric: signed restricted range ``[-(2^(b-1)-1), 2^(b-1)-1]`` with zero point 0 if True;
            unsigned ``[0, 2^b-1]`` with a zero point if False.
        granularity: "tensor", "channel" or "token" (see the module docstring).
        dynamic: compute the range from each input at run time instead of from calibration.

    Example::

        >>> QuantSpec(bits=4, symmetric=False, granularity="token")
        QuantSpec(bits=4, symmetric=False, granularity='token', dynamic=False)
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str = "tensor"
    dynamic: bool = False

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(
                f"QuantSpec.bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {self.bits!r}; "
                f"vmfx quantizes to {MIN_BITS}..{MAX_BITS} bits (keep a tensor in floating point by "
                "leaving it out of the config instead)"
            )
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"QuantSpec.granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}"
            )
        if not isinstance(self.symmetric, bool) or not isinstance(self.dynamic, bool):
            raise ConfigError("QuantSpec.symmetric and QuantSpec.dynamic must be booleans")

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.symmetric)[1]

    def kept_dims(self, ndim: int, *, is_weight: bool = False, layout: "TokenLayout | None" = None) -> tuple[int, ...]:
        """The dimensions of an ``ndim``-dimensional tensor that keep their own scale.

        Args:
            ndim: rank of the tensor to quantize.
            is_weight: the tensor is a weight ``(out, in, ...)``: "channel" means dim 0.
            layout: the activation's :class:`~vmfx.layout.TokenLayout` (from detection:
                ``annotation(node).layout`` or :func:`vmfx.layout.layout_of`). "token" keeps its
                token dims (static) or every dim but its channel dim (dynamic); "channel" keeps its
                channel dim.

        Returns:
            Sorted non-negative dimension indices; every other dimension is reduced over.

        Raises:
            LayoutError: a per-token spec without a layout, a layout
                of another rank, static per-token scales on a merged ``(b l)`` dim, or a
                per-channel spec on a layout without a channel dim.
        """
        if self.granularity == "tensor":
            return ()
        if self.granularity == "channel":
            if is_weight:
                return (0,)
            if layout is None:
                return (ndim - 1,)
            if layout.channel_dim is None:
                raise LayoutError(f"per-channel quantization of a rank-{ndim} tensor whose layout "
                                  f"({layout.describe()}) has no channel dim; use per-tensor here")
            return (layout.channel_dim,)
        if layout is not None:
            return token_kept_dims(layout, ndim, dynamic=self.dynamic)
        raise LayoutError(
            f"per-token quantization of a rank-{ndim} tensor needs its token layout (which dims "
            "index tokens), and none was given; vmfx does not guess the axis. Way out: pass "
            "layout=annotation(node).layout (recorded by DetectMambaMixersPass for every edge of a "
            "mixer; see vmfx.layout) to the observer or quantizer, or give this edge a per-tensor "
            "or per-channel spec"
        )

    def describe(self) -> str:
        """A short human-readable form, e.g. ``"int8 sym per-channel"``, ``"uint4 asym per-token dyn"``."""
        kind = f"{'int' if self.symmetric else 'uint'}{self.bits}"
        text = f"{kind} {'sym' if self.symmetric else 'asym'} per-{self.granularity}"
        return text + (" dyn" if self.dynamic else "")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        unknown = set(d) - {"bits", "symmetric", "granularity", "dynamic"}
        if unknown:
            raise ConfigError(f"unknown QuantSpec fields {sorted(unknown)}")
        return cls(**d)
