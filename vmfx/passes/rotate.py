"""``RotateResidualPass``: an offline rotation of the residual stream, folded into the weights
(QuaRot's recipe with MambaQuant's KLT-enhanced rotation), and the ``rotate`` method.

What is rotated
---------------

A pre-norm residual network (Vim: ``x -> RMSNorm(g) -> in_proj -> mixer -> out_proj -> + x``)
computes the same function when every value of its residual stream is replaced by ``x R`` for one
orthogonal ``d x d`` matrix ``R``:

* **Producers** of the stream absorb ``R``: the patch embedding's output channels
  (``W <- R^T W``, ``b <- R^T b`` on the conv's output-channel axis), the class token and the
  position embedding (``P <- P R``), every ``out_proj`` (``W <- R^T W``, ``b <- R^T b``).
* **RMSNorm** commutes with ``R`` once its elementwise weight ``g`` is gone: the mean of squares is
  rotation invariant (``eps`` inside it too), so ``RMSNorm_1(x R) = RMSNorm_1(x) R``. Each norm's
  ``g`` is folded into the linears that read the norm's output and the norm's weight set to ones.
* **Consumers** absorb ``R^T``: every linear reading the stream or a norm's output (``in_proj``,
  the head after ``norm_f``): ``W <- W diag(g) R``.
* Ops between them that act on tokens only (adds of two rotated values, token slicing and
  concatenation, ``expand``, ``flip`` / ``mean`` over tokens, multiplication by a number, dtype
  casts, dropout) commute with ``R`` and are left alone; shape queries are ignored.

The stream is found from the first RMSNorm of the graph by following use-def edges both ways
(producers back, users forward) until every edge of the region ends at one of the above. Anything
else on the way is refused with a :class:`~vmfx.errors.ConfigError` naming the node: a LayerNorm
(it subtracts the mean, which only rotations keeping the all-ones direction commute with; VMamba,
LocalVSSM and Vim built with ``rms_norm=False``), rope, a per-channel scale (``init_layer_scale``),
a module called at two places. Vim and LocalVim (without rope) are supported. Nothing is inserted
in the graph: only parameters change, so ``vmfx.save`` / ``vmfx.load`` keep them as state, and the
float model's output is unchanged up to rounding.

``out_proj``'s *input* (after the gate) is not rotated here: no weight before it can absorb
``R^T``; ``RotationOptions(online_out_proj=True)`` rotates it at run time
(:mod:`vmfx.passes.online_hadamard`).

Which rotation
--------------

* ``kind="hadamard"``: QuaRot's randomized Hadamard ``diag(s) H / sqrt(d)`` (signs from ``seed``;
  :mod:`vmfx.quant.hadamard`, block-diagonal for a width without a Hadamard construction).
* ``kind="klt"`` (default): MambaQuant's KLT-enhanced rotation ``R = K H / sqrt(d)``, ``K`` the
  eigenvectors of the second moment ``E[n^T n]`` of the *normalised* stream ``n = x / rms(x)``
  (the in_proj inputs once ``g`` is folded), pooled over the tokens of every norm whose output a
  mixer linear reads (every block's norm; ``norm_f``, read by the head only, is left out). With one
  ``R`` for the whole stream a per-block KLT is impossible; pooling weighs every block equally
  (each normalised token has mean square ~1). After it, every channel of every in_proj input has
  the pooled mean square ``mean(lambda)`` on the calibration data. The uncentred second moment (not
  the covariance about the mean) is used because a quantizer's range sees the mean too.
  The statistics are one ``d x d`` sum (O(d^2) memory), summed over processes under
  :mod:`vmfx.distributed`.

Annotations: every annotated node that absorbed the rotation gets ``extra["rotated"]``, e.g.
``"residual R (klt-hadamard 96): W <- W diag(g) R"`` (``vmfx.inspect.table`` shows it in the spec
column); the class token and position embedding are named on the patch embedding's entry. Nodes
whose *output* is rotated (norms, the patch embedding, ``out_proj``) also get
``extra["rotated_output"] = True``, which ``vmfx.inspect.compare`` skips (their float counterparts
are not rotated).
``gm.meta["vmfx_rotation"]`` records the kind, width, Hadamard blocks, statistics and every
absorbed parameter.

Facts: requires ``mixers_detected``, forbids ``observers_inserted`` (the weights must still be the
float model's) and ``residual_rotated``; ensures ``residual_rotated``.

The ``rotate`` method (:func:`rotate_passes`) runs this pass right after detection (then
MambaQuant's smooth-fused gate, with ``smooth_gate``, :mod:`vmfx.passes.smooth_gate`, and the
online Hadamard, with ``online_out_proj``), then the passes :func:`~vmfx.passes.ptq_passes`
builds from the rest of the config, so PTS, SmoothQuant + JLSS (``ptq4vm-rotate-*``), k-scaled or
OuroMamba configs run on the rotated graph with ``method="rotate"``.
"""

from __future__ import annotations

import builtins
import operator
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..annotations import annotate, annotation
from ..config import BIT_SETTINGS, QuantConfig, preset, register_preset
from ..errors import CalibrationDataError, ConfigError
from ..nn.norm import RMSNorm
from ..quant.hadamard import describe_blocks, hadamard_blocks, klt_hadamard, random_hadamard
from .base import FACTS, Pass, PassContext, PassResult
from .calibrate import input_expectation, owned_calibration_batches
from .detect import DetectMambaMixersPass
from .online_hadamard import OnlineHadamardPass
from .patterns import module_of
from .pipeline import ptq_passes, register_method
from .smooth_gate import SmoothFusedGatePass

__all__ = ["RotationOptions", "RotateResidualPass", "ResidualRegion", "find_residual_stream", "rotate_passes",
           "ROTATION_KINDS"]

#: The rotations :class:`RotateResidualPass` builds.
ROTATION_KINDS = ("klt", "hadamard")

FACTS.setdefault("residual_rotated", "the residual stream is rotated, the rotation folded into weights (RotateResidualPass)")


@dataclass(frozen=True)
class RotationOptions:
    """The ``rotate`` method's own options (saved with the config).

    Args:
        kind: ``"klt"`` (MambaQuant's KLT-enhanced rotation, from calibration statistics) or
            ``"hadamard"`` (QuaRot's randomized Hadamard, no data needed).
        seed: seed of the Hadamard's random signs (``kind="hadamard"``).
        online_out_proj: also rotate every ``out_proj``'s input by an online Hadamard
            (:class:`~vmfx.passes.online_hadamard.OnlineHadamardPass`), its inverse folded into
            ``out_proj``'s weight.
        residual: rotate the residual stream offline (:class:`RotateResidualPass`); ``False``
            keeps only the online Hadamard (``online_out_proj=True`` is then required), for models
            whose residual stream cannot be rotated (LayerNorm models such as VMamba).
        smooth_gate: MambaQuant's smooth-fused gate before the online Hadamard
            (:class:`~vmfx.passes.smooth_gate.SmoothFusedGatePass`: SmoothQuant factors of
            ``out_proj``'s input absorbed into ``in_proj``'s gate rows, a Smooth-SiLU gate and
            ``out_proj``); requires ``online_out_proj=True`` and calibration data.
        smooth_alpha: its migration strength, in ``[0, 1]`` (MambaQuant's code: 0.5).

    ``smooth_gate`` and ``smooth_alpha`` are written to saved configs only when they differ from
    their defaults.
    """

    kind: str = "klt"
    seed: int = 0
    online_out_proj: bool = False
    residual: bool = True
    smooth_gate: bool = False
    smooth_alpha: float = 0.5

    WRITTEN_WHEN_SET = ("smooth_gate", "smooth_alpha")

    def __post_init__(self):
        if self.kind not in ROTATION_KINDS:
            raise ConfigError(f"RotationOptions.kind must be one of {', '.join(map(repr, ROTATION_KINDS))}, got {self.kind!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"RotationOptions.seed must be a non-negative integer, got {self.seed!r}")
        for name in ("online_out_proj", "residual", "smooth_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"RotationOptions.{name} must be True or False, got {getattr(self, name)!r}")
        alpha = self.smooth_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"RotationOptions.smooth_alpha must be a number in [0, 1], got {alpha!r}")
        if self.smooth_gate and not self.online_out_proj:
            raise ConfigError("RotationOptions(smooth_gate=True) smooths out_proj's input before its online Hadamard: "
                              "set online_out_proj=True as well")
        if not self.residual and not self.online_out_proj:
            raise ConfigError("RotationOptions(residual=False, online_out_proj=False) rotates nothing: set "
                              "online_out_proj=True, or use a method without rotation")


# -- finding the residual stream ----------------------------------------------------------------------

_ADDS = {operator.add, torch.add, operator.sub, torch.sub, operator.iadd}
_SCALES = {operator.mul, torch.mul, operator.truediv, torch.div}
_NEGS = {operator.neg, torch.neg}
_CATS = {torch.cat, torch.concat}
_DROPOUTS = {F.dropout}
_CAST_METHODS = {"to", "float", "double", "half", "bfloat16", "contiguous", "clone", "detach"}
_TOKEN_METHODS = {"expand", "flip", "mean", "sum"}
_ARITH_METHODS = {"add": "add", "sub": "add", "mul": "scale", "div": "scale", "neg": "neg"}
_SHAPE_METHODS = {"size", "dim"}


@dataclass
class ResidualRegion:
    """The residual stream of a graph and what absorbs its rotation (:func:`find_residual_stream`).

    Attributes:
        dim: the stream's width ``d``.
        nodes: every node whose value is rotated, mapped to the norm whose weight scales it (None for
            the stream before a norm).
        norms: the RMSNorm nodes on the stream, in graph order.
        consumers: ``(linear node, norm node or None)``: linears reading the stream, with the norm
            whose weight they absorb.
        linear_producers, convs, params: linears, patch-embedding convs (``conv -> flatten ->
            transpose``; the conv node) and ``get_attr`` parameters whose outputs are in the stream.
    """

    dim: int
    nodes: dict = field(default_factory=dict)
    norms: list = field(default_factory=list)
    consumers: list = field(default_factory=list)
    linear_producers: list = field(default_factory=list)
    convs: list = field(default_factory=list)
    params: list = field(default_factory=list)


def _refuse(node: fx.Node, why: str) -> ConfigError:
    named = node.op in ("call_module", "get_attr", "call_method")
    what = node.target if named else getattr(node.target, "__name__", node.target)
    return ConfigError(
        f"the residual stream cannot be rotated offline: node '{node.name}' ({node.op} {what}) {why}. Offline rotation "
        "needs a residual stream that passes only through RMSNorm, linear layers, adds and token slicing (Vim, LocalVim "
        "without rope); quantize this model with a method without rotation (e.g. 'ptq4vm-w8a8')"
    )


def _layer_norm_error(node: fx.Node) -> ConfigError:
    module = module_of(node)
    what = type(module).__name__ if module is not None else getattr(node.target, "__name__", str(node.target))
    return ConfigError(
        f"the residual stream is normalised by a {what} (node '{node.name}'), which subtracts "
        "the mean: it commutes only with rotations that keep the all-ones direction, so the stream cannot be rotated "
        "offline. The 'rotate' method supports RMSNorm models (Vim, LocalVim); quantize this model with a method "
        "without rotation (e.g. 'ptq4vm-w8a8')"
    )


def _rank(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return None if shape is None else len(shape)


def _last_dim(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return None if not shape else int(shape[-1])


def _dims(value, rank: int) -> list[int] | None:
    if isinstance(value, int):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(d, int) for d in value):
        return None
    return [d % rank for d in value]


def _index_keeps_channels(index, rank: int) -> bool:
    """Whether ``x[index]`` leaves the last (channel) axis whole and last."""
    if isinstance(index, int) or (isinstance(index, slice) and rank >= 2):
        return True
    if not isinstance(index, tuple) or any(i is None or isinstance(i, fx.Node) for i in index):
        return False
    if any(not isinstance(i, (int, slice)) and i is not Ellipsis for i in index):
        return False
    if index and index[-1] == slice(None):
        return sum(i is not Ellipsis for i in index) <= rank
    return Ellipsis not in index and len(index) < rank


def _is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is builtins.getattr:
        return len(node.args) > 1 and node.args[1] in ("shape", "ndim", "dtype", "device")
    return node.op == "call_method" and node.target in _SHAPE_METHODS


def _is_norm(node: fx.Node) -> bool:
    return isinstance(module_of(node), RMSNorm)


def _is_other_norm(node: fx.Node) -> bool:
    return isinstance(module_of(node), (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) or (
        node.op == "call_function" and node.target in (F.layer_norm, F.group_norm, F.batch_norm))


def _is_linear_module(node: fx.Node) -> bool:
    return isinstance(module_of(node), nn.Linear)


def _conv_source(node: fx.Node) -> fx.Node | None:
    """The Conv2d node of ``conv -> flatten(2) -> transpose(1, 2)`` ending at ``node``, else None."""
    if node.op != "call_method" or node.target != "transpose" or tuple(node.args[1:]) not in ((1, 2), (2, 1)):
        return None
    flat = node.args[0]
    if not isinstance(flat, fx.Node) or flat.op != "call_method" or flat.target != "flatten" or len(flat.users) != 1:
        return None
    if tuple(flat.args[1:]) not in ((2,), (2, -1), (2, 3)) and flat.kwargs.get("start_dim") != 2:
        return None
    conv = flat.args[0]
    if not isinstance(conv, fx.Node) or not isinstance(module_of(conv), nn.Conv2d) or len(conv.users) != 1:
        return None
    return conv


def _tensor_inputs(node: fx.Node) -> list[fx.Node] | None:
    """The tensor inputs through which a transparent ``node`` passes the rotated stream, or None if
    ``node`` does not commute with a rotation of the last axis."""
    rank = _rank(node)
    args, kwargs = node.args, node.kwargs
    if node.op == "call_module":
        m = module_of(node)
        return [args[0]] if isinstance(m, (nn.Dropout, nn.Identity)) and isinstance(args[0], fx.Node) else None
    if node.op == "call_function":
        t = node.target
        if t in _ADDS:
            nodes = [a for a in args[:2] if isinstance(a, fx.Node)]
            return nodes if len(nodes) == 2 and "alpha" not in kwargs else None
        if t in _SCALES:
            nodes = [a for a in args[:2] if isinstance(a, fx.Node)]
            other = [a for a in args[:2] if not isinstance(a, fx.Node)]
            if t in (operator.truediv, torch.div) and not isinstance(args[0], fx.Node):
                return None
            return nodes if len(nodes) == 1 and all(isinstance(o, (int, float)) for o in other) else None
        if t in _NEGS or t in _DROPOUTS:
            return [args[0]] if isinstance(args[0], fx.Node) else None
        if t is operator.getitem:
            src = args[0]
            src_rank = _rank(src) if isinstance(src, fx.Node) else None
            if src_rank is None or not _index_keeps_channels(args[1], src_rank):
                return None
            return [src]
        if t in _CATS:
            tensors = args[0] if args else kwargs.get("tensors")
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if rank is None or not isinstance(tensors, (list, tuple)) or _dims(dim, rank) == [rank - 1]:
                return None
            return list(tensors) if all(isinstance(x, fx.Node) for x in tensors) else None
        if t in (torch.flip, torch.mean, torch.sum):
            src = args[0]
            dims = args[1] if len(args) > 1 else kwargs.get("dims", kwargs.get("dim"))
            src_rank = _rank(src) if isinstance(src, fx.Node) else None
            d = _dims(dims, src_rank) if src_rank is not None else None
            return [src] if d is not None and src_rank - 1 not in d else None
        return None
    if node.op == "call_method":
        src = args[0] if args else None
        if not isinstance(src, fx.Node):
            return None
        name = node.target
        if name in _CAST_METHODS:
            return [src] if all(not isinstance(a, fx.Node) for a in args[1:]) else None
        if name in _ARITH_METHODS:
            kind = _ARITH_METHODS[name]
            others = list(args[1:])
            if kind == "add":
                return [src, others[0]] if len(others) == 1 and isinstance(others[0], fx.Node) and not kwargs else None
            if kind == "scale":
                return [src] if len(others) == 1 and isinstance(others[0], (int, float)) else None
            return [src]
        if name in _TOKEN_METHODS:
            src_rank = _rank(src)
            if src_rank is None:
                return None
            if name == "expand":
                sizes = list(args[1:]) if not (len(args) == 2 and isinstance(args[1], (tuple, list))) else list(args[1])
                return [src] if sizes and sizes[-1] in (-1, _last_dim(src)) else None
            dims = args[1] if len(args) > 1 else kwargs.get("dims", kwargs.get("dim"))
            d = _dims(dims, src_rank)
            return [src] if d is not None and src_rank - 1 not in d else None
    return None


def find_residual_stream(gm: fx.GraphModule) -> ResidualRegion:
    """The residual stream of ``gm`` and what absorbs its rotation (see the module docstring).

    Starts from the first RMSNorm of the graph and follows use-def edges both ways. Raises
    :class:`~vmfx.errors.ConfigError` naming the first node that stops an offline rotation: a
    LayerNorm, an op that mixes channels, a module called at two places, a parameter read elsewhere.
    """
    nodes = list(gm.graph.nodes)
    first = next((n for n in nodes if _is_norm(n)), None)
    if first is None:
        other = next((n for n in nodes if _is_other_norm(n)), None)
        if other is not None:
            raise _layer_norm_error(other)
        raise ConfigError("the model has no RMSNorm: offline rotation needs a pre-norm residual stream normalised by "
                          "RMSNorm (Vim, LocalVim); quantize it with a method without rotation (e.g. 'ptq4vm-w8a8')")
    if _rank(first) is None:
        raise ConfigError("offline rotation needs the graph's shapes: trace it with an example input "
                          "(vmfx.compile / vmfx.prepare do)")
    region = ResidualRegion(dim=int(module_of(first).weight.shape[0]))
    sources: set[fx.Node] = set()
    frontier: deque = deque()

    def add(node: fx.Node, tag: fx.Node | None) -> None:
        if node in region.nodes:
            if region.nodes[node] is not tag:
                raise _refuse(node, "mixes the residual stream with a normalised value (or values of two norms)")
            return
        if node.op not in ("get_attr",) and _last_dim(node) != region.dim:
            raise _refuse(node, f"reads the residual stream but its last axis is not the stream's {region.dim} channels")
        region.nodes[node] = tag
        frontier.append(node)

    def take_input(arg, tag: fx.Node | None, user: fx.Node) -> None:
        if not isinstance(arg, fx.Node):
            raise _refuse(user, "combines the residual stream with a constant")
        if arg in region.nodes:
            add(arg, tag)
            return
        if arg.op == "get_attr":
            if tag is not None:
                raise _refuse(arg, "is combined with a normalised value (its norm's weight cannot be folded through it)")
            value = _get_attr(gm, arg.target)
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[-1] != region.dim:
                raise _refuse(arg, f"is not a tensor with {region.dim} channels on its last axis")
            region.params.append(arg)
            sources.add(arg)
            region.nodes[arg] = None
            frontier.append(arg)
        elif _is_linear_module(arg):
            if tag is not None:
                raise _refuse(arg, "writes a value combined with a normalised one")
            region.linear_producers.append(arg)
            sources.add(arg)
            add(arg, None)
        elif _conv_source(arg) is not None:
            if tag is not None:
                raise _refuse(arg, "writes a value combined with a normalised one")
            region.convs.append(_conv_source(arg))
            sources.add(arg)
            add(arg, None)
        elif _tensor_inputs(arg) is not None:
            add(arg, tag)
        elif _is_other_norm(arg):
            raise _layer_norm_error(arg)
        else:
            raise _refuse(arg, "writes the residual stream but cannot absorb a rotation (not a linear layer, the "
                               "patch embedding, a parameter, or an op acting on tokens only)")

    region.nodes[first] = first
    frontier.append(first)
    while frontier:
        node = frontier.popleft()
        tag = region.nodes[node]
        if node not in sources:  # backward: the tensor inputs
            if _is_norm(node):
                if node not in region.norms:
                    region.norms.append(node)
                take_input(node.args[0], None, node)
            else:
                inputs = _tensor_inputs(node)
                if inputs is None:
                    raise _refuse(node, "does not commute with a rotation of the channels")
                for arg in inputs:
                    take_input(arg, tag, node)
        for user in node.users:  # forward: every reader of the rotated value
            if _is_shape_query(user):
                continue
            if _is_norm(user):
                if tag is not None:
                    raise _refuse(user, "normalises an already normalised value")
                add(user, user)
            elif _is_other_norm(user):
                raise _layer_norm_error(user)
            elif _is_linear_module(user):
                if user.args[0] is not node or any(a is node for a in list(user.args[1:]) + list(user.kwargs.values())):
                    raise _refuse(user, "reads the residual stream other than as its input")
                if (user, tag) not in region.consumers:
                    region.consumers.append((user, tag))
            elif user.op == "output":
                raise _refuse(node, "is returned by the model (the output would be rotated)")
            elif _tensor_inputs(user) is not None and node in _tensor_inputs(user):
                add(user, tag)
            else:
                raise _refuse(user, "reads the residual stream and does not commute with a rotation of the channels")
    order = {n: i for i, n in enumerate(nodes)}
    region.norms.sort(key=order.__getitem__)
    for n in region.norms + [c for c, _ in region.consumers] + region.linear_producers + region.convs:
        calls = [m for m in nodes if m.op == "call_module" and m.target == n.target]
        if len(calls) != 1:
            raise _refuse(n, f"calls a module used at {len(calls)} places (its weights cannot absorb the rotation once)")
    for n in region.params:
        readers = [m for m in nodes if m.op == "get_attr" and m.target == n.target]
        if len(readers) != 1:
            raise _refuse(n, "reads a parameter read elsewhere too")
    for norm in region.norms:
        if module_of(norm).weight.shape[0] != region.dim:
            raise _refuse(norm, f"normalises {module_of(norm).weight.shape[0]} channels, the stream has {region.dim}")
    return region


def _get_attr(gm: nn.Module, target: str):
    owner, _, name = target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    return getattr(module, name)


# -- the pass -----------------------------------------------------------------------------------------


class RotateResidualPass(Pass):
    """Rotate the residual stream by one orthogonal ``R``, folded into the weights (see the module
    docstring).

    Args:
        kind: ``"klt"`` (from calibration statistics: the pass needs data) or ``"hadamard"``.
        seed: the randomized Hadamard's sign seed.

    Invariants: the graph is unchanged (no node added or removed); the float graph computes the
    same function up to rounding; only parameters of the stream's producers, norms and consumers
    change, so they are saved as state.
    """

    requires_facts = ("mixers_detected",)
    forbids_facts = ("observers_inserted", "residual_rotated")
    ensures_facts = ("residual_rotated",)

    def __init__(self, kind: str = "klt", seed: int = 0):
        options = RotationOptions(kind, seed)
        self.kind, self.seed = options.kind, options.seed
        self.needs_data = options.kind == "klt"

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if self.needs_data and ctx.calib_data is None:
            raise CalibrationDataError("the KLT-enhanced rotation needs calibration data (the stream's second moment): "
                                       "pass images to vmfx.compile / the Pipeline, or use RotationOptions(kind='hadamard')")

    def label(self, dim: int) -> str:
        """``"residual R (klt-hadamard 96)"``: the rotation's name in annotations."""
        kind = "klt-hadamard" if self.kind == "klt" else f"hadamard, seed {self.seed}"
        return f"residual R ({kind} {describe_blocks(dim)})"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        region = find_residual_stream(gm)
        d = region.dim
        record = {"kind": self.kind, "dim": d, "blocks": hadamard_blocks(d),
                  "seed": self.seed if self.kind == "hadamard" else None}
        if self.kind == "klt":
            moment, stats = self._second_moment(gm, ctx, region)
            rotation, eigenvalues = klt_hadamard(moment)
            record["statistics"] = stats
            record["eigenvalues"] = [float(v) for v in eigenvalues]
        else:
            rotation = random_hadamard(d, self.seed)
        record["absorbed"] = self._fold(gm, region, rotation)
        gm.meta["vmfx_rotation"] = record
        return PassResult(gm, True)

    def _statistics_norms(self, region: ResidualRegion) -> list[fx.Node]:
        """The norms whose outputs a mixer linear reads (not only the head); all if there are none."""
        readers = [tag for node, tag in region.consumers
                   if tag is not None and (annotation(node) is None or annotation(node).role != "head")]
        picked = [n for n in region.norms if n in readers]
        return picked or list(region.norms)

    def _second_moment(self, gm: fx.GraphModule, ctx: PassContext, region: ResidualRegion) -> tuple[torch.Tensor, dict]:
        """``sum n^T n`` over every token of the picked norms' normalised inputs, divided by the
        token count (float64). Across processes the sum is the one a single process computes, bit
        for bit: each process keeps its batches' terms, and every process adds all of them in the
        order of the batches in the whole data (so the rotation, an eigenbasis of this matrix, is
        the same in every process and equal to a single process's)."""
        d = region.dim
        norms = self._statistics_norms(region)
        total = torch.zeros(d, d, dtype=torch.float64)
        count = torch.zeros((), dtype=torch.float64)
        dist_ctx = distributed.current()
        batch_terms: list[torch.Tensor] = []  # this batch's n^T n per norm call (only across processes)

        def hook(module, inputs, output):
            x = inputs[0].detach().to(torch.float64)
            n = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.eps)).reshape(-1, d).cpu()
            if dist_ctx.active:
                batch_terms.append(n.T @ n)
            else:
                total.add_(n.T @ n)
            count.add_(n.shape[0])

        handles = [module_of(n).register_forward_hook(hook) for n in norms]
        owned_terms: list[torch.Tensor] = []  # per owned batch: [norm calls, d, d]
        was_training, images = gm.training, 0
        gm.eval()
        try:
            with torch.no_grad():
                for x in owned_calibration_batches(ctx, input_expectation(gm), dist_ctx):
                    gm(x)
                    images += x.shape[0]
                    if dist_ctx.active:
                        owned_terms.append(torch.stack(batch_terms))
                        batch_terms.clear()
        finally:
            for h in handles:
                h.remove()
            gm.train(was_training)
        if dist_ctx.active:
            for terms in distributed.gather_batches(owned_terms, dist_ctx):
                for term in terms:
                    total.add_(term)
            distributed.all_reduce_sum_(count, dist_ctx)  # integers: exact in any order
            images = distributed.all_reduce_sum([images], dist_ctx)[0]
        if float(count) == 0:
            raise CalibrationDataError("the calibration data gave no tokens for the KLT statistics")
        return total / count, {"images": images, "tokens": int(count), "norms": [n.name for n in norms]}

    def _fold(self, gm: fx.GraphModule, region: ResidualRegion, rotation: torch.Tensor) -> dict[str, str]:
        """Fold ``rotation`` into every producer, norm and consumer of the stream; annotate them.
        Returns ``{parameter path: how it absorbed R}``."""
        label = self.label(region.dim)
        absorbed: dict[str, str] = {}
        notes: dict[fx.Node, list[str]] = {}
        gains = {norm: module_of(norm).weight.detach().to(torch.float64).cpu() for norm in region.norms}

        def put(param: torch.Tensor, value: torch.Tensor) -> None:
            with torch.no_grad():
                param.copy_(value.to(device=param.device, dtype=param.dtype))

        r = rotation
        for node, tag in region.consumers:
            lin = module_of(node)
            w = lin.weight.detach().to(torch.float64).cpu()
            g = gains[tag] if tag is not None else torch.ones(region.dim, dtype=torch.float64)
            put(lin.weight, (w * g) @ r)
            how = f"W <- W diag({tag.name}.g) R" if tag is not None else "W <- W R"
            absorbed[f"{node.target}.weight"] = how
            notes.setdefault(node, []).append(how)
        for node in list(region.linear_producers) + list(region.convs):  # output channels absorb R^T
            layer = module_of(node)
            w = layer.weight.detach().to(torch.float64).cpu()
            put(layer.weight, (r.T @ w.reshape(w.shape[0], -1)).reshape(w.shape))
            how = ("output channels " if node in region.convs else "") + "W <- R^T W"
            if layer.bias is not None:
                put(layer.bias, r.T @ layer.bias.detach().to(torch.float64).cpu())
                how += ", b <- R^T b"
            absorbed[f"{node.target}.weight"] = how
            notes.setdefault(node, []).append(how)
        for node in region.params:
            p = _get_attr(gm, node.target)
            put(p, p.detach().to(torch.float64).cpu() @ r)
            absorbed[node.target] = "P <- P R"
        for norm in region.norms:
            readers = [c.name for c, tag in region.consumers if tag is norm]
            with torch.no_grad():
                module_of(norm).weight.fill_(1.0)
            absorbed[f"{norm.target}.weight"] = "g -> 1 (folded into " + ", ".join(readers) + ")"
            notes.setdefault(norm, []).append("weight g folded into " + (", ".join(readers) or "nothing"))
        if region.params:  # unannotated get_attr nodes: named on the patch embedding (else the first norm)
            host = next((n for n in region.convs if annotation(n) is not None), None) or region.norms[0]
            notes.setdefault(host, []).append(", ".join(n.target for n in region.params) + " <- P R")
        rotated_outputs = set(region.norms) | set(region.linear_producers) | set(region.convs)
        for node, parts in notes.items():
            ann = annotation(node)
            role = ann.role if ann is not None else ("norm" if _is_norm(node) else "linear")
            extra = dict(ann.extra) if ann is not None else {}
            extra["rotated"] = f"{label}: " + "; ".join(parts)
            if node in rotated_outputs:  # per-layer comparisons with the float model skip it
                extra["rotated_output"] = True
            annotate(node, role, extra=extra)
        return absorbed


# -- the method -----------------------------------------------------------------------------------------


@register_method("rotate", options=RotationOptions)
def rotate_passes(config: QuantConfig) -> list[Pass]:
    """``DetectMambaMixers -> RotateResidual -> [SmoothFusedGate] -> [OnlineHadamard] -> `` the rest of
    :func:`~vmfx.passes.ptq_passes` (built from the config's other fields: PTS, SmoothQuant + JLSS,
    k-scaled, OuroMamba). ``RotationOptions.residual=False`` leaves out ``RotateResidual``;
    ``online_out_proj`` adds the online Hadamard on ``out_proj``'s input, ``smooth_gate`` the
    smooth-fused gate before it."""
    options = config.options if isinstance(config.options, RotationOptions) else RotationOptions()
    passes = ptq_passes(config)
    at = next(i for i, p in enumerate(passes) if isinstance(p, DetectMambaMixersPass)) + 1
    rotations = [RotateResidualPass(options.kind, options.seed)] if options.residual else []
    if options.smooth_gate:
        rotations.append(SmoothFusedGatePass(options.smooth_alpha))
    if options.online_out_proj:
        rotations.append(OnlineHadamardPass())
    return passes[:at] + rotations + passes[at:]


def _register_presets() -> None:
    """``rotate-w<b>a<b>`` (every bit setting): KLT-enhanced rotation, then PTS (per-token static activation scales,
    Lp grid init), no learning; ``ptq4vm-rotate-*``: the rotation, then PTQ4VM (PTS, smoothing, JLSS).
    ``rotate-hadamard-*`` and ``ptq4vm-rotate-hadamard-*``: the same with QuaRot's randomized Hadamard (seed 0)
    in place of the KLT-enhanced rotation, so the two rotations can be measured side by side.
    ``rotate-online-*`` and ``ptq4vm-rotate-online-*``: the KLT-enhanced rotation plus the online Hadamard on
    every ``out_proj``'s input. ``rotate-smooth-online-*`` and ``ptq4vm-rotate-smooth-online-*``: those plus
    MambaQuant's smooth-fused gate (alpha 0.5) before the online Hadamard."""
    for w, a in BIT_SETTINGS:
        for name, options in (("rotate", RotationOptions(kind="klt")), ("rotate-hadamard", RotationOptions(kind="hadamard")),
                              ("rotate-online", RotationOptions(kind="klt", online_out_proj=True)),
                              ("rotate-smooth-online", RotationOptions(kind="klt", online_out_proj=True, smooth_gate=True))):
            register_preset(f"{name}-w{w}a{a}", preset(f"pts-w{w}a{a}").replace(method="rotate", options=options))
            register_preset(f"ptq4vm-{name}-w{w}a{a}",
                            preset(f"ptq4vm-w{w}a{a}").replace(method="rotate", options=options))


_register_presets()
