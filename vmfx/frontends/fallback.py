"""Tracing code vmfx has never seen: retry with sizes specialised, or the smallest untraceable callable as a leaf.

:func:`trace_with_fallback` is :func:`vmfx.frontends.trace` that does not give up on the model
when one module cannot be traced. It first traces symbolically (the graphs of the models vmfx
knows). On a :class:`~vmfx.errors.TraceError` it reads the failure's traceback from the innermost
frame outwards (skipping torch's and vmfx's own frames) and:

1. if the failing line is inside a **module-level function** called from the failing module (by a
   global name of its ``forward``'s module, or through an instance attribute, ``self.scan(...)``)
   (a hand-written scan with a Python loop over time steps, a chunked parallel scan with a check
   on a shape, a third-party helper such as ``einops.rearrange``), it retraces with that function
   as a leaf (one ``call_function`` node, :func:`~vmfx.frontends.register_leaf_function`'s
   mechanism, for this trace only). Everything around it is traced, so detection can still
   recognise the mixer structurally (:mod:`vmfx.passes.structural`) and the linears around the
   leaf are quantized. A function stays one node: a loop over the tokens is not unrolled;
2. else, once, when example inputs are known (``specialize_to``), it retraces with sizes
   **specialised** to them (:mod:`vmfx.frontends.concrete`): control flow on sizes in a module's
   own code (``if x.shape[1] % 2``, ``int(x.size(-1))``, ``for t in range(L)``) is decided at
   trace time, as vmfx specialises every traced model to its example's shape anyway. Nothing
   becomes opaque; ``gm.meta["vmfx_specialized"]`` says why it was needed;
3. otherwise (the module's own ``forward`` branches on a tensor's values, the function is not
   reachable by a global name, or making it a leaf did not help), it retraces with the failing
   module's **class** as a leaf module: that module stays in float, the rest of the model is
   traced and quantized.

Each retry of kind 1 or 3 is recorded in ``gm.meta["vmfx_fallback"]`` (kind ``"leaf_function"`` or
``"float_module"``, the callable or module, the failing line and the cause) and announced by one
:class:`FallbackWarning`; :func:`vmfx.inspect.coverage` lists the layers each one left in float.
A failure in the root module's own forward, outside any module-level function, that
specialising sizes does not resolve cannot be isolated and is raised as the original ``TraceError``.

Invariant: the returned graph computes the same function as the model on inputs of the traced
shape (leaves run the original code), and what is opaque is exactly what
``gm.meta["vmfx_fallback"]`` lists.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from ..errors import TraceError
from .tracer import trace

__all__ = ["trace_with_fallback", "FallbackWarning", "untraceable_callable", "FALLBACK_META"]

#: ``gm.meta`` key of the list of fallback decisions.
FALLBACK_META = "vmfx_fallback"

_TORCH_DIR = os.path.dirname(torch.__file__)
_VMFX_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MAX_RETRIES = 16


class FallbackWarning(UserWarning):
    """vmfx traced a model only by keeping some callables or modules opaque."""


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', repr(obj)))}"


def _frames(exc: BaseException) -> list:
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def untraceable_callable(exc: BaseException, failing_module: nn.Module | None) -> Callable | None:
    """The innermost function on ``exc``'s traceback that the failing module's code calls by a
    global name of its forward's module (so tracing can keep it as a leaf), or None when the
    failure is in the module's own methods. Frames of torch and vmfx are skipped."""
    forward = getattr(type(failing_module), "forward", None) if failing_module is not None else None
    reachable = getattr(forward, "__globals__", {})  # fx can only swap functions called by these names
    for frame in reversed(_frames(exc)):
        filename = os.path.abspath(frame.f_code.co_filename)
        if filename.startswith(_TORCH_DIR) or filename.startswith(_VMFX_DIR):
            continue
        if failing_module is not None and frame.f_locals.get("self") is failing_module:
            return None  # reached the module's own method without meeting a global function
        code = frame.f_code
        fn = frame.f_globals.get(code.co_name)
        if inspect.isfunction(fn) and fn.__code__ is code and (
            reachable.get(code.co_name) is fn or _attribute_holders(failing_module, fn)
        ):
            return fn
    return None


def _attribute_holders(root: nn.Module | None, fn: Callable) -> list[tuple[nn.Module, str]]:
    """(module, attribute) pairs under ``root`` whose instance attribute is ``fn`` (a function
    stored on the module, e.g. ``self.scan = my_scan``, called as ``self.scan(...)``)."""
    if root is None:
        return []
    return [(m, k) for m in root.modules() for k, v in vars(m).items() if v is fn]


def _leaf_call(fn: Callable) -> Callable:
    """``fn`` that records one ``call_function`` node when called with traced values."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        proxies = []
        fx.node.map_aggregate((args, kwargs), lambda a: proxies.append(a) if isinstance(a, fx.Proxy) else None)
        if proxies:
            return proxies[0].tracer.create_proxy("call_function", fn, args, kwargs)
        return fn(*args, **kwargs)

    return call


@contextlib.contextmanager
def _attributes_as_leaves(model: nn.Module, functions: list[Callable]):
    """Swap the instance attributes holding ``functions`` for leaf calls while tracing."""
    swapped = [(m, k, v) for fn in functions for m, k in _attribute_holders(model, fn) for v in (fn,)]
    try:
        for m, k, v in swapped:
            setattr(m, k, _leaf_call(v))
        yield
    finally:
        for m, k, v in swapped:
            setattr(m, k, v)


def _cause_text(err: TraceError) -> str:
    cause = err.__cause__
    text = f"{type(cause).__name__}: {cause}" if cause is not None else str(err)
    return text.strip().splitlines()[0] if text.strip() else type(cause).__name__


def trace_with_fallback(model: nn.Module, example_inputs=None, *, specialize_to: Any = None,
                        **kwargs) -> fx.GraphModule:
    """:func:`vmfx.frontends.trace`, retrying around untraceable code (see the module docstring).

    Args:
        model: the module to trace.
        example_inputs: inputs to propagate shapes with (and, by default, to specialise sizes to).
        specialize_to: inputs whose sizes a retry is specialised to when symbolic tracing fails
            outside a module-level function, or a function of no arguments returning them (called
            at most once, only then); defaults to ``example_inputs``. None with no example inputs:
            no specialisation, such failures keep the module float.
        **kwargs: passed to :func:`~vmfx.frontends.trace` (its ``extra_leaf_*`` are extended, not
            replaced).

    Raises:
        TraceError: the failure is in the root module's own forward, or no retry made progress.
    """
    leaf_functions = list(kwargs.pop("extra_leaf_functions", ()))
    leaf_modules = list(kwargs.pop("extra_leaf_modules", ()))
    if specialize_to is None:
        specialize_to = example_inputs
    sizes = None  # the inputs the trace is specialised to, once a failure called for it
    specialization: dict | None = None
    decisions: list[dict] = []
    for _ in range(_MAX_RETRIES):
        try:
            with _attributes_as_leaves(model, leaf_functions):
                gm = trace(model, example_inputs, extra_leaf_functions=leaf_functions,
                           extra_leaf_modules=leaf_modules, specialize_to=sizes, **kwargs)
        except TraceError as err:
            failing = _failing_module(model, err)
            fn = untraceable_callable(err.__cause__ or err, failing)
            record = {"module": err.module_path or "", "module_type": err.module_type,
                      "source": err.source, "cause": _cause_text(err)}
            if fn is not None and fn not in leaf_functions:
                leaf_functions.append(fn)
                decisions.append({"kind": "leaf_function", "target": _qualname(fn), **record})
                continue
            if sizes is None and specialize_to is not None:
                sizes = specialize_to() if callable(specialize_to) else specialize_to
                specialization = record
                continue
            if failing is None or failing is model or type(failing) in leaf_modules:
                raise
            leaf_modules.append(type(failing))
            decisions.append({"kind": "float_module", "target": _qualname(type(failing)), **record})
            continue
        if specialization is not None:
            gm.meta["vmfx_specialized"].update(specialization)
        gm.meta[FALLBACK_META] = decisions
        if decisions:
            warnings.warn(_summary(decisions), FallbackWarning, stacklevel=3)
        return gm
    raise TraceError(f"vmfx gave up tracing {type(model).__name__} after {_MAX_RETRIES} retries: "
                     + "; ".join(f"{d['kind']} {d['target']}" for d in decisions))


def _failing_module(model: nn.Module, err: TraceError) -> nn.Module | None:
    path = err.module_path or ""
    if not path:
        return model
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _summary(decisions: list[dict]) -> str:
    lines = ["vmfx could not trace parts of the model and worked around them:"]
    for d in decisions:
        where = f"in '{d['module']}' ({d['module_type']})" if d["module"] else ""
        if d["kind"] == "leaf_function":
            lines.append(f"  - {d['target']} {where} is kept as one opaque call (its surroundings are quantized)")
        else:
            lines.append(f"  - every {d['target']} module stays in float (first failure {where})")
        lines.append(f"    failing line: {d['source']}; cause: {d['cause']}")
    lines.append("See vmfx.inspect.coverage(qmodel) for what stays float and why.")
    return "\n".join(lines)
