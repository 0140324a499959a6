"""``DetectMambaMixersPass``: find every Mamba mixer in a traced graph and annotate its nodes.

What it finds, per selective-scan node, by following use-def edges (names never decide a match;
they only label Linear nodes that structure left unexplained inside a matched mixer):

* ``u``      <- ... <- SiLU (``conv_act``) <- depthwise token conv (``conv1d``: a causal conv1d over
  a sequence, or a depthwise Conv2d over a 2D token grid, as in VMamba) <- ... <- ``in_proj``
* ``delta``  <- [softplus (``dt_act``)] <- Linear (``dt_proj``) <- slice <- Linear (``x_proj``),
  whose input is the same SiLU output as ``u``; ``B`` and ``C`` are slices of the same ``x_proj``
* gate (optional): the scan output times SiLU (``gate``) of a slice of the same ``in_proj`` (or
  ``z=`` given to the scan op); ungated mixers (MambaVision concatenates the z branch) match too
* then forward through transparent ops, channel attentions (a value read by several branches that
  meet again in one node, e.g. ``x * gate(pool(x))``), the direction merge (``merge``: add, divide,
  concat), a norm of the merged output (``norm``, VMamba's ``out_norm``) and a gate applied after the
  merge (``gate``: times SiLU of a slice of the same ``in_proj``) to the Linear that reads the result
  (``out_proj``)

Token layouts (:mod:`vmfx.passes.propagate_layouts`): every node from ``in_proj`` to ``out_proj`` gets the
:class:`~vmfx.token_layout.TokenLayout` of its output (``node.meta[LAYOUT_META]``, and
``annotation(node).layout`` for annotated nodes): its token dims, channel dim and the permutation
from the canonical token order to the order it holds. A scan's order is its ``u``'s; its
``direction`` label is derived from it: "forward" (identity), "backward" (reversed), or
``"order<i>"`` (any other permutation, ``i`` its index among the mixer's scans in graph order), so
1, 2, 4 or 8 directions are the same code. Without propagated shapes the label falls back to flip
parity (an odd number of flips between ``in_proj`` and the conv: "backward"). Scans sharing an
``in_proj`` form one mixer; mixers are numbered (``block``) in graph order. The norm feeding
``in_proj`` gets role ``norm``; Conv2d/3d nodes reading the graph input are ``patch_embed``;
unannotated Linears and norms after the last mixer are ``head`` / ``norm``. Token lengths come from
shape propagation (``meta["tensor_meta"]``) when it was run.

Invariants: the graph is not modified (``modified`` is always False); every annotated node gets
a :class:`vmfx.annotations.NodeAnnotation`; ``gm.meta["vmfx_mixers"]`` lists the mixers found
and ``gm.meta["vmfx_detect_failures"]`` the scans that did not match, with the reason;
``gm.meta["vmfx_layout_unknown"]`` lists ``(node name, reason)`` for mixer nodes whose token layout
could not be inferred.
"""

from __future__ import annotations

import operator
import warnings

import torch
import torch.fx as fx

from ..annotations import VMFX_META, annotate, annotation
from ..token_layout import LAYOUT_META, LAYOUT_WHY_META, TokenLayout, layout_of
from .base import Pass, PassContext, PassResult
from .propagate_layouts import propagate_token_layouts
from .matches import MixerMatch, ScanMatch, bind_scan
from .patterns import (
    FailedMatch,
    debug_match,
    is_depthwise_conv,
    is_linear,
    is_norm,
    is_patch_conv,
    is_scan,
    is_silu,
    is_softplus,
    is_transparent,
    single_user,
    walk_back,
)

__all__ = ["DetectMambaMixersPass", "ScanMatch", "MixerMatch", "detected_mixers"]

_MERGE_OPS = {operator.add, operator.sub, operator.mul, operator.truediv}
_CONCAT = {torch.cat, torch.concat}
_ROLE_NAMES = ("in_proj", "x_proj", "dt_proj", "out_proj")


def detected_mixers(gm: fx.GraphModule) -> list[dict]:
    """The mixer summaries recorded by :class:`DetectMambaMixersPass` (empty if it has not run)."""
    return gm.meta.get("vmfx_mixers", [])


class DetectMambaMixersPass(Pass):
    """Annotate roles, block indices, scan directions and token lengths (see module docstring).

    Args:
        strict: raise instead of warning when a scan node does not match the mixer pattern.
    """

    ensures_facts = ("mixers_detected",)

    def __init__(self, strict: bool = False):
        self.strict = strict

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        for node in graph.nodes:
            node.meta.pop(VMFX_META, None)
            node.meta.pop(LAYOUT_META, None)
            node.meta.pop(LAYOUT_WHY_META, None)
        scans: list[ScanMatch] = []
        failures: list[tuple[str, str]] = []
        for node in graph.nodes:
            if not is_scan(node):
                continue
            match = _match_scan(node)
            debug_match(node, match)
            if isinstance(match, FailedMatch):
                failures.append((node.name, str(match)))
            else:
                scans.append(match)
        if failures:
            text = "; ".join(f"{name}: {why}" for name, why in failures)
            if self.strict:
                raise self.fail(f"selective-scan nodes that do not form a Mamba mixer: {text}")
            warnings.warn(f"vmfx detection skipped scan nodes it could not match: {text}", stacklevel=2)

        from .structural import annotate_structural, match_structural_scans  # hook: scans vmfx does not know

        scans.extend(match_structural_scans(gm, scans))
        unknown = _propagate_layouts(gm, scans)
        mixers = _group_into_mixers(graph, scans)
        for mixer in mixers:
            _label_directions(mixer)
            _annotate_mixer(mixer)
        _annotate_names_inside_mixers(gm, mixers)
        _annotate_outside_mixers(graph, mixers)
        annotate_structural(gm)
        for node in graph.nodes:
            ann = annotation(node)
            if ann is not None and node.meta.get(LAYOUT_META) is not None:
                ann.layout = node.meta[LAYOUT_META]
        gm.meta["vmfx_mixers"] = [m.summary() for m in mixers]
        gm.meta["vmfx_detect_failures"] = failures
        gm.meta["vmfx_layout_unknown"] = unknown
        return PassResult(gm, False)


# -- matching one scan ----------------------------------------------------------------------------


def _match_scan(scan: fx.Node):
    try:
        args = bind_scan(scan)
    except TypeError as exc:
        return FailedMatch("cannot bind the scan's arguments: {}", exc)

    conv_act, _ = walk_back(args["u"])
    if conv_act is None or not is_silu(conv_act):
        return FailedMatch("u does not come from a SiLU (found {})", conv_act)
    conv, _ = walk_back(conv_act.args[0])
    if conv is None or not is_depthwise_conv(conv):
        return FailedMatch("the SiLU before u does not read a depthwise conv1d or conv2d (found {})", conv)
    in_proj, x_flips = walk_back(conv.args[0])
    if in_proj is None or not is_linear(in_proj):
        return FailedMatch("the token conv's input does not come from a Linear (found {})", in_proj)

    dt_act = None
    dt_proj, _ = walk_back(args["delta"])
    if dt_proj is not None and is_softplus(dt_proj):
        dt_act = dt_proj
        dt_proj, _ = walk_back(dt_proj.args[0])
    if dt_proj is None or not is_linear(dt_proj):
        return FailedMatch("delta does not come from a Linear (dt_proj) (found {})", dt_proj)
    x_proj, _ = walk_back(dt_proj.args[0])
    if x_proj is None or not is_linear(x_proj):
        return FailedMatch("dt_proj's input does not come from a Linear (x_proj) (found {})", x_proj)
    for name in ("B", "C"):
        producer, _ = walk_back(args[name])
        if producer is not x_proj:
            return FailedMatch("{} does not come from the same x_proj as delta (found {})", name, producer)
    x_proj_input, _ = walk_back(x_proj.args[0])
    if x_proj_input is not conv_act:
        return FailedMatch("x_proj does not read the conv's SiLU output (found {})", x_proj_input)

    gate_nodes, tail = _match_gate(scan, args, in_proj)
    if isinstance(gate_nodes, FailedMatch):
        return gate_nodes
    out_proj, merge, post = _follow_to_out_proj(tail, in_proj)
    if isinstance(out_proj, FailedMatch):
        return out_proj
    direction = "backward" if x_flips % 2 else "forward"
    return ScanMatch(scan, direction, in_proj, conv, conv_act, x_proj, dt_proj, dt_act, gate_nodes, out_proj, merge,
                     post)


def _match_gate(scan: fx.Node, args: dict, in_proj: fx.Node):
    """Returns (gate nodes, node to continue from) or (FailedMatch, None)."""
    if args.get("z") is not None:  # gated inside the scan op
        z_src, _ = walk_back(args["z"])
        if z_src is not in_proj:
            return FailedMatch("the scan's z does not come from the same in_proj (found {})", z_src), None
        return [], scan
    node, user = scan, single_user(scan)
    while user is not None and is_transparent(user):
        node, user = user, single_user(user)
    if user is None or user.op != "call_function" or user.target is not operator.mul:
        return [], scan  # an ungated mixer (e.g. MambaVision concatenates instead)
    other = [a for a in user.args if isinstance(a, fx.Node) and a is not node]
    if len(other) != 1:
        return FailedMatch("the gate multiply has no second tensor operand"), None
    gate_act, _ = walk_back(other[0])
    if gate_act is None or not is_silu(gate_act):
        return [], scan  # multiplied by something else: not a gate; followed as a merge op
    z_src, _ = walk_back(gate_act.args[0])
    if z_src is not in_proj:
        return [], scan
    return [gate_act, user], user


def _post_merge_gate(user: fx.Node, node: fx.Node, in_proj: fx.Node) -> fx.Node | None:
    """The SiLU of a gate multiply ``node * silu(z)`` (z a slice of ``in_proj``), else None."""
    if user.op != "call_function" or user.target is not operator.mul:
        return None
    other = [a for a in user.args if isinstance(a, fx.Node) and a is not node]
    if len(other) != 1:
        return None
    act, _ = walk_back(other[0])
    if act is None or not is_silu(act):
        return None
    z_src, _ = walk_back(act.args[0])
    return act if z_src is in_proj else None


def _follow_to_out_proj(node: fx.Node, in_proj: fx.Node):
    """Follow single users through transparent ops, the direction merge, a norm and a gate to a
    Linear. Returns (out_proj or FailedMatch, merge nodes, [(node, role)] after the merge)."""
    merge, post = [], []
    for _ in range(64):
        user = single_user(node)
        if user is None and len(node.users) > 1:
            user = _reconvergence(node)  # a channel attention: x * gate(pool(x))
            if user is not None:
                node = user
                continue
        if user is None:
            return FailedMatch("{} has {} users before reaching out_proj", node, len(node.users)), [], []
        if is_linear(user):
            return user, merge, post
        if is_transparent(user):
            node = user
            continue
        gate_act = _post_merge_gate(user, node, in_proj)
        if gate_act is not None:
            post += [(gate_act, "gate"), (user, "gate")]
            node = user
            continue
        if is_norm(user):
            post.append((user, "norm"))
            node = user
            continue
        if user.op == "call_function" and (user.target in _MERGE_OPS or user.target in _CONCAT):
            merge.append(user)
            node = user
            continue
        return FailedMatch("the path from the scan to out_proj meets {} ({})", user, user.target), [], []
    return FailedMatch("no out_proj within 64 nodes of the scan"), [], []


def _reconvergence(node: fx.Node, limit: int = 64) -> fx.Node | None:
    """The multiply where all of ``node``'s branches meet again (its nearest post-dominator), if
    they do within ``limit`` nodes without passing a scan or the graph output and the multiply reads
    ``node`` itself (``x * gate(x)``); else None.

    A channel attention (squeeze-excitation, LocalMamba's ``BiAttn``: ``x * sigmoid(fc(gelu(fc(
    mean(norm(x))))))``) reads a direction's output twice and multiplies the two branches back
    together: the path to ``out_proj`` goes through that multiply. Nodes are visited in graph
    (topological) order, so when the only pending user is the next one reached, every branch ends
    in it.
    """
    pending = set(node.users)
    current = node.next
    for _ in range(limit):
        if current.op in ("output", "root"):
            return None
        if current in pending:
            if len(pending) == 1:  # every branch ends here: accept a gate of node by its own branch
                is_mul = current.op == "call_function" and current.target in (operator.mul, torch.mul)
                reads_node = any(walk_back(a, stop=lambda n: n is node)[0] is node
                                 for a in current.args if isinstance(a, fx.Node))
                return current if is_mul and reads_node else None
            if is_scan(current):
                return None
            pending.discard(current)
            pending.update(current.users)
        current = current.next
    return None


# -- token layouts --------------------------------------------------------------------------------


def _propagate_layouts(gm: fx.GraphModule, scans: list[ScanMatch]) -> list[tuple[str, str]]:
    """Layouts of every mixer node; sets each scan's ``layout`` and, where it is known, its
    ``direction`` from it. Returns the (node, reason) pairs of nodes left without a layout."""
    unknown: list[tuple[str, str]] = []
    done = set()
    for s in scans:
        if s.in_proj in done:
            continue
        done.add(s.in_proj)
        for node, layout in propagate_token_layouts(gm, s.in_proj, s.out_proj).items():
            if not isinstance(layout, TokenLayout):
                unknown.append((node.name, layout))
    for s in scans:
        s.layout = layout_of(s.scan)
        if s.layout is not None:
            s.direction = s.layout.direction  # None for a permutation: labelled per mixer
    return unknown


def _label_directions(m: "MixerMatch") -> None:
    """Give every scan of a mixer a distinct direction label: "order<i>" for a permutation,
    ``i`` the scan's index among the mixer's scans in graph order."""
    position = {n: i for i, n in enumerate(m.in_proj.graph.nodes)}
    in_graph_order = sorted(m.scans, key=lambda s: position[s.scan])
    used: set[str] = set()
    for s in m.scans:
        if s.direction is None or s.direction in used:
            s.direction = f"order{in_graph_order.index(s)}"
        used.add(s.direction)


# -- grouping and annotating ----------------------------------------------------------------------


def _group_into_mixers(graph: fx.Graph, scans: list[ScanMatch]) -> list[MixerMatch]:
    order = {n: i for i, n in enumerate(graph.nodes)}
    by_in_proj: dict[fx.Node, list[ScanMatch]] = {}
    for s in scans:
        by_in_proj.setdefault(s.in_proj, []).append(s)
    mixers = []
    for block, in_proj in enumerate(sorted(by_in_proj, key=order.__getitem__)):
        group = sorted(by_in_proj[in_proj], key=lambda s: (s.direction != "forward", s.direction != "backward",
                                                           order[s.scan]))
        out_projs = {s.out_proj for s in group}
        if len(out_projs) != 1:
            raise RuntimeError(
                f"the scans reading {in_proj.name} end in different out_proj nodes "
                f"({', '.join(sorted(n.name for n in out_projs))})"
            )
        norm, _ = walk_back(in_proj.args[0]) if in_proj.args else (None, 0)
        mixers.append(
            MixerMatch(
                block=block,
                in_proj=in_proj,
                out_proj=group[0].out_proj,
                scans=group,
                norm=norm if norm is not None and is_norm(norm) else None,
                tokens=_token_length(in_proj),
                post=_unique_post(group),
            )
        )
    return mixers


def _unique_post(group: list[ScanMatch]) -> list[tuple[fx.Node, str]]:
    seen, out = set(), []
    for s in group:
        for node, role in s.post:
            if node not in seen:
                seen.add(node)
                out.append((node, role))
    return out


def _token_length(in_proj: fx.Node) -> int | None:
    """Tokens per sample: from the token layout (any number of token dims, e.g. an (H, W) grid),
    else the second-to-last dim of the shape."""
    layout = layout_of(in_proj)
    if layout is not None and not layout.merged_batch:
        return int(layout.tokens)
    meta = in_proj.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape") or len(meta.shape) < 2:
        return None
    return int(meta.shape[-2])


def _mixer_path(node: fx.Node) -> str | None:
    if node.op == "call_module" and "." in node.target:
        return node.target.rsplit(".", 1)[0]
    return None


def _annotate_mixer(m: MixerMatch) -> None:
    common = {"block": m.block, "tokens": m.tokens, "mixer": _mixer_path(m.in_proj)}
    annotate(m.in_proj, "in_proj", **common)
    annotate(m.out_proj, "out_proj", **common)
    if m.norm is not None:
        annotate(m.norm, "norm", **common)
    for s in m.scans:
        per_dir = dict(common, direction=s.direction)
        annotate(s.conv1d, "conv1d", **per_dir)
        annotate(s.conv_act, "conv_act", **per_dir)
        annotate(s.x_proj, "x_proj", **per_dir)
        annotate(s.dt_proj, "dt_proj", **per_dir)
        if s.dt_act is not None:
            annotate(s.dt_act, "dt_act", **per_dir)
        annotate(s.scan, "scan", **per_dir)
        for g in s.gate:
            annotate(g, "gate", **per_dir)
        for node in s.merge:
            if annotation(node) is None:
                annotate(node, "merge", **common)
    for node, role in m.post:
        annotate(node, role, **common)


def _annotate_names_inside_mixers(gm: fx.GraphModule, mixers: list[MixerMatch]) -> None:
    """Tie-breaker: an unannotated Linear inside a matched mixer module whose name ends in a
    role name gets that role, marked ``matched_by="name"``."""
    paths = {(_mixer_path(m.in_proj)): m for m in mixers if _mixer_path(m.in_proj)}
    for node in gm.graph.nodes:
        if annotation(node) is not None or not is_linear(node) or node.op != "call_module":
            continue
        mixer = paths.get(_mixer_path(node))
        if mixer is None:
            continue
        leaf = node.target.rsplit(".", 1)[-1]
        for role in _ROLE_NAMES:
            if leaf == role or leaf.startswith(role + "_"):
                direction = "backward" if leaf.endswith("_b") else None
                annotate(node, role, block=mixer.block, tokens=mixer.tokens, mixer=_mixer_path(node),
                         direction=direction, matched_by="name")
                break


def _annotate_outside_mixers(graph: fx.Graph, mixers: list[MixerMatch]) -> None:
    """Patch-embedding convs, and after the last mixer the head (a Linear no other Linear reads,
    directly or not: an MLP after the last mixer is not the head) and norms."""
    nodes = list(graph.nodes)
    last = max((nodes.index(m.out_proj) for m in mixers), default=-1)
    feeds_linear: set[fx.Node] = set()  # nodes whose value reaches a Linear
    for node in reversed(nodes):
        if any(is_linear(u) or u in feeds_linear for u in node.users):
            feeds_linear.add(node)
    for i, node in enumerate(nodes):
        if annotation(node) is not None:
            continue
        if is_patch_conv(node):
            source, _ = walk_back(node.args[0])
            if source is not None and source.op == "placeholder":
                annotate(node, "patch_embed")
        elif i > last >= 0 and is_linear(node) and node not in feeds_linear:
            annotate(node, "head")
        elif i > last >= 0 and is_norm(node):
            annotate(node, "norm")
