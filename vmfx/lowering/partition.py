"""``partition``: group a converted (quantized) graph into the fused subgraphs vmfx lowers.

The kinds of partition, found by structure on the annotated graph (one more, ``mixed_qlinear``,
is OuroMamba's mixed-precision linear: its input quantizer, weight quantizer and the linear, run
as the inlier GEMM + outlier-column GEMM of :mod:`vmfx.lowering.kernels.mixed_linear`):

* ``qlinear``: the pattern ``[smooth] -> quantize(act) -> F.linear(., quantize([smooth](W)), b)``
  (producer -> quantize -> consumer), with a static asymmetric per-token or per-tensor activation
  quantizer and a static symmetric per-channel weight quantizer: smoothing + quantize + integer
  GEMM + dequantize with token x channel scales + bias, extended by the chain of elementwise nodes
  that alone consume its output (its *epilogue*: SiLU, softplus, arithmetic with constants or with
  a tensor of the output's shape, e.g. the residual add after ``out_proj``). When its input is
  produced by a ``conv`` or ``merge`` partition, that partition emits the quantized codes and the
  GEMM reads them directly.
* ``conv``: causal depthwise conv1d + crop + SiLU (role ``conv1d`` / ``conv_act``), also
  quantizing its output for the ``x_proj`` that reads it.
* ``scan``: the selective scan with its D skip and the SiLU(z) gate (roles ``scan`` / ``gate``), or
  MambaQuant's Smooth-SiLU gate ``z * sigmoid(s z)`` (:class:`~vmfx.quant.smooth_silu.SmoothSiLU`
  over the channel dim of the (B, E, L) gate; its factors go to the kernel).
* ``merge``: the sum of a mixer's two scan directions (the backward one flipped back), the
  division, and the transpose to tokens-major, quantized for the ``out_proj`` that reads it.
* ``hadamard_qlinear``: an online Hadamard node (:class:`~vmfx.quant.online_hadamard.OnlineHadamard`)
  read only by the input quantizer of a static quantized linear, with that linear and its
  epilogue: the rotation and the quantize run as the prologue of the linear's int8 GEMM, one
  kernel, where the width allows it (:func:`~vmfx.quant.online_hadamard.fits_gemm_prologue`:
  ``2^k m`` with int8 dots at least 32 deep, e.g. Vim's 192, 384, 768). The ``merge`` before it then writes its
  float output (the rotation mixes channels, so the merge cannot quantize).
* ``hadamard``: such a node at a width the GEMM prologue does not take (e.g. 48 = 12 x 4): the
  rotation and the quantize in a kernel of their own, which emits the linear's codes (the
  ``qlinear`` partition's GEMM reads them); one more launch.

Both directions of a bidirectional block, once :mod:`vmfx.lowering.rewrite` has moved the backward
direction's flips next to their readers (the conv's ``flip``, the scan's ``flip_z``), are paired
(:func:`find_partitions`' ``pair_directions``):

* ``conv_bidir``: a forward conv and a conv reading the same input reversed, one launch;
* ``qlinear_group``: the two linears reading a ``conv_bidir``'s codes (both ``x_proj``), one grouped GEMM;
* ``scan_merge``: a ``merge`` of a forward and a backward scan (float hidden states), one launch,
  which also takes in each direction's ``dt_proj`` when delta is ``dt_proj``'s output transposed.

A partition records the FX nodes it replaces (provenance), its external inputs (in order) and the
node whose value it produces. Nodes in no partition (norms, views, the patch embedding, the head)
stay as they are. This module only *finds* partitions; :mod:`vmfx.lowering.runtime` replaces them.
:func:`unlowered_quantizers` lists the quantizer nodes no partition takes (they stay fake-quant
in float), so that lowering never drops quantization silently.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..annotations import annotation
from ..passes.linear_edges import linear_edges
from ..passes.patterns import is_flip, is_silu, is_softplus, is_transparent, module_of, single_user
from ..quant.mixed import MixedPrecisionQuantize
from ..quant.online_hadamard import FAST_BASES, OnlineHadamard, fits_gemm_prologue
from ..quant.smooth_silu import SmoothSiLU
from ..quant.modules import FakeQuantize, Smooth
from ..quant.state_quantizer import scan_state_of
from .rewrite import flip_dims

__all__ = ["Partition", "PartitionInfo", "EmitsCodesFor", "PARTITION_KINDS", "register_partition_kind",
           "QLinearInfo", "ConvInfo", "ScanInfo", "MergeInfo", "HadamardInfo", "HadamardQLinearInfo", "MixedQLinearInfo", "ConvBidirInfo",
           "ScanMergeInfo", "QLinearGroupInfo", "QuantizedLinear", "find_partitions", "unlowered_quantizers",
           "EPILOGUE_OPS"]

#: FX targets an epilogue may hold, mapped to the op names of the code generator.
EPILOGUE_OPS = {
    operator.add: "add",
    operator.sub: "sub",
    operator.mul: "mul",
    operator.truediv: "div",
    torch.add: "add",
    torch.mul: "mul",
}


class PartitionInfo:
    """What the code generator needs to know of one partition kind; one dataclass per kind.

    A kind is registered with :func:`register_partition_kind` (its ``kind`` name, unique) and
    :func:`vmfx.lowering.runtime.register_lowering` (the module that runs it). Subclasses say how
    their lowered module's outputs replace the partition's (:meth:`wire_outputs`) and where it
    reads a producer's codes from (:meth:`codes_key`).
    """

    kind: ClassVar[str] = ""

    def codes_key(self) -> Any:
        """The key under which a producer registered the codes this partition reads as its first
        input, or None where it reads its inputs as they are."""
        return None

    def wire_outputs(self, p: "Partition", call: fx.Node, emits_codes: bool, codes_for: dict,
                     getitem: Callable[[fx.Node, int], fx.Node]) -> dict[fx.Node, fx.Node]:
        """``{old output node: the node that takes its value}``, read off the lowered ``call``;
        codes the partition emits for a linear go to ``codes_for`` (keyed by the linear's node)."""
        return {p.output: call}


class EmitsCodesFor(PartitionInfo):
    """A kind whose kernel may also emit the int codes of the one quantized linear it feeds
    (``consumer``): its call then returns ``(float output, codes)``."""

    consumer: fx.Node | None

    def wire_outputs(self, p, call, emits_codes, codes_for, getitem):
        if not emits_codes:
            return {p.output: call}
        codes_for[self.consumer] = getitem(call, 1)
        return {p.output: getitem(call, 0)}


#: kind name -> its PartitionInfo class (built-in kinds and those a plug-in registers).
PARTITION_KINDS: dict[str, type[PartitionInfo]] = {}


def register_partition_kind(cls: type[PartitionInfo]) -> type[PartitionInfo]:
    """Class decorator: register a :class:`PartitionInfo` subclass under its ``kind``."""
    if not (isinstance(cls, type) and issubclass(cls, PartitionInfo)) or not cls.kind:
        raise TypeError(f"register_partition_kind takes a PartitionInfo subclass with a 'kind' name, got {cls!r}")
    if PARTITION_KINDS.get(cls.kind, cls) is not cls:
        raise ValueError(f"partition kind {cls.kind!r} is already registered by {PARTITION_KINDS[cls.kind].__name__}")
    PARTITION_KINDS[cls.kind] = cls
    return cls


@dataclass
class Partition:
    """One fused subgraph.

    Attributes:
        name: a readable unique name (from the anchor node).
        nodes: the FX nodes it replaces, in graph order (their names are the kernel's provenance).
        inputs: external input nodes, in the order the lowered module takes them.
        output: the node whose value the partition computes (its users are rewired to it).
        info: the kind's typed facts (a registered :class:`PartitionInfo`: modules, epilogue ops,
            flags) for code generation.
    """

    name: str
    nodes: list[fx.Node]
    inputs: list[fx.Node]
    output: fx.Node
    info: PartitionInfo

    def __post_init__(self):
        if PARTITION_KINDS.get(type(self.info).kind) is not type(self.info):
            raise TypeError(f"partition {self.name}: {type(self.info).__name__} is not a registered partition kind "
                            "(decorate it with register_partition_kind)")

    @property
    def kind(self) -> str:
        """``"qlinear"``, ``"conv"``, ``"scan"``, ``"merge"``, ``"hadamard"``, ``"hadamard_qlinear"``, ``"mixed_qlinear"``,
        ``"conv_bidir"``, ``"qlinear_group"``, ``"scan_merge"`` or a plug-in's kind."""
        return self.info.kind

    @property
    def provenance(self) -> list[str]:
        return [f"{n.name} ({n.op} {_target(n)})" for n in self.nodes]


def _target(n: fx.Node) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _role(n: fx.Node) -> str | None:
    ann = annotation(n)
    return ann.role if ann is not None else None


# -- qlinear --------------------------------------------------------------------------------------


@dataclass
class QuantizedLinear:
    """What a ``qlinear`` kernel needs of one matched linear, read off its graph nodes.

    Attributes:
        weight, bias: the float (unsmoothed) weight and the bias of the ``nn.Linear``.
        input_quantizer, weight_quantizer: the static quantizer modules of its two edges.
        smooth: the smoothing module, or None.
        smooth_input: the input edge still divides by ``s`` (not folded into its producer).
        nodes: the inserted nodes the partition takes (smoothing, quantizers).
        source: the value entering the input edge.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    input_quantizer: FakeQuantize
    weight_quantizer: FakeQuantize
    smooth: Smooth | None
    smooth_input: bool
    nodes: list[fx.Node]
    source: fx.Node

    def smoothing(self) -> torch.Tensor | None:
        return None if self.smooth is None else self.smooth.value()


def _static_quantlinear(node: fx.Node) -> QuantizedLinear | None:
    """Match ``[smooth] -> quantize(act) -> F.linear(., quantize([smooth](W)), b)`` at ``node``."""
    if not (node.op == "call_function" and node.target is F.linear):
        return None
    edges = linear_edges(node)
    iq, wq = edges.quantizer("input"), edges.quantizer("weight")
    if not isinstance(iq, FakeQuantize) or not isinstance(wq, FakeQuantize) or edges.weight_attr is None:
        return None
    if not iq.enabled or not wq.enabled:
        return None
    if isinstance(iq, MixedPrecisionQuantize):  # OuroMamba's dynamic outliers: not this kernel's numerics
        return None
    if iq.spec.dynamic or iq.spec.symmetric or iq.spec.granularity not in ("token", "tensor"):
        return None
    layout = getattr(iq, "layout", None)  # the kernels read (batch, tokens, K): one token dim just before K
    if iq.spec.granularity == "token" and layout is not None and (
            layout.token_dims != (layout.ndim - 2,) or layout.merged_batch):
        return None  # e.g. a (B, H, W, C) token grid (VMamba's in_proj): stays a fake-quant torch op
    if wq.spec.granularity != "channel" or not wq.spec.symmetric:
        return None
    for inserted in (edges.act_quant, edges.act_smooth):
        if inserted is not None and len(inserted.users) != 1:
            return None
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return None
    module = edges.linear_module(node.graph.owning_module)
    return QuantizedLinear(module.weight, module.bias, iq, wq, edges.smooth_module(), edges.act_smooth is not None,
                           edges.inserted, edges.source)


def _epilogue(node: fx.Node) -> tuple[list[tuple], list[fx.Node], list[fx.Node]]:
    """Elementwise nodes that alone consume ``node``'s value: (ops, nodes, extra tensor inputs)."""
    ops, nodes, extra = [], [], []
    out_meta = node.meta.get("tensor_meta")
    current = node
    while True:
        user = single_user(current)
        if user is None or user.op not in ("call_function", "call_module"):
            break
        if is_silu(user) and user.op == "call_function":
            ops.append(("silu",))
        elif is_softplus(user) and user.op == "call_function" and len(user.args) == 1 and not user.kwargs:
            ops.append(("softplus",))
        elif user.op == "call_function" and user.target in EPILOGUE_OPS and len(user.args) == 2 and not user.kwargs:
            a, b = user.args
            other = b if a is current else a
            if a is not current and user.target in (operator.sub, operator.truediv):
                break  # c - acc, c / acc: not an epilogue of acc
            if isinstance(other, (int, float)):
                ops.append((EPILOGUE_OPS[user.target], float(other)))
            elif isinstance(other, fx.Node) and _same_shape(other, out_meta):
                ops.append((EPILOGUE_OPS[user.target], f"extra{len(extra)}"))
                extra.append(other)
            else:
                break
        else:
            break
        nodes.append(user)
        current = user
    return ops, nodes, extra


def _same_shape(other: fx.Node, meta) -> bool:
    m = other.meta.get("tensor_meta")
    return meta is not None and m is not None and tuple(m.shape) == tuple(meta.shape) and m.dtype == meta.dtype


@register_partition_kind
@dataclass(eq=False)
class QLinearInfo(PartitionInfo):
    """A static quantized linear (``module``, matched at ``node``) with the elementwise ``epilogue``
    ops fused after it; ``codes_from``: the partition that emits its input codes (None: the
    kernel quantizes its float input itself)."""

    kind: ClassVar[str] = "qlinear"
    module: QuantizedLinear
    node: fx.Node
    epilogue: list
    codes_from: Partition | None = None

    def codes_key(self):
        return self.node if self.codes_from is not None else None


# -- conv / scan / merge --------------------------------------------------------------------------


def _time_flip(node) -> fx.Node | None:
    """``node`` if it is a flip of a (B, E, L) tensor along L (its last dim) alone, else None:
    a kernel that reads its input reversed along L absorbs it (see :func:`vmfx.lowering.rewrite.sink_flips`)."""
    if not isinstance(node, fx.Node) or not is_flip(node) or len(node.users) != 1:
        return None
    meta = node.meta.get("tensor_meta")
    dims = flip_dims(node)
    if meta is None or dims is None or len(meta.shape) != 3 or [d % 3 for d in dims] != [2]:
        return None
    return node


@register_partition_kind
@dataclass(eq=False)
class ConvInfo(EmitsCodesFor):
    """A depthwise causal conv1d and its SiLU, read reversed along L when ``flip`` (its absorbed
    flip); ``consumer``: the quantized linear it emits codes for (set by :func:`find_partitions`)."""

    kind: ClassVar[str] = "conv"
    module: torch.nn.Conv1d
    flip: bool
    consumer: fx.Node | None = None


@register_partition_kind
@dataclass(eq=False)
class ScanInfo(PartitionInfo):
    """A selective scan and its gate: delta through softplus or not, a D skip or not, z read reversed
    (``flip_z``, the backward direction's gate), its quantized hidden state (None: float), and the
    Smooth-SiLU factors ``s`` (E,) when the gate is MambaQuant's ``z * sigmoid(s z)`` (None:
    ``silu(z)``)."""

    kind: ClassVar[str] = "scan"
    softplus: bool
    has_D: bool
    flip_z: bool
    state: Any
    gate_smooth: Any = None


@register_partition_kind
@dataclass(eq=False)
class MergeInfo(EmitsCodesFor):
    """The sum of the two directions' gated outputs, times ``scale``; ``consumer``: out_proj when
    the merge emits its codes."""

    kind: ClassVar[str] = "merge"
    scale: float
    consumer: fx.Node | None = None


@register_partition_kind
@dataclass(eq=False)
class HadamardInfo(EmitsCodesFor):
    """The online Hadamard ``module`` and the quantize of ``consumer``'s input in one kernel."""

    kind: ClassVar[str] = "hadamard"
    module: OnlineHadamard
    consumer: fx.Node | None = None


@register_partition_kind
@dataclass(eq=False)
class HadamardQLinearInfo(PartitionInfo):
    """A static quantized linear (``module``, matched at ``node``) whose input the online Hadamard
    ``rotation`` rotates, in one kernel: the rotation and the quantize as the GEMM's prologue, the
    elementwise ``epilogue`` ops after it; ``rotation_node``: the rotation's node. The partition's
    first input is the rotation's float input."""

    kind: ClassVar[str] = "hadamard_qlinear"
    module: QuantizedLinear
    node: fx.Node
    epilogue: list
    rotation: OnlineHadamard
    rotation_node: fx.Node


def _conv_partition(conv: fx.Node) -> Partition | None:
    """[flip along L] -> conv1d -> [crop getitem] -> silu."""
    module = module_of(conv)
    if not isinstance(module, torch.nn.Conv1d) or module.groups != module.in_channels or module.stride != (1,):
        return None
    if module.padding != (module.kernel_size[0] - 1,) or module.dilation != (1,):
        return None
    flip = _time_flip(conv.args[0])
    nodes = [conv] if flip is None else [flip, conv]
    current = single_user(conv)
    if current is not None and current.op == "call_function" and current.target is operator.getitem:
        nodes.append(current)
        current = single_user(current)
    if current is None or not is_silu(current) or _role(current) != "conv_act":
        return None
    nodes.append(current)
    source = conv.args[0] if flip is None else flip.args[0]
    return Partition(conv.name, nodes, [source], current, ConvInfo(module, flip is not None))


def _smooth_gate_factors(node: fx.Node) -> torch.Tensor | None:
    """The factors of a :class:`~vmfx.quant.smooth_silu.SmoothSiLU` node gating a (B, E, L) scan
    output over its channel dim E (the kernels' layout), else None."""
    module = module_of(node)
    if not isinstance(module, SmoothSiLU) or module.channel_dim != -2:
        return None
    return module.factors


def _scan_partition(scan: fx.Node) -> Partition | None:
    """selective_scan -> mul by silu(z) or by MambaQuant's Smooth-SiLU of z (the gate)."""
    if annotation(scan).extra.get("structural"):  # a scan vmfx does not know stays in PyTorch
        return None
    gate_mul = single_user(scan)
    if gate_mul is None or _role(gate_mul) != "gate" or gate_mul.target is not operator.mul:
        return None
    other = [a for a in gate_mul.args if isinstance(a, fx.Node) and a is not scan]
    if len(other) != 1 or len(other[0].users) != 1:
        return None
    gate_act = other[0]
    gate_smooth = _smooth_gate_factors(gate_act)
    if not (is_silu(gate_act) or gate_smooth is not None):
        return None
    args = list(scan.args) + [None] * (10 - len(scan.args))
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "return_last_state")
    bound = dict(zip(names, args))
    bound.update(scan.kwargs)
    if bound.get("z") is not None or bound.get("delta_bias") is not None or bound.get("return_last_state"):
        return None
    inputs = [bound["u"], bound["delta"], bound["A"], bound["B"], bound["C"]]
    has_d = bound.get("D") is not None
    if has_d:
        inputs.append(bound["D"])
    z = gate_act.args[0]  # before its SiLU
    flip_z = _time_flip(z)  # the backward direction's gate: the forward z, read reversed
    inputs.append(z if flip_z is None else flip_z.args[0])
    info = ScanInfo(softplus=bool(bound.get("delta_softplus")), has_D=has_d, flip_z=flip_z is not None,
                    state=scan_state_of(scan), gate_smooth=gate_smooth)
    nodes = [scan, gate_act, gate_mul] + ([flip_z] if flip_z is not None else [])
    return Partition(scan.name, nodes, inputs, gate_mul, info)


def _merge_partition(out_proj: fx.Node) -> Partition | None:
    """(transpose(y_f) + flip(transpose(y_b))) [/ c] feeding out_proj (through its smoothing and
    quantizer nodes, when it has them)."""
    node = linear_edges(out_proj).source if out_proj.op == "call_function" else out_proj.args[0]
    if isinstance(node, fx.Node) and isinstance(module_of(node), OnlineHadamard):
        node = node.args[0]  # the merge writes float for the online Hadamard kernel (see _hadamard_partition)
    nodes, scale = [], 1.0
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target in (operator.truediv, operator.mul) \
            and isinstance(node.args[1], (int, float)) and _role(node) == "merge":
        scale = 1.0 / node.args[1] if node.target is operator.truediv else float(node.args[1])
        nodes.append(node)
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.target is operator.add and _role(node) == "merge"):
        return None
    nodes.append(node)
    sources = []
    for arg in node.args:
        chain, flips, current = [], 0, arg
        while isinstance(current, fx.Node) and is_transparent(current) and len(current.users) == 1:
            chain.append(current)
            flips += int(is_flip(current))
            current = current.args[0]
        if not isinstance(current, fx.Node) or _role(current) != "gate":
            return None
        nodes.extend(chain)
        sources.append((current, flips % 2 == 1, chain))
    if [s[1] for s in sources] != [False, True]:
        return None
    for gate, _, chain in sources:  # exactly one transpose (B, E, L) -> (B, L, E), plus the flip
        kinds = [c.target for c in chain if not is_flip(c)]
        if kinds != ["transpose"]:
            return None
    order = {n: i for i, n in enumerate(out_proj.graph.nodes)}
    nodes.sort(key=order.__getitem__)
    return Partition(nodes[-1].name, nodes, [sources[0][0], sources[1][0]], nodes[-1], MergeInfo(scale))


def _hadamard_partition(source, consumer: fx.Node) -> Partition | None:
    """The online Hadamard node ``source`` feeding the quantized linear ``consumer`` (read by its
    input quantizer alone, a width whose base the kernel unrolls) as a ``hadamard`` partition
    emitting ``consumer``'s codes; else None."""
    module = module_of(source) if isinstance(source, fx.Node) else None
    if not isinstance(module, OnlineHadamard) or module.m not in FAST_BASES or len(source.users) != 1:
        return None
    if not isinstance(source.args[0], fx.Node):
        return None
    return Partition(source.name, [source], [source.args[0]], source, HadamardInfo(module, consumer))


# -- mixed_qlinear (OuroMamba) -------------------------------------------------------------------


@register_partition_kind
@dataclass(eq=False)
class MixedQLinearInfo(PartitionInfo):
    """OuroMamba's mixed-precision linear: its input quantizer (outlier selection), weight
    quantizer, float weight and bias, and the linear's node."""

    kind: ClassVar[str] = "mixed_qlinear"
    quantizer: MixedPrecisionQuantize
    weight_quantizer: FakeQuantize
    weight: torch.Tensor
    bias: torch.Tensor | None
    node: fx.Node


def _mixed_partition(node: fx.Node) -> Partition | None:
    """``mixed quantize(act) -> F.linear(., quantize(W), b)`` with a symmetric
    :class:`~vmfx.quant.mixed.MixedPrecisionQuantize` on the input (no smoothing), a static
    symmetric per-channel weight quantizer, and an input whose (sample, step) rows are its
    ``reshape(-1, K)`` rows (batch first, token dims next, channels last)."""
    if not (node.op == "call_function" and node.target is F.linear):
        return None
    edges = linear_edges(node)
    iq, wq = edges.quantizer("input"), edges.quantizer("weight")
    if not isinstance(iq, MixedPrecisionQuantize) or not iq.enabled or not iq.spec.symmetric or iq.outlier_float:
        return None
    if not isinstance(wq, FakeQuantize) or not wq.enabled or wq.spec.granularity != "channel" or not wq.spec.symmetric:
        return None
    if edges.act_smooth is not None or edges.weight_smooth is not None or edges.weight_attr is None:
        return None
    if len(edges.act_quant.users) != 1:
        return None
    lay = iq.layout
    nd = lay.ndim
    if lay.channel_dim != nd - 1 or not (lay.merged_batch or (lay.batch_dim == 0 and lay.token_dims == tuple(range(1, nd - 1)))):
        return None
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return None
    module = edges.linear_module(node.graph.owning_module)
    info = MixedQLinearInfo(iq, wq, module.weight, module.bias, node)
    return Partition(node.name, [edges.act_quant, edges.weight_quant, node], [edges.source], node, info)


# -- both directions of a block in one partition ---------------------------------------------------


def same_value(a, b) -> bool:
    """Whether two graph values are provably equal: the same node, equal constants, or the same
    view op (transpose, getitem, ...) with the same arguments applied to equal values."""
    if a is b:
        return True
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return not isinstance(a, fx.Node) and not isinstance(b, fx.Node) and type(a) is type(b) and a == b
    if a.op != b.op or a.target != b.target or a.op not in ("call_method", "call_function") or not is_transparent(a):
        return False
    if len(a.args) != len(b.args) or a.kwargs != b.kwargs:
        return False
    return all(same_value(x, y) for x, y in zip(a.args, b.args))


def _act_kind(linear: QuantizedLinear | None):
    if linear is None:
        return None
    spec = linear.input_quantizer.spec
    return spec.granularity, spec.bits


@register_partition_kind
@dataclass(eq=False)
class ConvBidirInfo(PartitionInfo):
    """Both directions' convs in one launch: their modules, output nodes and the linears they emit
    codes for (``consumers``, each None where that direction emits none)."""

    kind: ClassVar[str] = "conv_bidir"
    modules: tuple
    outputs: tuple
    consumers: tuple

    def wire_outputs(self, p, call, emits_codes, codes_for, getitem):
        stacked = getitem(call, 0) if emits_codes else call
        fwd, bwd = self.outputs
        if emits_codes:
            codes = getitem(call, 1)
            codes_for[tuple(self.consumers)] = codes  # for a grouped GEMM of the consumers
            for d, consumer in enumerate(self.consumers):
                codes_for[consumer] = getitem(codes, d)
        return {fwd: getitem(stacked, 0), bwd: getitem(stacked, 1)}


@register_partition_kind
@dataclass(eq=False)
class ScanMergeInfo(EmitsCodesFor):
    """Both directions' scans, their gates and the merge in one launch (``has_D`` per direction),
    with both ``dt_proj`` linears inside when :func:`_fuse_dt_proj` took them; ``gate_smooth``: the
    Smooth-SiLU factors both gates share (None: ``silu(z)``)."""

    kind: ClassVar[str] = "scan_merge"
    softplus: bool
    has_D: tuple
    scale: float
    consumer: fx.Node | None = None
    dt_proj: tuple | None = None
    gate_smooth: Any = None


@register_partition_kind
@dataclass(eq=False)
class QLinearGroupInfo(PartitionInfo):
    """Linears of one shape reading a ``conv_bidir``'s stacked codes, as one grouped GEMM."""

    kind: ClassVar[str] = "qlinear_group"
    modules: list
    nodes: list
    outputs: list
    codes_from: Partition

    def codes_key(self):
        return tuple(self.nodes)

    def wire_outputs(self, p, call, emits_codes, codes_for, getitem):
        return {output: getitem(call, g) for g, output in enumerate(self.outputs)}


def _pair_convs(parts: list[Partition]) -> list[Partition]:
    """A forward conv and a conv reading the same input reversed (its absorbed flip), with equal
    widths and channels, both emitting codes for a linear of the same activation kind (or neither),
    become one ``conv_bidir`` partition (one launch, no flip)."""
    convs = [p for p in parts if p.kind == "conv"]
    linears = {p.info.node: p.info.module for p in parts if p.kind == "qlinear"}
    paired: dict[int, Partition] = {}
    for fwd in convs:
        if fwd.info.flip or id(fwd) in paired:
            continue
        for bwd in convs:
            if not bwd.info.flip or id(bwd) in paired or not same_value(fwd.inputs[0], bwd.inputs[0]):
                continue
            mf, mb = fwd.info.module, bwd.info.module
            if mf.kernel_size != mb.kernel_size or mf.in_channels != mb.in_channels:
                continue
            cf, cb = fwd.info.consumer, bwd.info.consumer
            if (cf is None) != (cb is None) or _act_kind(linears.get(cf)) != _act_kind(linears.get(cb)):
                continue  # the kernel quantizes both directions alike (or neither)
            info = ConvBidirInfo((mf, mb), (fwd.output, bwd.output), (cf, cb))
            pair = Partition(fwd.name, fwd.nodes + bwd.nodes, [fwd.inputs[0]], fwd.output, info)
            paired[id(fwd)] = paired[id(bwd)] = pair
            break
    return _replace_pairs(parts, paired)


def _pair_scans(parts: list[Partition]) -> list[Partition]:
    """A ``merge`` of a forward scan and a backward scan whose gate reads the same z reversed
    (float hidden states, the same softplus, outputs read by the merge alone) becomes one
    ``scan_merge`` partition: both recurrences, the gate, the merge and the codes for the linear
    after it in one launch."""
    scans = {p.output: p for p in parts if p.kind == "scan"}
    paired: dict[int, Partition] = {}
    for merge in (p for p in parts if p.kind == "merge"):
        fwd, bwd = scans.get(merge.inputs[0]), scans.get(merge.inputs[1])
        if fwd is None or bwd is None or fwd.info.flip_z or not bwd.info.flip_z:
            continue
        if fwd.info.state is not None or bwd.info.state is not None:
            continue  # the quantized hidden state keeps its per-direction kernel
        if fwd.info.softplus != bwd.info.softplus or not same_value(fwd.inputs[-1], bwd.inputs[-1]):
            continue
        sf, sb = fwd.info.gate_smooth, bwd.info.gate_smooth
        if (sf is None) != (sb is None) or (sf is not None and not torch.equal(sf, sb)):
            continue  # the kernel gates both directions with one Smooth-SiLU (or silu)
        if any(u not in merge.nodes for p in (fwd, bwd) for u in p.output.users):
            continue  # a direction's own output is read elsewhere: the pair never writes it
        scan_inputs = lambda p: p.inputs[:-1] + ([] if p.info.has_D else [None])  # noqa: E731
        info = ScanMergeInfo(fwd.info.softplus, (fwd.info.has_D, bwd.info.has_D), merge.info.scale, merge.info.consumer,
                             gate_smooth=sf)
        inputs = scan_inputs(fwd) + scan_inputs(bwd) + [fwd.inputs[-1]]
        pair = Partition(merge.name, fwd.nodes + bwd.nodes + merge.nodes, inputs, merge.output, info)
        paired[id(fwd)] = paired[id(bwd)] = paired[id(merge)] = pair
    return _replace_pairs(parts, paired)


def _replace_pairs(parts: list[Partition], paired: dict[int, Partition]) -> list[Partition]:
    out, seen = [], set()
    for p in parts:
        q = paired.get(id(p), p)
        if id(q) not in seen:
            seen.add(id(q))
            out.append(q)
    for p in out:  # the linears that read codes from a partition now merged read them from the pair
        if p.kind == "qlinear" and p.info.codes_from is not None:
            p.info.codes_from = paired.get(id(p.info.codes_from), p.info.codes_from)
    return out


def _group_linears(parts: list[Partition]) -> list[Partition]:
    """The two linears that read a ``conv_bidir``'s codes (both directions' ``x_proj``), without
    epilogues and with weights of the same shape and bit width, become one ``qlinear_group``
    partition (one grouped GEMM over the stacked codes)."""
    linears = {p.info.node: p for p in parts if p.kind == "qlinear"}
    grouped: dict[int, Partition] = {}
    for conv in (p for p in parts if p.kind == "conv_bidir"):
        members = [linears.get(c) for c in conv.info.consumers]
        if any(m is None or m.info.epilogue or m.info.codes_from is not conv for m in members):
            continue
        modules = [m.info.module for m in members]
        if len({(tuple(m.weight.shape), m.weight_quantizer.spec.bits) for m in modules}) != 1:
            continue
        info = QLinearGroupInfo(modules, [m.info.node for m in members], [m.output for m in members], conv)
        group = Partition(members[0].name, [n for m in members for n in m.nodes],
                          [members[0].inputs[0]], members[0].output, info)
        for m in members:
            grouped[id(m)] = group
    return _replace_pairs(parts, grouped)


#: Where each direction's delta sits in a ``scan_merge`` partition's inputs (u, delta, A, B, C, D per direction, z).
_SCAN_MERGE_DELTA = (1, 7)


def _dt_proj_of(delta, linears: dict[fx.Node, Partition]) -> tuple[Partition, fx.Node] | None:
    """``delta = transpose(dt_proj(dt_in), 1, 2)``: the qlinear partition of ``dt_proj`` (no
    epilogue, not reading a producer's codes, read by that transpose alone, on a (B, L, R) input)
    and the transpose node, or None."""
    if not isinstance(delta, fx.Node) or delta.op != "call_method" or delta.target != "transpose":
        return None
    if len(delta.users) != 1 or len(delta.args) != 3 or sorted(d % 3 for d in delta.args[1:]) != [1, 2]:
        return None
    part = linears.get(delta.args[0])
    if part is None or part.info.epilogue or part.info.codes_from is not None:
        return None
    meta = part.inputs[0].meta.get("tensor_meta") if isinstance(part.inputs[0], fx.Node) else None
    if set(part.output.users) != {delta} or meta is None or len(meta.shape) != 3:
        return None
    if part.info.module.weight_quantizer.spec.bits > 8:
        return None
    return part, delta


def _fuse_dt_proj(parts: list[Partition]) -> list[Partition]:
    """A ``scan_merge`` whose two deltas are each ``dt_proj``'s output, transposed, takes both
    ``dt_proj`` linears into its launch (delta is computed in registers and never written)."""
    linears = {p.output: p for p in parts if p.kind == "qlinear"}
    fused: set[int] = set()
    for p in parts:
        if p.kind != "scan_merge":
            continue
        found = [_dt_proj_of(p.inputs[i], linears) for i in _SCAN_MERGE_DELTA]
        if any(f is None for f in found):
            continue
        for i, (dt, transpose) in zip(_SCAN_MERGE_DELTA, found):
            p.inputs[i] = dt.inputs[0]  # dt_in: x_proj's output slice, token-major
            p.nodes.extend(dt.nodes + [transpose])
            fused.add(id(dt))
        p.info.dt_proj = tuple(dt.info.module for dt, _ in found)
    return [p for p in parts if id(p) not in fused]


def _pair_directions(parts: list[Partition]) -> list[Partition]:
    """Both directions of a bidirectional block in one launch: ``conv_bidir`` (the two convs),
    ``qlinear_group`` (the two linears reading its codes) and ``scan_merge`` (the two scans,
    their gates and the merge, with both ``dt_proj`` linears inside)."""
    return _fuse_dt_proj(_pair_scans(_group_linears(_pair_convs(parts))))


# -- driver ---------------------------------------------------------------------------------------


def find_partitions(gm: fx.GraphModule, pair_directions: bool = True) -> list[Partition]:
    """Every partition of ``gm``, in graph order. Each node belongs to at most one partition.

    With ``pair_directions``, the two directions of a bidirectional block run as one partition
    where they can (:func:`_pair_directions`)."""
    taken: set[fx.Node] = set()
    parts: list[Partition] = []

    def add(p: Partition | None) -> Partition | None:
        if p is None or any(n in taken for n in p.nodes):
            return None
        taken.update(p.nodes)
        parts.append(p)
        return p

    for node in gm.graph.nodes:
        role = _role(node)
        if role == "conv1d":
            add(_conv_partition(node))
        elif role == "scan":
            add(_scan_partition(node))
    for node in gm.graph.nodes:
        if _role(node) == "out_proj":
            add(_merge_partition(node))
    producers = {p.output: p for p in parts if p.kind in ("conv", "merge")}
    for node in gm.graph.nodes:
        module = _static_quantlinear(node)
        if module is None or node in taken:
            continue
        ops, epi_nodes, extra = _epilogue(node)
        source, chain = module.source, []
        while isinstance(source, fx.Node) and source.op == "call_method" and source.target == "transpose" \
                and len(source.users) == 1:
            chain.append(source)
            source = source.args[0]
        producer = producers.get(source)
        info = QLinearInfo(module, node, ops)
        inputs = [module.source]
        if producer is not None and producer.kind == "conv" and len(chain) == 1:
            # the conv emits (B*L, E) codes for this linear; the transpose node becomes dead
            info.codes_from = producer
            producer.info.consumer = node
        elif producer is not None and producer.kind == "merge" and not chain:
            info.codes_from = producer
            producer.info.consumer = node
        rotation = _hadamard_partition(source, node) if producer is None and not chain else None
        if rotation is not None and fits_gemm_prologue(rotation.info.module.dim):
            info = HadamardQLinearInfo(module, node, ops, rotation.info.module, source)
            add(Partition(node.name, [source] + module.nodes + [node] + epi_nodes, rotation.inputs + extra,
                          (epi_nodes or [node])[-1], info))
            continue
        if add(Partition(node.name, module.nodes + [node] + epi_nodes, inputs + extra,
                         (epi_nodes or [node])[-1], info)) is not None and add(rotation) is not None:
            info.codes_from = rotation  # the online Hadamard kernel emits this linear's codes
    for node in gm.graph.nodes:  # OuroMamba: the mixed-precision linears
        if node not in taken:
            add(_mixed_partition(node))
    if pair_directions:
        parts = _pair_directions(parts)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for p in parts:
        p.nodes.sort(key=order.__getitem__)
    parts.sort(key=lambda p: order[p.nodes[0]])
    return parts


def unlowered_quantizers(gm: fx.GraphModule, parts: list[Partition]) -> list[fx.Node]:
    """The quantizer and smoothing nodes of ``gm`` that no partition in ``parts`` takes."""
    taken = {n for p in parts for n in p.nodes}
    left = [n for n in gm.graph.nodes if n not in taken and isinstance(module_of(n), (FakeQuantize, Smooth))]
    # a scan with a quantized hidden state that no scan partition takes stays a fake-quant float op
    left += [n for n in gm.graph.nodes if n not in taken and n.op == "call_function" and scan_state_of(n) is not None]
    return left
