"""``SmoothQuantPass``: SmoothQuant smoothing nodes for every linear with smoothing statistics.

For each :class:`~vmfx.quant.observers.AbsMaxObserver` node on the input edge of a linear (the
per-channel ``max|x|`` of calibration data)::

    s_j = clamp( max|x_j|^alpha / max_i |W_ij|^(1 - alpha), min=1e-5 )
          (max|x_j| clamped to >= 1e-3, max_i|W_ij| to >= 1e-5, as PTQ4VM's code does)

a :class:`~vmfx.quant.Smooth` node holding ``s`` is inserted on both edges of the linear (``x / s``
before the observer, ``W * s`` on the weight edge; one module, two calls), and the observer is
replaced by a fresh activation observer, which now sees ``x / s``: the next calibration pass
measures the range the quantizer will see. ``s`` is a parameter JLSS may learn.

Which linears: every one with statistics, or those a :class:`~vmfx.config.Selector` picks
(``select``); ``alpha`` may vary by node (``settings``: :class:`~vmfx.config.SettingRule` entries
for ``"smoothing.alpha"``). The pass re-arms only the observers it smoothed (and, without a
selector, the statistics observers on other edges), so two instances with disjoint selectors
compose: ``[Calibrate, SmoothQuant(0.8, select=Selector(role="out_proj")), SmoothQuant(0.5), Calibrate]``.

Requires: calibrated ``AbsMaxObserver``\\ s (fact ``smoothing_statistics``). Invariants: the graph computes the same function
(``(x / s) @ (W * s)^T == x @ W^T`` up to rounding); node names are unchanged; folding ``1 / s``
into a preceding norm happens later (:class:`~vmfx.passes.FoldSmoothingPass`), after learning.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from ..annotations import annotate, annotation, selector_facts
from ..config import Selector, SettingRule
from ..errors import ConfigError
from ..quant.modules import Smooth
from ..quant.observers import AbsMaxObserver, MinMaxObserver, Observer
from ..quant.spec import QuantSpec
from .base import Pass, PassContext, PassResult
from .graph_utils import insert_module_on_edge, replace_submodule, unique_submodule_name
from .insert_observers import QUANT_PREFIX, edge_layout, make_observer
from .linear_edges import linear_edges, served_linear
from .patterns import is_linear, module_of

__all__ = ["SmoothQuantPass", "smoothing_factors"]


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s = max|x|^alpha / max|W|^(1-alpha)`` per input channel (PTQ4VM's clamps)."""
    act = act_absmax.float().clamp(min=1e-3)
    w = weight.detach().abs().float().amax(dim=0).clamp(min=1e-5)
    return (act.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


class SmoothQuantPass(Pass):
    """Turn smoothing statistics into smoothing nodes (see module docstring).

    Args:
        alpha: migration strength (0.5 for Vim, 0.65 for VMamba in PTQ4VM), where no setting rule
            says otherwise.
        observer: factory of the activation observers that replace the statistics observers
            (called with the activation spec).
        select: smooth only the linears this selector picks (None: every linear with statistics).
        settings: setting rules; those for ``"smoothing.alpha"`` give the alpha of the linears
            they select (the last match wins over ``alpha``).
    """

    requires_facts = ("smoothing_statistics",)
    ensures_facts = ("smoothing_factors",)

    def __init__(self, alpha: float = 0.5, observer: Callable[[QuantSpec], Observer] = MinMaxObserver,
                 select: Selector | None = None, settings: tuple[SettingRule, ...] = ()):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        if select is not None and not isinstance(select, Selector):
            raise ConfigError(f"SmoothQuantPass(select=...) takes a vmfx.Selector, got {type(select).__name__}")
        settings = tuple(settings)
        if not all(isinstance(r, SettingRule) for r in settings):
            raise ConfigError("SmoothQuantPass(settings=...) takes vmfx.SettingRule entries")
        self.alpha = alpha
        self.observer = observer
        self.select = select
        self.settings = tuple(r for r in settings if r.setting == "smoothing.alpha")
        # a selective pass leaves the other linears' statistics for a later pass to smooth
        self.clears_facts = ("observers_calibrated",) if select is not None else ("observers_calibrated", "smoothing_statistics")

    def _targets(self, gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
        """(statistics observer, linear) for every AbsMaxObserver on the input edge of a linear
        the selector picks."""
        nodes = {n.name: n for n in gm.graph.nodes}
        out = []
        for node in gm.graph.nodes:
            served = nodes.get(served_linear(node))
            if isinstance(module_of(node), AbsMaxObserver) and served is not None and is_linear(served) \
                    and annotation(node).extra.get("edge") == "input":
                if self.select is None or self.select.matches(*selector_facts(served)):
                    out.append((node, served))
        return out

    def alpha_for(self, linear: fx.Node) -> float:
        """The alpha of one linear: ``alpha``, then every matching setting rule in order."""
        alpha = self.alpha
        for rule in self.settings:
            if rule.select.matches(*selector_facts(linear)):
                alpha = rule.value
        return float(alpha)

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        targets = self._targets(gm)
        if not targets:
            if self.select is not None:
                raise ConfigError(f"SmoothQuantPass(select={self.select.describe()}) selects no linear with smoothing "
                                  "statistics (not smoothed yet) in this graph: check the selector against "
                                  "vmfx.inspect.table(graph)")
            raise self.fail(
                "no AbsMaxObserver on a linear's input: insert smoothing-statistics observers "
                "(InsertObserversPass(observer=AbsMaxObserver)) and calibrate first"
            )
        linears = [selector_facts(lin) for _, lin in targets]
        for rule in self.settings:
            if not any(rule.select.matches(*t) for t in linears):
                raise ConfigError(f"the setting rule '{rule.describe()}' selects none of the {len(linears)} linears this "
                                  "SmoothQuantPass smooths (a typo? see their roles and names with vmfx.inspect.table)")
        for obs_node, _ in targets:
            if module_of(obs_node).channel_absmax.numel() == 0:
                raise self.fail("smoothing statistics are empty: run CalibratePass first", obs_node)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        for obs_node, lin_node in self._targets(gm):
            alpha = self.alpha_for(lin_node)
            stats = module_of(obs_node)
            edges = linear_edges(lin_node)
            if edges.act_smooth is not None:
                raise self.fail("this linear is already smoothed", lin_node)
            weight = edges.linear_module(gm).weight
            if stats.channel_absmax.numel() != weight.shape[1]:
                raise self.fail(
                    f"smoothing statistics have {stats.channel_absmax.numel()} channels, the linear "
                    f"{weight.shape[1]} inputs", lin_node,
                )
            if not bool(torch.isfinite(stats.channel_absmax).all()):
                raise self.fail("smoothing statistics are not finite (NaN/Inf in the model or the data)", lin_node)
            smooth = Smooth(smoothing_factors(stats.channel_absmax, weight, alpha))
            ann = annotation(lin_node)
            facts = {"block": ann.block, "direction": ann.direction, "tokens": ann.tokens, "mixer": ann.mixer}
            path = unique_submodule_name(gm, QUANT_PREFIX, f"{lin_node.name}__smooth")
            act_node = insert_module_on_edge(gm, obs_node, obs_node.args[0], smooth, path)
            annotate(act_node, "smooth", **facts, extra={"quantizes": lin_node.name, "edge": "input",
                                                         "alpha": alpha})
            if edge_layout(act_node.args[0]) is not None:
                annotation(act_node).layout = edge_layout(act_node.args[0])
            w_node = insert_module_on_edge(gm, lin_node, edges.weight_attr, smooth, path, {"weight": True})
            annotate(w_node, "smooth", **facts, extra={"quantizes": lin_node.name, "edge": "weight",
                                                       "alpha": alpha})
            layout = getattr(annotation(obs_node), "layout", None)
            replace_submodule(gm, obs_node.target, make_observer(self.observer, stats.spec, layout))
            annotate(lin_node, ann.role, extra={**ann.extra, "smoothing_alpha": alpha})
        if self.select is not None:  # the others' statistics wait for the pass that smooths them
            return PassResult(gm, True)
        # statistics observers on other edges (outputs) have nothing to smooth: re-arm them as
        # activation observers too
        for node in gm.graph.nodes:
            stats = module_of(node)
            if isinstance(stats, AbsMaxObserver):
                layout = getattr(annotation(node), "layout", None)
                replace_submodule(gm, node.target, make_observer(self.observer, stats.spec, layout))
        return PassResult(gm, True)
