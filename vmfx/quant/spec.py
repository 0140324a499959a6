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
cluster     k static scales, one per    (static only) k-scaled quantization (Shi et al.):
            cluster of token          k-means over the calibration absmax of every token
            positions                 position (``cluster_axis="token"``) or channel
            (``cluster_axis="token"``) (``"channel"``); each cluster gets one symmetric
            or of channels             scale, optionally the first cluster's scale times a
                                      power of two (``pow2``). Stored expanded: a
                                      per-token or per-channel scale vector holding at
                                      most ``clusters`` distinct values
=========== ======================= ===================================================

Which dims are tokens comes from the tensor's :class:`~vmfx.token_layout.TokenLayout`; without one a
per-token spec raises :class:`~vmfx.errors.LayoutError`: vmfx never guesses the token axis.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from typing import TYPE_CHECKING

from ..errors import ConfigError, LayoutError
from ..token_layout import token_kept_dims
from ..ops.quantize import qrange

if TYPE_CHECKING:
    from ..token_layout import TokenLayout

__all__ = ["QuantSpec", "GRANULARITIES", "CLUSTER_AXES", "CLUSTER_STATISTICS", "INT_RANGES", "MIN_BITS", "MAX_BITS"]

GRANULARITIES = ("tensor", "channel", "token", "cluster")
#: The axes a "cluster" spec can cluster.
CLUSTER_AXES = ("token", "channel")
#: The per-position statistic k-means clusters: ``max |x|`` over the calibration data, or the mean
#: of ``|x|`` (the official k-scaled code, Access-IC-Lab/PTQ_for_ViM@d6fc957 src/tools/kmeans.py:16).
CLUSTER_STATISTICS = ("absmax", "mean_abs")
#: The integer ranges of a symmetric spec: "restricted" ``[-(2^(b-1)-1), 2^(b-1)-1]``, max-based
#: scale ``max / qmax``; "full" ``[-2^(b-1), 2^(b-1)-1]``, max-based scale ``max / (2^(b-1) - 0.5)``
#: (the official k-scaled code, src/quant_configs/QuantConfig.py: ``qmax = 2^(b-1)``).
INT_RANGES = ("restricted", "full")
_CLUSTER_FIELDS = ("cluster_axis", "clusters", "pow2", "cluster_stat")
MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor.

    Args:
        bits: bit width, 2..8.
        symmetric: signed restricted range ``[-(2^(b-1)-1), 2^(b-1)-1]`` with zero point 0 if True;
            unsigned ``[0, 2^b-1]`` with a zero point if False.
        granularity: "tensor", "channel", "token" or "cluster" (see the module docstring).
        dynamic: compute the range from each input at run time instead of from calibration.
        cluster_axis: for "cluster": cluster the token positions ("token") or the channels
            ("channel"); the expanded scale is per-token or per-channel.
        clusters: for "cluster": the number of clusters k (k-scaled ViM PTQ: 4).
        pow2: for "cluster": every cluster's scale is the first (smallest) cluster's scale
            times a power of two, so moving between cluster scales is a shift.
        cluster_stat: for "cluster": the per-position statistic k-means clusters, "absmax"
            (``max |x|``) or "mean_abs" (the mean of ``|x|``, the official k-scaled code); each
            cluster's scale is max-based either way.
        int_range: for a symmetric spec: "restricted" (default) or "full" (see :data:`INT_RANGES`);
            left out of ``to_dict`` at its default.

    A "cluster" spec is static and symmetric; the cluster fields keep their defaults for the
    other granularities (and are left out of ``to_dict`` there).

    Example::

        >>> QuantSpec(bits=4, symmetric=False, granularity="token")
        QuantSpec(bits=4, symmetric=False, granularity='token', dynamic=False)
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str = "tensor"
    dynamic: bool = False
    cluster_axis: str = "token"
    clusters: int = 4
    pow2: bool = False
    cluster_stat: str = "absmax"
    int_range: str = "restricted"

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
        self._check_cluster_fields()
        if self.int_range not in INT_RANGES:
            raise ConfigError(f"QuantSpec.int_range must be one of {', '.join(INT_RANGES)}, got {self.int_range!r}")
        if self.int_range != "restricted" and not self.symmetric:
            raise ConfigError("QuantSpec.int_range='full' is for symmetric specs (an asymmetric spec already uses "
                              "the full unsigned range [0, 2^b - 1]); use symmetric=True or leave int_range out")

    def _check_cluster_fields(self) -> None:
        if self.granularity != "cluster":
            changed = [f for f in _CLUSTER_FIELDS if getattr(self, f) != _CLUSTER_DEFAULTS[f]]
            if changed:
                raise ConfigError(f"QuantSpec.{', '.join(changed)} only apply to granularity 'cluster', "
                                  f"not {self.granularity!r}")
            return
        if self.cluster_axis not in CLUSTER_AXES:
            raise ConfigError(f"QuantSpec.cluster_axis must be one of {', '.join(CLUSTER_AXES)}, got {self.cluster_axis!r}")
        if isinstance(self.clusters, bool) or not isinstance(self.clusters, int) or self.clusters < 1:
            raise ConfigError(f"QuantSpec.clusters must be a positive integer (k-scaled ViM PTQ uses 4), got {self.clusters!r}")
        if not isinstance(self.pow2, bool):
            raise ConfigError(f"QuantSpec.pow2 must be a boolean, got {self.pow2!r}")
        if self.cluster_stat not in CLUSTER_STATISTICS:
            raise ConfigError(f"QuantSpec.cluster_stat must be one of {', '.join(CLUSTER_STATISTICS)}, "
                              f"got {self.cluster_stat!r}")
        if self.dynamic or not self.symmetric:
            raise ConfigError(
                "a 'cluster' spec is static and symmetric (one calibrated scale per cluster, zero point 0): "
                "use dynamic=False, symmetric=True, or another granularity"
            )

    @property
    def qmin(self) -> int:
        low = qrange(self.bits, self.symmetric)[0]
        return low - 1 if self.int_range == "full" else low

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.symmetric)[1]

    @property
    def scale_divisor(self) -> float:
        """What a symmetric max-based scale divides the largest ``|x|`` by: ``qmax``, or
        ``2^(b-1) - 0.5`` for the "full" range (so ``max`` lands half a step inside the range)."""
        return self.qmax + 0.5 if self.int_range == "full" else self.qmax

    def kept_dims(self, ndim: int, *, is_weight: bool = False, layout: "TokenLayout | None" = None) -> tuple[int, ...]:
        """The dimensions of an ``ndim``-dimensional tensor that keep their own scale.

        Args:
            ndim: rank of the tensor to quantize.
            is_weight: the tensor is a weight ``(out, in, ...)``: "channel" means dim 0.
            layout: the activation's :class:`~vmfx.token_layout.TokenLayout` (from detection:
                ``annotation(node).layout`` or :func:`vmfx.token_layout.layout_of`). "token" keeps its
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
        if self.granularity == "cluster":  # the expanded scale: per token or per channel
            return self.expanded().kept_dims(ndim, is_weight=is_weight, layout=layout)
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
            "mixer; see vmfx.token_layout) to the observer or quantizer, or give this edge a per-tensor "
            "or per-channel spec"
        )

    def expanded(self) -> "QuantSpec":
        """The plain per-token / per-channel spec a "cluster" spec's scale is stored as (itself
        for the other granularities)."""
        if self.granularity != "cluster":
            return self
        return QuantSpec(self.bits, self.symmetric, self.cluster_axis, self.dynamic, int_range=self.int_range)

    def describe(self) -> str:
        """A short human-readable form, e.g. ``"int8 sym per-channel"``, ``"uint4 asym per-token dyn"``,
        ``"int8 sym per-cluster(token,k=4,pow2)"``."""
        kind = f"{'int' if self.symmetric else 'uint'}{self.bits}"
        text = f"{kind} {'sym' if self.symmetric else 'asym'} per-{self.granularity}"
        if self.granularity == "cluster":
            stat = ",mean-abs" if self.cluster_stat == "mean_abs" else ""
            text += f"({self.cluster_axis},k={self.clusters}{',pow2' if self.pow2 else ''}{stat})"
        if self.int_range == "full":
            text += " full-range"
        return text + (" dyn" if self.dynamic else "")

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.granularity != "cluster":
            for name in _CLUSTER_FIELDS:
                d.pop(name)
        elif self.cluster_stat == _CLUSTER_DEFAULTS["cluster_stat"]:  # written only when set
            d.pop("cluster_stat")
        if self.int_range == "restricted":
            d.pop("int_range")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        unknown = set(d) - {"bits", "symmetric", "granularity", "dynamic", "int_range", *_CLUSTER_FIELDS}
        if unknown:
            raise ConfigError(f"unknown QuantSpec fields {sorted(unknown)}")
        return cls(**d)


_CLUSTER_DEFAULTS = {"cluster_axis": "token", "clusters": 4, "pow2": False, "cluster_stat": "absmax"}
