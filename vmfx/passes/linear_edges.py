"""What sits on the edges of a linear in a quantized graph.

After quantization passes, a linear reads (see :mod:`vmfx.quant.modules`)::

    source -> [smooth] -> [observer | quantizer] -> F.linear( . , W_edge, bias)
    W_edge:   get_attr W -> [smooth(weight=True)] -> [quantizer]

:func:`linear_edges` finds those nodes for one linear by following its two input edges back
through the nodes inserted for it (their annotation's ``extra["quantizes"]`` names the linear), so
every pass, the lowering, inspection and serialization read the same structure the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..annotations import annotation
from ..quant.modules import FakeQuantize, Smooth
from ..quant.observers import Observer
from .patterns import is_linear, module_of

__all__ = ["LinearEdges", "linear_edges", "quantized_linears", "served_linear"]


@dataclass
class LinearEdges:
    """The nodes around one linear (None where there is none).

    Attributes:
        linear: the linear node (``F.linear`` once quantization passes touched it).
        module: the path of the ``nn.Linear`` that owns the weight and bias.
        source: the value entering the input edge, before smoothing and quantization.
        act_smooth / act_quant: the smoothing and the observer-or-quantizer node on the input edge.
        weight_attr: the ``get_attr`` node of the weight.
        weight_smooth / weight_quant: the smoothing and quantizer node on the weight edge.
    """

    linear: fx.Node
    module: str | None
    source: fx.Node | None
    act_smooth: fx.Node | None = None
    act_quant: fx.Node | None = None
    weight_attr: fx.Node | None = None
    weight_smooth: fx.Node | None = None
    weight_quant: fx.Node | None = None

    def linear_module(self, gm: fx.GraphModule) -> nn.Linear:
        """The ``nn.Linear`` owning the float weight and bias."""
        return gm.get_submodule(self.module)

    def smooth_module(self) -> Smooth | None:
        node = self.weight_smooth or self.act_smooth
        return module_of(node) if node is not None else None

    def quantizer(self, edge: str):
        """The observer or quantizer module on ``edge`` ("input" or "weight"), or None."""
        node = self.act_quant if edge == "input" else self.weight_quant
        return module_of(node) if node is not None else None

    @property
    def inserted(self) -> list[fx.Node]:
        """The nodes inserted for this linear, in graph order of their edges."""
        return [n for n in (self.act_smooth, self.act_quant, self.weight_smooth, self.weight_quant) if n is not None]


def served_linear(node: fx.Node) -> str | None:
    """The name of the linear an inserted node serves (``extra["quantizes"]``), else None."""
    ann = annotation(node)
    return ann.extra.get("quantizes") if ann is not None else None


def _inserted_for(node, linear: fx.Node, types) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_module" and isinstance(module_of(node), types)
            and served_linear(node) == linear.name)


def linear_edges(linear: fx.Node) -> LinearEdges:
    """The :class:`LinearEdges` of a linear node (``call_module`` or ``F.linear``)."""
    if not is_linear(linear):
        raise ValueError(f"node '{linear.name}' is not a linear")
    if linear.op == "call_module":
        return LinearEdges(linear, linear.target, linear.args[0] if linear.args else None)
    x = linear.args[0]
    edges = LinearEdges(linear, None, x)
    if _inserted_for(x, linear, (Observer, FakeQuantize)):
        edges.act_quant, x = x, x.args[0]
    if _inserted_for(x, linear, Smooth):
        edges.act_smooth, x = x, x.args[0]
    edges.source = x
    w = linear.args[1] if len(linear.args) > 1 else linear.kwargs.get("weight")
    if _inserted_for(w, linear, (Observer, FakeQuantize)):
        edges.weight_quant, w = w, w.args[0]
    if _inserted_for(w, linear, Smooth):
        edges.weight_smooth, w = w, w.args[0]
    if isinstance(w, fx.Node) and w.op == "get_attr" and w.target.endswith(".weight"):
        edges.weight_attr = w
        edges.module = w.target[: -len(".weight")]
    else:
        edges.module = linear.meta.get("vmfx_module")
    return edges


def quantized_linears(gm: fx.GraphModule) -> list[LinearEdges]:
    """The edges of every linear that has a smoothing, observer or quantizer node, in graph order."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is F.linear:
            edges = linear_edges(node)
            if edges.inserted:
                out.append(edges)
    return out
