"""The tracer's leaves and base tracer: which modules and functions stay one opaque node.

Leaves: ``torch.nn`` built-in modules (fx's default), :class:`vmfx.nn.RMSNorm`, vmfx's quantized
modules and observers, and whatever users register with :func:`register_leaf_module`. Leaf
functions (recorded as one ``call_function`` node): :func:`vmfx.ops.selective_scan` and those
registered with :func:`register_leaf_function`. :class:`VmfxTracer` honours them and remembers
which module it is inside (for error messages); :mod:`vmfx.frontends.tracer` drives it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch.fx as fx
from torch import nn

from ..nn.norm import RMSNorm
from ..ops.selective_scan import selective_scan
from ..quant.modules import FakeQuantize, Smooth
from ..quant.observers import Observer

__all__ = ["VmfxTracer", "register_leaf_module", "register_leaf_function", "leaf_module_types", "leaf_functions"]

_LEAF_MODULE_TYPES: list[type] = [RMSNorm, FakeQuantize, Smooth, Observer]
_LEAF_FUNCTIONS: list[Callable] = [selective_scan]



def register_leaf_module(cls: type) -> type:
    """Keep every module of type ``cls`` as one opaque ``call_module`` node when tracing.

    Use it for a module whose forward cannot be traced (data-dependent control flow, calls into
    a compiled extension). vmfx will not look or quantize inside a leaf. Usable as a decorator.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_leaf_module expects an nn.Module subclass, got {cls!r}")
    if cls not in _LEAF_MODULE_TYPES:
        _LEAF_MODULE_TYPES.append(cls)
    return cls


def register_leaf_function(fn: Callable) -> Callable:
    """Record every call of ``fn`` as one ``call_function`` node instead of tracing into it.

    ``fn`` must be a module-level function that the traced code calls through a global name
    (fx patches it in the globals of the traced functions). Usable as a decorator.
    """
    if not callable(fn):
        raise TypeError(f"register_leaf_function expects a function, got {fn!r}")
    if fn not in _LEAF_FUNCTIONS:
        _LEAF_FUNCTIONS.append(fn)
    return fn


def leaf_module_types() -> tuple[type, ...]:
    return tuple(_LEAF_MODULE_TYPES)


def leaf_functions() -> tuple[Callable, ...]:
    return tuple(_LEAF_FUNCTIONS)


class VmfxTracer(fx.Tracer):
    """``torch.fx.Tracer`` with vmfx's leaves, remembering which module it is inside.

    Args:
        extra_leaf_modules: more module types to keep opaque for this trace only.
        extra_leaf_functions: more leaf functions for this trace only.
    """

    def __init__(self, extra_leaf_modules: Iterable[type] = (), extra_leaf_functions: Iterable[Callable] = ()):
        super().__init__(autowrap_functions=tuple(_LEAF_FUNCTIONS) + tuple(extra_leaf_functions))
        self._leaf_types = tuple(_LEAF_MODULE_TYPES) + tuple(extra_leaf_modules)
        self._module_stack: list[tuple[str, str]] = []
        self.failure_stack: list[tuple[str, str]] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        try:
            path = self.path_of_module(m)
        except NameError:
            path = "<unregistered module>"
        self._module_stack.append((path, type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failure_stack is None:
                self.failure_stack = list(self._module_stack)
            raise
        finally:
            self._module_stack.pop()
