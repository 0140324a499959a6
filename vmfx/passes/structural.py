"""Structural recognition of Mamba mixers around scans vmfx does not know, and of other linears.

Detection (:mod:`vmfx.passes.detect`) anchors a mixer at a ``vmfx.ops.selective_scan`` node. Code
vmfx has never seen has its own scan: a function kept as one opaque leaf call by
:func:`vmfx.frontends.trace_with_fallback` (a Python loop over time steps), or ordinary traced
tensor ops (a cumulative-sum formulation). :func:`match_structural_scans` recognises the mixer
around either from the graph's shape and module types alone, whatever the classes and names::

    in_proj (Linear) -> depthwise conv1d -> SiLU (u) -> x_proj (Linear, reads u)
        -> dt_proj (Linear, reads a slice of x_proj) [-> softplus]
        -> scan (the node where u's and delta's paths meet, see below) [-> * SiLU(z) gate]
        [-> direction merge / concat] -> out_proj (the first Linear after dt_proj)

Anchored at every depthwise conv1d that no canonical scan claimed: ``in_proj`` is the Linear its
input walks back to, ``conv_act`` the SiLU its output walks forward to, ``x_proj`` the one Linear
reading ``conv_act``, ``dt_proj`` the one Linear reading a slice of ``x_proj``, ``out_proj`` the
one Linear at the frontier of everything computed from ``dt_proj`` (without crossing a Linear).
The scan is found by walking back from ``out_proj``'s input: through transparent ops, through a
gate (a multiply whose other operand is SiLU of a slice of ``in_proj``) and through merges (an
op with exactly one operand computed from this ``dt_proj``, the other not computed from ``u``:
add / concat / divide / multiply) to the scan: the first other node (a foreign scan leaf; or, for
a traced scan, its last op, e.g. the ``+ u * D`` skip term). That node must be computed from both ``u`` and ``delta``. The
match is a :class:`~vmfx.passes.matches.ScanMatch`, so grouping, layouts and annotation are the
canonical mixer's; its scan node's annotation carries ``extra["structural"]`` (``"leaf"`` with
``extra["callable"]``, or ``"inline"``). Lowering leaves such scans to PyTorch.

:func:`annotate_generic_linears` gives every other linear a role: ``"head"`` when no linear
follows it (the classifier), else ``"linear"`` (attention, MLP, extra layers), quantized by
default like the mixer's linears (``QuantConfig.roles``); ``"linear"`` nodes with token-sequence
inputs (rank >= 3, channels last) get the identity token layout when detection found none, so
per-token specs apply to them.

Invariants: the graph is not modified; a depthwise conv that does not fit the pattern is not
matched and is listed, with the reason, in ``gm.meta["vmfx_structural_misses"]``.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from ..annotations import GENERIC_LINEAR_ROLE, LINEAR_ROLES, annotate, annotation
from ..token_layout import LAYOUT_META, TokenLayout, layout_of
from .matches import ScanMatch
from .patterns import (
    FailedMatch,
    is_depthwise_conv1d,
    is_linear,
    is_silu,
    is_softplus,
    is_transparent,
    module_of,
    single_user,
    walk_back,
)

__all__ = ["match_structural_scans", "annotate_structural", "annotate_generic_linears", "structural_scan_input",
           "STRUCTURAL_META"]

#: ``node.meta`` key holding what structural matching learned about a scan node until it is annotated.
STRUCTURAL_META = "vmfx_structural"

_BINARY_MERGES = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.mul}
_CONCAT = {torch.cat, torch.concat}


def _descendants(start: fx.Node) -> set[fx.Node]:
    """Nodes computed from ``start``, not crossing a Linear (the Linears reached are included)."""
    seen, stack = set(), list(start.users)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if not is_linear(node):
            stack.extend(node.users)
    return seen


def _forward_to(node: fx.Node, predicate) -> fx.Node | None:
    """Follow single users through transparent ops to the first node satisfying ``predicate``."""
    user = single_user(node)
    while user is not None and not predicate(user) and is_transparent(user):
        user = single_user(user)
    return user if user is not None and predicate(user) else None


def _linears_reading(node: fx.Node) -> list[fx.Node]:
    graph_linears = [n for n in _descendants(node) if is_linear(n)]
    return [n for n in graph_linears if n.args and walk_back(n.args[0])[0] is node]


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if a.op != "get_attr"]


def _is_gate(node: fx.Node, other: fx.Node, in_proj: fx.Node) -> bool:
    if not (node.op == "call_function" and node.target in (operator.mul, torch.mul)):
        return False
    act, _ = walk_back(other)
    return act is not None and is_silu(act) and walk_back(act.args[0])[0] is in_proj


def _scan_output(out_proj: fx.Node, in_proj: fx.Node, from_dt: set[fx.Node], from_u: set[fx.Node]):
    """Walk back from ``out_proj``'s input to the scan: returns (scan, gate nodes, merge nodes)."""
    gate, merge = [], []
    node, _ = walk_back(out_proj.args[0])
    for _ in range(64):
        if node is None or node not in from_dt:
            return FailedMatch("out_proj's input does not come from dt_proj (found {})", node), [], []
        args = _tensor_args(node)
        if node.op == "call_function" and (node.target in _BINARY_MERGES or node.target in _CONCAT):
            if node.target in _CONCAT:
                args = [a for a in node.args[0] if isinstance(a, fx.Node)]
            inside = [a for a in args if walk_back(a)[0] in from_dt]
            if len(inside) == 1 and len(args) > 1:
                other = [a for a in args if a is not inside[0]][0]
                if other in from_u:  # y + u * D: the skip term belongs to the scan
                    return node, gate, merge
                if _is_gate(node, other, in_proj):
                    gate += [walk_back(other)[0], node]
                else:
                    merge.append(node)
                node, _ = walk_back(inside[0])
                continue
            if len(inside) == 1 and node.target is operator.truediv:  # y / constant
                merge.append(node)
                node, _ = walk_back(inside[0])
                continue
        return node, gate, merge
    return FailedMatch("no scan within 64 nodes before out_proj"), [], []


def _match_at_conv(conv: fx.Node):

    in_proj, flips = walk_back(conv.args[0]) if conv.args else (None, 0)
    if in_proj is None or not is_linear(in_proj):
        return FailedMatch("the conv's input does not come from a Linear (found {})", in_proj)
    conv_act = _forward_to(conv, is_silu)
    if conv_act is None:
        return FailedMatch("the conv's output does not go to a SiLU")
    x_projs = _linears_reading(conv_act)
    if len(x_projs) != 1:
        return FailedMatch("{} Linears read the conv's SiLU (x_proj needs exactly one)", len(x_projs))
    x_proj = x_projs[0]
    dt_projs = _linears_reading(x_proj)
    if len(dt_projs) != 1:
        return FailedMatch("{} Linears read a slice of x_proj (dt_proj needs exactly one)", len(dt_projs))
    dt_proj = dt_projs[0]
    dt_act = _forward_to(dt_proj, is_softplus)
    from_dt = _descendants(dt_proj)
    out_projs = [n for n in from_dt if is_linear(n)]
    if len(out_projs) != 1:
        return FailedMatch("{} Linears follow dt_proj (out_proj needs exactly one)", len(out_projs))
    out_proj = out_projs[0]
    from_u = _descendants(conv_act)
    scan, gate, merge = _scan_output(out_proj, in_proj, from_dt, from_u)
    if isinstance(scan, FailedMatch):
        return scan
    if scan not in from_u:
        return FailedMatch("the scan candidate {} is not computed from the conv's SiLU (u)", scan)
    kind = "leaf" if _is_opaque_call(scan) else "inline"
    facts = {"structural": kind}
    u = _token_input(scan, conv_act)
    if u is not None:
        facts["u"] = u.name
    if kind == "leaf":
        target = scan.target if scan.op == "call_function" else type(module_of(scan))
        facts["callable"] = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}"
    scan.meta[STRUCTURAL_META] = facts
    direction = "backward" if flips % 2 else "forward"
    return ScanMatch(scan, direction, in_proj, conv, conv_act, x_proj, dt_proj, dt_act, gate, out_proj, merge)


def _shape(node: fx.Node):
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return tuple(shape) if shape is not None else None


def _token_input(scan: fx.Node, conv_act: fx.Node) -> fx.Node | None:
    """The value the scan runs over: ``conv_act`` or a view of it (transparent ops only) that the
    scan is computed from and that has the scan output's shape (its tokens in the same places)."""
    want = _shape(scan)
    if want is None:
        return None
    ancestors, stack = set(), [scan]
    while stack:
        node = stack.pop()
        for a in node.all_input_nodes:
            if a not in ancestors:
                ancestors.add(a)
                stack.append(a)
    frontier = [conv_act]
    while frontier:
        node = frontier.pop(0)
        if node in ancestors and _shape(node) == want:
            return node
        frontier.extend(u for u in node.users if is_transparent(u))
    return None


def structural_scan_input(scan: fx.Node) -> fx.Node | None:
    """The node a structurally matched scan runs over (see :func:`_token_input`), or None."""
    name = (scan.meta.get(STRUCTURAL_META) or {}).get("u")
    return next((n for n in scan.graph.nodes if n.name == name), None) if name else None


def _is_opaque_call(node: fx.Node) -> bool:
    """A call of user code fx did not trace into (a leaf function, or a non-torch leaf module)."""
    if node.op == "call_function":
        module = getattr(node.target, "__module__", "") or ""
        return not (module.startswith("torch") or module in ("_operator", "operator", "builtins", "math"))
    if node.op == "call_module":
        return not type(module_of(node)).__module__.startswith("torch.nn")
    return False


def match_structural_scans(gm: fx.GraphModule, known: list) -> list:
    """Scan matches (:class:`~vmfx.passes.matches.ScanMatch`) for the mixers around scans that are
    not vmfx's op, anchored at every depthwise conv1d no match in ``known`` uses."""
    for node in gm.graph.nodes:
        node.meta.pop(STRUCTURAL_META, None)
    claimed = {s.conv1d for s in known}
    found, misses = [], []
    for node in gm.graph.nodes:
        if node in claimed or not is_depthwise_conv1d(node):
            continue
        match = _match_at_conv(node)
        if isinstance(match, FailedMatch):
            misses.append((node.name, str(match)))
        else:
            found.append(match)
    gm.meta["vmfx_structural_misses"] = misses
    return found


def annotate_structural(gm: fx.GraphModule) -> None:
    """After detection annotated the mixers: mark structurally matched scans, then give every
    other linear its role (:func:`annotate_generic_linears`)."""
    for node in gm.graph.nodes:
        facts = node.meta.get(STRUCTURAL_META)
        ann = annotation(node)
        if facts and ann is not None and ann.role == "scan":
            ann.extra.update({k: v for k, v in facts.items() if k != "u"})
    annotate_generic_linears(gm)


def _token_layout(node: fx.Node) -> TokenLayout | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None or len(shape) < 3:
        return None
    tokens = math.prod(int(s) for s in shape[1:-1])
    return TokenLayout(ndim=len(shape), token_dims=tuple(range(1, len(shape) - 1)), channel_dim=len(shape) - 1,
                       tokens=tokens, order=tuple(range(tokens)))


def annotate_generic_linears(gm: fx.GraphModule) -> None:
    """Role ``"head"`` for linears no linear follows, ``"linear"`` for the other linears outside the
    mixers (only those reading a token sequence, rank >= 3, or of unknown shape)."""
    nodes = list(gm.graph.nodes)
    feeds_linear: set[fx.Node] = set()
    for node in reversed(nodes):
        if any(is_linear(u) or u in feeds_linear for u in node.users):
            feeds_linear.add(node)
    for node in nodes:
        if not is_linear(node):
            continue
        ann = annotation(node)
        if ann is not None and ann.role in LINEAR_ROLES:
            continue
        if node not in feeds_linear:
            if ann is None:
                annotate(node, "head")
            continue
        source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        has_shape = source is not None and "tensor_meta" in source.meta
        layout = layout_of(source) if source is not None else None
        if layout is None and has_shape:
            layout = _token_layout(source)
            if layout is None:
                if ann is not None and ann.role == "head":
                    node.meta.pop("vmfx", None)  # not the classifier, not a token sequence: unannotated
                continue
            source.meta[LAYOUT_META] = layout
        annotate(node, GENERIC_LINEAR_ROLE, block=None, direction=None, matched_by="structure",
                 tokens=layout.tokens if layout is not None else None)
