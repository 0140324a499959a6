"""Small graph-editing helpers shared by passes (inserting and removing module calls)."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

__all__ = ["unique_submodule_name", "insert_module_before", "remove_passthrough_node", "replace_submodule"]


def unique_submodule_name(gm: fx.GraphModule, prefix: str, stem: str) -> str:
    """A free dotted path ``prefix.stem[_k]`` in ``gm``."""
    name = f"{prefix}.{stem}"
    k = 1
    while _has_submodule(gm, name):
        name = f"{prefix}.{stem}_{k}"
        k += 1
    return name


def _has_submodule(gm: nn.Module, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False


def insert_module_before(gm: fx.GraphModule, user: fx.Node, arg: fx.Node, module: nn.Module, path: str) -> fx.Node:
    """Route the edge ``arg -> user`` through a new ``call_module`` node calling ``module``.

    Only ``user``'s use of ``arg`` is rerouted; other users of ``arg`` are untouched.
    """
    gm.add_submodule(path, module)
    with gm.graph.inserting_before(user):
        new = gm.graph.call_module(path, (arg,))
    user.replace_input_with(arg, new)
    if "tensor_meta" in arg.meta:
        new.meta["tensor_meta"] = arg.meta["tensor_meta"]
    return new


def remove_passthrough_node(gm: fx.GraphModule, node: fx.Node) -> None:
    """Remove a one-input node whose output equals its input (an observer), rewiring users."""
    node.replace_all_uses_with(node.args[0])
    target = node.target if node.op == "call_module" else None
    gm.graph.erase_node(node)
    if target is not None and not any(n.op == "call_module" and n.target == target for n in gm.graph.nodes):
        gm.delete_submodule(target)


def replace_submodule(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` (the nodes calling ``path`` now call it)."""
    parent_path, _, leaf = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    setattr(parent, leaf, module)
