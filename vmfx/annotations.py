"""What detection learns about a node, stored in ``node.meta[VMFX_META]``.

Detection (:mod:`vmfx.passes.detect`) annotates; it never rewrites. Later passes read the
annotation to decide what to quantize and how, inspection prints it, and lowering groups nodes by
it. An annotation is a small mutable dataclass so passes can add what they decide (``act_spec``,
``weight_spec``) next to what detection found.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch.fx as fx

__all__ = [
    "VMFX_META",
    "ROLES",
    "LINEAR_ROLES",
    "GENERIC_LINEAR_ROLE",
    "QUANTIZABLE_ROLES",
    "INSERTED_ROLES",
    "NodeAnnotation",
    "annotation",
    "annotate",
    "selector_facts",
    "node_op",
]

#: The key of vmfx's annotation in ``node.meta``.
VMFX_META = "vmfx"

#: Every role detection assigns. Linear roles of the backward scan carry ``direction="backward"``.
ROLES = (
    "patch_embed",
    "norm",
    "in_proj",
    "conv1d",
    "conv_act",
    "x_proj",
    "dt_proj",
    "dt_act",
    "scan",
    "gate",
    "merge",
    "out_proj",
    "head",
    "observer",
    "quantizer",
    "smooth",
    "rotation",
    "kernel",
    # any other linear (attention, MLP, a hybrid model's extra layers): quantized like any linear
    "linear",
)

#: Roles of the nodes quantization passes insert on edges (not part of the float graph); a
#: ``rotation`` is an online Hadamard (:mod:`vmfx.passes.online_hadamard`).
INSERTED_ROLES = ("observer", "quantizer", "smooth", "rotation")

#: Roles of the linear layers inside a Mamba mixer.
LINEAR_ROLES = ("in_proj", "x_proj", "dt_proj", "out_proj")

#: Role of a linear outside every mixer that is not the classifier head (attention and MLP
#: linears of hybrid models, a user's extra layers): quantized by default like the mixer linears.
GENERIC_LINEAR_ROLE = "linear"

#: The roles a :class:`vmfx.config.QuantConfig` quantizes by default (``roles``).
QUANTIZABLE_ROLES = LINEAR_ROLES + (GENERIC_LINEAR_ROLE,)


@dataclass
class NodeAnnotation:
    """vmfx's facts about one node.

    Attributes:
        role: one of :data:`ROLES`.
        block: index of the Mamba block (0-based, in graph order), None outside blocks.
        direction: "forward" or "backward" for per-direction nodes of a mixer ("order<i>" for a
            scan order that is neither the identity nor the reversal), else None; a label derived
            from ``layout.order`` where the layout is known.
        tokens: sequence length the node sees (from shape propagation), when known.
        mixer: qualified name of the mixer module the node belongs to, when known.
        matched_by: "structure", or "name" when only the module name decided the role.
        layout: the :class:`vmfx.token_layout.TokenLayout` of the node's output (token dims, channel
            dim, token order), when detection could infer it; None otherwise.
        act_spec / weight_spec: the specs a quantization pass chose for this node (a linear's
            input and weight edges).
        extra: free-form facts of later passes (kept JSON-friendly). Nodes inserted on an edge
            (observers, quantizers, smoothing) record ``extra["quantizes"]`` (the linear they
            serve) and ``extra["edge"]`` ("input", "weight", "output", or "scan.<operand>" for an
            input of a selective scan, with ``extra["shared"]`` when one module serves several scans).
    """

    role: str
    block: int | None = None
    direction: str | None = None
    tokens: int | None = None
    mixer: str | None = None
    matched_by: str = "structure"
    layout: Any = None
    act_spec: Any = None
    weight_spec: Any = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def annotation(node: fx.Node) -> NodeAnnotation | None:
    """The annotation of ``node``, or None if detection gave it none."""
    return node.meta.get(VMFX_META)


def selector_facts(node: fx.Node) -> tuple:
    """``(role, module path, node name, block, direction)`` of ``node``: what a
    :class:`~vmfx.config.Selector` or a :class:`~vmfx.config.QuantRule` selects by (None where
    the node has no annotation or no module)."""
    ann = annotation(node)
    module = node.target if node.op == "call_module" else node.meta.get("vmfx_module")
    if ann is None:
        return None, module, node.name, None, None
    return ann.role, module, node.name, ann.block, ann.direction


def annotate(node: fx.Node, role: str, **facts) -> NodeAnnotation:
    """Set (or update) the annotation of ``node``; returns it."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    ann = node.meta.get(VMFX_META)
    if ann is None:
        ann = NodeAnnotation(role=role)
        node.meta[VMFX_META] = ann
    ann.role = role
    for key, value in facts.items():
        setattr(ann, key, value)
    return ann


def node_op(node: fx.Node) -> str:
    """The operation a node computes, as a :class:`~vmfx.config.QuantRule` ``op`` selector names it:
    a function's ``__name__`` (``"silu"``, ``"mul"``, ``"softplus"``), a method's name, or a
    module's class name in lower case (``"silu"`` for ``nn.SiLU``, ``"conv1d"``)."""
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        return type(module).__name__.lower()
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)
