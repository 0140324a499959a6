"""Run a flat fx graph block by block.

Block-wise calibration (JLSS) needs to run "block i" on stored inputs, thousands of times, without
re-running blocks 0..i-1. In a traced graph the blocks are inlined, so a block is a contiguous
range of nodes (graph order is topological), and what flows between ranges is the set of values
defined before a cut and used after it (for Vim: the hidden states and the residual stream).

:class:`SegmentRunner` cuts the graph after given nodes (each mixer's ``out_proj``) and runs one
segment at a time on an *environment*: a dict from node to value holding exactly the values live
across the cut. Gradients flow through a run when autograd is on, so a segment can be trained.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx

__all__ = ["SegmentRunner"]


class SegmentRunner:
    """Runs the segments of ``gm`` cut after each node of ``cuts`` (in graph order).

    Segment ``k`` runs from the node after cut ``k-1`` through cut ``k``; the last segment runs
    to the end of the graph (the output node is not run).

    Args:
        gm: the graph module.
        cuts: nodes after which to cut, e.g. every mixer's ``out_proj``.
    """

    def __init__(self, gm: fx.GraphModule, cuts: Sequence[fx.Node]):
        self.gm = gm
        self.nodes = [n for n in gm.graph.nodes if n.op != "output"]
        index = {n: i for i, n in enumerate(self.nodes)}
        ends = sorted(index[c] for c in cuts)
        bounds, start = [], 0
        for end in ends:
            bounds.append((start, end + 1))
            start = end + 1
        bounds.append((start, len(self.nodes)))
        self.bounds = bounds
        self._interp = fx.Interpreter(gm, garbage_collect_values=False)
        # last position at which each node is read (the output node counts as "after everything")
        last_use = {}
        output = next(n for n in gm.graph.nodes if n.op == "output")
        for i, n in enumerate(self.nodes + [output]):
            for src in n.all_input_nodes:
                last_use[src] = i
        self._last_use = last_use
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]

    def __len__(self) -> int:
        return len(self.bounds)

    def initial_env(self, *inputs: torch.Tensor) -> dict[fx.Node, Any]:
        """The environment before segment 0: the graph inputs (defaults for the others)."""
        env = {}
        for i, p in enumerate(self.placeholders):
            if i < len(inputs):
                env[p] = inputs[i]
            elif p.args:
                env[p] = p.args[0]
            else:
                raise ValueError(f"no value for graph input '{p.name}'")
        return env

    def run(self, k: int, env: dict[fx.Node, Any], keep: Sequence[fx.Node] = (),
            overrides: Mapping[fx.Node, Callable[[Any, dict], Any]] | None = None) -> dict[fx.Node, Any]:
        """Run segment ``k`` on ``env``; returns the environment after it.

        The result holds the values live after the segment plus those of ``keep`` (e.g. the
        block's ``out_proj``); ``env`` itself is not modified. ``overrides`` maps a node to
        ``f(value, env) -> value`` applied to its computed value (e.g. to change how gradients
        flow through it).
        """
        start, end = self.bounds[k]
        local = dict(env)
        self._interp.env = local
        overrides = overrides or {}
        for n in self.nodes[start:end]:
            if n.op == "placeholder":
                continue
            value = self._interp.run_node(n)
            if n in overrides:
                value = overrides[n](value, local)
            local[n] = value
        keep = set(keep)
        return {n: v for n, v in local.items() if n in keep or self._last_use.get(n, -1) >= end}
