"""``SplitDeltaSoftplusPass``: give a scan's fused delta softplus a node of its own.

Vim's scan applies the softplus to delta itself (``delta_softplus=True``), so no node holds the
softplus output and an ``output`` rule on role ``dt_act`` selects nothing there. The official
k-scaled code quantizes that output (its ``QuantSoftplus``); this pass makes it an edge: every
annotated scan that applies the softplus itself reads ``F.softplus(delta)`` from a new node
(role ``dt_act``) and applies none (:func:`~vmfx.passes.graph_utils.split_scan_softplus`).

Run between detection and observer insertion (``QuantConfig(split_softplus=True)`` puts it there).
Requires: mixers detected. Invariants: the graph computes the same function (the same softplus,
moved); scans with a ``delta_bias`` or without a fused softplus are left as they are; every edit is
recorded for ``vmfx.save``.
"""

from __future__ import annotations

import torch.fx as fx

from ..annotations import annotation
from .base import Pass, PassContext, PassResult
from .graph_utils import annotate_split_softplus, split_scan_softplus
from .matches import bind_scan

__all__ = ["SplitDeltaSoftplusPass"]


class SplitDeltaSoftplusPass(Pass):
    """Split every annotated scan's fused softplus into a ``dt_act`` node (see module docstring)."""

    requires_facts = ("mixers_detected",)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modified = False
        for scan in list(gm.graph.nodes):
            ann = annotation(scan)
            if ann is None or ann.role != "scan" or scan.op != "call_function":
                continue
            try:
                bound = bind_scan(scan)
            except TypeError:
                continue
            if not bound.get("delta_softplus") or bound.get("delta_bias") is not None:
                continue
            annotate_split_softplus(split_scan_softplus(gm, scan), scan)
            modified = True
        return PassResult(gm, modified)
