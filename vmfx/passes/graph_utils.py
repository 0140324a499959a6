"""Graph-editing helpers shared by passes, and the edit log that lets a saved model be rebuilt.

Every structural edit a quantization pass makes to a traced float graph goes through this module:

* :func:`functionalize_linear`: an ``nn.Linear`` call becomes ``F.linear(x, W, b)`` on ``get_attr``
  nodes, so that its weight is an edge a quantizer (or a smoothing node) can sit on. The node keeps
  its name and annotation.
* :func:`functionalize_weighted`: the same for a conv (``F.conv1d`` / ``conv2d`` / ``conv3d``) or a
  norm (:func:`vmfx.nn.norm.rms_norm`, ``F.layer_norm``) module call.
* :func:`split_scan_softplus`: a selective scan that applies the softplus to delta itself reads
  ``F.softplus(delta)`` from a node of its own instead (``delta_softplus=False``).
* :func:`insert_module_on_edge`: route one edge ``producer -> user`` through a new ``call_module``
  node (an observer, a quantizer, a smoothing node); :func:`insert_module_after` puts one on a
  node's output, for every user.
* :func:`remove_passthrough_node`: remove a node this module inserted, rewiring its users to its
  input.
* :func:`replace_node_with_module`: a one-input elementwise node (a gate's SiLU) becomes a call of a
  new module on the same input (MambaQuant's Smooth-SiLU), keeping its annotation.

Each of them appends a JSON-friendly record to ``gm.meta["vmfx_edits"]`` (:data:`EDITS_META`);
:func:`replay_edits` applies such a log to a fresh trace of the same float model, which is how
``vmfx.load`` rebuilds a quantized graph without pickling code. Node names are deterministic for a
given float graph and edit sequence, and the replay checks that every recorded name comes out the
same.
"""

from __future__ import annotations

from typing import Callable

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..annotations import VMFX_META
from ..token_layout import LAYOUT_META

__all__ = [
    "EDITS_META",
    "unique_submodule_name",
    "insert_module_on_edge",
    "insert_module_after",
    "remove_passthrough_node",
    "replace_submodule",
    "replace_node_with_module",
    "functionalize_linear",
    "functionalize_weighted",
    "split_scan_softplus",
    "annotate_split_softplus",
    "weighted_module_types",
    "replay_edits",
    "attach_scan_state",
]

#: The key of the edit log in ``gm.meta``.
EDITS_META = "vmfx_edits"


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


def _copy_value_meta(source: fx.Node, new: fx.Node) -> None:
    """An inserted node passes ``source``'s value through (same shape, dtype and token layout)."""
    for key in ("tensor_meta", LAYOUT_META):
        if key in source.meta:
            new.meta[key] = source.meta[key]


def _log(gm: fx.GraphModule, record: dict) -> None:
    gm.meta.setdefault(EDITS_META, []).append(record)


def insert_module_on_edge(
    gm: fx.GraphModule, user: fx.Node, arg: fx.Node, module: nn.Module, path: str, kwargs: dict | None = None
) -> fx.Node:
    """Route the edge ``arg -> user`` through a new ``call_module`` node calling ``module``.

    Only ``user``'s use of ``arg`` is rerouted; other users of ``arg`` are untouched. The new node
    copies ``arg``'s ``tensor_meta`` (the inserted modules keep shapes and dtypes).
    """
    gm.add_submodule(path, module)
    with gm.graph.inserting_before(user):
        new = gm.graph.call_module(path, (arg,), dict(kwargs or {}))
    user.replace_input_with(arg, new)
    _copy_value_meta(arg, new)
    _log(gm, {"op": "insert", "node": new.name, "path": path, "input": arg.name, "user": user.name,
              "kwargs": dict(kwargs or {})})
    return new


def insert_module_after(gm: fx.GraphModule, node: fx.Node, module: nn.Module, path: str) -> fx.Node:
    """Put a new ``call_module`` node on ``node``'s output: every user of ``node`` now reads the
    new node's value (a quantizer on the output edge of a conv, a SiLU, the scan, ...)."""
    gm.add_submodule(path, module)
    users = list(node.users)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(path, (node,))
    for user in users:
        user.replace_input_with(node, new)
    _copy_value_meta(node, new)
    _log(gm, {"op": "insert_after", "node": new.name, "path": path, "input": node.name})
    return new


def remove_passthrough_node(gm: fx.GraphModule, node: fx.Node) -> None:
    """Remove a one-input node whose output equals its input (an observer, a folded smoothing
    node), rewiring users; its module is deleted when no other node calls it."""
    name = node.name
    node.replace_all_uses_with(node.args[0])
    target = node.target if node.op == "call_module" else None
    gm.graph.erase_node(node)
    if target is not None and not any(n.op == "call_module" and n.target == target for n in gm.graph.nodes):
        gm.delete_submodule(target)
    _log(gm, {"op": "remove", "node": name})


def replace_node_with_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module, path: str) -> fx.Node:
    """Replace the one-input node ``node`` by a ``call_module`` node calling ``module`` on the same
    input; every user of ``node`` reads the new node, which takes over ``node``'s value metadata
    and annotation (it must compute a value of the same shape, dtype and token layout)."""
    gm.add_submodule(path, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(path, (node.args[0],))
    _copy_value_meta(node, new)
    if VMFX_META in node.meta:
        new.meta[VMFX_META] = node.meta[VMFX_META]
    old = node.name
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    _log(gm, {"op": "replace", "node": new.name, "path": path, "old": old})
    return new


def replace_submodule(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` (the nodes calling ``path`` now call it)."""
    parent_path, _, leaf = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    setattr(parent, leaf, module)


def functionalize_linear(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Turn a ``call_module`` ``nn.Linear`` node into ``F.linear(x, get_attr W, get_attr b)``.

    The node keeps its name, meta and annotation, so passes and inspection see the
    same node (it is changed in place); the module stays as the owner of ``weight`` and ``bias``. A node that is
    already functional is returned as is.
    """
    if node.op == "call_function" and node.target is F.linear:
        return node
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    if not isinstance(module, nn.Linear):
        raise TypeError(f"node '{node.name}' is not an nn.Linear call ({node.op} {node.target})")
    graph = gm.graph
    with graph.inserting_before(node):
        weight = graph.get_attr(f"{node.target}.weight")
        bias = graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
    node.meta["vmfx_module"] = node.target
    # Change the node in place: it keeps its name, users, meta and annotation.
    node.op, node.target = "call_function", F.linear
    node.args, node.kwargs = (node.args[0], weight, bias), {}
    name = node.name
    _log(gm, {"op": "functional_linear", "node": name})
    return node


_CONV_FUNCTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def weighted_module_types() -> tuple[type, ...]:
    """The module types besides ``nn.Linear`` whose weight :func:`functionalize_weighted` makes an
    edge: convs and the norms with a weight."""
    from ..nn.norm import RMSNorm

    return (*_CONV_FUNCTIONS, RMSNorm, nn.LayerNorm)


def functionalize_weighted(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Turn a ``call_module`` conv or norm node into its functional form on ``get_attr`` weights:
    ``F.conv<N>d(x, W, b, stride, padding, dilation, groups)``, ``rms_norm(x, W, eps)``
    (:func:`vmfx.nn.norm.rms_norm`) or ``F.layer_norm(x, shape, W, b, eps)``.

    Computes what the module computes (the same functions on the same parameters). The node keeps
    its name, meta and annotation (changed in place; ``meta["vmfx_module"]`` keeps the module path);
    the module stays as the owner of the parameters. A node already functional is returned as is.

    Raises:
        TypeError: the node calls no such module, a conv pads other than with zeros, or a norm has
            no weight.
    """
    from ..nn.norm import RMSNorm, rms_norm

    if node.op == "call_function" and "vmfx_module" in node.meta:
        return node
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    graph = gm.graph

    def attr(name: str):
        return graph.get_attr(f"{node.target}.{name}") if getattr(module, name, None) is not None else None

    with graph.inserting_before(node):
        if type(module) in _CONV_FUNCTIONS and module.padding_mode == "zeros":
            fn = _CONV_FUNCTIONS[type(module)]
            args = (node.args[0], attr("weight"), attr("bias"), module.stride, module.padding, module.dilation,
                    module.groups)
        elif isinstance(module, RMSNorm):
            fn, args = rms_norm, (node.args[0], attr("weight"), module.eps)
        elif isinstance(module, nn.LayerNorm) and module.weight is not None:
            fn, args = F.layer_norm, (node.args[0], tuple(module.normalized_shape), attr("weight"), attr("bias"),
                                      module.eps)
        else:
            raise TypeError(f"node '{node.name}' ({node.op} {node.target}) is no conv with zero padding or norm "
                            "with a weight: its weight cannot be made an edge")
    node.meta["vmfx_module"] = node.target
    node.op, node.target = "call_function", fn
    node.args, node.kwargs = args, {}
    _log(gm, {"op": "functional_weight", "node": node.name})
    return node


def split_scan_softplus(gm: fx.GraphModule, scan: fx.Node) -> fx.Node:
    """Move a selective scan's fused softplus onto its delta edge: the scan reads
    ``F.softplus(delta)`` (beta 1, threshold 20: the scan's own) and gets ``delta_softplus=False``,
    so it computes the same. Returns the softplus node (it copies delta's shape and token layout).

    Raises:
        ValueError: the scan does not apply the softplus itself, or adds a ``delta_bias`` first.
    """
    from .matches import bind_scan

    bound = bind_scan(scan)
    if not bound.get("delta_softplus"):
        raise ValueError(f"scan '{scan.name}' applies no softplus to delta: nothing to split")
    if bound.get("delta_bias") is not None:
        raise ValueError(f"scan '{scan.name}' adds delta_bias before its softplus; splitting it is not supported")
    delta = bound["delta"]
    with gm.graph.inserting_before(scan):
        new = gm.graph.call_function(F.softplus, (delta,))
    _copy_value_meta(delta, new)
    if "delta" in scan.kwargs:
        scan.update_kwarg("delta", new)
    else:
        scan.update_arg(1, new)
    if "delta_softplus" in scan.kwargs:
        scan.update_kwarg("delta_softplus", False)
    else:
        scan.update_arg(8, False)
    _log(gm, {"op": "split_softplus", "node": new.name, "scan": scan.name})
    return new


def attach_scan_state(gm: fx.GraphModule, scan: fx.Node, module: nn.Module, path: str) -> fx.Node:
    """Give a selective-scan node a quantized-state module: ``module`` goes to ``path`` and the
    scan reads it through its ``state_quant=`` keyword (a ``get_attr`` node inserted before it).
    A scan that already reads one is re-pointed (the old module is deleted when unused)."""
    old = scan.kwargs.get("state_quant")
    gm.add_submodule(path, module)
    with gm.graph.inserting_before(scan):
        ref = gm.graph.get_attr(path)
    scan.update_kwarg("state_quant", ref)
    if isinstance(old, fx.Node) and not old.users:
        gm.graph.erase_node(old)
        if old.target != path and not any(n.op == "get_attr" and n.target == old.target for n in gm.graph.nodes):
            gm.delete_submodule(old.target)
    _log(gm, {"op": "scan_state", "node": ref.name, "path": path, "scan": scan.name})
    return ref


def replay_edits(gm: fx.GraphModule, edits: list[dict], make_module: Callable[[dict], nn.Module]) -> None:
    """Apply an edit log recorded by the functions above to a fresh trace of the same float model.

    Args:
        gm: the freshly traced (and detected) float graph.
        edits: the records of ``gm.meta["vmfx_edits"]`` of the graph that was saved.
        make_module: builds the module to insert from an ``insert`` record (its ``path``).

    Raises:
        ValueError: a record names a node the graph lacks, or an insertion would produce a node
            name other than the recorded one (the float model differs from the saved one).
    """
    for record in edits:
        nodes = {n.name: n for n in gm.graph.nodes}
        op = record.get("op")
        if op == "functional_linear":
            _need(nodes, record["node"])
            functionalize_linear(gm, nodes[record["node"]])
        elif op == "functional_weight":
            _need(nodes, record["node"])
            functionalize_weighted(gm, nodes[record["node"]])
        elif op == "insert":
            _need(nodes, record["input"])
            _need(nodes, record["user"])
            new = insert_module_on_edge(gm, nodes[record["user"]], nodes[record["input"]], make_module(record),
                                        record["path"], record.get("kwargs"))
            if new.name != record["node"]:
                raise ValueError(f"replaying the edits produced node '{new.name}' where the saved graph had "
                                 f"'{record['node']}': the float model differs from the one that was saved")
        elif op == "insert_after":
            _need(nodes, record["input"])
            new = insert_module_after(gm, nodes[record["input"]], make_module(record), record["path"])
            if new.name != record["node"]:
                raise ValueError(f"replaying the edits produced node '{new.name}' where the saved graph had "
                                 f"'{record['node']}': the float model differs from the one that was saved")
        elif op == "split_softplus":
            _need(nodes, record["scan"])
            new = split_scan_softplus(gm, nodes[record["scan"]])
            annotate_split_softplus(new, nodes[record["scan"]])
            if new.name != record["node"]:
                raise ValueError(f"replaying the edits produced node '{new.name}' where the saved graph had "
                                 f"'{record['node']}': the float model differs from the one that was saved")
        elif op == "replace":
            _need(nodes, record["old"])
            new = replace_node_with_module(gm, nodes[record["old"]], make_module(record), record["path"])
            if new.name != record["node"]:
                raise ValueError(f"replaying the edits produced node '{new.name}' where the saved graph had "
                                 f"'{record['node']}': the float model differs from the one that was saved")
        elif op == "remove":
            _need(nodes, record["node"])
            remove_passthrough_node(gm, nodes[record["node"]])
        elif op == "scan_state":
            _need(nodes, record["scan"])
            new = attach_scan_state(gm, nodes[record["scan"]], make_module(record), record["path"])
            if new.name != record["node"]:
                raise ValueError(f"replaying the edits produced node '{new.name}' where the saved graph had "
                                 f"'{record['node']}': the float model differs from the one that was saved")
        else:
            raise ValueError(f"unknown graph edit {op!r}")


def annotate_split_softplus(softplus: fx.Node, scan: fx.Node) -> None:
    """Annotate a softplus :func:`split_scan_softplus` made: role ``dt_act``, in its scan's block,
    direction and mixer, with delta's token layout."""
    from ..annotations import annotate, annotation
    from ..token_layout import layout_of

    ann = annotation(scan)
    if ann is None:
        return
    new = annotate(softplus, "dt_act", block=ann.block, direction=ann.direction, tokens=ann.tokens, mixer=ann.mixer)
    if layout_of(softplus) is not None:
        new.layout = layout_of(softplus)


def _need(nodes: dict, name: str) -> None:
    if name not in nodes:
        raise ValueError(f"the saved graph edits name node '{name}', which the rebuilt float graph lacks")
