"""What detection matches: the nodes of one scan direction and of one mixer, and the binding of a
scan call's arguments by name. Detection (:mod:`vmfx.passes.detect`), the structural matcher
(:mod:`vmfx.passes.structural`) and token layouts (:mod:`vmfx.passes.propagate_layouts`) share them."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch.fx as fx

from ..token_layout import TokenLayout
from ..ops.selective_scan import selective_scan

__all__ = ["ScanMatch", "MixerMatch", "bind_scan"]

_SCAN_SIGNATURE = inspect.signature(selective_scan)


def bind_scan(node: fx.Node) -> dict:
    """The arguments of a :func:`~vmfx.ops.selective_scan` call node by name (``u``, ``delta``,
    ``A``, ...), defaults filled in. Raises ``TypeError`` if they do not bind."""
    bound = _SCAN_SIGNATURE.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


@dataclass
class ScanMatch:
    """The nodes of one scan direction."""

    scan: fx.Node
    direction: str
    in_proj: fx.Node
    conv1d: fx.Node
    conv_act: fx.Node
    x_proj: fx.Node
    dt_proj: fx.Node
    dt_act: fx.Node | None
    gate: list[fx.Node]
    out_proj: fx.Node
    merge: list[fx.Node] = field(default_factory=list)
    #: nodes after the merge, shared by all directions: (node, role) with role "norm" or "gate"
    post: list[tuple[fx.Node, str]] = field(default_factory=list)
    #: the layout of the scan's u (and output): ``layout.order`` is this direction's token order
    layout: TokenLayout | None = None


@dataclass
class MixerMatch:
    """One mixer: an ``in_proj``, its scans (one per direction) and the ``out_proj``."""

    block: int
    in_proj: fx.Node
    out_proj: fx.Node
    scans: list[ScanMatch]
    norm: fx.Node | None = None
    tokens: int | None = None
    #: the nodes after the direction merge (out_norm, a post-merge gate), with their roles
    post: list[tuple[fx.Node, str]] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "block": self.block,
            "in_proj": self.in_proj.name,
            "out_proj": self.out_proj.name,
            "norm": self.norm.name if self.norm is not None else None,
            "tokens": self.tokens,
            "directions": {s.direction: s.scan.name for s in self.scans},
        }
