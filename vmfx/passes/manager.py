"""``PassManager``: runs a list of passes, checks the graph after each, names the pass that broke.

Before running anything it checks the order of the passes against the facts they declare
(:func:`check_order`; see :mod:`vmfx.passes.base`): a pass that needs a fact only a later pass
establishes, or that cannot run after an earlier pass, fails at once with a
:class:`~vmfx.errors.PassError` naming both passes.

After every pass the graph is recompiled. With checks on (``run_checks_after_each_pass=True``,
or the environment variable ``VMFX_CHECK_PASSES=1``), the graph is also linted and, when the
context has example inputs, run once, so a pass that leaves the graph broken is caught at that
pass and not three passes later. ``VMFX_TRACE_DIR=<dir>`` writes the readable graph after every
pass to ``<dir>/NN_<PassName>.txt``.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

import torch
import torch.fx as fx

from ..errors import PassError, VmfxError
from .base import FACTS, Pass, PassContext, PassResult, graph_facts

__all__ = ["PassManager", "check_order"]


def check_order(passes: Sequence[Pass], facts: set[str] | frozenset[str] = frozenset()) -> None:
    """Check that ``passes`` can run in this order on a graph where ``facts`` hold.

    Raises:
        PassError: naming the pass whose requirement fails and the pass that establishes the
            missing fact later (or says that none does), or the earlier pass whose fact it forbids.
    """
    facts = set(facts)
    established_by: dict[str, str] = {f: "the input graph" for f in facts}
    for i, p in enumerate(passes):
        for fact in p.requires_facts:
            if fact in facts:
                continue
            later = next((q for q in passes[i + 1 :] if fact in q.ensures_facts), None)
            meaning = FACTS.get(fact, fact)
            if later is not None:
                raise PassError(
                    f"pass order: {p.name} (position {i + 1}) needs '{fact}' ({meaning}), which {later.name} "
                    f"establishes only later in the pipeline: move {later.name} before {p.name}"
                )
            providers = sorted({q.name for q in passes[:i] if fact in q.clears_facts})
            undone = f" ({', '.join(providers)} undid it)" if providers else ""
            raise PassError(
                f"pass order: {p.name} (position {i + 1}) needs '{fact}' ({meaning}), which no pass before it "
                f"establishes{undone}; add the pass that does before {p.name}"
            )
        for fact in p.forbids_facts:
            if fact in facts:
                raise PassError(
                    f"pass order: {p.name} (position {i + 1}) cannot run after {established_by.get(fact, 'an earlier pass')}, "
                    f"which established '{fact}' ({FACTS.get(fact, fact)}): run {p.name} before it"
                )
        facts.difference_update(p.clears_facts)
        for fact in p.ensures_facts:
            facts.add(fact)
            established_by[fact] = p.name


class PassManager:
    """Run ``passes`` in order.

    Args:
        passes: the passes.
        run_checks_after_each_pass: lint and (with example inputs) run the graph after each pass.

    Raises:
        PassError: naming the failing pass and the passes that ran before it. vmfx's own errors
            (``CalibrationDataError``, ``ConfigError``, ...) keep their type and get a note
            naming the pass.
    """

    def __init__(self, passes: Sequence[Pass], run_checks_after_each_pass: bool | None = None):
        for p in passes:
            if not isinstance(p, Pass):
                raise TypeError(
                    f"PassManager takes vmfx Pass instances, got {type(p).__name__}; wrap a function "
                    "in a Pass subclass (see vmfx/passes/README.md)"
                )
        self.passes = list(passes)
        if run_checks_after_each_pass is None:
            run_checks_after_each_pass = os.environ.get("VMFX_CHECK_PASSES", "") not in ("", "0")
        self.run_checks_after_each_pass = run_checks_after_each_pass

    def __call__(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        ctx = PassContext() if ctx is None else ctx
        check_order(self.passes, graph_facts(gm))
        trace_dir = os.environ.get("VMFX_TRACE_DIR")
        modified = False
        done: list[str] = []
        for index, p in enumerate(self.passes):
            start = time.perf_counter()
            try:
                result = p(gm, ctx)
            except VmfxError as exc:
                # vmfx's own errors already say what is wrong (bad data, bad config): keep their
                # type so users can catch them, and add where it happened.
                exc.add_note(f"(raised in pass {p.name}; passes run before it: {', '.join(done) or 'none'})")
                raise
            except Exception as exc:
                raise PassError(
                    f"pass {p.name} failed: {type(exc).__name__}: {exc}\n"
                    f"  (passes run before it: {', '.join(done) or 'none'})"
                ) from exc
            gm = result.graph_module
            gm.recompile()
            modified |= result.modified
            ctx.timings[p.name] = ctx.timings.get(p.name, 0.0) + time.perf_counter() - start
            if self.run_checks_after_each_pass:
                self.check(gm, ctx, p, done)
            if trace_dir:
                _dump(gm, trace_dir, index, p.name)
            done.append(p.name)
        return PassResult(gm, modified)

    @staticmethod
    def check(gm: fx.GraphModule, ctx: PassContext, p: Pass, done: list[str]) -> None:
        """Lint the graph and run it on the example inputs; raise a PassError naming ``p``."""
        try:
            gm.graph.lint()
            if ctx.example_inputs is not None:
                with torch.no_grad():
                    gm(*ctx.example_inputs)
        except Exception as exc:
            raise PassError(
                f"the graph is broken after pass {p.name}: {type(exc).__name__}: {exc}\n"
                f"  (passes run before it: {', '.join(done) or 'none'})"
            ) from exc


def _dump(gm: fx.GraphModule, directory: str, index: int, name: str) -> None:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{index:02d}_{name}.txt")
    with open(path, "w") as f:
        f.write(gm.print_readable(print_output=False))
