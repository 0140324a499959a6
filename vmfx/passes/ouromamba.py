"""OuroMamba-Quant as options of the PTQ pipeline.

``ouromamba`` runs the same passes as PTQ4VM without smoothing (:func:`~.pipeline.ptq_passes`)::

    DetectMambaMixers
    InsertObservers    OutlierLpObserver on every static activation edge: the inputs of in_proj,
                       x_proj, dt_proj, out_proj (symmetric, mean + 3 sd) and delta, dt_proj's
                       output (asymmetric, mean + 4 sd)
    Calibrate          two passes: range, then the Lp (p = 2.4) grid, on the activations with
                       their outliers removed
    Convert            observers -> MixedPrecisionQuantize nodes; weights by the per-channel Lp grid
    JLSS               block-wise step-size learning (AdamW 5e-4, 1 - cosine, clip 2.0), delta's
                       quantizer included (``JLSSConfig.learn_outputs``)

The only thing this module adds is the observer factory the config's ``outliers`` selects; the
passes are PTQ4VM's.
"""

from __future__ import annotations

from typing import Callable

from ..config import OutlierConfig
from ..quant.mixed import OutlierLpObserver
from ..quant.spec import QuantSpec

__all__ = ["outlier_observer"]


def outlier_observer(outliers: OutlierConfig, p: float = 2.4, candidates: int = 100) -> Callable[..., OutlierLpObserver]:
    """The observer factory of OuroMamba's activations: ``factory(spec, layout=...)`` gives an
    :class:`~vmfx.quant.mixed.OutlierLpObserver` with the config's outlier bits (or float
    outliers), refresh window, trigger and threshold (``sigma`` for symmetric specs, ``sigma_asym``
    for asymmetric ones: delta)."""

    def factory(spec: QuantSpec, is_weight: bool = False, layout=None) -> OutlierLpObserver:
        return OutlierLpObserver(spec, is_weight, p=p, candidates=candidates, layout=layout,
                                 outlier_bits=outliers.bits, sigma=outliers.sigma_for(spec), refresh=outliers.refresh,
                                 outlier_float=outliers.float_outliers, trigger=outliers.trigger)

    return factory
