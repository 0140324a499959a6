"""Lowering: fused subgraphs of a quantized graph become generated Triton kernels.

    lowered = vmfx.lowering.lower(qmodel, backend="auto")   # or vmfx.compile(..., backend="auto")
    vmfx.lowering.show(lowered)                             # print every kernel's source

The pipeline is :mod:`~vmfx.lowering.partition` (find the fused subgraphs: quantized linears with
their epilogues, conv + SiLU + quantize, scan + gate, the merge of the two scan directions +
quantize) -> :mod:`~vmfx.lowering.kernels` (render each partition's Triton source from a template
plus its own epilogue, cached by hash, :mod:`~vmfx.lowering.codegen`) -> :mod:`~vmfx.lowering.runtime`
(modules that launch the kernels on a GPU, or run the exact integer reference of
:mod:`~vmfx.lowering.reference` on a CPU).
"""

import os as _os

import torch as _torch

# Triton defines jit functions of its own when it is imported (tl.sigmoid, ...): on a machine
# without CUDA, its interpreter must be on before that happens, or no generated kernel can run.
# vmfx imports Triton only here, lazily; an explicit TRITON_INTERPRET setting wins.
if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")

from .partition import Partition, find_partitions  # noqa: E402
from .runtime import BACKENDS, LoweredPartition, lower, lowered_partitions, resolve_backend, show  # noqa: E402

__all__ = [
    "BACKENDS",
    "Partition",
    "find_partitions",
    "LoweredPartition",
    "lower",
    "lowered_partitions",
    "resolve_backend",
    "show",
]
