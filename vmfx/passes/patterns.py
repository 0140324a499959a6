"""Structural predicates and walks over fx graphs, shared by detection and later passes.

Matching follows use-def edges, not names. "Transparent" nodes (views, transposes, flips, slices,
token gathers (``index_select``) and padding (``F.pad``), dtype casts, ``getitem`` of a split;
observers, fake-quantizers and modules marked ``vmfx_preserves_layout``) do not change which token
a value belongs to, so walks step over them; flips are counted, because a flip on the token axis is
what makes a scan run backward (other token orders are read from the layouts, not from walks).

A failed match is a :class:`FailedMatch`: falsy, with its reason built lazily. Set
``VMFX_PATTERN_DEBUG=<node name>`` to log why that node did or did not match.
"""

from __future__ import annotations

import logging
import operator
import os
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..nn.norm import RMSNorm, rms_norm
from ..ops.selective_scan import selective_scan
from ..token_layout import PRESERVES_LAYOUT
from ..quant.modules import FakeQuantize, Smooth
from ..quant.observers import Observer

__all__ = [
    "FailedMatch",
    "debug_match",
    "module_of",
    "is_linear",
    "is_depthwise_conv1d",
    "is_depthwise_conv",
    "is_patch_conv",
    "is_silu",
    "is_softplus",
    "is_norm",
    "is_scan",
    "is_transparent",
    "is_flip",
    "walk_back",
    "single_user",
]

log = logging.getLogger("vmfx.patterns")

_TRANSPARENT_METHODS = {
    "transpose", "permute", "view", "reshape", "contiguous", "float", "half", "bfloat16", "double",
    "to", "type_as", "clone", "flip", "squeeze", "unsqueeze", "flatten", "unflatten", "movedim", "chunk", "split",
}
_TRANSPARENT_FUNCTIONS = {
    operator.getitem, torch.transpose, torch.permute, torch.reshape, torch.flip, torch.flatten,
    torch.squeeze, torch.unsqueeze, torch.chunk, torch.split, torch.clone, torch.unflatten, torch.movedim,
}
# Token gathers and token padding (LocalMamba's scan orders: a constant-index ``index_select`` on the
# token dim, after ``F.pad`` appends a zero token for windows that do not divide the grid): they move
# tokens or add positions holding none, never mix them, so walks step over them like over a flip.
_TRANSPARENT_METHODS |= {"index_select"}
_TRANSPARENT_FUNCTIONS |= {torch.index_select, F.pad}

_SILU = {F.silu, torch.nn.functional.silu}
_SOFTPLUS = {F.softplus, torch._C._nn.softplus}
_NORM_FUNCTIONS = ({F.layer_norm, F.rms_norm} if hasattr(F, "rms_norm") else {F.layer_norm}) | {rms_norm}


class FailedMatch:
    """Why a pattern did not match. Falsy; the message is formatted only when read."""

    def __init__(self, fmt: str, *args):
        self.fmt, self.args = fmt, args

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return self.fmt.format(*self.args)

    __repr__ = __str__


def debug_match(node: fx.Node, outcome) -> None:
    """Log the outcome of matching ``node`` when ``VMFX_PATTERN_DEBUG`` names it."""
    if os.environ.get("VMFX_PATTERN_DEBUG") == node.name:
        log.warning("pattern debug for %s: %s", node.name, outcome)


def module_of(node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls, else None."""
    if node.op != "call_module":
        return None
    return node.graph.owning_module.get_submodule(node.target)


def is_linear(node: fx.Node) -> bool:
    m = module_of(node)
    if m is not None:
        return isinstance(m, nn.Linear)
    return node.op == "call_function" and node.target is F.linear


def is_depthwise_conv1d(node: fx.Node) -> bool:
    m = module_of(node)
    if isinstance(m, nn.Conv1d):
        return m.groups == m.in_channels == m.out_channels and m.groups > 1
    if node.op == "call_function" and node.target is F.conv1d:
        groups = node.kwargs.get("groups", node.args[6] if len(node.args) > 6 else 1)
        return isinstance(groups, int) and groups > 1
    return False


def is_depthwise_conv(node: fx.Node) -> bool:
    """A depthwise token convolution: a depthwise conv1d over a sequence (Mamba, Vim) or a
    depthwise ``nn.Conv2d`` over a 2D token grid (VMamba's SS2D)."""
    if is_depthwise_conv1d(node):
        return True
    m = module_of(node)
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels and m.groups > 1


def is_patch_conv(node: fx.Node) -> bool:
    m = module_of(node)
    return isinstance(m, (nn.Conv2d, nn.Conv3d))


def is_silu(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _SILU
    if node.op == "call_method":
        return node.target == "silu"
    return isinstance(module_of(node), nn.SiLU)


def is_softplus(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _SOFTPLUS
    return isinstance(module_of(node), nn.Softplus)


def is_norm(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _NORM_FUNCTIONS
    m = module_of(node)
    norm_types = (RMSNorm, nn.LayerNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
    return isinstance(m, norm_types)


def is_scan(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is selective_scan


def is_flip(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "flip") or (
        node.op == "call_function" and node.target is torch.flip
    )


def is_transparent(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _TRANSPARENT_METHODS
    if node.op == "call_function":
        return node.target in _TRANSPARENT_FUNCTIONS
    m = module_of(node)  # observers, quantizers and modules marked as keeping their input's layout
    return isinstance(m, (Observer, FakeQuantize)) or bool(getattr(m, PRESERVES_LAYOUT, False))


def walk_back(node, stop: Callable[[fx.Node], bool] | None = None) -> tuple[fx.Node | None, int]:
    """Follow the data input of transparent nodes back from ``node``.

    Returns:
        ``(producer, flips)``: the first non-transparent node (or the first one where ``stop``
        holds), and how many flips were crossed on the way.
    """
    flips = 0
    while isinstance(node, fx.Node):
        if stop is not None and stop(node):
            return node, flips
        if not is_transparent(node):
            return node, flips
        flips += int(is_flip(node))
        node = node.args[0] if node.args else None
    return None, flips


def single_user(node: fx.Node) -> fx.Node | None:
    """The only user of ``node``, or None if it has zero or several."""
    users = list(node.users)
    return users[0] if len(users) == 1 else None
