"""Front end: canonicalization adapters for third-party modules, the tracer (symbolic, or with
sizes specialised to example inputs: :class:`ConcreteShapeTracer`), and
:func:`enable_mamba_ssm_on_cpu` (upstream mamba_ssm importable without its CUDA extension)."""

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
from .upstream import enable_mamba_ssm_on_cpu
from .mambavision import enable_mambavision_on_cpu
from .fallback import FallbackWarning, trace_with_fallback
from .concrete import ConcreteShapeTracer

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
    "enable_mamba_ssm_on_cpu",
    "enable_mambavision_on_cpu",
    "trace_with_fallback",
    "FallbackWarning",
    "ConcreteShapeTracer",
]
