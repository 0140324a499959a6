"""The pass contract: ``Pass``, ``PassResult`` and ``PassContext``.

A pass is a small class. ``__call__`` runs ``requires -> call -> ensures`` (the shape of
``torch.fx.passes.infra.pass_base.PassBase``, with no-op defaults so passes only write the checks
they have). ``call(gm, ctx)`` returns ``PassResult(graph_module, modified)``.

The context carries what no graph holds: calibration data, an example input for checks, the
quantization config, and a place to record per-pass timings. Passes keep their own facts in
``node.meta["vmfx"]`` (see :mod:`vmfx.annotations`) and ``gm.meta``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.fx as fx

from ..errors import PassError

__all__ = ["Pass", "PassResult", "PassContext"]


class PassResult(NamedTuple):
    """What a pass returns: the (possibly new) graph module and whether it changed anything."""

    graph_module: fx.GraphModule
    modified: bool


@dataclass
class PassContext:
    """Inputs of a pipeline run that are not part of the graph.

    Attributes:
        calib_data: calibration images: a tensor ``(N, C, H, W)`` or an iterable of batches
            (tensors or ``(images, labels)`` pairs, e.g. a ``DataLoader``).
        calib_batch_size: batch size used to split a tensor ``calib_data``.
        example_inputs: a small input tuple, for shape propagation and post-pass checks.
        config: the :class:`vmfx.config.QuantConfig` of the run, if any.
        progress: show progress bars.
        timings: seconds spent in each pass (filled by the pass manager).
        state: free-form scratch space shared by the passes of one run.
    """

    calib_data: Any = None
    calib_batch_size: int = 32
    example_inputs: tuple[torch.Tensor, ...] | None = None
    config: Any = None
    progress: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class of vmfx passes.

    Subclasses implement :meth:`call` and may override :meth:`requires` / :meth:`ensures`.
    A pass's docstring says what it does and which invariants it keeps. A pass that reads
    ``ctx.calib_data`` sets ``needs_data = True``; the staged API (``vmfx.prepare`` /
    ``calibrate`` / ``convert``) splits a method's pass list at its data passes.
    """

    needs_data: bool = False

    @property
    def name(self) -> str:
        return type(self).__name__

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Check preconditions; raise with :meth:`fail` when they do not hold."""

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError(f"{self.name} must implement call(gm, ctx)")

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Check postconditions; raise with :meth:`fail` when they do not hold."""

    def __call__(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        ctx = PassContext() if ctx is None else ctx
        self.requires(gm, ctx)
        result = self.call(gm, ctx)
        if not isinstance(result, PassResult):
            raise PassError(f"pass {self.name} returned {type(result).__name__}, expected PassResult")
        self.ensures(result.graph_module, ctx)
        return result

    def fail(self, message: str, node: fx.Node | None = None) -> PassError:
        """A :class:`PassError` naming this pass (and ``node``); ``raise self.fail(...)``."""
        where = f" at node '{node.name}' ({node.op} {_target_name(node)})" if node is not None else ""
        return PassError(f"pass {self.name}{where}: {message}")

    def __repr__(self) -> str:
        return f"{self.name}()"


def _target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))
