"""``BiasCorrectionPass``: remove the mean output error weight quantization adds to a linear.

For every linear of the given roles that has a bias and a weight quantizer, the pass runs the
quantized graph over the calibration data, collects the linear's input ``x`` as the quantized
model computes it, and subtracts ``mean(x @ (Q(W) - W)^T)`` (over every dim but the last) from the
bias, so that on calibration data the quantized linear's mean output equals the float weight's.
The official k-scaled code does this for every ``QuantLinear`` with a bias (dt_proj and the head in
Vim; Access-IC-Lab/PTQ_for_ViM@d6fc957 src/quant_layers/QuantLinear.py:98-106), on the first batch
its quantized model runs (its first evaluation batch); vmfx uses the calibration data instead.
Every correction is computed before any is applied (the inputs are those of the uncorrected model).

Requires: calibrated quantizers. Invariants: the graph is not edited; only the biases of the
corrected linears change (in place, on the graph's own copy of the model), and
``gm.meta["vmfx_bias_correction"]`` lists ``{linear node: max |correction|}``.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..annotations import annotation
from ..errors import CalibrationDataError
from .base import Pass, PassContext, PassResult
from .calibrate import input_expectation, iter_calibration_batches
from .linear_edges import linear_edges
from .patterns import is_linear, module_of

__all__ = ["BiasCorrectionPass"]


class _Collector(fx.Interpreter):
    """Runs the quantized graph and sums ``x @ (Q(W) - W)^T`` over the rows of each target linear."""

    def __init__(self, gm: fx.GraphModule, targets: dict):
        super().__init__(gm)
        self.targets = targets  # node -> [weight error (out, in), running sum (out,) float64, rows]

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        record = self.targets.get(n)
        if record is not None:
            args, _ = self.fetch_args_kwargs_from_env(n)
            x = args[0].detach().double()
            err = F.linear(x, record[0])
            record[1] += err.reshape(-1, err.shape[-1]).sum(0)
            record[2] += err.numel() // err.shape[-1]
        return result


class BiasCorrectionPass(Pass):
    """Correct the biases of the quantized linears of ``roles`` (see module docstring).

    Args:
        roles: the linear roles to correct (the official k-scaled code: those with a bias,
            ``("dt_proj", "head")`` in Vim).
    """

    needs_data = True
    requires_facts = ("quantizers_calibrated",)

    def __init__(self, roles: tuple[str, ...]):
        self.roles = tuple(roles)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if ctx.calib_data is None:
            raise CalibrationDataError("bias correction needs calibration data (calib_data)")
        targets = {}
        for node in gm.graph.nodes:
            ann = annotation(node)
            if ann is None or ann.role not in self.roles or not is_linear(node) or node.op != "call_function":
                continue
            edges = linear_edges(node)
            linear = edges.linear_module(gm) if edges.module is not None else None
            if linear is None or linear.bias is None or edges.weight_quant is None:
                continue
            w = linear.weight.detach()
            wq = module_of(edges.weight_quant)(w)
            targets[node] = [(wq - w).double(), torch.zeros(w.shape[0], dtype=torch.float64), 0]
        if not targets:
            return PassResult(gm, False)
        was_training = gm.training
        gm.eval()
        collector = _Collector(gm, targets)
        with torch.no_grad():
            for x in iter_calibration_batches(ctx.calib_data, ctx.calib_batch_size, input_expectation(gm),
                                              check_scale=False):
                collector.run(x)
        gm.train(was_training)
        report = {}
        with torch.no_grad():
            for node, (_, total, rows) in targets.items():
                bias = linear_edges(node).linear_module(gm).bias
                correction = (total / max(rows, 1)).to(bias.dtype)
                bias.sub_(correction)
                report[node.name] = float(correction.abs().max())
        gm.meta["vmfx_bias_correction"] = report
        return PassResult(gm, True)
