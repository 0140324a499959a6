"""Tracing specialised to the example's sizes: Python control flow on sizes resolves at trace time.

Third-party code often branches on sizes in Python: ``if L == next_power_of_two(L)``, ``if
x.shape[1] % 2``, ``for t in range(L)``, ``int(x.size(-1))``, ``assert x.dim() == 3``. Symbolic
tracing cannot (a size is a graph value, not a Python int), but vmfx specialises every traced
model to its example input's shape anyway (:func:`vmfx.passes.pipeline.check_input_shape` refuses
other shapes). :class:`ConcreteShapeTracer` traces as ``torch.export`` / ``make_fx`` would: every
node is also run on **meta tensors** shaped like the example (no memory, no arithmetic), so when
Python needs a concrete value of a size (``bool``, ``int``, ``range``, ``len``, iteration) the
tracer answers it from those values, and the branch is decided at trace time.

What stays symbolic, and why:

* the graph keeps size queries as nodes wherever Python does not force a value (``x.view(B, L, D)``
  with ``B = x.shape[0]``): the **batch size stays free**, since vmfx calibrates with other batch
  sizes than the example's. Every value is computed for two batch sizes (the example's N and
  N + 1); a value Python needs that differs between them depends on the batch size and is refused;
* a value computed from a tensor's **elements** (``if x.max() > 0``, ``.item()``) or its device is
  refused: only sizes, ranks, element counts and dtypes (and Python arithmetic on them) are
  specialised. The refusal is an fx ``TraceError``, so :func:`vmfx.frontends.trace_with_fallback`
  keeps the failing function or module opaque as for any untraceable code.

Invariants: on the example's shape (any batch size), the graph computes what the model computes;
size-only nodes whose values were consumed by Python (and that nothing else reads) are removed.
"""

from __future__ import annotations

import builtins
import inspect
import operator
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.proxy import Attribute
from torch.fx.proxy import TraceError as FxTraceError

from .leaves import VmfxTracer

__all__ = ["ConcreteShapeTracer", "meta_inputs"]

#: attributes and methods of a tensor that read its metadata, not its elements (not its device)
_SIZE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "itemsize"})
_SIZE_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "is_floating_point",
                           "is_complex", "element_size", "__len__"})
#: tensor factories patched while tracing so that sizes given as traced values are recorded
_FACTORIES = ("zeros", "ones", "empty", "full", "arange", "rand", "randn", "eye", "linspace")
_FACTORY_FUNCTIONS = frozenset(getattr(torch, name) for name in _FACTORIES)


class _Unknown(Exception):
    """The value of a traced node could not be computed on the example (reason in the message)."""


def meta_inputs(example_inputs: Any, extra_batch: int = 0) -> tuple:
    """``example_inputs`` (a tensor or a tuple) as meta tensors of the same shapes and dtypes, the
    batch (first) dimension grown by ``extra_batch``; other values are kept."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)

    def meta(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        shape = list(t.shape)
        if shape:
            shape[0] += extra_batch
        return torch.empty(shape, dtype=t.dtype, device="meta")

    return tuple(meta(t) for t in example_inputs)


def _plain(value: Any) -> bool:
    """A Python value a size computation yields (ints, flags, dtypes, sizes), not a tensor or device."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return False


def _to_meta(value: Any) -> Any:
    return fx.node.map_aggregate(
        value, lambda v: v.detach().to("meta") if isinstance(v, torch.Tensor) and not v.is_meta else v)


def _describe(kind: str, target: Any) -> str:
    name = target if isinstance(target, str) else getattr(target, "__qualname__", getattr(target, "__name__", target))
    return f"{kind} {name}"


def _node_text(node: fx.Node) -> str:
    """``name = op(args)`` of a traced node, for messages."""
    args = ", ".join(a.name if isinstance(a, fx.Node) else repr(a) for a in node.args)
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"'{node.name} = {target}({args})'"


class _ConcreteMagic:
    """Conversions Python applies to a traced value, answered from the example's sizes."""

    def __getattr__(self, k: str) -> "ConcreteAttribute":
        if k in ("tracer", "node", "root", "attr", "_node"):  # not set yet (copying): no attribute proxy
            raise AttributeError(k)
        return ConcreteAttribute(self, k)

    def __len__(self) -> int:
        return self.tracer.length(self, "len()")

    def __int__(self) -> int:
        return int(self.tracer.concrete(self, "int()"))

    def __index__(self) -> int:
        return operator.index(self.tracer.concrete(self, "an index (range(), slicing by a Python int)"))

    def __float__(self) -> float:
        return float(self.tracer.concrete(self, "float()"))


class ConcreteProxy(_ConcreteMagic, fx.Proxy):
    """A proxy whose sizes Python can read as ints (see :class:`ConcreteShapeTracer`)."""


class ConcreteAttribute(_ConcreteMagic, Attribute):
    """An attribute of a :class:`ConcreteProxy` (``x.shape``, ``x.ndim``), equally concrete."""


class ConcreteShapeTracer(VmfxTracer):
    """:class:`~vmfx.frontends.VmfxTracer` that answers size questions from example inputs.

    Args:
        example_inputs: the inputs (tensors, real or meta; a tensor or a tuple) the trace is
            specialised to, bound in order to ``forward``'s positional parameters.
        extra_leaf_modules, extra_leaf_functions: as for :class:`VmfxTracer`.

    Each node's value is computed on meta tensors for the example's batch size and one more
    (leaves that cannot run on meta tensors run on zeros of the same shapes instead, and their
    outputs are kept as meta tensors). ``concrete(proxy)`` returns a node's value when it is a
    plain Python value computed only from sizes and equal for both batch sizes; otherwise it raises
    ``torch.fx.proxy.TraceError``, which makes the trace fail like any untraceable code.
    """

    def __init__(self, example_inputs: Any, extra_leaf_modules: Iterable[type] = (),
                 extra_leaf_functions: Iterable[Callable] = ()):
        super().__init__(extra_leaf_modules, extra_leaf_functions)
        self._examples = (meta_inputs(example_inputs), meta_inputs(example_inputs, extra_batch=1))
        self._inputs: dict[str, tuple[Any, Any]] = {}
        self._values: dict[fx.Node, tuple[Any, Any]] = {}
        self._unknown: dict[fx.Node, str] = {}
        self._static: set[fx.Node] = set()
        self._computing = False
        self._meta_states: dict[int, dict[str, torch.Tensor]] = {}

    # -- tracing ----------------------------------------------------------------------------------

    def trace(self, root: nn.Module, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """Trace ``root`` (a module) specialised to the example's sizes; size-only nodes whose value
        Python consumed and that nothing reads are removed from the returned graph."""
        params = [p for p in list(inspect.signature(root.forward).parameters.values())
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in (concrete_args or {})]
        self._inputs = {p.name: (a, b) for p, a, b in zip(params, *self._examples)}
        originals = {name: getattr(torch, name) for name in _FACTORIES}
        try:
            for name, fn in originals.items():
                setattr(torch, name, self._recording_factory(fn))
            graph = super().trace(root, concrete_args)
        finally:
            for name, fn in originals.items():
                setattr(torch, name, fn)
        self._drop_unused_size_nodes(graph)
        return graph

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ConcreteProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if kind != "output":
            self._record_value(proxy.node, kind, target, args, kwargs)
        return proxy

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if self._computing:  # running a leaf on meta tensors: no graph nodes
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    # -- what Python asks of a traced value --------------------------------------------------------

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.concrete(obj, "a condition (if, while, assert, and/or)"))

    def iter(self, obj: fx.Proxy):
        return iter([obj[i] for i in range(self.length(obj, "iteration"))])

    def concrete(self, obj: fx.Proxy, use: str) -> Any:
        """The value of ``obj`` for Python's ``use`` of it, when the example's sizes fix it.

        Raises:
            torch.fx.proxy.TraceError: the value depends on tensor elements, the device or the
                batch size, or could not be computed on the example.
        """
        node = obj.node
        small, large = self._value(node, use)
        if node not in self._static:
            raise FxTraceError(
                f"Python control flow on a traced value used as {use}: {_node_text(node)} is computed from a "
                "tensor's elements (or its device), not only from sizes, so it cannot be decided at trace time")
        if small != large:
            raise FxTraceError(
                f"Python control flow on the batch size used as {use}: {_node_text(node)} is {small} for the "
                f"example's batch and {large} for one more image; vmfx keeps the batch size free, so keep it a "
                "tensor operation (x.shape[0] passed to view/reshape/zeros) rather than a Python int")
        return small

    def length(self, obj: fx.Proxy, use: str) -> int:
        """``len(obj)``: the first dimension of a tensor, or the length of a size tuple."""
        node = obj.node
        small, large = self._value(node, use)
        if isinstance(small, torch.Tensor) and isinstance(large, torch.Tensor):
            if small.dim() == 0:
                raise FxTraceError(f"{use} of a 0-d tensor ({_node_text(node)})")
            if small.shape[0] != large.shape[0]:
                raise FxTraceError(
                    f"{use} of {_node_text(node)} runs over the batch dimension ({small.shape[0]} for the "
                    "example's batch, another length for another batch); vmfx keeps the batch size free: use "
                    "batched tensor operations instead of a Python loop over the batch")
            return int(small.shape[0])
        value = self.concrete(obj, use)
        if not isinstance(value, (tuple, list)):
            raise FxTraceError(f"{use} of {_node_text(node)}, a {type(value).__name__}")
        return len(value)

    # -- values -----------------------------------------------------------------------------------

    def _value(self, node: fx.Node, use: str) -> tuple[Any, Any]:
        if node in self._unknown:
            raise FxTraceError(
                f"Python needs {_node_text(node)} as {use}, but its value could not be computed on the "
                f"example's shape: {self._unknown[node]}")
        if node not in self._values:
            raise FxTraceError(f"Python needs {_node_text(node)} as {use}, which has no known value")
        return self._values[node]

    def _record_value(self, node: fx.Node, kind: str, target: Any, args: tuple, kwargs: dict) -> None:
        try:
            values = (self._compute(kind, target, args, kwargs, 0), self._compute(kind, target, args, kwargs, 1))
        except _Unknown as exc:
            self._unknown[node] = str(exc)
            return
        except Exception as exc:  # an op that cannot run on meta tensors, or on the example's sizes
            values = self._compute_leaf_on_zeros(kind, target, args, kwargs) if self._is_leaf(kind, target) else None
            if values is None:
                self._unknown[node] = f"{_describe(kind, target)} failed: {type(exc).__name__}: {exc}".splitlines()[0]
                return
        self._values[node] = values
        if not all(_plain(v) for v in values):
            return
        if kind == "call_function" and target is builtins.getattr and len(args) == 2 and args[1] in _SIZE_ATTRIBUTES:
            self._static.add(node)
        elif kind == "call_method" and target in _SIZE_METHODS:
            self._static.add(node)
        elif kind in ("call_function", "call_method") and all(n in self._static for n in node.all_input_nodes):
            self._static.add(node)

    def _is_leaf(self, kind: str, target: Any) -> bool:
        if kind == "call_module":
            return True
        module = getattr(target, "__module__", "") or ""
        return kind == "call_function" and not module.startswith("torch") and module not in ("_operator", "builtins")

    def _arg_values(self, args: Any, which: int) -> Any:
        def value(a: Any) -> Any:
            if isinstance(a, fx.Proxy):
                node = a.node
                if node in self._unknown:
                    raise _Unknown(f"its input {node.name} is unknown ({self._unknown[node]})")
                if node not in self._values:
                    raise _Unknown(f"its input {node.name} has no value")
                return self._values[node][which]
            if isinstance(a, torch.Tensor) and not a.is_meta:
                return a.detach().to("meta")
            return a

        return fx.node.map_aggregate(args, value)

    def _compute(self, kind: str, target: Any, args: tuple, kwargs: dict, which: int) -> Any:
        if kind == "placeholder":
            if target not in self._inputs:
                raise _Unknown(f"input '{target}' has no example value")
            return self._inputs[target][which]
        a, k = self._arg_values(args, which), dict(self._arg_values(kwargs, which))
        self._computing = True
        try:
            if kind == "get_attr":
                return _to_meta(self._attribute(target))
            if kind == "call_function":
                if target in _FACTORY_FUNCTIONS:
                    k["device"] = "meta"
                return _to_meta(target(*a, **k))
            if kind == "call_method":
                return _to_meta(getattr(a[0], target)(*a[1:], **k))
            if kind == "call_module":
                module = self.root.get_submodule(target)
                return _to_meta(torch.func.functional_call(module, self._meta_state(module), tuple(a), k))
            raise _Unknown(f"no value for a {kind} node")
        finally:
            self._computing = False

    def _compute_leaf_on_zeros(self, kind: str, target: Any, args: tuple, kwargs: dict) -> tuple | None:
        """A leaf's outputs for both batch sizes, run on zeros shaped like its inputs (for leaves that
        cannot run on meta tensors), as meta tensors; None if that fails too."""

        def zeros(v: Any) -> Any:
            return torch.zeros(v.shape, dtype=v.dtype) if isinstance(v, torch.Tensor) and v.is_meta else v

        outputs = []
        for which in (0, 1):
            try:
                a = fx.node.map_aggregate(self._arg_values(args, which), zeros)
                k = dict(fx.node.map_aggregate(self._arg_values(kwargs, which), zeros))
            except _Unknown:
                return None
            self._computing = True
            try:
                with torch.no_grad():
                    out = self.root.get_submodule(target)(*a, **k) if kind == "call_module" else target(*a, **k)
            except Exception:
                return None
            finally:
                self._computing = False
            outputs.append(_to_meta(out))
        return tuple(outputs)

    def _attribute(self, target: str) -> Any:
        value: Any = self.root
        for atom in target.split("."):
            value = getattr(value, atom)
        return value

    def _meta_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        key = id(module)
        if key not in self._meta_states:
            state = dict(module.named_parameters(remove_duplicate=False))
            state.update(module.named_buffers(remove_duplicate=False))
            self._meta_states[key] = {n: t.detach().to("meta") for n, t in state.items()}
        return self._meta_states[key]

    def _recording_factory(self, fn: Callable) -> Callable:
        """``torch.<factory>`` that records a node when a size argument is a traced value (e.g.
        ``torch.zeros(B, D, N)`` with ``B = x.shape[0]``), so that the batch size stays free."""

        def factory(*args, **kwargs):
            found = []
            fx.node.map_aggregate((args, kwargs), lambda a: found.append(a) if isinstance(a, fx.Proxy) else None)
            if found and not self._computing:
                return self.create_proxy("call_function", fn, args, kwargs)
            return fn(*args, **kwargs)

        factory.__name__ = fn.__name__
        return factory

    def _drop_unused_size_nodes(self, graph: fx.Graph) -> None:
        """Remove size-only nodes (pure Python arithmetic on sizes) nothing reads: what remains of
        control flow decided at trace time."""
        removed = True
        while removed:
            removed = False
            for node in reversed(graph.nodes):
                if node in self._static and not node.users and node.op in ("call_function", "call_method"):
                    graph.erase_node(node)
                    removed = True
