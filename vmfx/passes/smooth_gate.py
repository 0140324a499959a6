"""``SmoothFusedGatePass``: MambaQuant's smooth-fused gate, SmoothQuant factors on ``out_proj``'s
input absorbed into the gate and the weights around it.

What it computes
----------------

``out_proj`` reads ``X = y * silu(z)`` (in Vim the mean of both scan directions, which share ``z``).
Per input channel ``j`` of ``out_proj``, with ``max|X_j|`` over the calibration data (measured on
the float graph) and ``W`` ``out_proj``'s weight::

    s_j = clamp( max|X_j|^alpha / max(max_i |W_ij|, 1e-5)^(1 - alpha), min=1e-2 )

(MambaQuant's ``use_S2`` factors and clamps, alpha 0.5: xzktx003/mambaquant-master@2a7887c
``model_vim_quant/tools/main_quant_naive.py:648-669``, a published extraction of MambaQuant's
code). ``s`` is absorbed with nothing added at run time but one multiplication inside the gate:

* ``in_proj``'s gate rows (the ``z`` half of its output; weight and bias) are divided by ``s``;
* every gate SiLU of the mixer (both directions) becomes a
  :class:`~vmfx.quant.smooth_silu.SmoothSiLU` with the same ``s``: ``z' -> z' * sigmoid(s z')``,
  which for ``z' = z / s`` is ``silu(z) / s`` exactly in real arithmetic;
* ``out_proj``'s weight columns are multiplied by ``s``.

So ``out_proj`` reads ``X / s`` and the float model computes the same function up to rounding.
The pass runs before :class:`~vmfx.passes.online_hadamard.OnlineHadamardPass` (MambaQuant smooths
before its online Hadamard: ``out_proj`` absorbs ``s``, then ``H^T``), and after the offline
residual rotation (``W`` above is ``out_proj``'s weight once it absorbed ``R^T``).

Where it refuses (:class:`~vmfx.errors.ConfigError`, naming the node): no gated mixer; a node
between a gate and ``out_proj`` other than transposes, permutes, token flips, the direction merge (an add of
two gated values, a division or multiplication by a number), e.g. a norm after the gate or a
channel attention (LocalMamba), which do not commute with a per-channel scale; a gate whose ``z``
is not a channel slice of ``in_proj``'s output reached through transposes and token flips; a
``z`` or ``in_proj`` / ``out_proj`` shared with another mixer; linears that are not an
``nn.Linear`` called at one place.

Annotations: every SmoothSiLU node keeps the gate's annotation and gets ``extra["rotated"]``
(``"smooth-fused gate (alpha 0.5, 192 channels): Smooth-SiLU x * sigmoid(s x), s from
layers_0_mixer_out_proj's input"``); ``in_proj`` and ``out_proj`` get what they absorbed appended to
their ``extra["rotated"]`` (``vmfx.inspect.table`` shows all three); ``in_proj``, the gate
multiplies and the merge get ``extra["rotated_output"] = True`` (their outputs are scaled by
``1 / s``: ``vmfx.inspect.compare`` skips them). ``gm.meta["vmfx_smooth_gate"]`` maps every
``out_proj`` to its ``in_proj``, gate nodes, alpha and the range of ``s``.

Facts: requires ``mixers_detected``, forbids ``observers_inserted``, ``quantizers_calibrated``,
``out_proj_input_rotated`` (``s`` is measured on the unrotated input and must be absorbed before
the Hadamard) and ``gate_smoothed``; ensures ``gate_smoothed``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from .. import distributed
from ..annotations import annotation
from ..errors import CalibrationDataError, ConfigError
from ..quant.smooth_silu import SmoothSiLU
from .base import FACTS, Pass, PassContext, PassResult
from .calibrate import input_expectation, owned_calibration_batches
from .graph_utils import replace_node_with_module, unique_submodule_name
from .inserted import QUANT_PREFIX
from .patterns import is_silu, module_of

__all__ = ["SmoothFusedGatePass", "GatedMixer", "find_gated_mixers", "smooth_gate_factors", "SMOOTH_GATE_META"]

#: ``gm.meta`` key: ``{out_proj node: {"in_proj", "gates", "alpha", "rows", "s_min", "s_max"}}``.
SMOOTH_GATE_META = "vmfx_smooth_gate"

FACTS.setdefault("gate_smoothed", "SmoothQuant factors on out_proj's input are absorbed into in_proj's gate rows, a "
                                  "Smooth-SiLU gate and out_proj (SmoothFusedGatePass)")

_ADDS = {operator.add}
_SCALES = {operator.truediv, operator.mul}
_PASS_METHODS = {"contiguous", "float", "to"}


@dataclass
class GatedMixer:
    """One mixer whose ``out_proj`` reads only gated values (:func:`find_gated_mixers`).

    Attributes:
        out_proj, in_proj: the linears' nodes.
        rows: the first row of ``z`` in ``in_proj``'s output (``z`` = rows ``rows .. rows + width``).
        gates: ``(SiLU node, channel dim counted from the end)`` of every gate (one per direction).
        multiplies: the gate multiplies; merge: the nodes between them and ``out_proj``.
    """

    out_proj: fx.Node
    in_proj: fx.Node
    rows: int
    gates: list = field(default_factory=list)
    multiplies: list = field(default_factory=list)
    merge: list = field(default_factory=list)

    @property
    def width(self) -> int:
        return module_of(self.out_proj).in_features


def _refuse(node: fx.Node, why: str) -> ConfigError:
    what = node.target if node.op in ("call_module", "call_method") else getattr(node.target, "__name__", node.target)
    return ConfigError(f"cannot smooth the gate through node '{node.name}' ({node.op} {what}): {why}; quantize without "
                       "the smooth-fused gate (RotationOptions(smooth_gate=False))")


def _role(node: fx.Node) -> str | None:
    ann = annotation(node)
    return ann.role if ann is not None else None


def _rank(node: fx.Node) -> int:
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    if shape is None:
        raise _refuse(node, "its shape is unknown (trace the model with example inputs, as vmfx.compile does)")
    return len(shape)


def _from_end(dim, rank: int) -> int:
    """``dim`` counted from the end (negative)."""
    return int(dim) % rank - rank


def _transposed_axis(node: fx.Node, axis: int) -> int:
    """Where ``axis`` (negative) of ``transpose(x, a, b)``'s input is in its output (and back)."""
    rank = _rank(node)
    a, b = (_from_end(d, rank) for d in node.args[1:3])
    return b if axis == a else a if axis == b else axis


def _permuted_axis(node: fx.Node, axis: int) -> int:
    """Where ``axis`` (negative) of ``permute(x, dims)``'s output is in its input."""
    rank = _rank(node)
    dims = node.args[1:] if len(node.args) > 2 else node.args[1]
    return _from_end(list(dims)[axis], rank)


def _flip_dims(node: fx.Node) -> list[int]:
    dims = node.args[1:] if len(node.args) > 2 else (node.args[1] if len(node.args) > 1 else node.kwargs.get("dims"))
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    return [_from_end(d, _rank(node)) for d in dims]


def _linear_once(gm: fx.GraphModule, node: fx.Node, what: str) -> nn.Linear:
    linear = module_of(node)
    if node.op != "call_module" or not isinstance(linear, nn.Linear):
        raise _refuse(node, f"{what} is not a call of an nn.Linear (only a linear's weight can absorb s)")
    calls = [m for m in gm.graph.nodes if m.op == "call_module" and m.target == node.target]
    if len(calls) != 1:
        raise _refuse(node, f"{what}'s module is called at {len(calls)} places (its weight can absorb s once)")
    return linear


def _gate_multiplies(out_proj: fx.Node) -> tuple[list[tuple[fx.Node, int]], list[fx.Node]]:
    """Walk back from ``out_proj``'s input to the gate multiplies, following the channel axis.
    Returns ``([(multiply, channel axis there)], merge nodes)``."""
    found, merge = [], []
    stack = [(out_proj.args[0], -1)]
    while stack:
        node, axis = stack.pop()
        if not isinstance(node, fx.Node):
            raise _refuse(out_proj, "its input is not a graph value")
        if node.op == "call_function" and node.target is operator.mul and _role(node) == "gate":
            found.append((node, axis))
            continue
        if len(node.users) != 1:
            raise _refuse(node, f"it is read {len(node.users)} times between the gate and out_proj (only out_proj may "
                                "read the scaled value)")
        merge.append(node)
        if node.op == "call_method" and node.target == "transpose":
            stack.append((node.args[0], _transposed_axis(node, axis)))
        elif node.op == "call_method" and node.target == "permute":
            stack.append((node.args[0], _permuted_axis(node, axis)))
        elif node.op == "call_method" and node.target == "flip":
            if axis in _flip_dims(node):
                raise _refuse(node, "it flips the channel axis")
            stack.append((node.args[0], axis))
        elif node.op == "call_method" and node.target in _PASS_METHODS and isinstance(node.args[0], fx.Node):
            stack.append((node.args[0], axis))
        elif node.op == "call_function" and node.target in _ADDS and not node.kwargs \
                and all(isinstance(a, fx.Node) for a in node.args[:2]) and len(node.args) == 2:
            stack += [(node.args[0], axis), (node.args[1], axis)]
        elif node.op == "call_function" and node.target in _SCALES and isinstance(node.args[0], fx.Node) \
                and len(node.args) == 2 and isinstance(node.args[1], (int, float)):
            stack.append((node.args[0], axis))
        else:
            raise _refuse(node, "it lies between the gate and out_proj and does not commute with a per-channel scale "
                                "(only transposes, permutes, token flips and the direction merge do)")
    if not found:
        raise _refuse(out_proj, "its input is not gated (no 'gate' multiply before it)")
    return found, merge


def _gate_silu(mul: fx.Node) -> fx.Node:
    silus = [a for a in mul.args if isinstance(a, fx.Node) and is_silu(a) and _role(a) == "gate"]
    if len(silus) != 1 or len(silus[0].users) != 1 or silus[0].op == "call_module":
        raise _refuse(mul, "it does not multiply by exactly one gate SiLU (F.silu) read only there")
    return silus[0]


def _z_source(silu: fx.Node, axis: int) -> tuple[fx.Node, int]:
    """Walk back from the gate SiLU's input to ``in_proj`` through transposes and token flips, to
    the channel slice ``in_proj(h)[..., a:b]``. Returns ``(in_proj node, a)``."""
    node = silu.args[0]
    while isinstance(node, fx.Node):
        if node.op == "call_method" and node.target == "transpose":
            axis = _transposed_axis(node, axis)
        elif node.op == "call_method" and node.target == "flip":
            if axis in _flip_dims(node):
                raise _refuse(node, "it flips the gate's channel axis")
        elif node.op == "call_method" and node.target in _PASS_METHODS:
            pass
        elif node.op == "call_function" and node.target is operator.getitem:
            index, source = node.args[1], node.args[0]
            index = index if isinstance(index, tuple) else (index,)
            last = index[-1] if index else None
            if axis != -1 or not isinstance(source, fx.Node) or len(index) > _rank(source) or \
                    not isinstance(last, slice) or last.step not in (None, 1) or \
                    any(i is not Ellipsis and i != slice(None) for i in index[:-1]):
                raise _refuse(node, "the gate's z is not a channel slice x[..., a:b] of in_proj's output")
            return source, int(last.start or 0)
        else:
            raise _refuse(node, "it lies between in_proj and the gate's SiLU (only a channel slice, transposes and "
                                "token flips may)")
        node = node.args[0]
    raise _refuse(silu, "its input does not come from in_proj")


def find_gated_mixers(gm: fx.GraphModule) -> list[GatedMixer]:
    """Every detected ``out_proj`` with the gates it reads, checked as the module docstring says."""
    out_projs = [n for n in gm.graph.nodes if _role(n) == "out_proj"]
    if not out_projs:
        raise ConfigError("the smooth-fused gate scales out_proj's input, but no out_proj linear was detected (see "
                          "vmfx.inspect.table(vmfx.trace(model)) for the roles); quantize without it "
                          "(RotationOptions(smooth_gate=False))")
    mixers, seen = [], set()
    for out_proj in out_projs:
        linear = _linear_once(gm, out_proj, "out_proj")
        if len(out_proj.args) != 1 or out_proj.kwargs:
            raise _refuse(out_proj, "it does not read one tensor input")
        multiplies, merge = _gate_multiplies(out_proj)
        mixer = None
        for mul, axis in multiplies:
            silu = _gate_silu(mul)
            in_proj, rows = _z_source(silu, axis)
            if _role(in_proj) != "in_proj":
                raise _refuse(in_proj, "the gate's z is not sliced from a detected in_proj")
            if mixer is None:
                mixer = GatedMixer(out_proj, in_proj, rows, merge=merge)
            elif (in_proj, rows) != (mixer.in_proj, mixer.rows):
                raise _refuse(silu, f"its z is not the z of the mixer's other gates ({mixer.in_proj.name} rows "
                                    f"{mixer.rows}..)")
            if silu in seen:
                raise _refuse(silu, "the gate is read by two out_proj")
            seen.add(silu)
            mixer.gates.append((silu, axis))
            mixer.multiplies.append(mul)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        mixer.gates.sort(key=lambda gate: order[gate[0]])
        mixer.multiplies.sort(key=order.__getitem__)
        in_linear = _linear_once(gm, mixer.in_proj, "in_proj")
        if mixer.rows + linear.in_features > in_linear.out_features:
            raise _refuse(mixer.in_proj, f"its gate rows {mixer.rows}..{mixer.rows + linear.in_features} exceed its "
                                         f"{in_linear.out_features} outputs")
        if any(m.in_proj is mixer.in_proj for m in mixers):
            raise _refuse(mixer.in_proj, "it feeds two out_proj")
        mixers.append(mixer)
    return mixers


def smooth_gate_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """MambaQuant's ``s = clamp(max|X|^alpha / max(max_i |W_ij|, 1e-5)^(1 - alpha), min=1e-2)`` per
    input channel ``j`` of the linear whose weight is ``W`` (float64)."""
    act = act_absmax.detach().to(torch.float64).cpu()
    w = weight.detach().to(torch.float64).cpu().abs().amax(dim=0).clamp(min=1e-5)
    return (act.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-2)


class SmoothFusedGatePass(Pass):
    """Absorb SmoothQuant factors of ``out_proj``'s input into ``in_proj``'s gate rows, a
    Smooth-SiLU gate and ``out_proj`` (see the module docstring).

    Args:
        alpha: migration strength in ``[0, 1]`` (0.5 in MambaQuant's code).

    Invariants: the float graph computes the same function up to rounding; each gate SiLU node is
    replaced by one ``call_module`` node (logged, so ``vmfx.save`` / ``vmfx.load`` replay it) with
    the gate's annotation; only ``in_proj``'s gate rows and ``out_proj``'s weight change.
    """

    needs_data = True
    requires_facts = ("mixers_detected",)
    forbids_facts = ("observers_inserted", "quantizers_calibrated", "out_proj_input_rotated", "gate_smoothed")
    ensures_facts = ("gate_smoothed",)

    def __init__(self, alpha: float = 0.5):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"SmoothFusedGatePass(alpha=...) must be a number in [0, 1], got {alpha!r}")
        self.alpha = float(alpha)

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if ctx.calib_data is None:
            raise CalibrationDataError("the smooth-fused gate needs calibration data (max |x| of out_proj's input per "
                                       "channel): pass images to vmfx.compile / the Pipeline, or quantize without it "
                                       "(RotationOptions(smooth_gate=False))")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        mixers = find_gated_mixers(gm)
        maxima = self._input_absmax(gm, ctx, mixers)
        record = {}
        for mixer in mixers:
            record[mixer.out_proj.name] = self._absorb(gm, mixer, maxima[mixer.out_proj])
        gm.meta[SMOOTH_GATE_META] = record
        return PassResult(gm, True)

    def _input_absmax(self, gm: fx.GraphModule, ctx: PassContext, mixers: list[GatedMixer]) -> dict:
        """``max |X_j|`` of every ``out_proj``'s input over the calibration data (float64; the
        maximum over processes under :mod:`vmfx.distributed`, exact in any order)."""
        maxima = {m.out_proj: torch.zeros(m.width, dtype=torch.float64) for m in mixers}

        def hook_for(out_proj: fx.Node):
            def hook(module, inputs):
                x = inputs[0].detach()
                amax = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).to(torch.float64).cpu()
                torch.maximum(maxima[out_proj], amax, out=maxima[out_proj])
            return hook

        handles = [module_of(m.out_proj).register_forward_pre_hook(hook_for(m.out_proj)) for m in mixers]
        dist_ctx = distributed.current()
        was_training, images = gm.training, 0
        gm.eval()
        try:
            with torch.no_grad():
                for x in owned_calibration_batches(ctx, input_expectation(gm), dist_ctx):
                    gm(x)
                    images += x.shape[0]
        finally:
            for h in handles:
                h.remove()
            gm.train(was_training)
        if dist_ctx.active:
            images = distributed.all_reduce_sum([images], dist_ctx)[0]
            for key, value in maxima.items():
                maxima[key] = torch.stack(distributed.all_gather(value, dist_ctx)).amax(dim=0)
        if images == 0:
            raise CalibrationDataError("the calibration data gave no images for the smooth-fused gate's statistics")
        return maxima

    def _absorb(self, gm: fx.GraphModule, mixer: GatedMixer, act_absmax: torch.Tensor) -> dict:
        """Divide ``in_proj``'s gate rows by ``s``, multiply ``out_proj``'s columns by ``s``,
        replace the gate SiLUs by Smooth-SiLUs; annotate. Returns the mixer's record."""
        out_linear, in_linear = module_of(mixer.out_proj), module_of(mixer.in_proj)
        dtype = in_linear.weight.dtype
        s_model = smooth_gate_factors(act_absmax, out_linear.weight, self.alpha).to(dtype)
        s = s_model.to(torch.float64)  # the factors exactly as the Smooth-SiLU holds them
        rows = slice(mixer.rows, mixer.rows + mixer.width)
        with torch.no_grad():
            w = in_linear.weight.detach().to(torch.float64).cpu()
            w[rows] = w[rows] / s[:, None]
            in_linear.weight.copy_(w.to(device=in_linear.weight.device, dtype=dtype))
            if in_linear.bias is not None:
                b = in_linear.bias.detach().to(torch.float64).cpu()
                b[rows] = b[rows] / s
                in_linear.bias.copy_(b.to(device=in_linear.bias.device, dtype=in_linear.bias.dtype))
            w = out_linear.weight.detach().to(torch.float64).cpu() * s[None, :]
            out_linear.weight.copy_(w.to(device=out_linear.weight.device, dtype=out_linear.weight.dtype))
        label = f"smooth-fused gate (alpha {self.alpha:g}, {mixer.width} channels)"
        gates = []
        for silu, axis in mixer.gates:
            path = unique_submodule_name(gm, QUANT_PREFIX, f"{silu.name}__smooth_silu")
            module = SmoothSiLU(s_model.clone(), axis).to(device=in_linear.weight.device)
            new = replace_node_with_module(gm, silu, module, path)
            _note(new, f"{label}: {module.describe().split(',')[0]}, s from {mixer.out_proj.name}'s input",
                  scaled_output=True)
            gates.append(new.name)
        bias = ", b <- b / s" if in_linear.bias is not None else ""
        _note(mixer.in_proj, f"{label}: gate rows {rows.start}..{rows.stop} W <- W / s{bias} (the gates "
                             f"{', '.join(gates)} compute silu(z) / s)", scaled_output=True)
        _note(mixer.out_proj, f"{label}: W <- W diag(s) (absorbs the gates' 1 / s)")
        for node in mixer.multiplies + mixer.merge:
            _note(node, None, scaled_output=True)
        return {"in_proj": mixer.in_proj.name, "gates": gates, "alpha": self.alpha, "rows": [rows.start, rows.stop],
                "s_min": float(s.min()), "s_max": float(s.max())}


def _note(node: fx.Node, text: str | None, scaled_output: bool = False) -> None:
    """Append ``text`` to the node's ``extra["rotated"]``; mark its output as scaled by ``1 / s``."""
    ann = annotation(node)
    if ann is None:
        return
    extra = dict(ann.extra)
    if text:
        extra["rotated"] = f"{extra['rotated']} | {text}" if extra.get("rotated") else text
    if scaled_output:
        extra["rotated_output"] = True
    ann.extra = extra
