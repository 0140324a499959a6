"""Helpers for testing passes: how many nodes of each kind a graph holds.

    from vmfx.testing import assert_nodes, count_nodes
    assert_nodes(qmodel, {FakeQuantize: 16, Smooth: 8, "out_proj": 2, torch.nn.functional.linear: 10})

A key is a module class (``call_module`` nodes whose module is an instance of it), a function or
method name (``call_function`` nodes with that target, ``call_method`` nodes with that name, given
as a string prefixed ``"method:"``), or a role (a string: nodes whose vmfx annotation has that
role).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch.fx as fx

from .annotations import ROLES, annotation

__all__ = ["count_nodes", "assert_nodes"]


def _matches(gm: fx.GraphModule, node: fx.Node, key: Any) -> bool:
    if isinstance(key, type):
        return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), key)
    if isinstance(key, str) and key.startswith("method:"):
        return node.op == "call_method" and node.target == key[len("method:"):]
    if isinstance(key, str):
        ann = annotation(node)
        return ann is not None and ann.role == key
    return node.op == "call_function" and node.target is key


def _check_key(key: Any) -> None:
    if isinstance(key, str) and not key.startswith("method:") and key not in ROLES:
        raise ValueError(f"{key!r} is neither a role ({', '.join(ROLES)}) nor 'method:<name>'")
    if not isinstance(key, (type, str)) and not callable(key):
        raise ValueError(f"a node kind is a module class, a function, 'method:<name>' or a role, got {key!r}")


def count_nodes(gm: fx.GraphModule, kinds: Mapping[Any, int] | list) -> dict:
    """How many nodes of ``gm`` match each key of ``kinds`` (see the module docstring)."""
    counts = {}
    for key in kinds:
        _check_key(key)
        counts[key] = sum(_matches(gm, node, key) for node in gm.graph.nodes)
    return counts


def _name(key: Any) -> str:
    return key.__name__ if hasattr(key, "__name__") else str(key)


def assert_nodes(gm: fx.GraphModule, expected: Mapping[Any, int]) -> None:
    """Raise ``AssertionError`` listing every kind whose count in ``gm`` differs from ``expected``."""
    got = count_nodes(gm, expected)
    wrong = [f"{_name(k)}: expected {n}, found {got[k]}" for k, n in expected.items() if got[k] != n]
    if wrong:
        raise AssertionError("node counts differ: " + "; ".join(wrong))
