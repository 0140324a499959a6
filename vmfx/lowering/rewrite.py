"""``rewrite``: graph rewrites that run before partitioning, so fewer ops run per forward.

Two rewrites, each a pure function of the graph (they never read an activation):

* :func:`fold_parameter_constants`: every maximal subgraph whose values depend only on the
  module's parameters and buffers (``get_attr`` nodes and Python constants), e.g. a Mamba mixer's
  ``A = -exp(A_log.float())`` and ``D.float()``, is evaluated once, and each of its values that a
  non-constant node reads becomes a buffer of a :class:`FoldedConstants` module, read by one
  ``get_attr`` node. Pure view chains of a parameter (``W.t()``, ``x[..., :n]``) are left alone:
  they cost nothing per forward, and folding them would copy the parameter.
* :func:`sink_flips`: ``transpose(flip(v, l), l, e)`` (a flip along a token dim followed by the
  transpose that moves that dim last, as a Vim block feeds its backward direction's conv and gate)
  becomes ``flip(transpose(v, l, e), e)``, so the flip is the last op before its consumer and a
  kernel that reads its input reversed along L (the conv's ``flip``, the scan's ``flip_z``) can
  absorb it (:mod:`vmfx.lowering.partition`).

Invariants: the rewritten graph computes the same values as before, bit for bit, on every input
(the folded values are the ones the graph computed, from the parameters as they are at lowering
time; the commuted flip moves the same elements); nodes outside the rewritten subgraphs keep
their names.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

__all__ = ["FoldedConstants", "fold_parameter_constants", "sink_flips", "flip_dims", "CONSTANTS_PATH"]

#: Where the folded constants live in a lowered graph (under the lowered partitions' module).
CONSTANTS_PATH = "vmfx_lowered.constants"

#: Ops that only view their input: a chain of these over a parameter is not worth a buffer.
_VIEW_METHODS = {"view", "reshape", "transpose", "permute", "t", "squeeze", "unsqueeze", "flatten",
                 "unflatten", "expand", "narrow", "select", "movedim", "contiguous", "view_as"}
_VIEW_FUNCTIONS = {operator.getitem, torch.transpose, torch.permute, torch.reshape, torch.squeeze,
                   torch.unsqueeze, torch.flatten, torch.narrow, torch.select, torch.movedim, getattr}


class FoldedConstants(nn.Module):
    """The buffers :func:`fold_parameter_constants` computed, one per folded value.

    A cast of the model (``.half()``) casts a folded buffer as it would have cast the value the
    graph computed, with one difference: the values the graph computes in a fixed dtype whatever
    its parameters' dtype (``A_log.float()``: float32 in a half-precision model too) keep that
    dtype. ``pinned`` names them; device moves reach every buffer.
    """

    def __init__(self):
        super().__init__()
        self.pinned: set[str] = set()

    def add(self, name: str, value: torch.Tensor, pinned: bool) -> str:
        self.register_buffer(name, value.detach().clone())  # clone keeps the strides: the same layout as computed
        if pinned:
            self.pinned.add(name)
        return name

    def _apply(self, fn, recurse=True):
        pinned = {name: getattr(self, name).dtype for name in self.pinned}
        super()._apply(fn, recurse)
        for name, dtype in pinned.items():
            t = getattr(self, name)
            if t.dtype != dtype:
                self._buffers[name] = t.to(dtype)
        return self

    def extra_repr(self) -> str:
        return f"{len(self._buffers)} folded constant(s), {len(self.pinned)} in a fixed dtype"


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and node.target in _VIEW_FUNCTIONS


def _is_pure_tensor_op(node: fx.Node) -> bool:
    """call_function / call_method nodes (no modules: a module may hold state or randomness)."""
    if node.op not in ("call_function", "call_method"):
        return False
    target = node.target
    if node.op == "call_function" and getattr(target, "__module__", "").startswith("vmfx"):
        return False  # vmfx's own functions (input checks, scans) are not folded
    return not (node.op == "call_method" and target in ("uniform_", "normal_", "random_", "bernoulli_"))


def _constant_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends only on get_attr nodes and Python constants."""
    constant: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            constant.add(node)
        elif _is_pure_tensor_op(node):
            inputs = node.all_input_nodes
            if inputs and all(n in constant for n in inputs):
                constant.add(node)
    return constant


def _computes(node: fx.Node, constant: set[fx.Node]) -> bool:
    """Whether the value of ``node`` takes more than views of parameters to compute."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen or n.op == "get_attr":
            continue
        seen.add(n)
        if not _is_view(n):
            return True
        stack.extend(i for i in n.all_input_nodes if i in constant)
    return False


def _evaluate(gm: fx.GraphModule, nodes: list[fx.Node], half: bool = False) -> dict[fx.Node, object]:
    """Run the constant nodes in graph order (optionally on float16 copies of floating parameters)."""
    env: dict[fx.Node, object] = {}
    for node in nodes:
        if node.op == "get_attr":
            value = gm
            for atom in str(node.target).split("."):
                value = getattr(value, atom)
            if half and isinstance(value, torch.Tensor) and value.is_floating_point():
                value = value.detach().half()
        else:
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            if node.op == "call_function":
                value = node.target(*args, **kwargs)
            else:
                self_obj, *rest = args
                value = getattr(self_obj, node.target)(*rest, **kwargs)
        env[node] = value
    return env


@torch.no_grad()
def fold_parameter_constants(gm: fx.GraphModule) -> list[str]:
    """Fold parameter-only subgraphs of ``gm`` into buffers (see the module docstring).

    Modifies ``gm`` in place (the caller lowers a copy). Returns the names of the folded values.
    """
    constant = _constant_nodes(gm)
    order = [n for n in gm.graph.nodes if n in constant]
    roots = [n for n in order if n.op != "get_attr" and any(u not in constant for u in n.users) and _computes(n, constant)]
    if not roots:
        return []
    values = _evaluate(gm, order)
    as_half = _evaluate(gm, order, half=True)
    holder = FoldedConstants()
    gm.add_submodule(CONSTANTS_PATH, holder)
    folded = []
    for node in roots:
        value = values[node]
        if not isinstance(value, torch.Tensor):
            continue  # a shape or a Python number: the graph reads it as a constant already
        half_value = as_half[node]
        pinned = isinstance(half_value, torch.Tensor) and value.is_floating_point() and half_value.dtype == value.dtype
        name = holder.add(node.name, value, pinned)
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(f"{CONSTANTS_PATH}.{name}")
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        folded.append(name)
    gm.graph.eliminate_dead_code()
    return folded


def flip_dims(node: fx.Node) -> tuple[int, ...] | None:
    """The dims of a flip node, or None when it is not a flip of one tensor by literal dims."""
    if node.op == "call_method" and node.target == "flip":
        dims = node.args[1:] if len(node.args) > 1 else (node.kwargs.get("dims"),)
    elif node.op == "call_function" and node.target is torch.flip:
        dims = node.args[1:] or (node.kwargs.get("dims"),)
    else:
        return None
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = tuple(dims[0])
    return tuple(dims) if dims and all(isinstance(d, int) for d in dims) else None


def _transpose_dims(node: fx.Node) -> tuple[int, int] | None:
    if node.op == "call_method" and node.target == "transpose" and len(node.args) == 3 and not node.kwargs:
        dims = node.args[1:]
    elif node.op == "call_function" and node.target is torch.transpose and len(node.args) == 3 and not node.kwargs:
        dims = node.args[1:]
    else:
        return None
    return tuple(dims) if all(isinstance(d, int) for d in dims) else None


def sink_flips(gm: fx.GraphModule) -> int:
    """Commute ``transpose(flip(v, d), a, b)`` into ``flip(transpose(v, a, b), d')`` where the flip
    has no other user (see the module docstring). Needs ``tensor_meta`` (the rank) on the flip's
    input; nodes without it are left. Modifies ``gm`` in place; returns how many flips moved."""
    moved = 0
    for node in list(gm.graph.nodes):
        dims = _transpose_dims(node)
        if dims is None:
            continue
        flip = node.args[0]
        if not isinstance(flip, fx.Node) or len(flip.users) != 1:
            continue
        flipped_dims = flip_dims(flip)
        meta = flip.args[0].meta.get("tensor_meta") if isinstance(flip.args[0], fx.Node) else None
        if flipped_dims is None or meta is None:
            continue
        rank = len(meta.shape)
        a, b = (d % rank for d in dims)
        swap = {a: b, b: a}
        new_dims = tuple(swap.get(d % rank, d % rank) for d in flipped_dims)
        with gm.graph.inserting_before(node):
            transposed = gm.graph.call_method("transpose", (flip.args[0], *dims))
            flipped = gm.graph.call_method("flip", (transposed, new_dims))
        transposed.meta.update(node.meta)
        flipped.meta.update(node.meta)
        node.replace_all_uses_with(flipped)
        gm.graph.erase_node(node)
        gm.graph.erase_node(flip)
        moved += 1
    return moved
