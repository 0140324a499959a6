"""``FoldSmoothingPass``: fold ``1 / s`` into the norm that produces a smoothed linear's input.

A smoothing node on a linear's input edge divides by ``s`` at run time. When its input is the
output of a norm with an affine weight (RMSNorm, LayerNorm) read by nothing else, the division can
move into the norm exactly: ``norm(x) * w / s == norm_{w / s}(x)`` (and ``b / s`` for a LayerNorm
bias). The norm's weight is divided by ``s`` and the input-side smoothing node is removed (a graph
rewrite); the weight side keeps ``W * s``, so the product is unchanged. In Vim this is every
``in_proj`` (after the block's RMSNorm); the other linears read SiLU, slices or the scan, where no
exact fold exists, so they keep their smoothing node (a fused kernel folds it into the quantize
step).

Run it after every pass that learns ``s`` (JLSS); the pass manager refuses the other order.
Invariants: the graph computes the same function up to float rounding; the folded norm node is
annotated ``extra["smoothing_folded_into"]`` (its output is now scaled, so per-layer comparisons
skip it) and the smoothing module records ``folded_into``.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from ..annotations import annotate, annotation
from ..nn.norm import RMSNorm
from ..quant.modules import Smooth
from .base import Pass, PassContext, PassResult
from .graph_utils import remove_passthrough_node
from .linear_edges import served_linear
from .patterns import module_of

__all__ = ["FoldSmoothingPass"]


class FoldSmoothingPass(Pass):
    """Fold input-side smoothing nodes into preceding norms where exact (see module docstring)."""

    requires_facts = ("smoothing_factors",)
    ensures_facts = ("smoothing_folded",)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            smooth = module_of(node)
            ann = annotation(node)
            if not isinstance(smooth, Smooth) or ann is None or ann.extra.get("edge") != "input":
                continue
            source = node.args[0]
            norm = module_of(source) if isinstance(source, fx.Node) else None
            if not isinstance(norm, (RMSNorm, nn.LayerNorm)) or len(source.users) != 1:
                continue
            if getattr(norm, "weight", None) is None:
                continue
            with torch.no_grad():
                s = smooth.value().to(norm.weight.dtype)
                norm.weight.div_(s)
                if getattr(norm, "bias", None) is not None:
                    norm.bias.div_(s)
            smooth.folded_into = source.name
            linear = served_linear(node)
            remove_passthrough_node(gm, node)
            norm_ann = annotation(source)
            extra = dict(norm_ann.extra) if norm_ann is not None else {}
            extra["smoothing_folded_into"] = linear
            annotate(source, norm_ann.role if norm_ann is not None else "norm", extra=extra)
            modified = True
        return PassResult(gm, modified)
