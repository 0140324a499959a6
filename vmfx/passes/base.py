"""The pass contract: ``Pass``, ``PassResult`` and ``PassContext``.

A pass is a small class. ``__call__`` runs ``requires -> call -> ensures`` (the shape of
``torch.fx.passes.infra.pass_base.PassBase``, with no-op defaults so passes only write the checks
they have). ``call(gm, ctx)`` returns ``PassResult(graph_module, modified)``.

The context carries what no graph holds: calibration data, an example input for checks, the
quantization config, and a place to record per-pass timings. Passes keep their own facts in
``node.meta["vmfx"]`` (see :mod:`vmfx.annotations`) and ``gm.meta``.

Ordering facts
--------------
Passes declare what they need and what they establish as *facts*, short names recorded in
``gm.meta["vmfx_facts"]`` (see :data:`FACTS`): ``requires_facts`` must hold before the pass runs,
``forbids_facts`` must not (JLSS cannot learn smoothing factors that were already folded),
``ensures_facts`` hold after it and ``clears_facts`` no longer do. The
:class:`~vmfx.passes.manager.PassManager` checks a whole pipeline against them before running
anything, so a pipeline in an impossible order fails at once with an error naming both passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.fx as fx

from ..errors import PassError

__all__ = ["Pass", "PassResult", "PassContext", "FACTS", "FACTS_META", "graph_facts"]

#: The key of the set of facts that hold for a graph, in ``gm.meta``.
FACTS_META = "vmfx_facts"

#: Every fact a built-in pass declares, with what it means.
FACTS = {
    "mixers_detected": "Mamba mixers are detected and their nodes annotated (DetectMambaMixersPass)",
    "observers_inserted": "observers sit on the edges to quantize (InsertObserversPass)",
    "observers_calibrated": "the observers hold statistics of calibration data (CalibratePass)",
    "smoothing_statistics": "smoothing-statistics observers (AbsMaxObserver) hold calibrated |x| maxima (CalibratePass)",
    "smoothing_factors": "linears carry SmoothQuant smoothing nodes (SmoothQuantPass)",
    "quantizers_calibrated": "observers became calibrated quantizer nodes (ConvertPass)",
    "learning_done": "step sizes and smoothing factors were learned block by block (JLSSPass)",
    "smoothing_folded": "smoothing factors were folded into the ops producing the inputs (FoldSmoothingPass)",
    "scales_searched": "static scales were chosen by cosine similarity of layer outputs (SimilaritySearchPass)",
}


def graph_facts(gm: fx.GraphModule) -> set[str]:
    """The facts recorded on ``gm`` (empty for a freshly traced graph)."""
    return set(gm.meta.get(FACTS_META) or ())


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
    #: facts that must hold before the pass runs, must not hold, hold after it, no longer hold.
    requires_facts: tuple[str, ...] = ()
    forbids_facts: tuple[str, ...] = ()
    ensures_facts: tuple[str, ...] = ()
    clears_facts: tuple[str, ...] = ()

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
        facts = graph_facts(result.graph_module)
        facts.difference_update(self.clears_facts)
        facts.update(self.ensures_facts)
        result.graph_module.meta[FACTS_META] = sorted(facts)
        return result

    def fail(self, message: str, node: fx.Node | None = None) -> PassError:
        """A :class:`PassError` naming this pass (and ``node``); ``raise self.fail(...)``."""
        where = f" at node '{node.name}' ({node.op} {_target_name(node)})" if node is not None else ""
        return PassError(f"pass {self.name}{where}: {message}")

    def __repr__(self) -> str:
        """``Name(arg=value, ...)``: the pass's public settings (its attributes not starting with
        an underscore), so that ``print(pipeline)`` shows how every pass is configured."""
        args = ", ".join(f"{k}={_short(v)}" for k, v in vars(self).items()
                         if not k.startswith("_") and not k.endswith("_facts"))
        return f"{self.name}({args})"


def _short(value) -> str:
    text = getattr(value, "__name__", None) or repr(value)
    if hasattr(value, "func") and hasattr(value, "keywords"):  # functools.partial of an observer class
        kw = ", ".join(f"{k}={v!r}" for k, v in value.keywords.items())
        text = f"{getattr(value.func, '__name__', value.func)}({kw})"
    return text if len(text) <= 400 else text[:397] + "..."


def _target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))
