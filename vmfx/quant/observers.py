"""Observers: modules that watch a tensor during calibration and turn what they saw into
quantization parameters.

Observers are inserted into the graph as ``call_module`` nodes by
:class:`vmfx.passes.insert_observers.InsertObserversPass`. They pass their input through unchanged
and keep only running reductions (O(channels) or O(tokens) memory), never the tensors themselves.
``calculate_qparams()`` returns a :class:`QParams` named tuple.

Across processes (:mod:`vmfx.distributed`) every observer combines its statistics with the other
processes' after each pass over the data (:meth:`Observer.synchronize`), giving what one process
computes on the whole data: min / max exactly; the Lp grid search keeps its error sums per batch
while the pass runs (O(batches x candidates x kept positions)) and adds them up in the order of the
batches once they are gathered, so its losses are the same bits as one process's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..errors import CalibrationDataError, ConfigError, LayoutError
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

    Symmetric: ``scale = max(|min|, |max|) / spec.scale_divisor`` (``qmax``; ``2^(b-1) - 0.5`` for
    the "full" integer range), zero point 0. Asymmetric:
    ``scale = (max - min) / (qmax - qmin)``, ``zero_point = qmin - round(min / scale)`` clamped to
    the range, so that 0.0 is exactly representable.
    """
    qmin, qmax = spec.qmin, spec.qmax
    min_neg = torch.clamp(min_val.float(), max=0.0)
    max_pos = torch.clamp(max_val.float(), min=0.0)
    if spec.symmetric:
        scale = torch.maximum(-min_neg, max_pos) / spec.scale_divisor
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
        layout: the observed activation's :class:`~vmfx.token_layout.TokenLayout` (detection records it
            per edge: ``annotation(node).layout``). Per-token statistics follow its token dims and
            per-channel ones its channel dim; they are kept in the tensor's own position order
            (``layout.order[p]`` is the canonical token at position ``p``). Without a layout a
            per-token spec raises :class:`~vmfx.errors.LayoutError`: vmfx never guesses the axis.

    Attributes:
        pre_scale: optional per-channel factor applied before observing (``x * pre_scale``): a
            smoothed linear quantizes ``x / s``, so its observer sees ``x`` scaled by ``1 / s``.
        name: what the observer watches (e.g. the node name), used in error messages; set by
            the pass that inserts it.
    """

    num_phases = 1

    def __init__(self, spec: QuantSpec, is_weight: bool = False, layout=None):
        super().__init__()
        self.spec = spec
        self.is_weight = is_weight
        self.layout = layout
        self.name: str | None = None
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

    def _what(self, x: torch.Tensor) -> str:
        where = f" at {self.name}" if self.name else ""
        return f"the tensor{where} of shape {tuple(x.shape)}"

    def _kept_dims_for(self, x: torch.Tensor) -> tuple[int, ...]:
        """The spec's kept dims on ``x``, checked against the layout; a LayoutError names the
        tensor (its node when ``name`` is set, and its shape)."""
        what = self._what(x)
        try:
            if self.layout is not None and not self.is_weight:
                self.layout.check_shape(x.shape, what)
            return self.spec.kept_dims(x.dim(), is_weight=self.is_weight, layout=self.layout)
        except LayoutError as exc:
            if what in str(exc):
                raise
            raise LayoutError(f"{type(self).__name__} on {what}: {exc}") from None

    def calculate_qparams(self) -> QParams:
        raise NotImplementedError  # implemented by every concrete observer below

    # -- several processes (vmfx.distributed) -----------------------------------------------------

    #: set by the calibration pass while it feeds batches across processes: the index of the
    #: running batch among this process's batches (None with one process)
    batch_index: int | None = None

    def synchronize(self, phase: int, ctx) -> None:
        """Combine the statistics of pass ``phase`` over the data with those of every other
        process (``ctx``, a :class:`vmfx.distributed.Context`), so that every process holds what
        one process would have computed on all their batches. Called by every process, after
        each pass over the data, before the next one reads the statistics; collectives only.
        Observers that cannot do so exactly raise :class:`~vmfx.errors.ConfigError`."""
        raise ConfigError(
            f"{type(self).__name__} cannot combine its statistics across processes (it has no "
            "synchronize method); calibrate in one process (without torchrun, or inside "
            "vmfx.distributed.single_process())"
        )

    def extra_repr(self) -> str:
        return f"{self.spec.describe()}, batches={self.num_batches}"


def _combine_extrema(local: torch.Tensor, ctx, fold) -> torch.Tensor:
    """Fold every process's running extremum (``torch.minimum`` / ``torch.maximum``) in rank
    order; processes that saw nothing (empty tensors) are skipped. Exact in any order."""
    from .. import distributed

    seen = [t for t in distributed.all_gather(local, ctx) if t.numel()]
    if not seen:
        return local
    shapes = {tuple(t.shape) for t in seen}
    if len(shapes) > 1:
        raise CalibrationDataError(
            f"processes observed statistics of different shapes {sorted(shapes)}; every process must "
            "calibrate the same model on images of one size"
        )
    out = seen[0]
    for t in seen[1:]:
        out = fold(out, t)
    return out


class MinMaxObserver(Observer):
    """Running minimum and maximum, per tensor / channel / token as the spec says.

    The statistics have the shape of the observed tensor with every reduced dimension set to 1
    (e.g. ``(1, L, 1)`` for per-token static on ``(B, L, C)``). Observing a tensor whose kept
    dimensions differ from the first one seen (e.g. another token length) raises
    :class:`~vmfx.errors.CalibrationDataError` naming both shapes.
    """

    def __init__(self, spec: QuantSpec, is_weight: bool = False, layout=None):
        super().__init__(spec, is_weight, layout)
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))
        self.abs_sum: torch.Tensor | None = None  # running sum of |x| per kept position (cluster_stat "mean_abs")
        self.abs_count = 0

    def _observe(self, x: torch.Tensor) -> None:
        if self.phase != 0:
            return
        if self.kept_dims is None:
            self.kept_dims = self._kept_dims_for(x)
        elif self.layout is not None:
            self.layout.check_shape(x.shape, self._what(x))
        lo, hi = reduce_minmax(x.float(), self.kept_dims)
        if self.spec.cluster_stat == "mean_abs":
            self._observe_mean_abs(x)
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

    def _observe_mean_abs(self, x: torch.Tensor) -> None:
        """Add ``|x|`` summed over the reduced dims (in float64) to the running sum of
        ``cluster_stat="mean_abs"``; ``abs_count`` counts the elements each position summed."""
        reduced = [d for d in range(x.dim()) if d not in self.kept_dims]
        total = x.detach().double().abs().sum(dim=reduced, keepdim=True) if reduced else x.detach().double().abs()
        self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
        self.abs_count += x.numel() // max(total.numel(), 1)

    def synchronize(self, phase: int, ctx) -> None:
        """Phase 0: the minimum of the minima and maximum of the maxima of every process (exact)."""
        if phase != 0:
            return
        if self.abs_sum is not None:
            raise ConfigError("cluster_stat='mean_abs' keeps a running mean that is not combined across "
                              "processes; calibrate this spec in one process (vmfx.distributed.single_process())")
        self.min_val = _combine_extrema(self.min_val, ctx, torch.minimum)
        self.max_val = _combine_extrema(self.max_val, ctx, torch.maximum)

    def _require_data(self) -> None:
        if self.min_val.numel() == 0:
            raise CalibrationDataError(
                "observer has seen no data: run calibration (vmfx.calibrate or the Calibrate pass) "
                "before converting"
            )

    def calculate_qparams(self) -> QParams:
        self._require_data()
        if self.spec.granularity == "cluster":
            return self._cluster_qparams()
        return qparams_from_minmax(self.min_val, self.max_val, self.spec)

    # -- k-scaled clusters (granularity "cluster") ------------------------------------------------

    #: seed of the k-means initialisation of "cluster" specs
    cluster_seed = 0

    def _cluster_qparams(self) -> QParams:
        """k-means over the per-position absmax (or, for ``cluster_stat="mean_abs"``, the mean
        ``|x|``; token positions or channels, as the spec's ``cluster_axis`` says), one max-based
        symmetric scale per cluster, expanded to the per-position scale; the cluster of every
        position is kept in ``cluster_ids``."""
        from .kscaled import cluster_scales, expand

        absmax = torch.maximum(self.min_val.abs(), self.max_val.abs())
        features = self.abs_sum / self.abs_count if self.spec.cluster_stat == "mean_abs" else None
        ids, scales = cluster_scales(absmax, self.spec.clusters, self.spec.scale_divisor, pow2=self.spec.pow2,
                                     seed=self.cluster_seed, features=features)
        self.cluster_ids = ids
        scale = expand(scales, ids)
        return QParams(scale, torch.zeros_like(scale), self.spec.qmin, self.spec.qmax)


class AbsMaxObserver(Observer):
    """Running per-channel maximum of ``|x|``: SmoothQuant's statistic. The channels are the
    layout's channel dim when a layout is given, else the last dimension.

    ``calculate_qparams`` gives the min-max parameters of the spec over the same data only when
    the spec is per-tensor or per-channel; use it for smoothing statistics, then re-observe.
    """

    def __init__(self, spec: QuantSpec, is_weight: bool = False, layout=None):
        super().__init__(spec, is_weight, layout)
        self.register_buffer("channel_absmax", torch.empty(0))

    def _observe(self, x: torch.Tensor) -> None:
        if self.phase != 0:
            return
        if self.layout is not None:
            self.layout.check_shape(x.shape, self._what(x))
            if self.layout.channel_dim is None:
                raise LayoutError(f"AbsMaxObserver on {self._what(x)}: its layout "
                                  f"({self.layout.describe()}) has no channel dim to keep")
            x = x.movedim(self.layout.channel_dim, -1)
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

    def synchronize(self, phase: int, ctx) -> None:
        """The per-channel maximum over every process (exact)."""
        if phase == 0:
            self.channel_absmax = _combine_extrema(self.channel_absmax, ctx, torch.maximum)

    def calculate_qparams(self) -> QParams:
        if self.channel_absmax.numel() == 0:
            raise CalibrationDataError("observer has seen no data: run calibration first")
        raise CalibrationDataError(
            "AbsMaxObserver only collects smoothing statistics; run SmoothQuantPass and calibrate again"
        )


class LpObserver(MinMaxObserver):
    """Grid search of the clipping range minimising the mean ``|x - Q(x)|^p`` (PTQ4VM's init).

    Phase 0 records the range ``[min, max]`` of every kept position (per token, per channel or
    per tensor). Phase 1 scores ranges shrunk symmetrically toward the midpoint,
    ``[min + a (max - min), max - a (max - min)]`` for the clipping ratios ``a = i / candidates``,
    ``i = 1 .. candidates``, as the official PTQ4VM code does (its ratios ``i / 100``); ratios
    ``a >= 1/2`` would collapse the range and are skipped (the official code scores them, but
    their clamped scale never wins), so the full range itself is not a candidate. It sums
    ``|x - Q(x)|^p`` over every batch; memory is O(candidates x kept positions). The best range is
    then widened to include 0, as the official code does, before computing the scale and zero
    point. Symmetric specs search the clip ``max|x| * i / candidates``, ``i = 1 .. candidates``.

    Args:
        spec: the activation spec (static).
        p: the norm (2.4 in PTQ4VM).
        candidates: number of candidate ranges (100 in PTQ4VM).
        layout: the activation's token layout (see :class:`Observer`).
    """

    num_phases = 2

    def __init__(self, spec: QuantSpec, is_weight: bool = False, p: float = 2.4, candidates: int = 100,
                 layout=None):
        super().__init__(spec, is_weight, layout)
        if spec.granularity == "cluster":
            raise ConfigError(
                f"the Lp grid search does not calibrate '{spec.describe()}' scales; k-scaled clusters are "
                "calibrated by min-max (MinMaxObserver) and refined by the similarity search "
                "(QuantConfig(init=InitConfig('minmax'), search=SimilaritySearchConfig()), the 'kscaled' presets)"
            )
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
        self._init_losses()
        parts = [] if self.batch_index is not None else None
        for i, (lo, hi) in enumerate(self._candidate_ranges()):
            qp = qparams_from_range(lo, hi, self.spec)
            err = (fake_quantize(x, qp.scale, qp.zero_point, qp.qmin, qp.qmax) - x).abs_().pow_(self.p)
            part = err.sum(dim=reduce, keepdim=True) if reduce else err
            if parts is None:
                self.losses[i] += part.double()
            else:
                parts.append(part)
        if parts is not None:  # across processes: kept per batch, added in the batches' order later
            self._pending.setdefault(self.batch_index, []).append(torch.stack(parts))

    def _init_losses(self) -> None:
        if self.losses.numel() == 0:
            count = self.candidates if self.spec.symmetric else len(self._clip_ratios())
            self.losses = torch.zeros((count,) + tuple(self.min_val.shape), dtype=torch.float64,
                                      device=self.min_val.device)

    @property
    def _pending(self) -> dict:
        """This process's per-batch error sums of phase 1 (float32, as computed), by batch index."""
        if "_pending_sums" not in self.__dict__:
            self.__dict__["_pending_sums"] = {}
        return self.__dict__["_pending_sums"]

    def synchronize(self, phase: int, ctx) -> None:
        """Phase 0: the range of every process (:meth:`MinMaxObserver.synchronize`). Phase 1: the
        error sums of every batch of every process are gathered and added to ``losses`` in the
        order of the batches in the whole data, each batch's float32 sum cast to float64 as one
        process adds them: the same bits as one process, whatever the number of processes."""
        if phase == 0:
            super().synchronize(phase, ctx)
            return
        from .. import distributed

        pending = self.__dict__.pop("_pending_sums", {})
        self._require_data()
        self._init_losses()
        shape = tuple(self.losses.shape)
        pieces = [torch.stack(pending[k]) if pending.get(k) else torch.empty((0,) + shape)
                  for k in range(max(pending, default=-1) + 1)]
        for batch in distributed.gather_batches(pieces, ctx):
            for part in batch:
                self.losses += part.double()

    def _candidate_ranges(self):
        lo, hi = self.min_val, self.max_val
        if self.spec.symmetric:
            amax = torch.maximum(lo.abs(), hi.abs())
            for i in range(1, self.candidates + 1):
                clip = amax * (i / self.candidates)
                yield -clip, clip
        else:
            width = hi - lo
            for a in self._clip_ratios():
                yield lo + a * width, hi - a * width

    def _clip_ratios(self) -> list[float]:
        """The asymmetric search's clipping ratios (at least the full range when fewer than three
        candidates leave no ratio below 1/2)."""
        return [i / self.candidates for i in range(1, self.candidates + 1) if i / self.candidates < 0.5] or [0.0]

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
