"""``ConvertPass``: turn observers into quantization parameters and linears into ``QuantLinear``.

* An observer whose only user is a linear with a ``weight_spec`` becomes that linear's input
  quantizer: the Linear module is replaced by a :class:`~vmfx.quant.QuantLinear` (or an existing
  one, e.g. made by SmoothQuant, is completed) holding a static :class:`~vmfx.quant.FakeQuantize`
  built from the observer's ``calculate_qparams()`` and a weight quantizer computed from the
  (smoothed) weight itself, by min-max or the Lp grid search, and the observer node is removed.
* A linear with a ``weight_spec`` and a dynamic (or no) activation spec gets a dynamic (or no)
  input quantizer.
* Any other observer becomes a standalone ``FakeQuantize`` node in its place (role ``quantizer``).

Invariants: node names of the float graph are kept (inspection compares graphs by name); the
graph computes the simulated-quantized function; no observer is left behind.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from ..annotations import annotate, annotation
from ..quant.modules import FakeQuantize, QuantLinear, weight_quantizer_minmax
from ..quant.observers import Observer, lp_search_weight
from ..quant.spec import QuantSpec
from .base import Pass, PassContext, PassResult
from .graph_utils import remove_passthrough_node, replace_submodule
from .patterns import is_linear, module_of

__all__ = ["ConvertPass"]


class ConvertPass(Pass):
    """Replace observers and float linears with quantized modules (see module docstring).

    Args:
        weight_init: "minmax" or "lp" (per-channel grid search of the clipping range).
        p, candidates: the grid search's norm and number of candidates.
    """

    def __init__(self, weight_init: str = "minmax", p: float = 2.4, candidates: int = 100):
        if weight_init not in ("minmax", "lp"):
            raise ValueError(f"weight_init must be 'minmax' or 'lp', got {weight_init!r}")
        self.weight_init, self.p, self.candidates = weight_init, p, candidates

    def weight_quantizer(self, weight, spec: QuantSpec) -> FakeQuantize:
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
            if ann is not None and ann.weight_spec is not None and is_linear(node):
                modified |= self._quantize_linear(gm, node, input_quantizer=None)
        gm.delete_all_unused_submodules()
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        for node in gm.graph.nodes:
            if isinstance(module_of(node), Observer):
                raise self.fail("an observer is left in the converted graph", node)

    def _convert_observer(self, gm: fx.GraphModule, node: fx.Node) -> None:
        obs = module_of(node)
        users = list(node.users)
        user = users[0] if len(users) == 1 else None
        user_ann = annotation(user) if user is not None else None
        if user is not None and is_linear(user) and user_ann is not None and user_ann.weight_spec is not None:
            fq = FakeQuantize(obs.spec, obs.calculate_qparams())
            self._quantize_linear(gm, user, input_quantizer=fq)
            remove_passthrough_node(gm, node)
            return
        fq = FakeQuantize(obs.spec, obs.calculate_qparams())
        replace_submodule(gm, node.target, fq)
        ann = annotation(node)
        annotate(node, "quantizer", **({} if ann is None else {"block": ann.block, "direction": ann.direction}))

    def _quantize_linear(self, gm: fx.GraphModule, node: fx.Node, input_quantizer: FakeQuantize | None) -> bool:
        """Make ``node``'s module a complete QuantLinear; returns whether anything changed.

        ``input_quantizer`` (from an observer) replaces any existing one; without it, a dynamic
        activation spec gets a dynamic quantizer if the module has none.
        """
        if node.op != "call_module":
            raise self.fail("only Linear modules can be quantized (a functional F.linear was found)", node)
        ann = annotation(node)
        module = module_of(node)
        if not isinstance(module, QuantLinear):
            if not isinstance(module, nn.Linear):
                raise self.fail(f"expected an nn.Linear, found {type(module).__name__}", node)
            module = QuantLinear.from_linear(module)
            replace_submodule(gm, node.target, module)
            changed = True
        else:
            changed = False
        if input_quantizer is not None:
            module.input_quantizer = input_quantizer
            changed = True
        elif module.input_quantizer is None and ann.act_spec is not None and ann.act_spec.dynamic:
            module.input_quantizer = FakeQuantize(ann.act_spec)
            changed = True
        if module.weight_quantizer is None:
            module.weight_quantizer = self.weight_quantizer(module.smoothed_weight(), ann.weight_spec)
            changed = True
        return changed
