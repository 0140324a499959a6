"""Lowered modules and the ``lower`` transform: partitions become calls to generated kernels.

``lower(qmodel, backend)`` copies a converted graph, finds its partitions
(:func:`~vmfx.lowering.partition.find_partitions`), and replaces each by one ``call_module`` node
calling a :class:`LoweredPartition` that holds the integer weights and the quantization
parameters prepared once (:class:`~vmfx.lowering.reference.QWeight`,
:class:`~vmfx.lowering.reference.ActQuant`) and runs either

* ``backend="triton"``: the generated Triton kernel (on a GPU, or under ``TRITON_INTERPRET=1`` on
  a CPU, slowly: that is how the tests run them), or
* ``backend="reference"``: the exact torch integer reference (:mod:`vmfx.lowering.reference`),
  vmfx's CPU backend and the kernels' test oracle.

A producer partition that feeds a quantized linear (the conv feeding ``x_proj``, the merge feeding
``out_proj``) also emits that linear's int8 codes, and the linear's GEMM reads them directly.
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

Invariants: the quantized model passed in is not modified; the lowered graph computes what the
fake-quant graph computes up to the documented rounding differences (an activation code may
differ by one step within an ulp of a rounding tie); node names outside partitions are kept.
"""

from __future__ import annotations

import copy
import operator
import warnings
from typing import Sequence

import torch
import torch.fx as fx
from torch import nn

from ..annotations import annotate, annotation
from ..errors import ConfigError, LoweringError
from ..ops.selective_scan import reparameterize
from ..quant.scan_state import scan_state_of
from . import reference as ref
from .partition import Partition, QuantizedLinear, find_partitions, unlowered_quantizers

__all__ = [
    "BACKENDS",
    "resolve_backend",
    "LoweredPartition",
    "LoweredQLinear",
    "LoweredConv",
    "LoweredScan",
    "LoweredMerge",
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


def _kernels():
    from . import kernels  # imported lazily: rendering/launching needs triton

    return kernels


#: The activation dtypes a lowered partition reads and writes (the kernels' float I/O dtypes).
IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
    def forward(self, x: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
        if self.takes_codes and x.dim() == 2:
            x = x.reshape((-1,) + self.token_shape + (x.shape[-1],))
        inputs = {f"extra{i}": e.float().contiguous() for i, e in enumerate(extras)}
        act, weight = _act(self, "a"), self._weight()
        if self.backend == "triton":  # float input in the model's dtype, converted in registers
            return _kernels().qlinear(x, weight, act, self.bias, epilogue=self.epilogue, epilogue_inputs=inputs,
                                      provenance=self.provenance, out_dtype=self.io_dtype)
        x = x if self.takes_codes else x.float()
        return self._out(ref.qlinear(x, weight, act, self.bias, epilogue=self.epilogue, epilogue_inputs=inputs))

    def source(self) -> str:
        act = _act(self, "a")
        return _kernels().render_qlinear(
            per_token=act.per_token, smooth=act.inv_smooth is not None and not self.takes_codes,
            bias=self.bias is not None, prequantized=self.takes_codes, act_bits=act.bits,
            epilogue=self.epilogue, autotune=True, provenance=tuple(self.provenance),
        )


class LoweredConv(LoweredPartition):
    """Causal depthwise conv1d + SiLU (+ the next linear's codes)."""

    kind = "conv"

    def __init__(self, name, provenance, backend, conv: nn.Conv1d, consumer: QuantizedLinear | None):
        super().__init__(name, provenance, backend)
        self.register_buffer("weight", conv.weight.detach().float().reshape(conv.weight.shape[0], -1).clone())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().float().clone())
        self.emits_codes = consumer is not None
        if consumer is not None:
            _act_buffers(self, "a", input_act_quant(consumer))

    @torch.no_grad()
    def forward(self, x: torch.Tensor):
        act = _act(self, "a") if self.emits_codes else None
        if self.backend == "triton":
            return _kernels().causal_conv1d_silu(x, self.weight, self.bias, act=act, provenance=self.provenance,
                                                 out_dtype=self.io_dtype)
        out = ref.causal_conv1d_silu(x.float(), self.weight, self.bias, act=act)
        return self._out(out) if act is None else (self._out(out[0]), out[1])

    def source(self) -> str:
        act = _act(self, "a") if self.emits_codes else None
        return _kernels().render_conv(
            width=self.weight.shape[1], bias=self.bias is not None, flip=False, emit_codes=self.emits_codes,
            per_token=bool(act is not None and act.per_token), smooth=bool(act is not None and act.inv_smooth is not None),
            act_bits=act.bits if act is not None else 8, autotune=True, provenance=tuple(self.provenance),
        )


class LoweredScan(LoweredPartition):
    """Selective scan + D skip + SiLU(z) gate; with a :class:`~vmfx.quant.scan_state.ScanStateQuant`
    (``state``), the reparameterization factors are folded into u, B, C (:func:`vmfx.ops.reparameterize`)
    and the kernel takes the step ratio, the output factor ``r_C`` and the per-step state step
    sizes (buffers ``r_C``, ``r_L``, ``r_D``, ``state_scales``)."""

    kind = "scan"

    def __init__(self, name, provenance, backend, softplus: bool, has_D: bool, state=None):
        super().__init__(name, provenance, backend)
        self.softplus, self.has_D = softplus, has_D
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
    def forward(self, u, delta, A, B, C, *rest):
        D, z = (rest[0], rest[1]) if self.has_D else (None, rest[0])
        u, B, C, extra = self._state_args(u, B, C)
        f = lambda t: None if t is None else t.float()  # noqa: E731
        if self.backend == "triton":  # activations in the model's dtype; A and D in float32
            return _kernels().selective_scan(u, delta, f(A), B, C, f(D), z, delta_softplus=self.softplus,
                                             provenance=self.provenance, out_dtype=self.io_dtype, **extra)
        return self._out(ref.selective_scan(f(u), f(delta), f(A), f(B), f(C), f(D), f(z),
                                            delta_softplus=self.softplus, **extra))

    def source(self) -> str:
        return _kernels().render_scan(has_D=self.has_D, has_z=True, delta_softplus=self.softplus,
                                      autotune=True, provenance=tuple(self.provenance),
                                      step_scale=self.reparameterized, out_scale=self.reparameterized,
                                      quant_state=self.quant_state, state_bits=self.state_bits)


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
    def forward(self, y_f, y_b):
        act = _act(self, "a") if self.emits_codes else None
        if self.backend == "triton":
            return _kernels().merge_quantize(y_f, y_b, self.scale, act, write_float=self.write_float,
                                             provenance=self.provenance, out_dtype=self.io_dtype)
        out = ref.merge_quantize(y_f.float(), y_b.float(), self.scale, act)
        if act is None:
            return self._out(out)
        return (self._out(out[0]) if self.write_float else None, out[1])

    def source(self) -> str:
        act = _act(self, "a") if self.emits_codes else None
        return _kernels().render_merge(
            backward=True, write_float=self.write_float, emit_codes=self.emits_codes,
            per_token=bool(act is not None and act.per_token), smooth=bool(act is not None and act.inv_smooth is not None),
            act_bits=act.bits if act is not None else 8, autotune=True, provenance=tuple(self.provenance),
        )


class LoweredMixedQLinear(LoweredPartition):
    """OuroMamba's mixed-precision linear: the input quantizer's outlier selection and codes
    (:func:`~vmfx.lowering.reference.mixed_codes`), then the inlier GEMM + outlier-column GEMM
    (reference or the generated kernel), bias."""

    kind = "mixed_qlinear"

    def __init__(self, name, provenance, backend, info: dict):
        super().__init__(name, provenance, backend)
        wq = info["weight_quantizer"]
        weight = ref.QWeight.from_float(info["weight"], wq.scale, wq.spec.bits)
        self.register_buffer("w_codes", weight.codes)
        self.register_buffer("w_scale", weight.scale)
        self.register_buffer("w_sum", weight.wsum)
        self.w_bits = weight.bits
        self.register_buffer("bias", None if info["bias"] is None else info["bias"].detach().float().clone())
        self.quantizer = info["quantizer"]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = ref.mixed_codes(x.float(), self.quantizer)
        weight = ref.QWeight(self.w_codes, self.w_scale, self.w_sum, self.w_bits)
        if self.backend == "triton":
            y = _kernels().mixed_qlinear(codes, weight, self.bias, provenance=self.provenance, out_dtype=self.io_dtype)
        else:
            y = self._out(ref.mixed_qlinear(codes, weight, self.bias))
        return y.reshape(tuple(x.shape[:-1]) + (weight.codes.shape[0],))

    def source(self) -> str:
        return _kernels().render_mixed_qlinear(bias=self.bias is not None,
                                               wide_outliers=self.quantizer.outlier_bits > 8,
                                               provenance=tuple(self.provenance))


# -- the transform --------------------------------------------------------------------------------


def _build(gm: fx.GraphModule, p: Partition, backend: str, linears: dict[fx.Node, QuantizedLinear]) -> LoweredPartition:
    if p.kind == "qlinear":
        linear: QuantizedLinear = p.info["module"]
        meta = linear.source.meta.get("tensor_meta")
        token_shape = tuple(meta.shape[1:-1]) if meta is not None else ()
        return LoweredQLinear(p.name, p.provenance, backend, linear, p.info["epilogue"], token_shape,
                              p.info["codes_from"] is not None)
    consumer = p.info.get("consumer")
    consumer_module = linears[consumer] if consumer is not None else None
    if p.kind == "conv":
        return LoweredConv(p.name, p.provenance, backend, p.info["module"], consumer_module)
    if p.kind == "scan":
        return LoweredScan(p.name, p.provenance, backend, p.info["softplus"], p.info["has_D"], p.info.get("state"))
    if p.kind == "merge":
        only_consumer = consumer is not None and set(p.output.users) == {consumer}
        return LoweredMerge(p.name, p.provenance, backend, p.info["scale"], consumer_module, not only_consumer)
    if p.kind == "mixed_qlinear":  # OuroMamba (issue 11)
        return LoweredMixedQLinear(p.name, p.provenance, backend, p.info)
    raise ValueError(f"unknown partition kind {p.kind!r}")


def lower(qmodel: fx.GraphModule, backend: str = "auto", *, strict: bool = False) -> fx.GraphModule:
    """Replace every partition of a converted graph by a lowered module (see module docstring).

    Quantizer and smoothing nodes that no kernel pattern takes stay in the graph as fake-quant
    float ops; they are listed in a warning (and in ``result.meta["vmfx_lowered"]["left_float"]``),
    or, with ``strict=True``, raise :class:`~vmfx.errors.LoweringError`.

    Args:
        qmodel: a quantized graph from :func:`vmfx.compile` / :func:`vmfx.convert` (not modified).
        backend: "triton", "reference" or "auto" (Triton on a GPU, the reference elsewhere).
        strict: fail instead of warning when a quantized node is left in float.

    Returns:
        A new GraphModule; ``lowered_partitions(result)`` lists its partitions. The converted
        model it came from is kept in ``result.meta["vmfx_unlowered"]`` (``vmfx.save`` writes that
        one and ``vmfx.load`` lowers it again).
    """
    backend = resolve_backend(backend)
    if not isinstance(qmodel, fx.GraphModule) or "vmfx_source_type" not in qmodel.meta:
        from ..serialize import lost_metadata_hint

        raise ConfigError("vmfx.lowering.lower expects a quantized model from vmfx.compile / vmfx.convert"
                          + lost_metadata_hint(qmodel))
    if qmodel.meta.get("vmfx_lowered"):
        raise ConfigError("this model is already lowered; lower the quantized model returned by vmfx.compile "
                          "without a backend")
    gm = copy.deepcopy(qmodel)
    gm.meta.update({k: v for k, v in qmodel.meta.items() if k not in gm.meta})
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
    linears = {p.info["node"]: p.info["module"] for p in parts if p.kind == "qlinear"}
    codes_of: dict[int, fx.Node] = {}
    replaced: dict[fx.Node, fx.Node] = {}  # a partition's old output node -> its new value node
    graph = gm.graph
    for p in parts:
        module = _build(gm, p, backend, linears)
        path = f"{LOWERED_PREFIX}.{p.name}"
        gm.add_submodule(path, module)
        inputs = [replaced.get(n, n) for n in p.inputs]
        producer = p.info.get("codes_from") if p.kind == "qlinear" else None
        if producer is not None:
            inputs[0] = codes_of[id(producer)]
        with graph.inserting_before(p.output):
            call = graph.call_module(path, tuple(inputs))
            annotate(call, "kernel", extra={"kind": p.kind, "replaces": [n.name for n in p.nodes]})
            if p.kind in ("conv", "merge") and getattr(module, "emits_codes", False):
                value = graph.call_function(operator.getitem, (call, 0))
                codes_of[id(p)] = graph.call_function(operator.getitem, (call, 1))
            else:
                value = call
        value.meta["tensor_meta"] = p.output.meta.get("tensor_meta")
        p.output.replace_all_uses_with(value)
        replaced[p.output] = value
        for node in reversed(p.nodes):
            if node.users:
                raise RuntimeError(f"partition {p.name}: node {node.name} still has users {list(node.users)}")
            graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    graph.lint()
    gm.recompile()
    gm.meta["vmfx_lowered"] = {"backend": backend, "partitions": [p.kind for p in parts],
                                "left_float": [n.name for n in left]}
    gm.meta["vmfx_unlowered"] = qmodel
    return gm.eval()


def _describe_left(node: fx.Node) -> str:
    state = scan_state_of(node) if node.op == "call_function" else None
    if state is not None:
        return f"{node.name} [scan with {state.describe()}: no scan partition matched]"
    ann = annotation(node)
    module = node.graph.owning_module.get_submodule(node.target)
    spec = getattr(module, "spec", None)
    what = spec.describe() if spec is not None else type(module).__name__
    serves = f" of {ann.extra.get('quantizes')} ({ann.extra.get('edge')})" if ann is not None and ann.extra.get("quantizes") else ""
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
