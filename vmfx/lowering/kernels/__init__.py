"""vmfx's Triton kernel templates and their launchers.

Each module holds one template: the kernel's Triton source as text with named slots (its
``TEMPLATE``, a :class:`~vmfx.lowering.template.KernelTemplate`: the main loop written out, the
parts that depend on static choices (which inputs exist, bit widths, epilogue ops) left as slots
such as ``$main_loop`` or ``$epilogue``), a ``render_*`` function that fills the slots with the
output of small functions and puts the shared preamble in front
(:func:`~vmfx.lowering.codegen.render_preamble`: header with provenance, device helpers, autotune
decorator), and a launcher that checks its arguments, allocates the outputs, computes the grid and
launches the kernel (compiled once per set of render arguments,
:func:`~vmfx.lowering.codegen.kernel_cache`). The generated source of every variant the lowering
emits is kept as a golden snapshot (``tests/lowering/golden/``). The exact CPU equivalent of every launcher is in
:mod:`vmfx.lowering.reference`, with the same parameter objects (:class:`ActQuant`,
:class:`QWeight`).

=====================  ===================  =========================================================
template               module               launcher
=====================  ===================  =========================================================
``qlinear``            ``linear``           :func:`qlinear`: smoothing + static per-token / per-tensor
                                            activation quantize (or int8 codes) + int8 GEMM +
                                            zero-point correction + dequantize + bias + epilogue
``qlinear_group``      ``linear_group``     :func:`qlinear_group`: G linears on int8 codes (G, M, K),
                                            one launch (both directions' x_proj)
``quantize``           ``act_quantize``     :func:`quantize`: standalone activation quantize to codes
``conv``               ``conv``             :func:`causal_conv1d_silu`: causal depthwise conv1d + SiLU
                                            (+ codes of its transpose for the next linear)
``conv_bidir``         ``conv_bidir``       :func:`causal_conv1d_silu_bidir`: both directions' conv
                                            + SiLU in one launch (+ codes for each direction's x_proj)
``scan``               ``scan``             :func:`selective_scan`: selective scan, D skip, SiLU(z) gate
``merge_quantize``     ``merge``            :func:`merge_quantize`: (y_f + flip(y_b)) * c, token-major
                                            (+ codes)
``scan_merge``         ``scan_merge``       :func:`scan_merge`: both scan directions of a Vim block +
                                            the merge (+ codes), one launch
``mixed_qlinear``      ``mixed_linear``     :func:`mixed_qlinear`: OuroMamba's inlier int8 GEMM + the
                                            per-tile outlier columns' int8 GEMM, summed in the epilogue
``hadamard_quantize``  ``hadamard``         :func:`hadamard_quantize`: online Hadamard (FWHT) + the
                                            next linear's activation quantize, float in, codes out
``hadamard_qlinear``   ``hadamard_linear``  :func:`hadamard_qlinear`: the online Hadamard + quantize as
                                            the prologue of ``qlinear``'s int8 GEMM (one launch)
=====================  ===================  =========================================================

Every launcher reads float activations in float32, float16 or bfloat16 (converted in registers)
and writes ``out_dtype`` (default: its float input's dtype; float32 for linears that read codes),
computing in float32 / int32 and rounding once at the store
(:data:`vmfx.lowering.codegen.FLOAT_IO`); quantization parameters are float32.

(The modules are not named after the launchers they hold, so that ``kernels.qlinear`` is always
the function and ``kernels.linear`` the module.)

Importing this package defines no Triton kernel: sources are rendered, written to the kernel
cache and imported on first launch, when the backend (GPU, or the interpreter on a machine
without one) is chosen.
"""

from __future__ import annotations

from ..params import ActQuant, QWeight, make_act_quant
from .conv import causal_conv1d_silu, render_conv
from .merge import merge_quantize, render_merge
from .linear import qlinear, render_qlinear
from .act_quantize import quantize, render_quantize
from .scan import render_scan, selective_scan
from .scan_merge import render_scan_merge, scan_merge
from .mixed_linear import mixed_qlinear, render_mixed_qlinear
from .conv_bidir import causal_conv1d_silu_bidir, render_conv_bidir
from .linear_group import GroupedQWeight, qlinear_group, render_qlinear_group
from .hadamard import hadamard_quantize, render_hadamard_quantize
from .hadamard_linear import hadamard_qlinear, render_hadamard_qlinear

__all__ = [
    "ActQuant",
    "QWeight",
    "make_act_quant",
    "qlinear",
    "quantize",
    "causal_conv1d_silu",
    "selective_scan",
    "merge_quantize",
    "render_qlinear",
    "render_quantize",
    "render_conv",
    "render_scan",
    "render_merge",
    "scan_merge",
    "render_scan_merge",
    "mixed_qlinear",
    "render_mixed_qlinear",
    "causal_conv1d_silu_bidir",
    "render_conv_bidir",
    "qlinear_group",
    "render_qlinear_group",
    "GroupedQWeight",
    "hadamard_quantize",
    "render_hadamard_quantize",
    "hadamard_qlinear",
    "render_hadamard_qlinear",
]

