"""``plan``: what a graph launches per forward, per block, and the bytes each launch moves.

    plan = vmfx.lowering.launch_plan(lowered, images[:1])
    print(plan.table())                 # one row per launch: node, kind, block, bytes read / written
    plan.per_block()                    # {block: launches}; plan.max_per_block()

A *launch* is a graph call that computes a new tensor: a lowered partition (one kernel), a module
or a torch op whose output does not share storage with its inputs. Views (slices, transposes,
reshapes of an existing tensor), shape arithmetic and input checks are not launches: they move no
data. The plan is measured by running the graph once on the example input with an
:class:`torch.fx.Interpreter` on the CPU (the reference backend computes what the kernels compute),
so it counts exactly what the graph runs, whatever the model; a GPU profile (``benchmarks/gpu.py``)
then times the same launches.

Bytes: ``read`` is every tensor argument of the call plus the module's own parameters and
buffers (a lowered partition's integer weights and scales), ``written`` is every tensor it returns,
and ``scratch`` what a lowered partition says it moves besides (``scratch_bytes``: ``scan_merge``'s
float32 workspace, ``conv_bidir``'s second read of its input).
Activation bytes grow with the batch, weight bytes do not: :meth:`LaunchPlan.bytes_per_forward`
scales them apart.

Blocks: a launch belongs to the block (the Mamba block index of :class:`vmfx.annotations.NodeAnnotation`)
of the nodes it computes: a lowered partition takes its nodes' block, any other node its annotation's
block or, failing that, the block of the annotated nodes under the same module (``nn_module_stack``),
so that a mixer's glue ops (``flip``, ``exp`` of ``A_log``) count in their block.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..annotations import annotation

__all__ = ["Launch", "LaunchPlan", "launch_plan"]


@dataclass
class Launch:
    """One call that computes a new tensor.

    Attributes:
        node: the FX node's name.
        kind: the lowered partition's kind (``qlinear``, ``scan_merge``, ...) or the op
            (``RMSNorm``, ``flip``, ``exp``).
        block: the Mamba block it belongs to, or None outside blocks.
        activation_bytes_read: bytes of its tensor arguments.
        weight_bytes_read: bytes of the module's own parameters and buffers.
        bytes_written: bytes of the tensors it returns.
        dtypes_written: the dtypes of the tensors it returns (``"float16"``, ``"int8"``...).
        scratch_bytes: what a lowered partition moves beyond reading its inputs and writing its
            outputs once (a workspace written and read back, an input read twice).
    """

    node: str
    kind: str
    block: int | None
    activation_bytes_read: int
    weight_bytes_read: int
    bytes_written: int
    dtypes_written: tuple[str, ...] = ()
    scratch_bytes: int = 0


@dataclass
class LaunchPlan:
    """The launches of one forward (see the module docstring)."""

    launches: list[Launch]
    batch: int
    blocks: list[int] = field(default_factory=list)

    def per_block(self) -> dict[int, int]:
        """Launches per block, for every block of the model."""
        counts = {b: 0 for b in self.blocks}
        for launch in self.launches:
            if launch.block is not None:
                counts[launch.block] = counts.get(launch.block, 0) + 1
        return counts

    def max_per_block(self) -> int:
        counts = self.per_block()
        return max(counts.values()) if counts else 0

    def kinds_per_block(self, block: int) -> dict[str, int]:
        """What one block launches, by kind."""
        out: dict[str, int] = {}
        for launch in self.launches:
            if launch.block == block:
                out[launch.kind] = out.get(launch.kind, 0) + 1
        return out

    def bytes_per_forward(self, batch: int | None = None) -> int:
        """Bytes read and written by all launches of one forward at ``batch`` (default: the
        measured one): activation bytes scale with the batch, weight bytes do not."""
        factor = (batch or self.batch) / self.batch
        act = sum(x.activation_bytes_read + x.bytes_written + x.scratch_bytes for x in self.launches)
        return int(act * factor) + sum(x.weight_bytes_read for x in self.launches)

    def summary(self, batch: int | None = None) -> dict[str, Any]:
        per_block = self.per_block()
        return {
            "launches": len(self.launches),
            "blocks": len(per_block),
            "max_launches_per_block": max(per_block.values()) if per_block else 0,
            "launches_outside_blocks": sum(1 for x in self.launches if x.block is None),
            "batch": batch or self.batch,
            "bytes_per_forward": self.bytes_per_forward(batch),
            "weight_bytes": sum(x.weight_bytes_read for x in self.launches),
        }

    def to_records(self) -> list[dict]:
        return [asdict(x) for x in self.launches]

    def table(self) -> str:
        rows = [f"{'node':<44} {'kind':<14} {'block':>5} {'act read':>11} {'weights':>10} {'written':>11}"]
        for x in self.launches:
            block = "-" if x.block is None else str(x.block)
            rows.append(f"{x.node:<44} {x.kind:<14} {block:>5} {x.activation_bytes_read:>11,} "
                        f"{x.weight_bytes_read:>10,} {x.bytes_written:>11,}")
        s = self.summary()
        rows.append(f"{s['launches']} launches ({s['launches_outside_blocks']} outside blocks), at most "
                    f"{s['max_launches_per_block']} per block over {s['blocks']} blocks; "
                    f"{s['bytes_per_forward']:,} bytes per forward at batch {self.batch}")
        return "\n".join(rows)


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    last = list(stack.values())[-1]
    return last[0] if isinstance(last, tuple) else str(list(stack.keys())[-1])


def _block_finder(gm: fx.GraphModule):
    """node -> block: its annotation's block, else the one block of the annotated nodes under the
    same module path."""
    annotated: list[tuple[str, int]] = []
    for node in gm.graph.nodes:
        ann = annotation(node)
        path = _module_path(node)
        if ann is not None and ann.block is not None and path:
            annotated.append((path, ann.block))

    def block_of(node: fx.Node) -> int | None:
        ann = annotation(node)
        if ann is not None and ann.block is not None:
            return ann.block
        path = _module_path(node)
        if not path:
            return None
        found = {b for p, b in annotated if p == path or p.startswith(path + ".")}
        return found.pop() if len(found) == 1 else None

    return block_of


def _kind(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return getattr(module, "kind", None) if hasattr(module, "partition_name") else type(module).__name__
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


@torch.no_grad()
def launch_plan(gm: fx.GraphModule, *example_inputs: torch.Tensor) -> LaunchPlan:
    """Run ``gm`` once on ``example_inputs`` and record its launches (see the module docstring).

    Args:
        gm: a lowered (or quantized, or any traced) graph; it runs on the inputs' device.
        example_inputs: its inputs, batch first (a batch of 1 is enough: activation bytes are
            scaled by :meth:`LaunchPlan.bytes_per_forward`).
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"launch_plan takes a traced or lowered fx.GraphModule, got {type(gm).__name__}")
    block_of = _block_finder(gm)
    launches: list[Launch] = []

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if node.op not in ("call_module", "call_function", "call_method"):
                return result
            outputs = _tensors(result)
            if not outputs:
                return result  # shape arithmetic, input checks
            args = _tensors([self.env.get(n) for n in node.all_input_nodes])
            inputs = {_storage(t) for t in args}
            if all(_storage(t) in inputs for t in outputs):
                return result  # a view (or an element of a tuple the call before returned)
            weights = scratch = 0
            if node.op == "call_module":
                module = gm.get_submodule(node.target)
                weights = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
                if hasattr(module, "scratch_bytes"):
                    scratch = module.scratch_bytes(*self.fetch_args_kwargs_from_env(node)[0])
            launches.append(Launch(node.name, str(_kind(gm, node)), block_of(node),
                                   sum(t.numel() * t.element_size() for t in args), weights,
                                   sum(t.numel() * t.element_size() for t in outputs),
                                   tuple(str(t.dtype).removeprefix("torch.") for t in outputs), scratch))
            return result

    Recorder(gm).run(*example_inputs)
    batch = int(example_inputs[0].shape[0]) if example_inputs and example_inputs[0].dim() else 1
    blocks = sorted({b for n in gm.graph.nodes if (b := block_of(n)) is not None})
    return LaunchPlan(launches, batch, blocks)
