"""Lowered modules and the ``lower`` transform: partitions become calls to generated kernels.

``lower(qmodel, backend)`` copies a converted graph, rewrites it (:mod:`vmfx.lowering.rewrite`:
parameter-only subgraphs folded, flips moved next to the kernels that absorb them), finds its partitions
(:func:`~vmfx.lowering.partition.find_partitions`), and replaces each by one ``call_module`` node
calling a :class:`LoweredPartition` that holds the integer weights and the quantization
parameters prepared once (:class:`~vmfx.lowering.reference.QWeight`,
:class:`~vmfx.lowering.reference.ActQuant`) and runs either

* ``backend="triton"``: the generated Triton kernel (on a GPU, or under ``TRITON_INTERPRET=1`` on
  a CPU, slowly: that is how the tests run them), or
* ``backend="reference"``: the exact torch integer reference (:mod:`vmfx.lowering.reference`),
  vmfx's CPU backend and the kernels' test oracle.

A producer partition that feeds a quantized linear (the conv feeding ``x_proj``, the merge feeding
``out_proj``) also emits that linear's int8 codes, and the linear's GEMM reads them directly; an
online Hadamard before ``out_proj`` is rotated and quantized in the prologue of ``out_proj``'s GEMM,
one kernel (:class:`LoweredHadamardQLinear`), or, at a width that prologue does not take, in a
kernel of its own that emits ``out_proj``'s codes (:class:`LoweredHadamardQuantize`); the merge
then writes float.
Nodes in no partition stay torch ops. Every partition can render its Triton source
(:func:`show`), whatever the backend.

Dtypes: the lowered model runs in the dtype it is cast to. ``lowered.half()`` (or
``.to(torch.bfloat16)``) casts the float ops left in the graph as usual, while every lowered
partition keeps its quantization parameters in float32 and records the cast as its
``io_dtype``: its activations come in and go out in that dtype, the kernels convert them in
registers and compute in float32 / int32 (the reference backend computes on the inputs converted
to float32 and rounds its outputs to ``io_dtype``).

A lowered model is for inference: the partitions compute without autograd (integer kernels have
no gradient), so calling it with gradients enabled works, and no gradient flows through them.

Graph capture: under ``torch.compile`` every partition is one call of the custom op
``vmfx::lowered_partition`` (registered with ``torch.library``; the partition is found by a key it
holds, and a fake implementation gives its outputs' shapes and dtypes from ``output_specs``), so
``torch.compile(lowered, fullgraph=True)`` traces the whole model without a graph break, compiling
the ops between the partitions and calling vmfx's kernels as they are.

Invariants: the quantized model passed in is not modified; the lowered graph computes what the
fake-quant graph computes up to the documented rounding differences (an activation code may
differ by one step within an ulp of a rounding tie); node names outside partitions are kept.
"""

from __future__ import annotations

import copy
import itertools
import math
import operator
import warnings
import weakref
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..annotations import annotate, annotation
from ..errors import ConfigError, LoweringError
from ..ops.selective_scan import reparameterize
from ..quant.state_quantizer import scan_state_of
from ..quant.modules import FakeQuantize
from . import mixed_reference
from . import reference as ref
from .partition import (PARTITION_KINDS, MixedQLinearInfo, Partition, QuantizedLinear, find_partitions,
                        unlowered_quantizers)
from .rewrite import fold_parameter_constants, sink_flips

__all__ = [
    "BACKENDS",
    "resolve_backend",
    "check_backend_runs",
    "LoweredPartition",
    "lost_metadata_hint",
    "LoweredQLinear",
    "LoweredConv",
    "LoweredScan",
    "LoweredMerge",
    "LoweredHadamardQuantize",
    "LoweredHadamardQLinear",
    "LoweredConvBidir",
    "LoweredScanMerge",
    "LoweredQLinearGroup",
    "LOWERINGS",
    "register_lowering",
    "lower",
    "show",
    "lowered_partitions",
]

BACKENDS = ("triton", "reference", "auto")
LOWERED_PREFIX = "vmfx_lowered"


def resolve_backend(backend: str) -> str:
    """"auto" -> "triton" on a CUDA machine, "reference" elsewhere; validates the name."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if torch.cuda.is_available() else "reference"
    return backend


def check_backend_runs(backend: str) -> None:
    """Fail now, with the way out, when kernels of ``backend`` could not run on this machine: the
    Triton backend without a CUDA device needs Triton's CPU interpreter, which
    :func:`~vmfx.lowering.codegen.ensure_backend` switches on while no kernel has been defined yet
    (and refuses when it was switched off, or when Triton was imported without it). Called by
    ``vmfx.compile`` before calibrating and by :func:`lower`, not at the first forward."""
    if backend != "triton" or torch.cuda.is_available():
        return
    from .codegen import ensure_backend

    try:
        ensure_backend()
    except RuntimeError as exc:
        raise ConfigError(f"backend='triton' cannot run here: {str(exc).removeprefix('vmfx: ')} "
                          "(backend='auto' picks the reference backend on a machine without CUDA)") from None


def _kernels():
    from . import kernels  # imported lazily: rendering/launching needs triton

    return kernels


#: The activation dtypes a lowered partition reads and writes (the kernels' float I/O dtypes).
IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: The lowered partitions the custom op can run, by key (weakly: a freed model leaves no entry).
_PARTITIONS: "weakref.WeakValueDictionary[str, LoweredPartition]" = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def _flat_outputs(out) -> list[torch.Tensor]:
    outs = out if isinstance(out, tuple) else (out,)
    return [t for t in outs if t is not None]


@torch.library.custom_op("vmfx::lowered_partition", mutates_args=())
def _run_partition(key: str, inputs: list[Optional[torch.Tensor]]) -> list[torch.Tensor]:
    """Run the lowered partition registered under ``key`` on ``inputs``: its outputs, the
    ``None`` ones left out. What ``torch.compile`` sees of a partition: one opaque op (its
    kernels and integer weights stay vmfx's), with the fake implementation below for tracing."""
    return [t if not any(t is i for i in inputs if i is not None) else t.clone()
            for t in _flat_outputs(_PARTITIONS[key].compute(*inputs))]


@_run_partition.register_fake
def _(key: str, inputs: list[Optional[torch.Tensor]]) -> list[torch.Tensor]:
    module = _PARTITIONS[key]
    device = next(t.device for t in inputs if t is not None)
    return [torch.empty(shape, dtype=dtype, device=device) for spec in module.output_specs(*inputs)
            if spec is not None for shape, dtype in (spec,)]


class LoweredPartition(nn.Module):
    """Base class: one partition, its provenance, the backend it runs on and ``io_dtype``, the
    dtype of its activations (float32 until the model is cast; see the module docstring)."""

    kind = "partition"

    def __init__(self, name: str, provenance: Sequence[str], backend: str):
        super().__init__()
        self.partition_name = name
        self.provenance = list(provenance)
        self.backend = backend
        self.io_dtype = torch.float32
        self._register()

    def _apply(self, fn, recurse=True):
        """Device moves reach the parameters; dtype casts do not: the float32 quantization
        parameters stay float32 (the kernels read them so, and a half-precision step size would
        change the codes) and the cast becomes ``io_dtype``. A cast to another dtype than the
        kernels' I/O dtypes (e.g. ``.double()``) is refused by name."""
        cast = fn(torch.zeros((), dtype=torch.float32)).dtype
        if cast != torch.float32:
            if cast not in IO_DTYPES:
                raise ConfigError(f"a lowered model runs in float32, float16 or bfloat16, not {cast}; "
                                  "cast the quantized model before lowering it, or lower it again")
            self.io_dtype = cast

        def keep_dtype(t):
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(device=moved.device)

        return super()._apply(keep_dtype, recurse)

    def _out(self, y: torch.Tensor | None) -> torch.Tensor | None:
        """A reference-backend output (float32) in ``io_dtype``."""
        return y if y is None or y.dtype == self.io_dtype else y.to(self.io_dtype)

    # -- running: eagerly, or as one opaque custom op under torch.compile ------------------------

    def forward(self, *inputs):
        """Run the partition. Under ``torch.compile`` it is one call of the custom op
        ``vmfx::lowered_partition`` (:func:`_run_partition`), opaque to the compiler, whose fake
        implementation gives the outputs' shapes and dtypes (:meth:`output_specs`); eagerly it
        calls :meth:`compute` directly. Both compute the same thing."""
        if torch.compiler.is_compiling():
            flat = torch.ops.vmfx.lowered_partition(self._registry_key(), list(inputs))
            return self._unflatten(flat, self.output_specs(*inputs))
        return self.compute(*inputs)

    def compute(self, *inputs):
        """The partition's outputs (a tensor, or a tuple where it also emits codes)."""
        raise NotImplementedError(f"{type(self).__name__} must define compute (every partition kind in this module does)")

    def output_specs(self, *inputs) -> tuple:
        """((shape, dtype) or None, ...): what :meth:`compute` returns for these inputs, one entry
        per output (None where an output of a tuple is not written); a single output is a
        one-entry tuple and :attr:`returns_tuple` says whether compute returns a tuple."""
        raise NotImplementedError(f"{type(self).__name__} must define output_specs (torch.compile's fake "
                                  "implementation needs it; every partition kind in this module does)")

    def scratch_bytes(self, *inputs) -> int:
        """Bytes the kernel moves beyond its inputs and outputs read once and written once (a
        workspace written and read back, an input read twice): the launch plan adds them."""
        return 0

    @property
    def returns_tuple(self) -> bool:
        return bool(getattr(self, "emits_codes", False))

    def _unflatten(self, flat, specs):
        it = iter(flat)
        outs = tuple(None if spec is None else next(it) for spec in specs)
        return outs if self.returns_tuple else outs[0]

    def _registry_key(self) -> str:
        """This module's key in the custom op's registry (made when it is built, copied or
        unpickled: a copy is a module of its own)."""
        return self._vmfx_key

    def _register(self) -> None:
        self._vmfx_key = f"{self.kind}:{self.partition_name}:{next(_KEYS)}"
        _PARTITIONS[self._vmfx_key] = self

    def __setstate__(self, state):
        super().__setstate__(state)
        self._register()

    def source(self) -> str:
        """The generated Triton source of this partition's kernel."""
        raise NotImplementedError  # every concrete partition below renders its template

    def extra_repr(self) -> str:
        return f"{self.kind}, backend={self.backend}, from {len(self.provenance)} nodes"


def _act_buffers(module: nn.Module, prefix: str, act: ref.ActQuant) -> None:
    module.register_buffer(f"{prefix}_scale", act.scale)
    module.register_buffer(f"{prefix}_inv_scale", act.inv_scale)
    module.register_buffer(f"{prefix}_zero_point", act.zero_point)
    module.register_buffer(f"{prefix}_inv_smooth", act.inv_smooth)
    setattr(module, f"{prefix}_bits", act.bits)


def _act(module: nn.Module, prefix: str) -> ref.ActQuant:
    g = lambda name: getattr(module, f"{prefix}_{name}")  # noqa: E731
    return ref.ActQuant(g("scale"), g("inv_scale"), g("zero_point"), g("bits"), g("inv_smooth"))


def input_act_quant(linear: QuantizedLinear) -> ref.ActQuant:
    """The kernels' activation parameters of a matched linear's input quantizer."""
    iq = linear.input_quantizer
    smooth = linear.smoothing() if (linear.smooth is not None and linear.smooth_input) else None
    return ref.make_act_quant(iq.scale, iq.zero_point, iq.spec.bits, smooth=smooth)


class LoweredQLinear(LoweredPartition):
    """Quantize (or take codes) + int GEMM + zero-point correction + dequant + bias + epilogue.

    Args:
        linear: the matched :class:`~vmfx.lowering.partition.QuantizedLinear` (static quantizers).
        epilogue: the epilogue ops (``("add", "extra0")``, ``("silu",)``...).
        token_shape: the input's dims between batch and channels (e.g. ``(L,)``), used to
            reshape 2-D codes from a producer back to ``(B, L, N)``.
        takes_codes: the input is int8 codes from a producer partition.

    Buffers: ``w_codes`` (N, K) int8 for weights of more than 4 bits, or ``w_packed``
    (N, ceil(K / 2)) int8, two 4-bit codes per byte (:func:`~vmfx.lowering.reference.pack_int4`),
    for 4-bit weights (the other one is None); ``w_scale``, ``w_sum``, ``bias`` and the
    activation parameters ``a_*``. They are the lowered model's state, which ``vmfx.save`` writes.
    """

    kind = "qlinear"

    def __init__(self, name, provenance, backend, linear: QuantizedLinear, epilogue, token_shape, takes_codes):
        super().__init__(name, provenance, backend)
        wq = linear.weight_quantizer
        weight = ref.QWeight.from_float(linear.weight, wq.scale, wq.spec.bits, smooth=linear.smoothing())
        self.w_bits = weight.bits
        self.in_features = weight.shape[1]
        if weight.bits <= 4:  # stored packed two per byte (half the bytes); nothing keeps the unpacked codes
            self.register_buffer("w_codes", None)
            self.register_buffer("w_packed", ref.pack_int4(weight.codes))
        else:
            self.register_buffer("w_codes", weight.codes)
            self.register_buffer("w_packed", None)
        self.register_buffer("w_scale", weight.scale)
        self.register_buffer("w_sum", weight.wsum)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        _act_buffers(self, "a", input_act_quant(linear))
        self.epilogue = [tuple(op) for op in epilogue]
        self.token_shape = tuple(token_shape)
        self.takes_codes = takes_codes

    def _weight(self) -> ref.QWeight:
        """The stored weight: 8-bit codes, or 4-bit codes packed two per byte (the GEMM unpacks
        them in registers, the reference once per plan or per call on its slow path)."""
        return ref.QWeight(self.w_codes, self.w_scale, self.w_sum, self.w_bits, self.w_packed, self.in_features)

    @torch.no_grad()
    def compute(self, x: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
        if self.takes_codes and x.dim() == 2:
            x = x.reshape((-1,) + self.token_shape + (x.shape[-1],))
        inputs = {f"extra{i}": e.float().contiguous() for i, e in enumerate(extras)}
        act, weight = _act(self, "a"), self._weight()
        if self.backend == "triton":  # float input in the model's dtype, converted in registers
            return _kernels().qlinear(x, weight, act, self.bias, epilogue=self.epilogue, epilogue_inputs=inputs,
                                      provenance=self.provenance, out_dtype=self.io_dtype)
        x = x if self.takes_codes else x.float()
        return self._out(ref.qlinear(x, weight, act, self.bias, epilogue=self.epilogue, epilogue_inputs=inputs))

    def output_specs(self, x, *extras):
        n = self.w_scale.shape[0]
        if self.takes_codes and x.dim() == 2:
            return ((((x.shape[0] // math.prod(self.token_shape),) + self.token_shape + (n,)), self.io_dtype),)
        return (((*x.shape[:-1], n), self.io_dtype),)

    def source(self) -> str:
        act = _act(self, "a")
        return _kernels().render_qlinear(
            per_token=act.per_token, smooth=act.inv_smooth is not None and not self.takes_codes,
            bias=self.bias is not None, prequantized=self.takes_codes, act_bits=act.bits,
            epilogue=self.epilogue, autotune=True, provenance=tuple(self.provenance), packed=self.w_packed is not None,
        )


class LoweredConv(LoweredPartition):
    """Causal depthwise conv1d + SiLU (+ the next linear's codes)."""

    kind = "conv"

    def __init__(self, name, provenance, backend, conv: nn.Conv1d, consumer: QuantizedLinear | None,
                 flip: bool = False):
        super().__init__(name, provenance, backend)
        self.register_buffer("weight", conv.weight.detach().float().reshape(conv.weight.shape[0], -1).clone())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().float().clone())
        self.flip = flip  # read x reversed along L (the backward direction's flip, absorbed)
        self.emits_codes = consumer is not None
        if consumer is not None:
            _act_buffers(self, "a", input_act_quant(consumer))

    @torch.no_grad()
    def compute(self, x: torch.Tensor):
        act = _act(self, "a") if self.emits_codes else None
        if self.backend == "triton":
            return _kernels().causal_conv1d_silu(x, self.weight, self.bias, flip=self.flip, act=act,
                                                 provenance=self.provenance, out_dtype=self.io_dtype)
        out = ref.causal_conv1d_silu(x.float(), self.weight, self.bias, flip=self.flip, act=act)
        return self._out(out) if act is None else (self._out(out[0]), out[1])

    def output_specs(self, x):
        bsz, e, length = x.shape
        return ((tuple(x.shape), self.io_dtype),) + ((((bsz * length, e), torch.int8),) if self.emits_codes else ())

    def source(self) -> str:
        act = _act(self, "a") if self.emits_codes else None
        return _kernels().render_conv(
            width=self.weight.shape[1], bias=self.bias is not None, flip=self.flip, emit_codes=self.emits_codes,
            per_token=bool(act is not None and act.per_token), smooth=bool(act is not None and act.inv_smooth is not None),
            act_bits=act.bits if act is not None else 8, autotune=True, provenance=tuple(self.provenance),
        )


class LoweredScan(LoweredPartition):
    """Selective scan + D skip + SiLU(z) gate; with a :class:`~vmfx.quant.state_quantizer.ScanStateQuant`
    (``state``), the reparameterization factors are folded into u, B, C (:func:`vmfx.ops.reparameterize`)
    and the kernel takes the step ratio, the output factor ``r_C`` and the per-step state step
    sizes (buffers ``r_C``, ``r_L``, ``r_D``, ``state_scales``). With ``gate_smooth`` (buffer
    ``gate_s``, (E,)) the gate is MambaQuant's Smooth-SiLU ``z * sigmoid(s z)``."""

    kind = "scan"

    def __init__(self, name, provenance, backend, softplus: bool, has_D: bool, state=None, flip_z: bool = False,
                 gate_smooth: torch.Tensor | None = None):
        super().__init__(name, provenance, backend)
        self.softplus, self.has_D = softplus, has_D
        self.flip_z = flip_z  # the gate reads z reversed along L (the backward direction's flip, absorbed)
        self.register_buffer("gate_s", None if gate_smooth is None else gate_smooth.detach().float().clone())
        self.reparameterized = state is not None and state.reparameterized
        self.quant_state = state is not None and state.quantize
        self.state_bits = state.bits if state is not None else 8
        if self.reparameterized:
            for name_ in ("r_C", "r_L", "r_D"):
                self.register_buffer(name_, getattr(state, name_).detach().float().clone())
        if self.quant_state:
            self.register_buffer("state_scales", state.scales.detach().float().clone())

    def _state_args(self, u, B, C):
        extra = {}
        if self.reparameterized:
            u, B, C, step, out_scale = reparameterize(u.float(), B.float(), C.float(), self.r_C, self.r_L, self.r_D)
            extra.update(step_scale=step.contiguous(), out_scale=out_scale)
        if self.quant_state:
            extra.update(state_scales=self.state_scales, state_bits=self.state_bits)
        return u, B, C, extra

    @torch.no_grad()
    def compute(self, u, delta, A, B, C, *rest):
        D, z = (rest[0], rest[1]) if self.has_D else (None, rest[0])
        u, B, C, extra = self._state_args(u, B, C)
        f = lambda t: None if t is None else t.float()  # noqa: E731
        if self.backend == "triton":  # activations in the model's dtype; A and D in float32
            return _kernels().selective_scan(u, delta, f(A), B, C, f(D), z, delta_softplus=self.softplus,
                                             flip_z=self.flip_z, provenance=self.provenance,
                                             out_dtype=self.io_dtype, z_smooth=self.gate_s, **extra)
        return self._out(ref.selective_scan(f(u), f(delta), f(A), f(B), f(C), f(D), f(z),
                                            delta_softplus=self.softplus, flip_z=self.flip_z, z_smooth=self.gate_s,
                                            **extra))

    def output_specs(self, u, *rest):
        return ((tuple(u.shape), self.io_dtype),)

    def source(self) -> str:
        return _kernels().render_scan(has_D=self.has_D, has_z=True, delta_softplus=self.softplus, flip_z=self.flip_z,
                                      autotune=True, provenance=tuple(self.provenance),
                                      step_scale=self.reparameterized, out_scale=self.reparameterized,
                                      quant_state=self.quant_state, state_bits=self.state_bits,
                                      smooth_gate=self.gate_s is not None)


class LoweredMerge(LoweredPartition):
    """(y_f + flip(y_b)) * c, token-major (+ the next linear's codes)."""

    kind = "merge"

    def __init__(self, name, provenance, backend, scale: float, consumer: QuantizedLinear | None, write_float: bool):
        super().__init__(name, provenance, backend)
        self.scale = float(scale)
        self.emits_codes = consumer is not None
        self.write_float = write_float or consumer is None
        if consumer is not None:
            _act_buffers(self, "a", input_act_quant(consumer))

    @torch.no_grad()
    def compute(self, y_f, y_b):
        act = _act(self, "a") if self.emits_codes else None
        if self.backend == "triton":
            return _kernels().merge_quantize(y_f, y_b, self.scale, act, write_float=self.write_float,
                                             provenance=self.provenance, out_dtype=self.io_dtype)
        out = ref.merge_quantize(y_f.float(), y_b.float(), self.scale, act)
        if act is None:
            return self._out(out)
        return (self._out(out[0]) if self.write_float else None, out[1])

    def output_specs(self, y_f, y_b):
        bsz, e, length = y_f.shape
        m = ((bsz, length, e), self.io_dtype)
        if not self.emits_codes:
            return (m,)
        return (m if self.write_float else None, ((bsz * length, e), torch.int8))

    def source(self) -> str:
        act = _act(self, "a") if self.emits_codes else None
        return _kernels().render_merge(
            backward=True, write_float=self.write_float, emit_codes=self.emits_codes,
            per_token=bool(act is not None and act.per_token), smooth=bool(act is not None and act.inv_smooth is not None),
            act_bits=act.bits if act is not None else 8, autotune=True, provenance=tuple(self.provenance),
        )


class LoweredHadamardQuantize(LoweredPartition):
    """The online Hadamard of a linear's input and that linear's activation quantize: float in,
    the linear's int8 codes out (:func:`~vmfx.lowering.kernels.hadamard_quantize`); ``x H`` is
    never written. Returns ``(None, codes)`` like a producer that emits codes only."""

    kind = "hadamard"

    def __init__(self, name, provenance, backend, dim: int, consumer: QuantizedLinear):
        super().__init__(name, provenance, backend)
        self.dim = int(dim)
        self.emits_codes = True
        _act_buffers(self, "a", input_act_quant(consumer))

    @torch.no_grad()
    def compute(self, x):
        act = _act(self, "a")
        if self.backend == "triton":
            return None, _kernels().hadamard_quantize(x, act, provenance=self.provenance)
        return None, ref.hadamard_quantize(x, act)

    def output_specs(self, x):
        return (None, ((x.numel() // self.dim, self.dim), torch.int8))

    def source(self) -> str:
        act = _act(self, "a")
        return _kernels().render_hadamard_quantize(
            n=self.dim, per_token=act.per_token, smooth=act.inv_smooth is not None, act_bits=act.bits,
            autotune=True, provenance=tuple(self.provenance))


class LoweredHadamardQLinear(LoweredQLinear):
    """The online Hadamard of a linear's input, its activation quantize and the linear in one
    kernel (:func:`~vmfx.lowering.kernels.hadamard_qlinear`): the rotation and the quantize are the
    prologue of the int8 GEMM, so float rows come in and the linear's output goes out; neither
    ``x H`` nor the codes reach memory. Computes what :class:`LoweredHadamardQuantize` followed by
    a :class:`LoweredQLinear` on its codes computes, bit for bit (both backends).

    Its buffers are :class:`LoweredQLinear`'s: the weight of the rotated input (it absorbed
    ``H^T``) and the rotated input's activation parameters (``a_inv_smooth``, when set, applies
    after the rotation); ``dim`` is the rotated width; ``rotation_partition``: the name the rotation's
    partition has where it runs as a launch of its own (:class:`LoweredHadamardQuantize`), by which
    :func:`vmfx.load` recognises a file written in that form."""

    kind = "hadamard_qlinear"

    def __init__(self, name, provenance, backend, linear: QuantizedLinear, epilogue, token_shape, dim: int,
                 rotation_partition: str):
        super().__init__(name, provenance, backend, linear, epilogue, token_shape, False)
        self.dim = int(dim)
        self.rotation_partition = rotation_partition

    @torch.no_grad()
    def compute(self, x: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
        inputs = {f"extra{i}": e.float().contiguous() for i, e in enumerate(extras)}
        act, weight = _act(self, "a"), self._weight()
        if self.backend == "triton":  # float input in the model's dtype, converted in registers
            return _kernels().hadamard_qlinear(x, weight, act, self.bias, epilogue=self.epilogue,
                                               epilogue_inputs=inputs, provenance=self.provenance,
                                               out_dtype=self.io_dtype)
        return self._out(ref.hadamard_qlinear(x, weight, act, self.bias, epilogue=self.epilogue,
                                              epilogue_inputs=inputs))

    def source(self) -> str:
        act = _act(self, "a")
        return _kernels().render_hadamard_qlinear(
            n=self.dim, per_token=act.per_token, smooth=act.inv_smooth is not None, bias=self.bias is not None,
            act_bits=act.bits, packed=self.w_packed is not None, epilogue=self.epilogue, autotune=True,
            provenance=tuple(self.provenance))


class LoweredQLinearGroup(LoweredPartition):
    """Quantized linears that read the codes of one producer (both directions' ``x_proj`` reading
    :class:`LoweredConvBidir`'s stacked codes) as one grouped GEMM launch. Each group's parameters
    are a :class:`LoweredQLinear` in ``groups`` (its buffers are this module's state); returns the
    stacked (G, B, ..., N) outputs."""

    kind = "qlinear_group"

    def __init__(self, name, provenance, backend, linears: Sequence[QuantizedLinear], token_shape,
                 names: Sequence[str] | None = None):
        super().__init__(name, provenance, backend)
        names = names or [f"{name}.{g}" for g in range(len(linears))]
        self.groups = nn.ModuleList(LoweredQLinear(n, provenance, backend, linear, [], token_shape, True)
                                    for n, linear in zip(names, linears))
        self.token_shape = tuple(token_shape)

    def _params(self):
        return ([g._weight() for g in self.groups], [_act(g, "a") for g in self.groups], [g.bias for g in self.groups])

    @torch.no_grad()
    def compute(self, codes: torch.Tensor) -> torch.Tensor:
        weights, acts, biases = self._params()
        shape = (codes.shape[0], -1) + self.token_shape
        if self.backend == "triton":
            rows_per_image = math.prod(self.token_shape)
            out = _kernels().qlinear_group(codes, weights, acts, biases,
                                           token_shape=(codes.shape[1] // rows_per_image,) + self.token_shape,
                                           provenance=self.provenance, out_dtype=self.io_dtype)
        else:
            out = self._out(ref.qlinear_group(codes, weights, acts, biases))
        return out.reshape(shape + (out.shape[-1],))

    def output_specs(self, codes):
        n = self.groups[0].w_scale.shape[0]
        return (((codes.shape[0], codes.shape[1] // math.prod(self.token_shape)) + self.token_shape + (n,),
                 self.io_dtype),)

    def source(self) -> str:
        weights, acts, biases = self._params()
        return _kernels().render_qlinear_group(per_token=acts[0].per_token, bias=any(b is not None for b in biases),
                                               act_bits=acts[0].bits, packed=weights[0].bits <= 4, autotune=True,
                                               provenance=tuple(self.provenance))


class LoweredConvBidir(LoweredPartition):
    """Both directions' causal depthwise conv1d + SiLU of a bidirectional block in one launch, the
    backward one reading x reversed along L (+ each direction's next-linear codes). Returns the
    stacked (2, B, E, L) outputs (and (2, B*L, E) codes)."""

    kind = "conv_bidir"

    def __init__(self, name, provenance, backend, convs: tuple[nn.Conv1d, nn.Conv1d],
                 consumers: tuple[QuantizedLinear | None, QuantizedLinear | None]):
        super().__init__(name, provenance, backend)
        for d, conv in zip("fb", convs):
            self.register_buffer(f"weight_{d}", conv.weight.detach().float().reshape(conv.weight.shape[0], -1).clone())
            self.register_buffer(f"bias_{d}", None if conv.bias is None else conv.bias.detach().float().clone())
        self.emits_codes = consumers[0] is not None
        if self.emits_codes:
            for d, consumer in zip("fb", consumers):
                _act_buffers(self, f"a_{d}", input_act_quant(consumer))

    def _acts(self):
        return (_act(self, "a_f"), _act(self, "a_b")) if self.emits_codes else (None, None)

    @torch.no_grad()
    def compute(self, x: torch.Tensor):
        act_f, act_b = self._acts()
        if self.backend == "triton":
            return _kernels().causal_conv1d_silu_bidir(x, self.weight_f, self.bias_f, self.weight_b, self.bias_b,
                                                       act_f=act_f, act_b=act_b, provenance=self.provenance,
                                                       out_dtype=self.io_dtype)
        out = ref.causal_conv1d_silu_bidir(x.float(), self.weight_f, self.bias_f, self.weight_b, self.bias_b,
                                           act_f, act_b)
        return self._out(out) if act_f is None else (self._out(out[0]), out[1])

    def scratch_bytes(self, x) -> int:
        return x.numel() * x.element_size()  # each direction reads x (the second read may hit the L2)

    def output_specs(self, x):
        bsz, e, length = x.shape
        out = ((2, bsz, e, length), self.io_dtype)
        return (out,) + ((((2, bsz * length, e), torch.int8),) if self.emits_codes else ())

    def source(self) -> str:
        act_f, act_b = self._acts()
        return _kernels().render_conv_bidir(
            width=self.weight_f.shape[1], bias_f=self.bias_f is not None, bias_b=self.bias_b is not None,
            emit_codes=self.emits_codes, per_token=bool(act_f is not None and act_f.per_token),
            smooth_f=bool(act_f is not None and act_f.inv_smooth is not None),
            smooth_b=bool(act_b is not None and act_b.inv_smooth is not None),
            act_bits=act_f.bits if act_f is not None else 8, autotune=True, provenance=tuple(self.provenance),
        )


class LoweredScanMerge(LoweredPartition):
    """Both scan directions of a bidirectional block, their D skips and SiLU(z) gates (the
    backward one reading z reversed; MambaQuant's Smooth-SiLU with the factors ``gate_s`` when
    given), the merge and the next linear's codes, in one launch."""

    kind = "scan_merge"

    def __init__(self, name, provenance, backend, softplus: bool, has_D: tuple[bool, bool], scale: float,
                 consumer: QuantizedLinear | None, write_float: bool,
                 dt_proj: tuple[QuantizedLinear, QuantizedLinear] | None = None,
                 gate_smooth: torch.Tensor | None = None):
        super().__init__(name, provenance, backend)
        self.softplus, self.has_D, self.scale = softplus, tuple(has_D), float(scale)
        self.register_buffer("gate_s", None if gate_smooth is None else gate_smooth.detach().float().clone())
        self.emits_codes = consumer is not None
        self.write_float = write_float or consumer is None
        if consumer is not None:
            _act_buffers(self, "a", input_act_quant(consumer))
        # each direction's dt_proj inside the launch: its delta slot then carries dt_proj's input
        self.fused_dt_proj = dt_proj is not None
        for d, linear in zip("fb", dt_proj or ()):
            wq = linear.weight_quantizer  # codes kept unpacked (E x R bytes): the scan reads them so
            weight = ref.QWeight.from_float(linear.weight, wq.scale, wq.spec.bits, smooth=linear.smoothing())
            self.register_buffer(f"dt_{d}_w_codes", weight.codes)
            self.register_buffer(f"dt_{d}_w_scale", weight.scale)
            self.register_buffer(f"dt_{d}_w_sum", weight.wsum)
            self.register_buffer(f"dt_{d}_bias", None if linear.bias is None else linear.bias.detach().float().clone())
            setattr(self, f"dt_{d}_w_bits", weight.bits)
            _act_buffers(self, f"dt_{d}_a", input_act_quant(linear))

    def _dt_proj(self, dt_in_f, dt_in_b) -> dict:
        if not self.fused_dt_proj:
            return {}
        out = {}
        for d, dt_in in (("f", dt_in_f), ("b", dt_in_b)):
            g = lambda name: getattr(self, f"dt_{d}_{name}")  # noqa: E731
            out.update({f"dt_in_{d}": dt_in, f"dt_act_{d}": _act(self, f"dt_{d}_a"), f"dt_bias_{d}": g("bias"),
                        f"dt_weight_{d}": ref.QWeight(g("w_codes"), g("w_scale"), g("w_sum"), g("w_bits"))})
        return out

    @torch.no_grad()
    def compute(self, u_f, delta_f, A_f, B_f, C_f, D_f, u_b, delta_b, A_b, B_b, C_b, D_b, z):
        act = _act(self, "a") if self.emits_codes else None
        f = lambda t: None if t is None else t.float()  # noqa: E731
        if self.fused_dt_proj:  # the delta slots hold dt_proj's inputs
            dt = self._dt_proj(delta_f, delta_b)
            delta_f = delta_b = None
        else:
            dt = {}
        if self.backend == "triton":  # activations in the model's dtype; A and D in float32
            return _kernels().scan_merge(u_f, delta_f, f(A_f), B_f, C_f, f(D_f), u_b, delta_b, f(A_b), B_b, C_b,
                                         f(D_b), z, delta_softplus=self.softplus, scale=self.scale, act=act,
                                         write_float=self.write_float, provenance=self.provenance,
                                         out_dtype=self.io_dtype, z_smooth=self.gate_s, **dt)
        dt = {k: (f(v) if k.startswith("dt_in") else v) for k, v in dt.items()}
        out = ref.scan_merge(f(u_f), f(delta_f), f(A_f), f(B_f), f(C_f), f(D_f), f(u_b), f(delta_b), f(A_b),
                             f(B_b), f(C_b), f(D_b), f(z), delta_softplus=self.softplus, scale=self.scale,
                             act=act, write_float=self.write_float, z_smooth=self.gate_s, **dt)
        if act is None:
            return self._out(out)
        return (self._out(out[0]) if self.write_float else None, out[1])

    def scratch_bytes(self, u_f, *rest) -> int:
        # the forward direction's values go to a float32 (B, L, E) workspace and are read back
        return 2 * 4 * u_f.numel()

    def output_specs(self, u_f, *rest):
        bsz, e, length = u_f.shape
        m = ((bsz, length, e), self.io_dtype)
        if not self.emits_codes:
            return (m,)
        return (m if self.write_float else None, ((bsz * length, e), torch.int8))

    def source(self) -> str:
        act = _act(self, "a") if self.emits_codes else None
        return _kernels().render_scan_merge(
            has_D_f=self.has_D[0], has_D_b=self.has_D[1], has_z=True, delta_softplus=self.softplus,
            write_float=self.write_float, emit_codes=self.emits_codes,
            per_token=bool(act is not None and act.per_token), smooth=bool(act is not None and act.inv_smooth is not None),
            act_bits=act.bits if act is not None else 8, autotune=True, provenance=tuple(self.provenance),
            smooth_gate=self.gate_s is not None, **self._dt_flags(),
        )

    def _dt_flags(self) -> dict:
        if not self.fused_dt_proj:
            return {}
        from .kernels.scan_merge import DtProj

        flags = {}
        for d in "fb":
            a = _act(self, f"dt_{d}_a")
            flags[f"dt_proj_{d}"] = DtProj(a.per_token, a.inv_smooth is not None, a.bits,
                                           getattr(self, f"dt_{d}_bias") is not None)
        return flags


class LoweredMixedQLinear(LoweredPartition):
    """OuroMamba's mixed-precision linear: the input quantizer's outlier selection and codes
    (:func:`~vmfx.lowering.mixed_reference.mixed_codes`), then the inlier GEMM + outlier-column GEMM
    (reference or the generated kernel), bias."""

    kind = "mixed_qlinear"

    def __init__(self, name, provenance, backend, info: MixedQLinearInfo):
        super().__init__(name, provenance, backend)
        wq = info.weight_quantizer
        weight = ref.QWeight.from_float(info.weight, wq.scale, wq.spec.bits)
        self.register_buffer("w_codes", weight.codes)
        self.register_buffer("w_scale", weight.scale)
        self.register_buffer("w_sum", weight.wsum)
        self.w_bits = weight.bits
        self.register_buffer("bias", None if info.bias is None else info.bias.detach().float().clone())
        self.quantizer = info.quantizer

    @torch.no_grad()
    def compute(self, x: torch.Tensor) -> torch.Tensor:
        codes = mixed_reference.mixed_codes(x.float(), self.quantizer)
        weight = ref.QWeight(self.w_codes, self.w_scale, self.w_sum, self.w_bits)
        if self.backend == "triton":
            y = _kernels().mixed_qlinear(codes, weight, self.bias, provenance=self.provenance, out_dtype=self.io_dtype)
        else:
            y = self._out(mixed_reference.mixed_qlinear(codes, weight, self.bias))
        return y.reshape(tuple(x.shape[:-1]) + (weight.codes.shape[0],))

    def output_specs(self, x):
        return (((*x.shape[:-1], self.w_scale.shape[0]), self.io_dtype),)

    def source(self) -> str:
        return _kernels().render_mixed_qlinear(bias=self.bias is not None,
                                               wide_outliers=self.quantizer.outlier_bits > 8,
                                               provenance=tuple(self.provenance))


# -- the transform --------------------------------------------------------------------------------


#: partition kind -> ``build(p, backend, linears)``, the module that runs a partition of that kind.
LOWERINGS: dict[str, Callable[[Partition, str, dict], LoweredPartition]] = {}


def register_lowering(kind: str):
    """Decorator: register ``build(p, backend, linears) -> LoweredPartition`` for the partitions of
    ``kind`` (a kind registered with :func:`~vmfx.lowering.partition.register_partition_kind`);
    ``linears`` maps every quantized linear's node to its :class:`QuantizedLinear`."""
    if kind not in PARTITION_KINDS:
        raise ValueError(f"register_lowering: unknown partition kind {kind!r}; register its PartitionInfo first "
                         f"(known: {', '.join(sorted(PARTITION_KINDS))})")

    def decorate(build):
        if LOWERINGS.get(kind, build) is not build:
            raise ValueError(f"partition kind {kind!r} already has a lowering ({LOWERINGS[kind].__qualname__})")
        LOWERINGS[kind] = build
        return build

    return decorate


def _build(p: Partition, backend: str, linears: dict[fx.Node, QuantizedLinear]) -> LoweredPartition:
    build = LOWERINGS.get(p.kind)
    if build is None:
        raise LoweringError(f"partition {p.name}: no lowering is registered for kind {p.kind!r} "
                            "(vmfx.lowering.runtime.register_lowering)")
    return build(p, backend, linears)


def _token_shape(linear: QuantizedLinear) -> tuple:
    meta = linear.source.meta.get("tensor_meta")
    return tuple(meta.shape[1:-1]) if meta is not None else ()


def _consumer_module(p: Partition, linears: dict[fx.Node, QuantizedLinear]) -> QuantizedLinear | None:
    return linears[p.info.consumer] if p.info.consumer is not None else None


def _writes_float(p: Partition, linears: dict[fx.Node, QuantizedLinear]) -> bool:
    """Whether something besides its consumer's codes reads the partition's float output."""
    consumer = p.info.consumer
    return consumer is None or not set(p.output.users) <= set(linears[consumer].nodes) | {consumer}


@register_lowering("qlinear")
def _lower_qlinear(p, backend, linears):
    linear: QuantizedLinear = p.info.module
    return LoweredQLinear(p.name, p.provenance, backend, linear, p.info.epilogue, _token_shape(linear),
                          p.info.codes_from is not None)


@register_lowering("conv")
def _lower_conv(p, backend, linears):
    return LoweredConv(p.name, p.provenance, backend, p.info.module, _consumer_module(p, linears), p.info.flip)


@register_lowering("scan")
def _lower_scan(p, backend, linears):
    return LoweredScan(p.name, p.provenance, backend, p.info.softplus, p.info.has_D, p.info.state, p.info.flip_z,
                       p.info.gate_smooth)


@register_lowering("hadamard")
def _lower_hadamard(p, backend, linears):
    return LoweredHadamardQuantize(p.name, p.provenance, backend, p.info.module.dim, _consumer_module(p, linears))


@register_lowering("hadamard_qlinear")
def _lower_hadamard_qlinear(p, backend, linears):
    linear: QuantizedLinear = p.info.module
    return LoweredHadamardQLinear(p.name, p.provenance, backend, linear, p.info.epilogue, _token_shape(linear),
                                  p.info.rotation.dim, p.info.rotation_node.name)


@register_lowering("merge")
def _lower_merge(p, backend, linears):
    return LoweredMerge(p.name, p.provenance, backend, p.info.scale, _consumer_module(p, linears),
                        _writes_float(p, linears))


@register_lowering("qlinear_group")
def _lower_qlinear_group(p, backend, linears):
    return LoweredQLinearGroup(p.name, p.provenance, backend, p.info.modules, _token_shape(p.info.modules[0]),
                               [n.name for n in p.info.nodes])


@register_lowering("conv_bidir")
def _lower_conv_bidir(p, backend, linears):
    consumers = tuple(linears[c] if c is not None else None for c in p.info.consumers)
    return LoweredConvBidir(p.name, p.provenance, backend, p.info.modules, consumers)


@register_lowering("scan_merge")
def _lower_scan_merge(p, backend, linears):
    return LoweredScanMerge(p.name, p.provenance, backend, p.info.softplus, p.info.has_D, p.info.scale,
                            _consumer_module(p, linears), _writes_float(p, linears), p.info.dt_proj,
                            p.info.gate_smooth)


@register_lowering("mixed_qlinear")
def _lower_mixed_qlinear(p, backend, linears):
    return LoweredMixedQLinear(p.name, p.provenance, backend, p.info)


def lower(qmodel: fx.GraphModule, backend: str = "auto", *, strict: bool = False,
          optimize: bool = True) -> fx.GraphModule:
    """Replace every partition of a converted graph by a lowered module (see module docstring).

    With ``optimize`` (the default) the graph is rewritten first (:mod:`vmfx.lowering.rewrite`):
    parameter-only subgraphs (``-exp(A_log)``, casts of parameters) are folded into buffers
    computed once, and flips along L are moved next to the kernels that read their input reversed,
    which absorb them. ``optimize=False`` lowers the graph as it is (the form of lowered files
    written before the rewrites existed, which :func:`vmfx.load` rebuilds that way).

    Quantizer and smoothing nodes that no kernel pattern takes stay in the graph as fake-quant
    float ops; they are listed in a warning (and in ``result.meta["vmfx_lowered"]["left_float"]``),
    or, with ``strict=True``, raise :class:`~vmfx.errors.LoweringError`. Among them are the
    quantizers of scan operands (``QuantRule("scan.B", ...)``): the scan kernels take float
    operands and read those quantizers' fake-quantized values, so the lowered model still computes
    the quantized graph's function.

    Args:
        qmodel: a quantized graph from :func:`vmfx.compile` / :func:`vmfx.convert` (not modified).
        backend: "triton", "reference" or "auto" (Triton on a GPU, the reference elsewhere).
        strict: fail instead of warning when a quantized node is left in float.
        optimize: run the rewrites above before partitioning.

    Returns:
        A new GraphModule; ``lowered_partitions(result)`` lists its partitions. The converted
        model it came from is kept in ``result.meta["vmfx_unlowered"]`` (``vmfx.save`` writes that
        one and ``vmfx.load`` lowers it again).
    """
    backend = resolve_backend(backend)
    check_backend_runs(backend)
    if not isinstance(qmodel, fx.GraphModule) or "vmfx_source_type" not in qmodel.meta:
        raise ConfigError("vmfx.lowering.lower expects a quantized model from vmfx.compile / vmfx.convert"
                          + lost_metadata_hint(qmodel))
    if qmodel.meta.get("vmfx_lowered"):
        raise ConfigError("this model is already lowered; lower the quantized model returned by vmfx.compile "
                          "without a backend")
    gm = copy.deepcopy(qmodel)
    gm.meta.update({k: v for k, v in qmodel.meta.items() if k not in gm.meta})
    folded = []
    if optimize:
        folded = fold_parameter_constants(gm)
        sink_flips(gm)
    parts = find_partitions(gm)
    if not parts:
        raise ConfigError("nothing to lower: the graph has no quantized linear, conv or scan partition")
    left = unlowered_quantizers(gm, parts)
    if left:
        names = ", ".join(_describe_left(n) for n in left)
        message = (f"lowering leaves {len(left)} quantized node(s) in float (fake-quant torch ops; no kernel "
                   f"pattern matches their spec or structure): {names}")
        if strict:
            raise LoweringError(message + "; use lower(..., strict=False) to accept this")
        warnings.warn(message, stacklevel=2)
    linears = {p.info.node: p.info.module for p in parts if p.kind == "qlinear"}
    linears.update({n: m for p in parts if p.kind == "qlinear_group" for n, m in zip(p.info.nodes, p.info.modules)})
    codes_for: dict[fx.Node, fx.Node] = {}  # a linear node -> the codes its producer partition emits
    replaced: dict[fx.Node, fx.Node] = {}  # a partition's old output node -> its new value node
    graph = gm.graph
    for p in parts:
        module = _build(p, backend, linears)
        path = f"{LOWERED_PREFIX}.{p.name}"
        gm.add_submodule(path, module)
        inputs = [replaced.get(n, n) if isinstance(n, fx.Node) else n for n in p.inputs]
        codes_key = p.info.codes_key()
        if codes_key is not None:
            inputs[0] = codes_for[codes_key]  # the codes a producer partition emits for this one
        with graph.inserting_before(p.output):
            call = graph.call_module(path, tuple(inputs))
            blocks = {a.block for n in p.nodes if (a := annotation(n)) is not None and a.block is not None}
            annotate(call, "kernel", block=blocks.pop() if len(blocks) == 1 else None,
                     extra={"kind": p.kind, "replaces": [n.name for n in p.nodes], "layers": kernel_layers(p)})
            if "nn_module_stack" in p.output.meta:  # where it came from (launch plans place it in its block)
                call.meta["nn_module_stack"] = dict(p.output.meta["nn_module_stack"])
            getitem = lambda value, i: graph.call_function(operator.getitem, (value, i))  # noqa: E731
            values = p.info.wire_outputs(p, call, getattr(module, "emits_codes", False), codes_for, getitem)
        for old, value in values.items():
            value.meta["tensor_meta"] = old.meta.get("tensor_meta")
            old.replace_all_uses_with(value)
            replaced[old] = value
        for node in reversed(p.nodes):
            if node.users:
                raise RuntimeError(f"partition {p.name}: node {node.name} still has users {list(node.users)}")
            graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    graph.lint()
    gm.recompile()
    gm.meta["vmfx_lowered"] = {"backend": backend, "partitions": [p.kind for p in parts],
                                "left_float": [n.name for n in left], "optimized": bool(optimize),
                                "folded": folded}
    gm.meta["vmfx_unlowered"] = qmodel
    return gm.eval()


def kernel_layers(p: Partition) -> list[dict]:
    """What one partition computes, for inspection once its nodes are gone (a lowered model loaded
    from a file keeps no quantized graph): one JSON-friendly record per linear, conv and scan it
    replaces, ``{"node", "kind", "role", "direction", "input", "weight"}``, where ``input`` /
    ``weight`` describe a linear's quantized edges (``QuantSpec.describe()``; None: float),
    ``state`` a scan's quantized hidden state and ``operands`` its quantized operands
    (:func:`vmfx.passes.scan_operands.quantized_operands`: their quantizers stay in the graph,
    before the kernel), ``rotated`` the rotations a linear's weight absorbed (when any); an online
    Hadamard the kernel applies is a record of kind ``"rotation"`` (``rotation``: what it is).
    :func:`vmfx.inspect.summary`, ``table`` and ``coverage`` read them from the kernel node's
    annotation (``extra["layers"]``)."""
    import torch.nn.functional as F

    from ..passes.linear_edges import linear_edges
    from ..passes.patterns import is_linear, is_scan
    from ..passes.scan_operands import quantized_operands
    from ..quant.mixed import MixedPrecisionQuantize

    out = []
    for node in p.nodes:
        ann = annotation(node)
        role = ann.role if ann is not None else ""
        direction = ann.direction if ann is not None else None
        if is_linear(node):
            edges = linear_edges(node)
            specs = {}
            for edge in ("input", "weight"):
                q = edges.quantizer(edge)
                if isinstance(q, MixedPrecisionQuantize):  # OuroMamba: inliers + outlier channels
                    specs[edge] = q.describe()
                else:
                    spec = getattr(q, "spec", None)
                    specs[edge] = spec.describe() if spec is not None else None
            record = {"node": node.name, "kind": "linear", "role": role, "direction": direction, **specs}
            if ann is not None and ann.extra.get("rotated"):  # rotations its weight absorbed
                record["rotated"] = ann.extra["rotated"]
            out.append(record)
        elif role == "rotation":  # an online Hadamard the kernel applies
            out.append({"node": node.name, "kind": "rotation", "role": role, "direction": direction,
                        "rotation": ann.extra.get("rotated")})
        elif is_scan(node) or role == "scan":
            state = scan_state_of(node) if node.op == "call_function" else None
            out.append({"node": node.name, "kind": "scan", "role": role, "direction": direction,
                        "state": state.describe() if state is not None and state.quantize else None,
                        "operands": quantized_operands(node)})
        elif (node.op == "call_function" and node.target in (F.conv1d, F.conv2d)) or (
                node.op == "call_module" and isinstance(node.graph.owning_module.get_submodule(node.target),
                                                        (nn.Conv1d, nn.Conv2d))):
            out.append({"node": node.name, "kind": "conv", "role": role, "direction": direction})
    return out


def _describe_left(node: fx.Node) -> str:
    state = scan_state_of(node) if node.op == "call_function" else None
    if state is not None:
        return f"{node.name} [scan with {state.describe()}: no scan partition matched]"
    ann = annotation(node)
    module = node.graph.owning_module.get_submodule(node.target)
    spec = getattr(module, "spec", None)
    what = spec.describe() if spec is not None else type(module).__name__
    serves = f" of {ann.extra.get('quantizes')} ({ann.extra.get('edge')})" if ann is not None and ann.extra.get("quantizes") else ""
    if ann is not None and str(ann.extra.get("edge", "")).startswith("scan."):
        serves += ": the scan kernels read float operands, so it runs as a fake-quant op before the kernel"
    return f"{node.name} [{what}{serves}]"


def lowered_partitions(gm: fx.GraphModule) -> list[LoweredPartition]:
    """The lowered partitions of ``gm``, in graph order."""
    return [gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), LoweredPartition)]


def show(gm: fx.GraphModule, file=None) -> str:
    """Print (and return) the Triton source of every lowered partition's kernel, in graph order."""
    parts = lowered_partitions(gm)
    if not parts:
        raise ConfigError("this graph has no lowered partitions: call vmfx.lowering.lower(qmodel) first")
    text = "\n\n".join(f"# ===== {p.partition_name} ({p.kind}, backend={p.backend}) =====\n{p.source()}" for p in parts)
    print(text, file=file)
    return text


def lost_metadata_hint(module) -> str:
    """A sentence to add to "expects a quantized model" errors when ``module`` is a quantized
    GraphModule without vmfx's metadata: what ``torch.save`` / pickling leaves (fx pickles only the
    generated code and re-traces it on load, dropping ``meta`` and every node annotation)."""
    if not isinstance(module, fx.GraphModule) or module.meta.get("vmfx_source_type"):
        return ""
    if not any(isinstance(m, (FakeQuantize, LoweredPartition)) for m in module.modules()):
        return ""
    return ("; this GraphModule has quantizers but none of vmfx's metadata, as after torch.save / pickle "
            "(fx keeps only the code): it still runs, but keep quantized models with vmfx.save(qmodel, path) "
            "and vmfx.load(path) to inspect, lower or save them again")
