"""``SmoothQuantPass``: per-input-channel smoothing factors for every quantized linear.

For each observer node whose module is an :class:`~vmfx.quant.observers.AbsMaxObserver` (the
per-channel ``max|x|`` of calibration data) and whose only user is a linear to be quantized::

    s_j = clamp( max|x_j|^alpha / max_i |W_ij|^(1 - alpha), min=1e-5 )
          (max|x_j| clamped to >= 1e-3, max_i|W_ij| to >= 1e-5, as PTQ4VM's code does)

the Linear becomes a :class:`~vmfx.quant.QuantLinear` holding ``s`` as an explicit tensor (a
learnable parameter for JLSS; quantizers are added by ``ConvertPass``), and the observer is
replaced by a fresh activation observer that sees ``x / s`` (``pre_scale = 1 / s``), so that the
next calibration pass measures the range the quantizer will see.

Requires: calibrated ``AbsMaxObserver``\\ s. Invariants: the graph computes exactly the same
function (``(x / s) @ (W * s)^T == x @ W^T`` up to rounding); node names are unchanged.
Folding ``1 / s`` into a preceding norm happens later (:class:`FoldSmoothingPass`), after
learning, where it is exact.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
from torch import nn

from ..annotations import annotate, annotation
from ..quant.modules import QuantLinear
from ..quant.observers import AbsMaxObserver, MinMaxObserver, Observer
from ..quant.spec import QuantSpec
from .base import Pass, PassContext, PassResult
from .graph_utils import replace_submodule
from .patterns import is_linear, module_of

__all__ = ["SmoothQuantPass", "smoothing_factors"]


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s = max|x|^alpha / max|W|^(1-alpha)`` per input channel (PTQ4VM's clamps)."""
    act = act_absmax.float().clamp(min=1e-3)
    w = weight.detach().abs().float().amax(dim=0).clamp(min=1e-5)
    return (act.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


class SmoothQuantPass(Pass):
    """Turn smoothing statistics into smoothing factors (see module docstring).

    Args:
        alpha: migration strength (0.5 for Vim, 0.65 for VMamba in PTQ4VM).
        observer: factory of the activation observers that replace the statistics observers
            (called with the activation spec).
    """

    def __init__(self, alpha: float = 0.5, observer: Callable[[QuantSpec], Observer] = MinMaxObserver):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.observer = observer

    def _targets(self, gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
        out = []
        for node in gm.graph.nodes:
            if isinstance(module_of(node), AbsMaxObserver):
                users = list(node.users)
                if len(users) == 1 and is_linear(users[0]) and annotation(users[0]) is not None:
                    out.append((node, users[0]))
        return out

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        targets = self._targets(gm)
        if not targets:
            raise self.fail(
                "no AbsMaxObserver before a linear: insert smoothing-statistics observers "
                "(InsertObserversPass(observer=AbsMaxObserver)) and calibrate first"
            )
        for obs_node, _ in targets:
            if module_of(obs_node).channel_absmax.numel() == 0:
                raise self.fail("smoothing statistics are empty: run CalibratePass first", obs_node)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        for obs_node, lin_node in self._targets(gm):
            stats = module_of(obs_node)
            linear = module_of(lin_node)
            weight = linear.weight
            if stats.channel_absmax.numel() != weight.shape[1]:
                raise self.fail(
                    f"smoothing statistics have {stats.channel_absmax.numel()} channels, the linear "
                    f"{weight.shape[1]} inputs", lin_node,
                )
            s = smoothing_factors(stats.channel_absmax, weight, self.alpha)
            if isinstance(linear, QuantLinear):
                linear.smooth = nn.Parameter(s, requires_grad=False)
                linear.smooth_input = True
            else:
                replace_submodule(gm, lin_node.target, QuantLinear.from_linear(linear, smooth=s))
            observer = self.observer(stats.spec)
            observer.pre_scale = 1.0 / s
            replace_submodule(gm, obs_node.target, observer)
            ann = annotation(lin_node)
            annotate(lin_node, ann.role, extra={**ann.extra, "smoothing_alpha": self.alpha})
        return PassResult(gm, True)
