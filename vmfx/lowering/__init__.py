"""Lowering: fused subgraphs of a quantized graph become generated Triton kernels.

    lowered = vmfx.lowering.lower(qmodel, backend="auto")   # or vmfx.compile(..., backend="auto")
    vmfx.lowering.show(lowered)                             # print every kernel's source

The pipeline is :mod:`~vmfx.lowering.rewrite` (fold parameter-only subgraphs into buffers, move
flips next to the kernels that absorb them) -> :mod:`~vmfx.lowering.partition` (find the fused
subgraphs: quantized linears with their epilogues, conv + SiLU + quantize, scan + gate, the merge of
the two scan directions + quantize; then both directions of a block paired into one launch each:
``conv_bidir``, ``qlinear_group``, ``scan_merge`` with ``dt_proj`` inside) ->
:mod:`~vmfx.lowering.kernels` (render each partition's Triton source from a template plus its own
epilogue, cached by hash, one compiled kernel per form, :mod:`~vmfx.lowering.codegen`) ->
:mod:`~vmfx.lowering.runtime` (modules that launch the kernels on a GPU, or run the exact integer reference of
:mod:`~vmfx.lowering.reference` on a CPU; each one custom op under ``torch.compile``).
:func:`~vmfx.lowering.plan.launch_plan` lists what a lowered graph launches per forward and block.
"""

# Importing vmfx changes no environment variable and imports no Triton: the backend (a GPU, or
# Triton's CPU interpreter on a machine without CUDA) is chosen when the first generated kernel is
# defined (vmfx.lowering.codegen.ensure_backend), before Triton is imported.
from .partition import Partition, PartitionInfo, find_partitions, register_partition_kind, unlowered_quantizers
from .plan import Launch, LaunchPlan, launch_plan
from .runtime import BACKENDS, LoweredPartition, lower, lowered_partitions, register_lowering, resolve_backend, show

__all__ = [
    "BACKENDS",
    "Partition",
    "PartitionInfo",
    "register_partition_kind",
    "register_lowering",
    "find_partitions",
    "unlowered_quantizers",
    "LoweredPartition",
    "lower",
    "lowered_partitions",
    "resolve_backend",
    "show",
    "Launch",
    "LaunchPlan",
    "launch_plan",
]
