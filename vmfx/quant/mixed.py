"""OuroMamba's mixed-precision activation quantizer: static per-token inliers, dynamic outlier
channels at higher precision, the outlier set growing within windows of time steps.

A Vision Mamba's linear inputs carry a few channels far larger than the rest, and *which* channels
changes from token to token. OuroMamba (ICCV 2025) quantizes such an activation in two parts:

* **inliers**: a static per-token scale ``S_I(t)`` (calibrated on the activation with its outliers
  removed, :class:`OutlierLpObserver`), at the activation bit width (4 or 8);
* **outliers**: at every time step ``t`` whose dynamic inlier scale exceeds ``S_I(t)`` (the step
  does not fit the static range), the channels with ``|x_c| > mean_c |x| + k std_c |x|`` join an
  outlier set; the set only grows within a window of ``refresh`` steps (10) and is emptied at the
  start of the next window. Outlier channels are quantized dynamically, one scale per (sample, step)
  over that step's outlier channels, at ``outlier_bits`` (8 in W4A4O8, 16 in W4A8O16).

``k`` is 3 for the symmetric quantizer on the linears' inputs and 4 for the asymmetric variant
OuroMamba applies to delta (the output of ``dt_proj``), whose inliers and outliers both have a zero
point.

Time steps are the positions of the tensor's token dims (its :class:`~vmfx.token_layout.TokenLayout`),
which is the scan order for the tensors inside a scan direction (Vim's backward branch holds its
tokens reversed) and the raster order for ``in_proj`` / ``out_proj``; windows are positions
``[10 w, 10 w + 10)``. Everything is vectorised over samples, windows and steps (the union within a
window is one small GEMM with a lower-triangular matrix of ones), so no Python loop runs over time.

Differences from the official code, on purpose:

* the official run-time loop computes each step's trigger and threshold on the step with the
  window's earlier outlier channels zeroed, which makes step ``t`` depend on steps ``< t`` and
  forces a loop over time; here the trigger (``dynamic scale > S_I(t)``) and the threshold are
  computed on the whole step, and the union is taken afterwards. A channel that is already an
  outlier still raises the step's maximum, so the trigger fires at least as often; the threshold
  includes the outliers' own magnitudes, so it is a little higher.
* the official trigger is ``any`` over the batch (one image's outlier changes another image's
  quantization); here it is per sample by default, so a quantized model's output for an image does
  not depend on the other images of its batch. ``trigger="batch"`` is the official rule: step ``t``
  of a window fires when any (sample, window) exceeds its static scale at that offset within the
  window (the official ``(dynamic_s > static_s[:, :, i]).any()`` reduces over samples and windows).
* the official code keeps W4A8O16 outliers in floating point; here they are 16-bit integers by
  default (one scale per sample and step), which the integer kernels can consume;
  ``outlier_float=True`` keeps them in floating point, as the official code does.

Invariants: the output has the input's shape and dtype; every element is either its inlier
quantization (static scale) or its outlier quantization (dynamic scale, or its float value with
``outlier_float``), never both; with ``enabled = False`` the module is the identity; gradients
reach ``x`` straight through (``round_gradient="ste"``, the default) or not at all through the
rounding (``"zero"``, the official OuroMamba learning) and the inlier step size by LSQ (the outlier
scales are recomputed per call and get none).
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError, LayoutError
from ..token_layout import TokenLayout
from ..ops.quantize import MIN_SCALE, fake_quantize, qrange
from .modules import FakeQuantize
from .observers import LpObserver, QParams
from .registry import register_module_kind
from .spec import QuantSpec

__all__ = [
    "MixedPrecisionQuantize",
    "OutlierLpObserver",
    "to_steps",
    "from_steps",
    "select_outliers",
    "outlier_qparams",
    "MAX_OUTLIER_BITS",
    "TRIGGERS",
    "FlatMixedPrecisionQuantize",
    "FLAT_LAYOUT",
    "calibrate_flat",
]

#: Outlier channels may use up to 16 bits (W4A8O16).
MAX_OUTLIER_BITS = 16

#: When a time step adds outlier channels: "sample" (each sample's own dynamic scale against the
#: static one) or "batch" (the official rule: any sample, and any window, at that step's offset).
TRIGGERS = ("sample", "batch")


# -- the (samples, steps, channels) view ------------------------------------------------------------


def _check_layout(x: torch.Tensor, layout, what: str):
    if layout is None:
        raise LayoutError(
            f"{what}: the mixed-precision quantizer needs the activation's token layout (which dims are "
            "time steps and which is the channel dim); pass layout=annotation(node).layout"
        )
    layout.check_shape(x.shape, what)
    if layout.channel_dim is None:
        raise LayoutError(f"{what}: its layout ({layout.describe()}) has no channel dim to select outliers in")


def to_steps(x: torch.Tensor, layout) -> torch.Tensor:
    """``x`` as ``(samples, steps, channels)``: the batch dim, the token dims flattened (positions),
    the channel dim. A merged ``(b l) d`` layout reshapes its rows; any other dim is refused."""
    _check_layout(x, layout, f"a tensor of shape {tuple(x.shape)}")
    if layout.merged_batch:
        return x.movedim(layout.channel_dim, -1).reshape(-1, layout.tokens, x.shape[layout.channel_dim])
    perm = ([] if layout.batch_dim is None else [layout.batch_dim]) + list(layout.token_dims) + [layout.channel_dim]
    if len(perm) != x.dim():
        raise LayoutError(f"a tensor of shape {tuple(x.shape)} ({layout.describe()}) has dims that are neither "
                          "batch, token nor channel dims; the mixed-precision quantizer cannot order its steps")
    y = x.permute(perm)
    return y.reshape(-1 if layout.batch_dim is not None else 1, layout.tokens, x.shape[layout.channel_dim])


def from_steps(y: torch.Tensor, like: torch.Tensor, layout) -> torch.Tensor:
    """Inverse of :func:`to_steps`: ``y`` (samples, steps, channels) back to the shape of ``like``."""
    if layout.merged_batch:
        moved = list(like.movedim(layout.channel_dim, -1).shape)
        return y.reshape(moved).movedim(-1, layout.channel_dim)
    perm = ([] if layout.batch_dim is None else [layout.batch_dim]) + list(layout.token_dims) + [layout.channel_dim]
    permuted_shape = [like.shape[d] for d in perm]
    inverse = [perm.index(d) for d in range(like.dim())]
    return y.reshape(permuted_shape).permute(inverse)


def _per_step(t: torch.Tensor, layout) -> torch.Tensor:
    """A static per-token parameter (the input's rank, size 1 but on token dims) as ``(1, steps, 1)``;
    a per-tensor one (one element) broadcast to every step."""
    if t.numel() == 1:
        return t.reshape(1, 1, 1).expand(1, layout.tokens, 1)
    return t.reshape(1, layout.tokens, 1)


# -- selection --------------------------------------------------------------------------------------


def select_outliers(
    x: torch.Tensor,
    k: float,
    refresh: int,
    trigger_scale: torch.Tensor | None = None,
    qmin: int | None = None,
    qmax: int | None = None,
    symmetric: bool = True,
    trigger: str = "sample",
) -> torch.Tensor:
    """The outlier mask of ``x`` ``(samples, steps, channels)``, vectorised over steps.

    Step ``t`` of sample ``n`` adds the channels ``c`` with ``|x[n,t,c]| > mean_c + k std_c`` (of
    ``|x[n,t,:]|``, ``std`` unbiased as ``torch.std``) to the outlier set of its window
    ``t // refresh``, if it is *triggered*: always when ``trigger_scale`` is None (calibration),
    else when its dynamic inlier scale exceeds ``trigger_scale[t]`` (symmetric: ``max|x| / qmax``;
    asymmetric: ``(max x - min x) / (qmax - qmin)``, both ranges widened to include 0). The mask at
    step ``t`` is the union of the sets added at steps ``w * refresh .. t`` of its window.

    Args:
        x: (S, P, C) float.
        k: the threshold's number of standard deviations (3; 4 for delta).
        refresh: window length in steps (10).
        trigger_scale: (P,) or broadcastable ``(1, P, 1)`` static inlier scales, or None.
        qmin, qmax, symmetric: the inlier range (needed with ``trigger_scale``).
        trigger: "sample" (step ``t`` of sample ``n`` fires on its own dynamic scale) or "batch"
            (step ``t`` fires for every sample and window when any sample, in any window, exceeds
            the static scale at the same offset ``t % refresh``: the official OuroMamba rule).

    Returns:
        (S, P, C) bool.
    """
    if x.dim() != 3:
        raise ValueError(f"select_outliers takes (samples, steps, channels), got shape {tuple(x.shape)}")
    if not isinstance(refresh, int) or refresh < 1:
        raise ConfigError(f"the outlier refresh window must be a positive number of steps, got {refresh!r}")
    if trigger not in TRIGGERS:
        raise ConfigError(f"the outlier trigger must be one of {', '.join(map(repr, TRIGGERS))}, got {trigger!r}")
    s, p, c = x.shape
    a = x.detach().abs().float()
    if c > 1:
        std, mean = torch.std_mean(a, dim=-1, keepdim=True)
    else:
        std, mean = torch.zeros_like(a), a
    new = a > mean + k * std
    if trigger_scale is not None:
        if symmetric:
            dynamic = a.amax(dim=-1) / qmax
        else:
            xd = x.detach().float()
            lo = xd.amin(dim=-1).clamp(max=0.0)
            hi = xd.amax(dim=-1).clamp(min=0.0)
            dynamic = (hi - lo) / (qmax - qmin)
        fired = dynamic > trigger_scale.reshape(1, -1).float()
        if trigger == "batch":
            fired = _fired_at_offset(fired, refresh)
        new = new & fired.unsqueeze(-1)
    pad = (-p) % refresh
    if pad:
        new = torch.cat([new, new.new_zeros(s, pad, c)], dim=1)
    windows = new.view(s, (p + pad) // refresh, refresh, c)
    # the union within a window: step i's mask is the OR of steps 0..i, a lower-triangular matrix
    # of ones applied over the window's steps (one small batched GEMM; counts stay exact in float)
    union = torch.ones(refresh, refresh, device=x.device).tril_()
    mask = (torch.matmul(union, windows.float()) > 0).view(s, p + pad, c)
    return mask[:, :p] if pad else mask


def _fired_at_offset(fired: torch.Tensor, refresh: int) -> torch.Tensor:
    """``(S, P)`` triggers -> the official batch-wide ones: offset ``i`` of every window fires for
    every sample when any sample fires at offset ``i`` of any window."""
    s, p = fired.shape
    pad = (-p) % refresh
    padded = torch.cat([fired, fired.new_zeros(s, pad)], dim=1) if pad else fired
    at_offset = padded.view(s, -1, refresh).any(dim=1).any(dim=0)  # (refresh,)
    return at_offset.repeat((p + pad) // refresh)[:p].unsqueeze(0).expand(s, p)


def outlier_qparams(x: torch.Tensor, mask: torch.Tensor, bits: int, symmetric: bool) -> QParams:
    """Dynamic parameters of the outlier part: one scale (and zero point) per (sample, step) from
    the values of that step's outlier channels (the range widened to include 0, as the inlier
    channels hold 0 in the outlier part); shape ``(S, P, 1)``."""
    qmin, qmax = qrange(bits, symmetric)
    xo = torch.where(mask, x.detach().float(), torch.zeros((), device=x.device))
    if symmetric:
        scale = (xo.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=MIN_SCALE)
        return QParams(scale, torch.zeros_like(scale), qmin, qmax)
    lo = xo.amin(dim=-1, keepdim=True).clamp(max=0.0)
    hi = xo.amax(dim=-1, keepdim=True).clamp(min=0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=MIN_SCALE)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return QParams(scale, zero_point, qmin, qmax)


# -- the quantizer ----------------------------------------------------------------------------------


class MixedPrecisionQuantize(FakeQuantize):
    """OuroMamba's mixed-precision activation quantizer, a graph node like ``FakeQuantize``.

    It *is* a :class:`~vmfx.quant.modules.FakeQuantize` for the machinery that learns, disables or
    finds quantizers (its ``scale`` / ``zero_point`` are the static per-token inlier parameters,
    learned by JLSS like any step size); its forward adds the dynamic outlier channels.

    Args:
        spec: the inlier spec: static, per-token (or per-tensor), symmetric for the linears' inputs,
            asymmetric for delta.
        qparams: the calibrated inlier parameters (:class:`OutlierLpObserver`).
        layout: the activation's token layout (required: it orders the time steps).
        outlier_bits: bits of the outlier channels, 2..16 (8 in W4A4O8, 16 in W4A8O16).
        sigma: ``k`` of the threshold ``mean + k std`` (3; 4 for delta).
        refresh: window length in time steps after which the outlier set is emptied (10).
        outlier_float: keep the outlier channels in floating point (the official W4A8O16) instead
            of quantizing them at ``outlier_bits``.
        trigger: when a step adds outliers, "sample" or "batch" (:func:`select_outliers`).

    Attributes:
        record: when True, every forward stores its outlier mask ``(samples, steps, channels)``
            in ``last_mask`` (inspection: :func:`vmfx.inspect.outlier_sets`).
    """

    def __init__(self, spec: QuantSpec, qparams: QParams, layout, outlier_bits: int = 8, sigma: float = 3.0,
                 refresh: int = 10, outlier_float: bool = False, trigger: str = "sample"):
        if spec.dynamic or spec.granularity == "channel":
            raise ConfigError(f"the mixed-precision quantizer's inliers are static per-token or per-tensor, got "
                              f"{spec.describe()}")
        if layout is None:
            raise LayoutError("the mixed-precision quantizer needs the activation's token layout (its time steps)")
        if isinstance(outlier_bits, bool) or not isinstance(outlier_bits, int) or not 2 <= outlier_bits <= MAX_OUTLIER_BITS:
            raise ConfigError(f"outlier_bits must be an integer from 2 to {MAX_OUTLIER_BITS}, got {outlier_bits!r}")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
            raise ConfigError(f"sigma must be a non-negative number of standard deviations, got {sigma!r}")
        if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1:
            raise ConfigError(f"refresh must be a positive number of time steps, got {refresh!r}")
        if not isinstance(outlier_float, bool):
            raise ConfigError(f"outlier_float must be True or False, got {outlier_float!r}")
        if trigger not in TRIGGERS:
            raise ConfigError(f"trigger must be one of {', '.join(map(repr, TRIGGERS))}, got {trigger!r}")
        super().__init__(spec, qparams, layout=layout)
        self.outlier_bits = outlier_bits
        self.sigma = float(sigma)
        self.refresh = refresh
        self.outlier_float = outlier_float
        self.trigger = trigger
        self.record = False
        self.last_mask: torch.Tensor | None = None

    def describe(self) -> str:
        """E.g. ``"int4 sym per-token + int8 outliers (mean+3sd, refresh 10)"``."""
        kind = "float" if self.outlier_float else ("int" if self.spec.symmetric else "uint") + str(self.outlier_bits)
        batch = ", batch trigger" if self.trigger == "batch" else ""
        return (f"{self.spec.describe()} + {kind} outliers "
                f"(mean+{self.sigma:g}sd, refresh {self.refresh}{batch})")

    def _inlier_params(self):
        scale = self.scale.clamp(min=MIN_SCALE) if self.scale.requires_grad else self.scale
        return _per_step(scale, self.layout), _per_step(self.zero_point, self.layout)

    def outlier_mask(self, x: torch.Tensor) -> torch.Tensor:
        """The outlier mask of ``x`` in the (samples, steps, channels) view."""
        scale, _ = self._inlier_params()
        return select_outliers(to_steps(x, self.layout), self.sigma, self.refresh, scale.detach(),
                               self.qmin, self.qmax, self.spec.symmetric, self.trigger)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        self._check_shape(x)
        x3 = to_steps(x, self.layout)
        scale, zero_point = self._inlier_params()
        mask = select_outliers(x3, self.sigma, self.refresh, scale.detach(), self.qmin, self.qmax, self.spec.symmetric,
                               self.trigger)
        if self.record:
            self.last_mask = mask.detach().cpu()
        zero = torch.zeros((), dtype=x3.dtype, device=x3.device)
        straight = self.round_gradient == "ste"
        inliers = fake_quantize(torch.where(mask, zero, x3), scale, zero_point, self.qmin, self.qmax, straight)
        if self.outlier_float:
            outliers = x3
        else:
            oq = outlier_qparams(x3, mask, self.outlier_bits, self.spec.symmetric)
            outliers = fake_quantize(torch.where(mask, x3, zero), oq.scale, oq.zero_point, oq.qmin, oq.qmax, straight)
        y = torch.where(mask, outliers, inliers)
        return from_steps(y, x, self.layout).to(x.dtype)

    def quantize_parts(self, x: torch.Tensor) -> dict:
        """The integer form of ``x`` in the (samples, steps, channels) view, for the integer kernels:
        ``mask`` (bool), inlier ``codes_in`` (the codes of 0 at outlier positions), ``scale_in`` /
        ``zero_in`` (1, P, 1), outlier ``codes_out`` (the codes of 0 at inlier positions),
        ``scale_out`` / ``zero_out`` (S, P, 1), and the two integer ranges. Dequantizing each part
        where the mask selects it gives :meth:`forward`'s output."""
        if self.outlier_float:
            raise ConfigError("this mixed-precision quantizer keeps its outliers in floating point (outlier_float): "
                              "they have no integer codes; quantize them (OutlierConfig(float_outliers=False)) to "
                              "lower it to the integer kernels")
        with torch.no_grad():
            x3 = to_steps(x, self.layout).float()
            scale, zero_point = self._inlier_params()
            mask = self.outlier_mask(x)
            zero = torch.zeros((), device=x3.device)
            q_in = torch.clamp(torch.round(torch.where(mask, zero, x3) / scale) + zero_point, self.qmin, self.qmax)
            oq = outlier_qparams(x3, mask, self.outlier_bits, self.spec.symmetric)
            q_out = torch.clamp(torch.round(torch.where(mask, x3, zero) / oq.scale) + oq.zero_point, oq.qmin, oq.qmax)
        return {"mask": mask, "codes_in": q_in.to(torch.int32), "scale_in": scale.float(), "zero_in": zero_point.float(),
                "codes_out": q_out.to(torch.int32), "scale_out": oq.scale, "zero_out": oq.zero_point,
                "in_range": (self.qmin, self.qmax), "out_range": (oq.qmin, oq.qmax)}

    def to_dict(self) -> dict:
        """The structure (spec, scale shape, layout, outlier settings), for :mod:`vmfx.serialize`."""
        d = {"spec": self.spec.to_dict(), "scale_shape": list(self.scale.shape), "enabled": self.enabled,
             "layout": self.layout, "outlier_bits": self.outlier_bits, "sigma": self.sigma, "refresh": self.refresh}
        if self.outlier_float or self.trigger != "sample":  # written only when set: older readers read the rest
            d.update(outlier_float=self.outlier_float, trigger=self.trigger)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MixedPrecisionQuantize":
        spec = QuantSpec.from_dict(d["spec"])
        shape = tuple(int(n) for n in d["scale_shape"])
        fq = cls(spec, QParams(torch.ones(shape), torch.zeros(shape), spec.qmin, spec.qmax), d.get("layout"),
                 int(d["outlier_bits"]), float(d["sigma"]), int(d["refresh"]),
                 bool(d.get("outlier_float", False)), str(d.get("trigger", "sample")))
        fq.enabled = bool(d.get("enabled", True))
        return fq

    def extra_repr(self) -> str:
        return f"{self.describe()}, scale{tuple(self.scale.shape)}"


# -- parameter operands as one time step ------------------------------------------------------------

#: The layout of a value seen as one sample with one time step whose channels are all its elements
#: (``(1, 1, numel)``): how the official OuroMamba quantizes the scan's ``A`` and ``D``.
FLAT_LAYOUT = TokenLayout(3, (1,), 2, 1, (0,), batch_dim=0)


class FlatMixedPrecisionQuantize(MixedPrecisionQuantize):
    """The mixed-precision quantizer of a parameter-only value (the scan's ``A`` (dim, N) or
    ``D`` (dim,)) read as one time step whose channels are all its elements, as the official
    OuroMamba reshapes ``A`` to ``(1, 1, dim * N)`` and ``D`` to ``(1, 1, dim)`` before its
    per-token activation quantizer (ICCV-OuroMamba@562d7e3, quant/vim/modified/
    selective_scan_interface.py:276-297): one static inlier scale for the whole value, and the
    elements past ``mean + sigma std`` of ``|value|`` as outliers.

    Invariants: as :class:`MixedPrecisionQuantize` on ``x.reshape(1, 1, -1)``, reshaped back to
    ``x``'s shape; any input shape whose element count matches the calibrated one.
    """

    def __init__(self, spec: QuantSpec, qparams: QParams, layout=None, outlier_bits: int = 8, sigma: float = 3.0,
                 refresh: int = 10, outlier_float: bool = False, trigger: str = "sample"):
        super().__init__(spec, qparams, FLAT_LAYOUT, outlier_bits, sigma, refresh, outlier_float, trigger)

    def describe(self) -> str:
        """E.g. ``"int4 sym per-token + int8 outliers (mean+3sd, refresh 10), whole value as one step"``."""
        return super().describe() + ", whole value as one step"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return super().forward(x.reshape(1, 1, -1)).reshape(x.shape)

    def quantize_parts(self, x: torch.Tensor) -> dict:
        return super().quantize_parts(x.reshape(1, 1, -1))


def calibrate_flat(observer_factory, spec: QuantSpec, values: list[torch.Tensor]) -> FlatMixedPrecisionQuantize:
    """Calibrate a :class:`FlatMixedPrecisionQuantize` on parameter-only ``values`` (one or more
    tensors of one size, e.g. ``A`` of both scan directions of a mixer) with the observer
    ``observer_factory(spec, layout=FLAT_LAYOUT)`` gives, which must be an :class:`OutlierLpObserver`;
    each value is one sample, so a shared quantizer's per-step statistics cover all of them."""
    observer = observer_factory(spec, layout=FLAT_LAYOUT)
    if not isinstance(observer, OutlierLpObserver):
        raise ConfigError(
            f"a per-token spec on the scan operand A or D quantizes the whole value as one time step with "
            f"OuroMamba's outlier channels; this config's observers are {type(observer).__name__}. Give the "
            "config outliers (QuantConfig(outliers=OutlierConfig(...))), or use a 'tensor' / 'channel' spec"
        )
    sizes = {v.numel() for v in values}
    if len(sizes) != 1:
        raise ConfigError(f"the values sharing one A / D quantizer have different sizes {sorted(sizes)}; drop shared")
    batch = torch.cat([v.detach().float().reshape(1, 1, -1) for v in values])
    with torch.no_grad():
        for phase in range(observer.num_phases):
            observer.phase = phase
            observer(batch)
    qparams = observer.calculate_qparams()
    return FlatMixedPrecisionQuantize(spec, qparams, None, observer.outlier_bits, observer.sigma, observer.refresh,
                                      observer.outlier_float, observer.trigger)


# -- calibration ------------------------------------------------------------------------------------


class OutlierLpObserver(LpObserver):
    """PTQ4VM's Lp grid search of the per-token inlier range, on the activation with its outliers
    removed (OuroMamba's calibration): every step's channels past ``mean + sigma std`` (accumulated
    over windows of ``refresh`` steps, no trigger) are set to 0 before the statistics are taken.
    Converts to a :class:`MixedPrecisionQuantize` (:meth:`build_quantizer`).

    Args:
        spec: the inlier spec (static per-token).
        outlier_bits, sigma, refresh, outlier_float, trigger: passed on to the quantizer.
        p, candidates: the grid search (2.4, 100).
        layout: the activation's token layout (required).
    """

    def __init__(self, spec: QuantSpec, is_weight: bool = False, p: float = 2.4, candidates: int = 100,
                 layout=None, outlier_bits: int = 8, sigma: float = 3.0, refresh: int = 10,
                 outlier_float: bool = False, trigger: str = "sample"):
        if is_weight:
            raise ConfigError("OutlierLpObserver observes activations, not weights")
        super().__init__(spec, False, p=p, candidates=candidates, layout=layout)
        self.outlier_bits, self.sigma, self.refresh = outlier_bits, float(sigma), refresh
        self.outlier_float, self.trigger = outlier_float, trigger

    def _observe(self, x: torch.Tensor) -> None:
        _check_layout(x, self.layout, self._what(x))
        x3 = to_steps(x, self.layout)
        mask = select_outliers(x3, self.sigma, self.refresh)
        inliers = from_steps(torch.where(mask, torch.zeros((), dtype=x3.dtype, device=x3.device), x3), x, self.layout)
        super()._observe(inliers)

    def build_quantizer(self, qparams: QParams) -> MixedPrecisionQuantize:
        """The converted node's module (called by :class:`~vmfx.passes.convert.ConvertPass`)."""
        return MixedPrecisionQuantize(self.spec, qparams, self.layout, self.outlier_bits, self.sigma, self.refresh,
                                      self.outlier_float, self.trigger)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, outliers int{self.outlier_bits} mean+{self.sigma:g}sd refresh {self.refresh}"


register_module_kind(MixedPrecisionQuantize)
register_module_kind(FlatMixedPrecisionQuantize)
