"""``ConvertPass``: observers become calibrated quantizer nodes; weights get quantizer nodes.

* Every observer node becomes a :class:`~vmfx.quant.FakeQuantize` node in its place (same node,
  same module path): static parameters from the observer's ``calculate_qparams()``, role
  ``quantizer``. An observer with a ``build_quantizer(qparams)`` method builds its own quantizer
  module (a ``FakeQuantize`` subclass: OuroMamba's mixed-precision quantizer).
* Every linear whose annotation has a ``weight_spec`` gets a quantizer node on its weight edge
  (after the weight-side smoothing node, if any), its parameters computed from the (smoothed)
  weight by min-max or PTQ4VM's per-channel Lp grid search.
* A linear with a dynamic activation spec gets a dynamic quantizer on its input edge.
* A functional conv or norm whose annotation has a ``weight_spec`` (a "weight" rule selected it)
  gets a min-max quantizer on its weight edge.

The converted graph reads ``source -> [smooth] -> quantize -> F.linear(., quantize([smooth](W)), b)``.

Requires: inserted and calibrated observers (``requires_calibration=False`` for configs whose
activations are all dynamic or float). Invariants: node names of the float graph are kept
(inspection compares graphs by name); the graph computes the simulated-quantized function; no
observer is left behind.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..annotations import annotate, annotation
from ..quant.modules import FakeQuantize, weight_quantizer_minmax
from ..quant.observers import Observer, lp_search_weight
from ..quant.spec import QuantSpec
from .base import Pass, PassContext, PassResult
from .graph_utils import insert_module_on_edge, replace_submodule, unique_submodule_name
from .insert_observers import QUANT_PREFIX, edge_layout
from .linear_edges import linear_edges
from .patterns import is_linear, module_of

__all__ = ["ConvertPass"]


class ConvertPass(Pass):
    """Replace observers with quantizers and quantize weights (see module docstring).

    Args:
        weight_init: "minmax" or "lp" (per-channel grid search of the clipping range).
        p, candidates: the grid search's norm and number of candidates.
        requires_calibration: whether the pipeline must have calibrated observers first.
    """

    ensures_facts = ("quantizers_calibrated",)
    clears_facts = ("observers_inserted", "observers_calibrated", "smoothing_statistics")

    def __init__(self, weight_init: str = "minmax", p: float = 2.4, candidates: int = 100,
                 requires_calibration: bool = True):
        if weight_init not in ("minmax", "lp"):
            raise ValueError(f"weight_init must be 'minmax' or 'lp', got {weight_init!r}")
        self.weight_init, self.p, self.candidates = weight_init, p, candidates
        self.requires_calibration = requires_calibration
        self.requires_facts = ("observers_inserted", "observers_calibrated") if requires_calibration else ("observers_inserted",)

    def weight_quantizer(self, weight: torch.Tensor, spec: QuantSpec) -> FakeQuantize:
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("the weight holds NaN or Inf values; fix the checkpoint before quantizing")
        if self.weight_init == "lp":
            return FakeQuantize(spec, lp_search_weight(weight, spec, self.p, self.candidates), is_weight=True)
        return weight_quantizer_minmax(weight, spec)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if isinstance(module_of(node), Observer):
                self._convert_observer(gm, node)
                modified = True
        for node in list(gm.graph.nodes):
            ann = annotation(node)
            if ann is not None and ann.weight_spec is not None and not is_linear(node) and node.op == "call_function":
                modified |= self._quantize_other_weight(gm, node, ann.weight_spec)
                continue
            if ann is None or not is_linear(node) or node.op != "call_function":
                continue
            edges = linear_edges(node)
            if ann.weight_spec is not None and edges.weight_quant is None:
                self._quantize_weight(gm, node, edges, ann.weight_spec)
                modified = True
            if ann.act_spec is not None and ann.act_spec.dynamic and edges.act_quant is None:
                layout = edge_layout(node.args[0])
                fq = FakeQuantize(ann.act_spec) if layout is None else FakeQuantize(ann.act_spec, layout=layout)
                self._insert_quantizer(gm, node, node.args[0], fq, "input")
                modified = True
        gm.delete_all_unused_submodules()
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        for node in gm.graph.nodes:
            if isinstance(module_of(node), Observer):
                raise self.fail("an observer is left in the converted graph", node)

    def _convert_observer(self, gm: fx.GraphModule, node: fx.Node) -> None:
        obs = module_of(node)
        qparams = obs.calculate_qparams()
        if not (bool(torch.isfinite(qparams.scale).all()) and bool(torch.isfinite(qparams.zero_point).all())):
            raise self.fail(
                "calibration gave non-finite quantization parameters (the model or the data produce NaN/Inf "
                "values here); check the checkpoint and the calibration images", node,
            )
        layout = getattr(obs, "layout", None)
        if hasattr(obs, "build_quantizer"):  # an observer that converts to its own quantizer kind
            fq = obs.build_quantizer(qparams)
        else:
            clusters = {"cluster_ids": getattr(obs, "cluster_ids", None)} if obs.spec.granularity == "cluster" else {}  # k-scaled
            fq = (FakeQuantize(obs.spec, qparams, **clusters) if layout is None
                  else FakeQuantize(obs.spec, qparams, layout=layout, **clusters))
        replace_submodule(gm, node.target, fq)
        # an observer shared by several nodes (a scan operand's, shared per mixer) converts once:
        # every node calling it now calls the quantizer
        for user in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target]:
            ann = annotation(user)
            if ann is None:
                annotate(user, "quantizer")
            else:
                annotate(user, "quantizer", extra=dict(ann.extra))

    def _quantize_weight(self, gm: fx.GraphModule, node: fx.Node, edges, spec: QuantSpec) -> None:
        if edges.weight_attr is None:
            raise self.fail("the linear's weight does not come from a parameter (get_attr); cannot quantize it", node)
        weight = edges.linear_module(gm).weight.detach()
        smooth = edges.smooth_module()
        if smooth is not None:
            weight = smooth(weight, weight=True)
        source = edges.weight_smooth or edges.weight_attr
        self._insert_quantizer(gm, node, source, self.weight_quantizer(weight, spec), "weight")

    def _quantize_other_weight(self, gm: fx.GraphModule, node: fx.Node, spec: QuantSpec) -> bool:
        """A min-max quantizer on the weight edge of a functional conv or norm (the ``get_attr``
        argument ending in ``.weight``); False when it has one already."""
        weight = next((a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"
                       and a.target.endswith(".weight")), None)
        if weight is None:
            raise self.fail("a weight rule selects this node, but its weight is no parameter edge (get_attr)", node)
        if any(annotation(u) is not None and annotation(u).extra.get("edge") == "weight" for u in node.args
               if isinstance(u, fx.Node)):
            return False
        value = gm.get_parameter(weight.target).detach()
        self._insert_quantizer(gm, node, weight, weight_quantizer_minmax(value, spec), "weight")
        return True

    def _insert_quantizer(self, gm, node: fx.Node, source: fx.Node, fq: FakeQuantize, edge: str) -> fx.Node:
        ann = annotation(node)
        path = unique_submodule_name(gm, QUANT_PREFIX, f"{node.name}__{edge}")
        q = insert_module_on_edge(gm, node, source, fq, path)
        annotate(q, "quantizer", block=ann.block, direction=ann.direction, tokens=ann.tokens, mixer=ann.mixer,
                 act_spec=fq.spec if edge == "input" else None, weight_spec=fq.spec if edge == "weight" else None,
                 extra={"quantizes": node.name, "edge": edge})
        if edge == "input" and edge_layout(source) is not None:
            annotation(q).layout = edge_layout(source)
        return q
