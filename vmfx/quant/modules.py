"""The modules a converted graph calls on its edges: ``FakeQuantize`` and ``Smooth``.

Quantization is not hidden inside layers: every quantized tensor, activation or weight, passes
through its own ``FakeQuantize`` node, and SmoothQuant's factors are a ``Smooth`` node of their own,
so a converted linear reads::

    x -> smooth -> quantize(act) -> F.linear( . , quantize(smooth(W, weight=True)), b)

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
from .registry import register_module_kind
from .spec import QuantSpec

__all__ = ["FakeQuantize", "Smooth", "weight_quantizer_minmax", "SMOOTH_MIN"]

#: Smoothing factors are kept at least this large (PTQ4VM's clamp), also while they are learned.
SMOOTH_MIN = 1e-5


class FakeQuantize(nn.Module):
    """Quantize-dequantize one tensor in floating point.

    Args:
        spec: how to quantize.
        qparams: static scale and zero point (shaped to broadcast against the input); ``None``
            for a dynamic spec.
        is_weight: the tensor is a weight (``channel`` means dim 0).
        layout: the activation's :class:`~vmfx.token_layout.TokenLayout`: which dims a dynamic
            per-token spec keeps, and which dims are tokens in shape errors (see
            :meth:`QuantSpec.kept_dims`).
        cluster_ids: for a "cluster" spec (k-scaled), the cluster of every position, shaped like
            the scale (a ``cluster_ids`` buffer). The scale stays the expanded per-position
            vector (what the forward, the inspector and the lowering read); ``cluster_scales`` /
            ``set_cluster_scales`` read and write it per cluster.

    Static per-token parameters fix the token length: an input of another length raises a
    ``ValueError`` naming both lengths.

    Attributes:
        round_gradient: the gradient of the rounding, "ste" (straight through, the default) or
            "zero" (plain ``round``; set while learning by JLSS with ``activation_rounding="zero"``).
    """

    def __init__(self, spec: QuantSpec, qparams: QParams | None = None, is_weight: bool = False, layout=None,
                 cluster_ids: torch.Tensor | None = None):
        super().__init__()
        self.spec = spec
        self.is_weight = is_weight
        self.layout = layout
        self.enabled = True
        self.round_gradient = "ste"
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
        self._init_clusters(cluster_ids)

    # -- k-scaled clusters ----------------------------------------------------------------------

    def _init_clusters(self, cluster_ids: torch.Tensor | None) -> None:
        if self.spec.granularity != "cluster":
            if cluster_ids is not None:
                raise ConfigError(f"cluster_ids are for 'cluster' specs, not {self.spec.describe()}")
            self.register_buffer("cluster_ids", None)
            return
        if cluster_ids is None:
            raise ConfigError(f"a {self.spec.describe()} FakeQuantize needs the cluster of every position "
                              "(cluster_ids, from the observer's calibration)")
        ids = cluster_ids.detach().clone().long()
        if tuple(ids.shape) != tuple(self.scale.shape):
            raise ConfigError(f"cluster_ids of shape {tuple(ids.shape)} do not match the scale's {tuple(self.scale.shape)}")
        self.register_buffer("cluster_ids", ids)

    @property
    def num_clusters(self) -> int:
        """Clusters in use (0 for a spec that is not "cluster")."""
        return 0 if self.cluster_ids is None else int(self.cluster_ids.max()) + 1

    def cluster_scales(self) -> torch.Tensor:
        """The scale of every cluster, ``(num_clusters,)`` (read off the expanded scale)."""
        if self.cluster_ids is None:
            raise ConfigError(f"{self.spec.describe()} has no clusters")
        ids = self.cluster_ids.reshape(-1)
        return torch.zeros(self.num_clusters).scatter_(0, ids, self.scale.detach().reshape(-1).float())

    def set_cluster_scales(self, scales: torch.Tensor) -> None:
        """Write one scale per cluster into the expanded scale (in place, no gradient)."""
        if self.cluster_ids is None:
            raise ConfigError(f"{self.spec.describe()} has no clusters")
        with torch.no_grad():
            self.scale.copy_(scales.to(self.scale)[self.cluster_ids])

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
            self.layout.check_shape(x.shape, "the input of a dynamic FakeQuantize")
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
        return fake_quantize(x, scale, qp.zero_point, qp.qmin, qp.qmax,
                             straight_through=self.round_gradient == "ste").to(x.dtype)

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
                if self.spec.expanded().granularity == "token" and d in token_dims:
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

    def to_dict(self) -> dict:
        """The structure (spec, parameter shapes, flags, layout), for :mod:`vmfx.serialize`."""
        return {"spec": self.spec.to_dict(), "is_weight": self.is_weight,
                "scale_shape": None if self.scale is None else list(self.scale.shape), "enabled": self.enabled,
                "layout": getattr(self, "layout", None)}

    @classmethod
    def from_dict(cls, d: dict) -> "FakeQuantize":
        """A quantizer of that structure with unit placeholder parameters."""
        spec = QuantSpec.from_dict(d["spec"])
        if spec.dynamic:
            fq = cls(spec, None, is_weight=bool(d["is_weight"]), layout=d.get("layout"))
        else:
            shape = tuple(int(n) for n in d["scale_shape"])
            clusters = {"cluster_ids": torch.zeros(shape, dtype=torch.long)} if spec.granularity == "cluster" else {}
            fq = cls(spec, QParams(torch.ones(shape), torch.zeros(shape), spec.qmin, spec.qmax), bool(d["is_weight"]),
                     layout=d.get("layout"), **clusters)
        fq.enabled = bool(d.get("enabled", True))
        return fq

    def extra_repr(self) -> str:
        shape = "dynamic" if self.scale is None else f"scale{tuple(self.scale.shape)}"
        clusters = f", {self.num_clusters} clusters" if self.cluster_ids is not None else ""
        return f"{self.spec.describe()}, {shape}{clusters}"


class Smooth(nn.Module):
    """SmoothQuant's per-input-channel factors ``s`` of one linear, as a graph node of their own.

    The same module is called on two edges of the linear it smooths: on the activation edge it
    computes ``x / s`` (``smooth(x)``), on the weight edge ``W * s`` (``smooth(W, weight=True)``,
    ``s`` broadcast over the input columns), so that ``(x / s) @ (W * s)^T == x @ W^T`` and the
    graph reads ``x -> smooth -> quantize -> linear(., quantize(smooth(W)))``. When the activation
    side has been folded into the op producing ``x`` (:class:`~vmfx.passes.FoldSmoothingPass`), its
    node is gone and ``folded_into`` names the op that now divides.

    Args:
        factors: ``s``, shape ``(in_features,)``, positive.

    ``factors`` is an ``nn.Parameter`` with ``requires_grad=False``; learning passes (JLSS) switch
    it on, and while it learns it is clamped to ``SMOOTH_MIN`` at use.
    """

    #: x / s keeps the shape and token layout of x (detection and layouts walk through it)
    vmfx_preserves_layout = True

    def __init__(self, factors: torch.Tensor):
        super().__init__()
        if factors.dim() != 1:
            raise ConfigError(f"smoothing factors must be a vector (in_features,), got shape {tuple(factors.shape)}")
        self.factors = nn.Parameter(factors.detach().clone().float(), requires_grad=False)
        self.folded_into: str | None = None

    def value(self) -> torch.Tensor:
        """The factors in use (clamped to stay positive while they are learned)."""
        return self.factors.clamp(min=SMOOTH_MIN) if self.factors.requires_grad else self.factors

    def forward(self, x: torch.Tensor, weight: bool = False) -> torch.Tensor:
        s = self.value().to(x.dtype)
        return x * s if weight else x / s

    def to_dict(self) -> dict:
        """The structure (channel count, where the activation side was folded), for :mod:`vmfx.serialize`."""
        return {"channels": self.factors.numel(), "folded_into": self.folded_into}

    @classmethod
    def from_dict(cls, d: dict) -> "Smooth":
        smooth = cls(torch.ones(int(d["channels"])))
        smooth.folded_into = d.get("folded_into")
        return smooth

    def extra_repr(self) -> str:
        folded = f", activation side folded into {self.folded_into}" if self.folded_into else ""
        return f"channels={self.factors.numel()}{folded}"


def weight_quantizer_minmax(weight: torch.Tensor, spec: QuantSpec) -> FakeQuantize:
    """A static weight quantizer with min-max parameters computed from ``weight`` itself."""
    lo, hi = reduce_minmax(weight.detach().float(), spec.kept_dims(weight.dim(), is_weight=True))
    return FakeQuantize(spec, qparams_from_minmax(lo, hi, spec), is_weight=True)


register_module_kind(FakeQuantize)
register_module_kind(Smooth)
