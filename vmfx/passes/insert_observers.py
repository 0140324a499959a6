"""``InsertObserversPass``: put an observer on the input of every linear to be quantized.

For each Linear node whose detected role is in ``roles`` (both scan directions), the edge from
its input producer to it is routed through a new ``call_module`` observer node (module path
``vmfx_observers.<node>``), and the node's annotation records the activation and weight specs
the later passes use.

Requires: mixers detected (:class:`~vmfx.passes.detect.DetectMambaMixersPass` ran and found at
least one). Invariants: observers pass their input through unchanged, so the graph computes the
same function; nothing else is rewired; weights are not touched (they are quantized at convert).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterable

import torch.fx as fx

from ..annotations import LINEAR_ROLES, annotate, annotation
from ..quant.observers import LpObserver, MinMaxObserver, Observer
from ..quant.spec import QuantSpec
from .base import Pass, PassContext, PassResult
from .detect import detected_mixers
from .graph_utils import insert_module_before, unique_submodule_name
from .patterns import is_linear

__all__ = ["InsertObserversPass", "quantized_linear_nodes", "activation_observer"]

OBSERVER_PREFIX = "vmfx_observers"


def quantized_linear_nodes(gm: fx.GraphModule, roles: Iterable[str] = LINEAR_ROLES) -> list[fx.Node]:
    """Linear nodes whose detected role is in ``roles``, in graph order."""
    roles = set(roles)
    return [n for n in gm.graph.nodes if is_linear(n) and (a := annotation(n)) is not None and a.role in roles]


def activation_observer(method: str = "minmax", p: float = 2.4, candidates: int = 100) -> Callable[[QuantSpec], Observer]:
    """The observer factory of an initialisation method ("minmax" or "lp" grid search)."""
    if method == "minmax":
        return MinMaxObserver
    if method == "lp":
        return partial(LpObserver, p=p, candidates=candidates)
    raise ValueError(f"unknown initialisation method {method!r}")


class InsertObserversPass(Pass):
    """Insert activation observers before the linears with the given roles.

    Args:
        activation: spec of the linears' inputs (None: weights only, no observer).
        weight: spec of the linears' weights (recorded for convert; None keeps weights float).
        roles: linear roles to quantize.
        observer: observer factory, called as ``observer(spec)`` (an Observer class, or e.g.
            :func:`activation_observer`'s result).
    """

    def __init__(
        self,
        activation: QuantSpec | None,
        weight: QuantSpec | None,
        roles: Iterable[str] = LINEAR_ROLES,
        observer: Callable[[QuantSpec], Observer] = MinMaxObserver,
    ):
        self.activation = activation
        self.weight = weight
        self.roles = tuple(roles)
        self.observer = observer

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if not detected_mixers(gm):
            failures = gm.meta.get("vmfx_detect_failures") or []
            why = "; ".join(f"{n}: {r}" for n, r in failures) or "no selective_scan node in the graph"
            raise self.fail(
                f"no Mamba mixer was detected ({why}). Run DetectMambaMixersPass first; if the model "
                "uses a third-party mixer, register an adapter (vmfx.frontends.register_adapter)"
            )

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modified = False
        for node in quantized_linear_nodes(gm, self.roles):
            ann = annotate(node, annotation(node).role, act_spec=self.activation, weight_spec=self.weight)
            if self.activation is None or self.activation.dynamic:
                continue
            source = node.args[0]
            path = unique_submodule_name(gm, OBSERVER_PREFIX, node.name)
            obs = insert_module_before(gm, node, source, self.observer(self.activation), path)
            annotate(obs, "observer", block=ann.block, direction=ann.direction, tokens=ann.tokens,
                     mixer=ann.mixer, act_spec=self.activation, extra={"observes": node.name})
            modified = True
        return PassResult(gm, modified)
