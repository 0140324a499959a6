"""Front end: canonicalization adapters for third-party modules, and the tracer."""

from .adapters import adapters, canonicalize, qualified_name, register_adapter
from .tracer import (
    VmfxTracer,
    leaf_functions,
    leaf_module_types,
    propagate_shapes,
    register_leaf_function,
    register_leaf_module,
    trace,
)

__all__ = [
    "adapters",
    "canonicalize",
    "qualified_name",
    "register_adapter",
    "VmfxTracer",
    "trace",
    "propagate_shapes",
    "register_leaf_module",
    "register_leaf_function",
    "leaf_module_types",
    "leaf_functions",
]
