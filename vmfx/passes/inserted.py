"""What passes insert on edges: where the inserted modules live (:data:`QUANT_PREFIX`), the
observers they build for an edge (:func:`make_observer`, :func:`activation_observer`), the token
layout of an edge (:func:`edge_layout`) and the module path a rule's ``module`` pattern sees
(:func:`rule_module_path`). Shared by the passes that insert observers, quantizers and smoothing.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch.fx as fx

from ..annotations import annotation
from ..token_layout import layout_of
from ..quant.observers import LpObserver, MinMaxObserver, Observer
from ..quant.spec import QuantSpec

__all__ = ["QUANT_PREFIX", "activation_observer", "rule_module_path", "edge_layout", "make_observer"]

#: Where the modules inserted on edges (observers, quantizers, smoothing) live in the graph module.
QUANT_PREFIX = "vmfx_q"


def activation_observer(method: str = "minmax", p: float = 2.4, candidates: int = 100) -> Callable[[QuantSpec], Observer]:
    """The observer factory of an initialisation method ("minmax" or "lp" grid search)."""
    if method == "minmax":
        return MinMaxObserver
    if method == "lp":
        return partial(LpObserver, p=p, candidates=candidates)
    raise ValueError(f"unknown initialisation method {method!r}")


def rule_module_path(node: fx.Node) -> str | None:
    """The module path a rule's ``module`` pattern is matched against for ``node``: the module it
    calls (or, for a functional linear, called), else, for a selective-scan node (a function
    call), the path of its mixer (``"layers.0.mixer"``)."""
    if node.op == "call_module":
        return node.target
    path = node.meta.get("vmfx_module")
    ann = annotation(node)
    if path is None and ann is not None and ann.role == "scan":
        return ann.mixer
    return path


def edge_layout(node: fx.Node):
    """The token layout detection recorded for the value ``node`` produces (None if unknown)."""
    return layout_of(node)


def make_observer(factory: Callable[..., Observer], spec: QuantSpec, layout, name: str | None = None) -> Observer:
    """``factory(spec)``, passing the edge's token layout when there is one; ``name`` (what it
    watches) goes into its error messages."""
    observer = factory(spec) if layout is None else factory(spec, layout=layout)
    if name is not None and hasattr(observer, "name"):
        observer.name = name
    return observer
