"""``OnlineHadamardPass``: an online Hadamard on ``out_proj``'s input edge, its inverse folded into
``out_proj``'s weight.

Why online
----------

``out_proj`` reads the gated scan output ``y * silu(z)`` (merged over both directions in Vim). No
weight sits between the scan and ``out_proj`` that could absorb a rotation offline, so the edge is
rotated at run time: the pass inserts an :class:`~vmfx.quant.online_hadamard.OnlineHadamard` node
(``y -> y H / sqrt(n)``, a fast Walsh-Hadamard transform, ``n`` = ``d_inner``) on the edge and
folds its inverse into the weight, ``W <- W H / sqrt(n)`` (``H H^T = n I``), so
``(y H / sqrt(n)) (W H / sqrt(n))^T = y W^T``: the float model computes the same function up to
rounding. The Hadamard spreads the gate's channel outliers over all ``n`` channels before the
activation quantizer of ``out_proj`` sees them (QuaRot's online rotation; Quamba rotates this same
edge, Quamba's ``QHadamard``).

The pass runs before the observers are inserted, so ``out_proj``'s input quantizer (and
SmoothQuant's statistics, when the method smooths) calibrate on the rotated tensor. The rotation
composes with the offline residual rotation (:class:`~vmfx.passes.rotate.RotateResidualPass`,
which folds ``R^T`` into ``out_proj``'s output side), and runs alone on any model whose mixers have
an ``out_proj`` linear.

Where it refuses (:class:`~vmfx.errors.ConfigError`, naming the node): no ``out_proj`` detected;
an ``out_proj`` that is not an ``nn.Linear`` called at one place; an input width without a fast
Hadamard transform (``2^k m`` with a Hadamard base ``m``: 1, 12, 20, 28, ...).

Annotations: the inserted node has role ``rotation`` and ``extra["rotated"]`` says what it is
(``"online Hadamard 192 = 12 x 2^4 (FWHT), before out_proj: x <- x H / sqrt(192)"``);
``out_proj`` gets that it absorbed ``H^T`` appended to its ``extra["rotated"]``.
``vmfx.inspect.table`` shows both in its spec column. ``gm.meta["vmfx_online_rotation"]`` maps
every ``out_proj`` to its rotation node and width.

Facts: requires ``mixers_detected``, forbids ``observers_inserted``, ``quantizers_calibrated`` (the
weight must still be the float model's) and ``out_proj_input_rotated``; ensures
``out_proj_input_rotated``.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from ..annotations import annotate, annotation
from ..errors import ConfigError
from ..quant.online_hadamard import OnlineHadamard, fast_hadamard_factors, online_hadamard_matrix
from .base import FACTS, Pass, PassContext, PassResult
from .graph_utils import insert_module_on_edge, unique_submodule_name
from .inserted import QUANT_PREFIX
from .patterns import module_of

__all__ = ["OnlineHadamardPass", "ONLINE_ROTATION_META"]

#: ``gm.meta`` key: ``{out_proj node: {"node": rotation node, "dim": n}}``.
ONLINE_ROTATION_META = "vmfx_online_rotation"

FACTS.setdefault("out_proj_input_rotated", "out_proj's input is rotated by an online Hadamard node (OnlineHadamardPass)")


def _refuse(node: fx.Node, why: str) -> ConfigError:
    return ConfigError(f"cannot put an online Hadamard before out_proj '{node.name}': {why}; quantize without it "
                       "(RotationOptions(online_out_proj=False))")


def _out_projs(gm: fx.GraphModule) -> list[fx.Node]:
    """The detected ``out_proj`` nodes, each checked to be a once-called ``nn.Linear`` whose input
    width has a fast Hadamard transform."""
    nodes = [n for n in gm.graph.nodes if (a := annotation(n)) is not None and a.role == "out_proj"]
    if not nodes:
        raise ConfigError("the online Hadamard rotates out_proj's input, but no out_proj linear was detected in this "
                          "model (see vmfx.inspect.table(vmfx.trace(model)) for the roles); quantize without it "
                          "(RotationOptions(online_out_proj=False))")
    for node in nodes:
        linear = module_of(node)
        if node.op != "call_module" or not isinstance(linear, nn.Linear):
            raise _refuse(node, "it is not a call of an nn.Linear (only a linear's weight can absorb H^T)")
        if not node.args or not isinstance(node.args[0], fx.Node) or len(node.args) > 1 or node.kwargs:
            raise _refuse(node, "it does not read one tensor input")
        calls = [m for m in gm.graph.nodes if m.op == "call_module" and m.target == node.target]
        if len(calls) != 1:
            raise _refuse(node, f"its module is called at {len(calls)} places (its weight can absorb H^T once)")
        if fast_hadamard_factors(linear.in_features) is None:
            raise _refuse(node, f"its input width {linear.in_features} has no fast Hadamard transform (2^k m with a "
                                "Hadamard base m: 1, 12, 20, 28, ...)")
    return nodes


class OnlineHadamardPass(Pass):
    """Insert an online Hadamard on every ``out_proj``'s input edge and fold ``H^T`` into its
    weight (see the module docstring).

    Invariants: the float graph computes the same function up to rounding; one ``call_module``
    node is added per ``out_proj`` (logged, so ``vmfx.save`` / ``vmfx.load`` replay it), and only
    the ``out_proj`` weights change; node names of the float graph are kept.
    """

    requires_facts = ("mixers_detected",)
    forbids_facts = ("observers_inserted", "quantizers_calibrated", "out_proj_input_rotated")
    ensures_facts = ("out_proj_input_rotated",)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        record = {}
        for node in _out_projs(gm):
            linear = module_of(node)
            n = linear.in_features
            rotation = OnlineHadamard(n).to(device=linear.weight.device)
            path = unique_submodule_name(gm, QUANT_PREFIX, f"{node.name}__hadamard")
            new = insert_module_on_edge(gm, node, node.args[0], rotation, path)
            h = online_hadamard_matrix(n) / n**0.5
            with torch.no_grad():
                w = linear.weight.detach().to(torch.float64).cpu()
                linear.weight.copy_((w @ h).to(device=linear.weight.device, dtype=linear.weight.dtype))
            what = rotation.describe()
            ann = annotation(node)
            annotate(new, "rotation", block=ann.block, tokens=ann.tokens, mixer=ann.mixer, layout=ann.layout,
                     extra={"rotated": f"{what}, before {node.name}: x <- x H / sqrt({n})", "serves": node.name})
            extra = dict(ann.extra)
            absorbed = f"{what} of {new.name}: W <- W H / sqrt({n}) (absorbs its H^T)"
            extra["rotated"] = f"{extra['rotated']} | {absorbed}" if extra.get("rotated") else absorbed
            ann.extra = extra
            record[node.name] = {"node": new.name, "dim": n}
        gm.meta[ONLINE_ROTATION_META] = record
        return PassResult(gm, True)
