"""``FoldSmoothingPass``: fold ``1 / s`` into the norm that produces a smoothed linear's input.

A smoothed linear divides its input by ``s`` at run time. When that input is the output of a
norm with an affine weight (RMSNorm, LayerNorm) read by nothing else, the division can move into
the norm exactly: ``norm(x) * w / s == norm_{w / s}(x)`` (and ``b / s`` for a LayerNorm bias).
The norm's weight is divided by ``s`` and the linear stops dividing (``smooth_input=False``);
its weight keeps ``W * s``, so the product is unchanged. In Vim this is every ``in_proj`` (after
the block's RMSNorm); the other linears read SiLU, slices or the scan, where no exact fold exists,
so they keep the explicit division (a fused kernel folds it into the quantize step).

Run it after every pass that learns ``s`` (JLSS). Invariants: the graph computes the same function
up to float rounding; the folded norm node is annotated ``extra["smoothing_folded_into"]`` (its
output is now scaled, so per-layer comparisons skip it).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from ..annotations import annotate, annotation
from ..nn.norm import RMSNorm
from ..quant.modules import QuantLinear
from .base import Pass, PassContext, PassResult
from .patterns import module_of

__all__ = ["FoldSmoothingPass"]


class FoldSmoothingPass(Pass):
    """Fold smoothing factors into preceding norms where exact (see module docstring)."""

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modified = False
        for node in gm.graph.nodes:
            linear = module_of(node)
            if not isinstance(linear, QuantLinear) or linear.smooth is None or not linear.smooth_input:
                continue
            source = node.args[0] if node.args else None
            norm = module_of(source) if isinstance(source, fx.Node) else None
            if not isinstance(norm, (RMSNorm, nn.LayerNorm)) or len(source.users) != 1:
                continue
            if getattr(norm, "weight", None) is None:
                continue
            with torch.no_grad():
                s = linear.smoothing().to(norm.weight.dtype)
                norm.weight.div_(s)
                if getattr(norm, "bias", None) is not None:
                    norm.bias.div_(s)
            linear.smooth_input = False
            ann = annotation(source)
            extra = dict(ann.extra) if ann is not None else {}
            extra["smoothing_folded_into"] = node.name
            if ann is not None:
                annotate(source, ann.role, extra=extra)
            else:
                annotate(source, "norm", extra=extra)
            modified = True
        return PassResult(gm, modified)
