"""Observers: modules that watch a tensor during calibration and turn what they saw into
quantization parameters.

Observers are inserted into the graph as ``call_module`` nodes by
:class:`vmfx.passes.insert_observers.InsertObserversPass`. They pass their input through unchanged
and keep only running reductions (O(channels) or O(tokens) memory), never the tensors themselves.
``calculate_qparams()`` returns a :class:`QParams` named tuple.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..errors import CalibrationDataError
from ..ops.quantize import MIN_SCALE, fake_quantize
from .spec import QuantSpec

__all__ = [
    "QParams",
    "Observer",
    "MinMaxObserver",
    "AbsMaxObserver",
    "LpObserver",
    "qparams_from_minmax",
    "reduce_minmax",
    "lp_search_weight",
]


class QParams(NamedTuple):
    """Quantization parameters, shaped to broadcast against the observed tensor."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int


def reduce_minmax(x: torch.Tensor, kept_dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` over every dimension not in ``kept_dims`` (kept with size 1)."""
    reduce = tuple(d for d in range(x.dim()) if d not in kept_dims)
    if not reduce:
        return x, x
    return torch.amin(x, dim=reduce, keepdim=True), torch.amax(x, dim=reduce, keepdim=True)


def qparams_from_minmax(min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec) -> QParams:
    """Scale and zero point that cover ``[min_val, max_val]`` (always widened to include 0).

    Symmetric: ``scale = max(|min|, |max|) / qmax``, zero point 0. Asymmetric:
    ``scale = (max - min) / (qmax - qmin)``, ``zero_point = qmin - round(min / scale)`` clamped to
    the range, so that 0.0 is exactly representable.
    """
    qmin, qmax = spec.qmin, spec.qmax
    min_neg = torch.clamp(min_val.float(), max=0.0)
    max_pos = torch.clamp(max_val.float(), min=0.0)
    if spec.symmetric:
        scale = torch.maximum(-min_neg, max_pos) / qmax
        scale = torch.clamp(scale, min=MIN_SCALE)
        zero_point = torch.zeros_like(scale)
    else:
        scale = torch.clamp((max_pos - min_neg) / (qmax - qmin), min=MIN_SCALE)
        zero_point = torch.clamp(qmin - torch.round(min_neg / scale), qmin, qmax)
    return QParams(scale, zero_point, qmin, qmax)


class Observer(nn.Module):
    """Base class: identity in ``forward`` apart from updating statistics.

    Some statistics need several passes over the calibration data (a grid search needs the
    range before it can score candidates): an observer says how many in ``num_phases``, and the
    calibration pass runs the data that many times, setting ``phase`` before each.

    Args:
        spec: the quantization spec the statistics are for.
        is_weight: the observed tensor is a weight (``channel`` means dim 0).

    Attributes:
        pre_scale: optional per-channel factor applied before observing (``x * pre_scale``): a
            smoothed linear quantizes ``x / s``, so its observer sees ``x`` scaled by ``1 / s``.
    """

    num_phases = 1

    def __init__(self, spec: QuantSpec, is_weight: bool = False):
        super().__init__()
        self.spec = spec
        self.is_weight = is_weight
        self.kept_dims: tuple[int, ...] | None = None
        self.num_batches = 0
        self.phase = 0
        self.register_buffer("pre_scale", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_floating_point(x):
            raise CalibrationDataError(f"{type(self).__name__} observes floating-point tensors, got {x.dtype}")
        with torch.no_grad():
            seen = x.detach()
            if self.pre_scale is not None:
                seen = seen * self.pre_scale.to(seen.dtype)
            self._observe(seen)
        self.num_batches += 1
        return x

    def _observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError  # implemented by every concrete observer below

    def calculate_qparams(self) -> QParams:
        raise NotImplementedError  # implemented by every concrete observer below

    def extra_repr(self) -> str:
        return f"{self.spec.describe()}, batches={self.num_batches}"


class MinMaxObserver(Observer):
    """Running minimum and maximum, per tensor / channel / token as the spec says.

    The statistics have the shape of the observed tensor with every reduced dimension set to 1
    (e.g. ``(1, L, 1)`` for per-token static on ``(B, L, C)``). Observing a tensor whose kept
    dimensions differ from the first one seen (e.g. another token length) raises
    :class:`~vmfx.errors.CalibrationDataError` naming both shapes.
    """

    def __init__(self, spec: QuantSpec, is_weight: bool = False):
        super().__init__(spec, is_weight)
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))

    def _observe(self, x: torch.Tensor) -> None:
        if self.phase != 0:
            return
        if self.kept_dims is None:
            self.kept_dims = self.spec.kept_dims(x.dim(), is_weight=self.is_weight)
        lo, hi = reduce_minmax(x.float(), self.kept_dims)
        if self.min_val.numel() == 0:
            self.min_val, self.max_val = lo, hi
            return
        if lo.shape != self.min_val.shape:
            raise CalibrationDataError(
                f"observer saw a tensor of shape {tuple(x.shape)} whose kept dims {self.kept_dims} "
                f"differ from the first one seen ({tuple(self.min_val.shape)}); calibration batches "
                "must share their token length and channel count"
            )
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)

    def _require_data(self) -> None:
        if self.min_val.numel() == 0:
            raise CalibrationDataError(
                "observer has seen no data: run calibration (vmfx.calibrate or the Calibrate pass) "
                "before converting"
            )

    def calculate_qparams(self) -> QParams:
        self._require_data()
        return qparams_from_minmax(self.min_val, self.max_val, self.spec)


class AbsMaxObserver(Observer):
    """Running per-channel maximum of ``|x|`` (the last dimension): SmoothQuant's statistic.

    ``calculate_qparams`` gives the min-max parameters of the spec over the same data only when
    the spec is per-tensor or per-channel; use it for smoothing statistics, then re-observe.
    """

    def __init__(self, spec: QuantSpec, is_weight: bool = False):
        super().__init__(spec, is_weight)
        self.register_buffer("channel_absmax", torch.empty(0))

    def _observe(self, x: torch.Tensor) -> None:
        if self.phase != 0:
            return
        amax = x.abs().float().reshape(-1, x.shape[-1]).amax(dim=0)
        if self.channel_absmax.numel() == 0:
            self.channel_absmax = amax
        elif amax.shape != self.channel_absmax.shape:
            raise CalibrationDataError(
                f"observer saw {amax.numel()} channels after {self.channel_absmax.numel()}; calibration "
                "batches must share their channel count"
            )
        else:
            self.channel_absmax = torch.maximum(self.channel_absmax, amax)

    def calculate_qparams(self) -> QParams:
        if self.channel_absmax.numel() == 0:
            raise CalibrationDataError("observer has seen no data: run calibration first")
        raise CalibrationDataError(
            "AbsMaxObserver only collects smoothing statistics; run SmoothQuantPass and calibrate again"
        )


class LpObserver(MinMaxObserver):
    """Grid search of the clipping range minimising the mean ``|x - Q(x)|^p`` (PTQ4VM's init).

    Phase 0 records the range ``[min, max]`` of every kept position (per token, per channel or
    per tensor). Phase 1 scores ``candidates`` ranges shrunk symmetrically toward the midpoint,
    ``[min + a (max - min), max - a (max - min)]`` for ``a = i / (2 * candidates)``,
    ``i = 0 .. candidates - 1`` (the full range included, no collapsed range), summing
    ``|x - Q(x)|^p`` over every batch; memory is O(candidates x kept positions). The best range is
    then widened to include 0, as the official code does, before computing the scale and zero
    point. Symmetric specs search the clip ``max|x| * i / candidates``, ``i = 1 .. candidates``.

    Args:
        spec: the activation spec (static).
        p: the norm (2.4 in PTQ4VM).
        candidates: number of candidate ranges (100 in PTQ4VM).
    """

    num_phases = 2

    def __init__(self, spec: QuantSpec, is_weight: bool = False, p: float = 2.4, candidates: int = 100):
        super().__init__(spec, is_weight)
        self.p = float(p)
        self.candidates = int(candidates)
        self.register_buffer("losses", torch.empty(0))

    def _observe(self, x: torch.Tensor) -> None:
        if self.phase == 0:
            super()._observe(x)
            return
        self._require_data()
        x = x.float()
        reduce = tuple(d for d in range(x.dim()) if d not in self.kept_dims)
        if self.losses.numel() == 0:
            self.losses = torch.zeros((self.candidates,) + tuple(self.min_val.shape), dtype=torch.float64,
                                      device=self.min_val.device)
        for i, (lo, hi) in enumerate(self._candidate_ranges()):
            qp = qparams_from_range(lo, hi, self.spec)
            err = (fake_quantize(x, qp.scale, qp.zero_point, qp.qmin, qp.qmax) - x).abs_().pow_(self.p)
            self.losses[i] += (err.sum(dim=reduce, keepdim=True) if reduce else err).double()

    def _candidate_ranges(self):
        lo, hi = self.min_val, self.max_val
        if self.spec.symmetric:
            amax = torch.maximum(lo.abs(), hi.abs())
            for i in range(1, self.candidates + 1):
                clip = amax * (i / self.candidates)
                yield -clip, clip
        else:
            width = hi - lo
            for i in range(self.candidates):
                a = i / (2 * self.candidates)
                yield lo + a * width, hi - a * width

    def calculate_qparams(self) -> QParams:
        self._require_data()
        if self.losses.numel() == 0:
            raise CalibrationDataError("LpObserver needs its second calibration pass (phase 1) before converting")
        best = self.losses.argmin(dim=0)
        ranges = list(self._candidate_ranges())
        lo = torch.stack([r[0] for r in ranges]).gather(0, best.unsqueeze(0)).squeeze(0)
        hi = torch.stack([r[1] for r in ranges]).gather(0, best.unsqueeze(0)).squeeze(0)
        return qparams_from_minmax(lo, hi, self.spec)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> QParams:
    """Parameters that map ``[lo, hi]`` exactly onto the integer range (no widening to 0).

    Used to score grid-search candidates the way the official PTQ4VM code does; the final
    parameters are widened to include 0 (:func:`qparams_from_minmax`).
    """
    qmin, qmax = spec.qmin, spec.qmax
    if spec.symmetric:
        scale = torch.clamp(torch.maximum(lo.abs(), hi.abs()) / qmax, min=MIN_SCALE)
        return QParams(scale, torch.zeros_like(scale), qmin, qmax)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=MIN_SCALE)
    zero_point = torch.round(-lo / scale) + qmin
    return QParams(scale, zero_point, qmin, qmax)


def lp_search_weight(weight: torch.Tensor, spec: QuantSpec, p: float = 2.4, candidates: int = 100) -> QParams:
    """Per-output-channel (or per-tensor) grid search of a weight's clipping range (PTQ4VM's
    weight init): the clip ``max|w| * i / candidates`` with the smallest mean ``|w - Q(w)|^p``."""
    obs = LpObserver(spec, is_weight=True, p=p, candidates=candidates)
    with torch.no_grad():
        obs.phase = 0
        obs(weight)
        obs.phase = 1
        obs(weight)
    return obs.calculate_qparams()
