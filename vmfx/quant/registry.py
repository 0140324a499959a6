"""The modules a quantized graph may hold on its edges, by kind: how ``vmfx.save`` describes one
and ``vmfx.load`` rebuilds it.

A kind is a module class with ``to_dict()`` (its structure as JSON values; token layouts and
specs may stay objects, the file format encodes them) and a classmethod ``from_dict(d)`` that
builds a module of that structure with placeholder tensors (the file's tensors are loaded into it
afterwards). vmfx registers ``FakeQuantize``, ``MixedPrecisionQuantize``, ``Smooth``,
``ScanStateQuant`` and ``OnlineHadamard``; a plug-in registers its own with :func:`register_module_kind`. A module is
looked up by its exact type, so a subclass is its own kind.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["register_module_kind", "module_kind", "describe_module", "build_module", "module_kinds"]

_KINDS: dict[str, type] = {}


def register_module_kind(cls: type, kind: str | None = None) -> type:
    """Make ``cls`` (an ``nn.Module`` with ``to_dict`` and a classmethod ``from_dict``) savable as
    ``kind`` (default: its class name). Usable as a decorator."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_module_kind takes an nn.Module subclass, got {cls!r}")
    if not callable(getattr(cls, "to_dict", None)) or not callable(getattr(cls, "from_dict", None)):
        raise TypeError(f"{cls.__name__} needs to_dict() and a classmethod from_dict(d) to be saved and loaded")
    _KINDS[kind or cls.__name__] = cls
    return cls


def module_kinds() -> dict[str, type]:
    """The registered kinds."""
    return dict(_KINDS)


def module_kind(module: nn.Module) -> str | None:
    """The kind of ``module`` (its exact type registered), or None."""
    for kind, cls in _KINDS.items():
        if type(module) is cls:
            return kind
    return None


def describe_module(module: nn.Module) -> dict[str, Any] | None:
    """``{"kind": ..., **module.to_dict()}``, or None for a module of no registered kind."""
    kind = module_kind(module)
    return None if kind is None else {"kind": kind, **module.to_dict()}


def build_module(entry: dict[str, Any]) -> nn.Module:
    """The module :func:`describe_module` described (``KeyError`` for an unknown kind)."""
    fields = {k: v for k, v in entry.items() if k != "kind"}
    return _KINDS[entry["kind"]].from_dict(fields)
