"""The vmfx tracer: ``torch.fx`` symbolic tracing with the selective scan as one leaf op.

``trace(model, example_inputs)`` turns an (already canonicalized) module into a ``GraphModule``
and, given example inputs, runs shape propagation so every node carries
``meta["tensor_meta"]`` (detection reads token lengths from it).

Leaves: ``torch.nn`` built-in modules (fx's default), :class:`vmfx.nn.RMSNorm`, vmfx's quantized
modules and observers, and whatever users register with :func:`register_leaf_module`. Leaf
functions (recorded as one ``call_function`` node): :func:`vmfx.ops.selective_scan` and those
registered with :func:`register_leaf_function`.

With ``specialize_to`` (example inputs), ``trace`` uses
:class:`~vmfx.frontends.concrete.ConcreteShapeTracer`: Python control flow on sizes (``if L % 2``,
``for t in range(L)``, ``int(x.size(-1))``) is decided for the example's shape, as torch.export does;
vmfx's graphs are specialised to that shape anyway (``check_input_shape``).

Tracing failures become :class:`vmfx.TraceError` naming the module being traced, the source line
that failed and the way out, with the fx exception chained as the cause.
"""

from __future__ import annotations

import inspect
import os
import traceback
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import TraceError
from .concrete import ConcreteShapeTracer
from .leaves import VmfxTracer, leaf_functions, leaf_module_types, register_leaf_function, register_leaf_module

__all__ = [
    "VmfxTracer",
    "trace",
    "register_leaf_module",
    "register_leaf_function",
    "leaf_module_types",
    "leaf_functions",
    "propagate_shapes",
]

_TORCH_DIR = os.path.dirname(torch.__file__)
_FRONTENDS_DIR = os.path.dirname(os.path.abspath(__file__))


def _default_concrete_args(model: nn.Module) -> dict[str, Any]:
    """Bind every non-tensor keyword with a default (flags, ``inference_params=None``) to it, so
    fx does not turn configuration into graph inputs."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    concrete = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is not inspect.Parameter.empty and not isinstance(p.default, torch.Tensor):
            concrete[p.name] = p.default
    return concrete


def _user_source_line(exc: BaseException) -> str:
    """``file:line: code`` of the innermost frame outside torch and vmfx's front end."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        filename = os.path.abspath(frame.filename)
        if filename.startswith(_TORCH_DIR) or os.path.dirname(filename) == _FRONTENDS_DIR:
            continue
        return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return ""


def _trace_error(exc: BaseException, tracer: VmfxTracer, model: nn.Module) -> TraceError:
    stack = tracer.failure_stack or []
    path, type_name = stack[-1] if stack else ("", type(model).__name__)
    where = f"module '{path}' ({type_name})" if path else f"the root module ({type_name})"
    source = _user_source_line(exc)
    lines = [f"vmfx could not trace {where} into a torch.fx graph."]
    if source:
        lines.append(f"  failing line: {source}")
    lines.append(f"  cause: {type(exc).__name__}: {exc}".rstrip())
    lines.append(
        "Way out: if this module is a third-party block vmfx should understand, register an adapter "
        "that turns it into canonical vmfx modules (vmfx.frontends.register_adapter); otherwise keep it "
        f"opaque with vmfx.frontends.register_leaf_module({type_name}) (vmfx will not quantize inside "
        "it), or make its forward traceable (no Python control flow on tensor values; control flow on "
        "sizes is decided at trace time only when example inputs are given)."
    )
    return TraceError("\n".join(lines), module_path=path, module_type=type_name, source=source)


def trace(
    model: nn.Module,
    example_inputs: tuple | torch.Tensor | None = None,
    *,
    concrete_args: dict[str, Any] | None = None,
    extra_leaf_modules: Iterable[type] = (),
    extra_leaf_functions: Iterable[Callable] = (),
    specialize_to: tuple | torch.Tensor | None = None,
) -> fx.GraphModule:
    """Trace ``model`` into a ``GraphModule`` (shape-propagated when example inputs are given).

    The model is traced as it is (call :func:`vmfx.frontends.canonicalize` first for third-party
    modules); its parameters are shared with the returned graph module, not copied.

    Args:
        model: the module to trace; put it in eval mode first for inference graphs.
        example_inputs: a tensor or tuple of tensors to propagate shapes with.
        concrete_args: values for non-tensor forward arguments; by default every non-tensor
            argument with a default value is fixed to it.
        extra_leaf_modules, extra_leaf_functions: leaves for this call only.
        specialize_to: inputs (real or meta tensors) whose sizes the trace is specialised to:
            Python control flow on sizes is decided for them (any batch size stays valid); None
            traces symbolically, where such control flow fails.

    Returns:
        The traced ``GraphModule``; ``node.meta["tensor_meta"]`` is set when ``example_inputs``
        were given, and ``gm.meta["vmfx_specialized"]["input_shapes"]`` the non-batch input shapes
        when ``specialize_to`` was.

    Raises:
        TraceError: the model cannot be traced (names the module, the line and the way out).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"vmfx traces nn.Module instances, got {type(model).__name__}")
    if specialize_to is not None:
        tracer: VmfxTracer = ConcreteShapeTracer(specialize_to, extra_leaf_modules, extra_leaf_functions)
    else:
        tracer = VmfxTracer(extra_leaf_modules, extra_leaf_functions)
    if concrete_args is None:
        concrete_args = _default_concrete_args(model)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args or None)
    except TraceError:
        raise
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, AttributeError...
        raise _trace_error(exc, tracer, model) from exc
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    gm.meta["vmfx_source_type"] = f"{type(model).__module__}.{type(model).__qualname__}"
    if specialize_to is not None:
        inputs = (specialize_to,) if isinstance(specialize_to, torch.Tensor) else tuple(specialize_to)
        shapes = [list(t.shape[1:]) for t in inputs if isinstance(t, torch.Tensor)]
        gm.meta["vmfx_specialized"] = {"input_shapes": shapes}
    if example_inputs is not None:
        propagate_shapes(gm, example_inputs)
    return gm


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple | torch.Tensor) -> fx.GraphModule:
    """Run ``gm`` once on ``example_inputs`` (no grad) and record every node's shape and dtype."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)
    return gm
