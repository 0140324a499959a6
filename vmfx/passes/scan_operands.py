"""The operands of the selective scan as quantizable edges (``QuantRule("scan.B", spec)``).

A selective-scan node reads ``selective_scan(u, delta, A, B, C, D, z, delta_bias, ...)``
(:mod:`vmfx.ops.selective_scan`). A rule on the edge ``"scan.<operand>"``
(:data:`vmfx.config.SCAN_EDGES`) puts a quantizer node on that input edge of every scan it selects,
so the scan reads the quantized value (the other readers of the value are untouched):

* activations ``u``, ``delta``, ``B``, ``C``, ``z`` ((batch, channels, L), or (batch, G, N, L) for
  grouped ``B`` / ``C``): an observer during calibration (the config's init method, e.g. min-max
  or the Lp grid), converted to a :class:`~vmfx.quant.FakeQuantize` by ``ConvertPass``; a dynamic
  spec gets its run-time quantizer at once. The edge's token layout is the one detection recorded
  for it or, where none was, the scan's own: tokens on the last dim, in the scan's direction order
  (per-token scales of the backward scan are indexed by its time steps).
* ``A`` (dim, N) and ``D`` (dim,), functions of parameters only (``A = -exp(A_log)``): a static
  ``FakeQuantize`` at once, its min-max parameters computed from the value (per tensor, or per
  channel along dim 0, the model channel), like a weight quantizer; or, for a static per-token
  spec, OuroMamba's layout: the value as one time step with outlier channels
  (:class:`~vmfx.quant.mixed.FlatMixedPrecisionQuantize`), calibrated at once on the value by the
  config's observer (:func:`~vmfx.quant.mixed.calibrate_flat`).

``shared="mixer"`` on the rule makes the scans of one mixer (both directions of a Vim block) call
one quantizer module (one ``call_module`` target): one scale, calibrated on every direction's data
(for ``A`` / ``D``: the min-max over every direction's value).

Every inserted node is annotated with role ``observer`` / ``quantizer`` and ``extra``
``{"quantizes": <scan node>, "edge": "scan.<operand>"}`` (plus ``"shared": "mixer"``), and is
inserted through :func:`~vmfx.passes.graph_utils.insert_module_on_edge`, so ``vmfx.save`` /
``vmfx.load`` replay it (a shared module is one path the replay inserts twice).

:func:`quantized_operands` reads, for coverage, which operands of a scan arrive quantized (by an
operand rule, or by an output rule upstream, e.g. delta by ``dt_proj``'s output rule, u by the
conv SiLU's) and its quantized hidden state.
"""

from __future__ import annotations

import warnings

import torch
import torch.fx as fx
from torch import nn

from ..annotations import annotate, annotation
from ..config import SCAN_OPERANDS, SCAN_WEIGHT_OPERANDS, QuantConfig
from ..errors import ConfigError, ConfigWarning
from ..token_layout import TokenLayout, layout_of
from ..quant.mixed import calibrate_flat
from ..quant.modules import FakeQuantize
from ..quant.observers import Observer, qparams_from_minmax, reduce_minmax
from ..quant.state_quantizer import scan_state_of
from ..quant.spec import QuantSpec
from .graph_utils import insert_module_on_edge, unique_submodule_name
from .inserted import QUANT_PREFIX, make_observer, rule_module_path
from .patterns import is_scan, is_transparent, module_of

__all__ = ["SCAN_ARGUMENTS", "scan_operand_nodes", "operand_layout", "insert_scan_operand_quantizers",
           "quantized_operands", "planned_operands"]

#: The positional parameters of :func:`vmfx.ops.selective_scan`, in order.
SCAN_ARGUMENTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "return_last_state",
                  "state_hook", "state_reader")


def scan_operand_nodes(scan: fx.Node) -> dict[str, fx.Node]:
    """The operands of a ``selective_scan`` node that are graph values, by name (:data:`SCAN_OPERANDS`;
    an operand passed as None or left out is absent)."""
    bound = dict(zip(SCAN_ARGUMENTS, scan.args))
    bound.update({k: v for k, v in scan.kwargs.items() if k in SCAN_ARGUMENTS})
    return {name: bound[name] for name in SCAN_OPERANDS if isinstance(bound.get(name), fx.Node)}


def _rank(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return len(shape) if shape is not None else None


def operand_layout(scan: fx.Node, name: str, node: fx.Node) -> TokenLayout | None:
    """The token layout of operand ``name`` (its node ``node``) of ``scan``: the layout detection
    recorded for the value when it has the tokens on its last dim, else the scan's convention
    (batch dim 0, channels on the dim before the last, tokens on the last, in the order of the
    scan's own layout, identity when unknown). None for a value without tokens (``A``, ``D``, a
    time-invariant (dim, N) ``B`` / ``C``) or of unknown rank."""
    if name in SCAN_WEIGHT_OPERANDS:
        return None
    rank = _rank(node)
    recorded = layout_of(node)
    if recorded is not None and rank == recorded.ndim and recorded.token_dims == (recorded.ndim - 1,):
        return recorded
    if rank is None or rank < 3:
        return None
    length = int(node.meta["tensor_meta"].shape[-1])
    own = annotation(scan).layout if annotation(scan) is not None else None
    order = own.order if own is not None and own.tokens == length else tuple(range(length))
    return TokenLayout(rank, (rank - 1,), rank - 2, length, order, batch_dim=0)


def _constant_value(gm: fx.GraphModule, node: fx.Node, what: str) -> torch.Tensor:
    """The value of ``node`` when it depends on parameters and constants only (run here)."""
    needed, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        if n.op == "placeholder":
            raise ConfigError(f"{what} is computed from the model's input, not from parameters alone, so it cannot "
                              "get a weight-like quantizer; give this operand no rule")
        needed.add(n)
        stack.extend(n.all_input_nodes)
    interp = fx.Interpreter(gm)
    with torch.no_grad():
        for n in gm.graph.nodes:
            if n in needed:
                interp.env[n] = interp.run_node(n)
    value = interp.env[node]
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise ConfigError(f"{what} is not a floating-point tensor ({type(value).__name__}); give it no rule")
    if not bool(torch.isfinite(value).all()):
        raise ConfigError(f"{what} holds NaN or Inf values; fix the checkpoint before quantizing")
    return value.detach()


def _weight_operand_quantizer(values: list[torch.Tensor], spec: QuantSpec) -> FakeQuantize:
    """A static weight-like quantizer with the min-max parameters covering every value (per
    tensor, or per channel along dim 0)."""
    lo = hi = None
    for v in values:
        kept = spec.kept_dims(v.dim(), is_weight=True)
        vlo, vhi = reduce_minmax(v.float(), kept)
        lo = vlo if lo is None else torch.minimum(lo, vlo)
        hi = vhi if hi is None else torch.maximum(hi, vhi)
    return FakeQuantize(spec, qparams_from_minmax(lo, hi, spec), is_weight=True)


def insert_scan_operand_quantizers(gm: fx.GraphModule, config: QuantConfig, observer_factory) -> int:
    """Put a quantizer (or observer) on every scan-operand edge the config's ``scan.*`` rules give
    a spec (see the module docstring); returns how many edges got one.

    Args:
        gm: a detected graph; edited in place (every edit logged for ``vmfx.save``).
        config: the config whose rules decide (:meth:`QuantConfig.rule_for`).
        observer_factory: the activation observer factory (called ``factory(spec[, layout=])``).

    Raises:
        ConfigError: a rule selects a scan vmfx does not know the arguments of (a structural
            match), a per-token or per-channel spec on an operand without tokens, one value feeding
            two operands of a scan one of which is quantized, or ``A`` / ``D`` computed from the input.

    Warns:
        ConfigWarning: a rule selects scans none of which takes its operand (Vim's scans take no
            ``z``: the model gates their output itself).
    """
    plan = []  # (scan, operand name, argument node, rule)
    missing: dict[str, list[str]] = {}
    for scan in gm.graph.nodes:
        ann = annotation(scan)
        if ann is None or ann.role != "scan":
            continue
        module = rule_module_path(scan)
        rules = {name: config.rule_for(f"scan.{name}", "scan", module, scan.name) for name in SCAN_OPERANDS}
        rules = {name: r for name, r in rules.items() if r is not None and r.spec is not None}
        if not rules:
            continue
        if not is_scan(scan):
            raise ConfigError(
                f"{', '.join(f'QuantRule({r.edge!r})' for r in rules.values())} selects scan '{scan.name}', which "
                f"vmfx matched by structure ({ann.extra.get('structural')}: not a call of vmfx's selective_scan), so "
                "its operands have no known places; select the other scans with module= or node="
            )
        operands = scan_operand_nodes(scan)
        for name, rule in rules.items():
            arg = operands.get(name)
            if arg is None:
                missing.setdefault(name, []).append(scan.name)
                continue
            twins = [other for other, node in operands.items() if node is arg and other != name]
            if twins:
                raise ConfigError(
                    f"operands {name} and {', '.join(twins)} of scan '{scan.name}' are one value '{arg.name}': a "
                    "quantizer on the edge would serve all of them; quantize the value with an output rule on its "
                    "producer instead"
                )
            plan.append((scan, name, arg, rule))
    for name, scans in missing.items():
        hint = (" (the model multiplies the scan's output by silu(z) itself, nodes of role 'gate': quantize that "
                "with QuantRule('output', spec, node=...))" if name == "z" else "")
        warnings.warn(f"QuantRule 'scan.{name}' selects scan(s) {', '.join(scans)}, which take no {name} operand; "
                      f"nothing is quantized there{hint}", ConfigWarning, stacklevel=4)

    # one quantizer per (scan, operand), or per (mixer, operand, rule) where the rule shares it
    groups: dict[tuple, list[tuple]] = {}
    for entry in plan:
        scan, name, _, rule = entry
        mixer = annotation(scan).mixer
        key = (mixer, name, id(rule)) if rule.shared == "mixer" and mixer is not None else (scan.name, name)
        groups.setdefault(key, []).append(entry)
    for members in groups.values():
        _insert_group(gm, members, observer_factory)
    return len(plan)


def _insert_group(gm: fx.GraphModule, members: list[tuple], observer_factory) -> None:
    """Insert one quantizer module on the operand edge of every scan in ``members`` (one scan,
    or the scans of a mixer sharing it)."""
    scan0, name, arg0, rule = members[0]
    spec: QuantSpec = rule.spec
    shared = len(members) > 1 or rule.shared is not None
    edge = f"scan.{name}"
    if name in SCAN_WEIGHT_OPERANDS:
        values = [_constant_value(gm, arg, f"operand {name} of scan '{scan.name}'") for scan, _, arg, _ in members]
        if len({tuple(v.shape) for v in values}) != 1:
            raise ConfigError(f"QuantRule({edge!r}, shared={rule.shared!r}): the scans "
                              f"{', '.join(s.name for s, *_ in members)} have {name} of different shapes; "
                              "drop shared")
        if spec.granularity == "token":  # OuroMamba: the whole value as one time step, with outliers
            module = calibrate_flat(observer_factory, spec, values)
        else:
            module = _weight_operand_quantizer(values, spec)
        role, layout = "quantizer", None
    else:
        layout = operand_layout(scan0, name, arg0)
        if layout is None and spec.granularity != "tensor":
            raise ConfigError(
                f"QuantRule({edge!r}) gives operand {name} of scan '{scan0.name}' a {spec.describe()} spec, but "
                f"the value '{arg0.name}' has no tokens on a last dim (a time-invariant (dim, N) matrix, or its shape "
                "is unknown); use granularity 'tensor' for it"
            )
        watched = f"'{arg0.name}' (operand {name} of {scan0.name})"
        if spec.dynamic:
            module, role = (FakeQuantize(spec) if layout is None else FakeQuantize(spec, layout=layout)), "quantizer"
        else:
            module, role = make_observer(observer_factory, spec, layout, watched), "observer"
    mixer = annotation(scan0).mixer
    stem = (f"{mixer.replace('.', '_')}__scan_{name}" if len(members) > 1 and mixer else f"{scan0.name}__{name}")
    path = unique_submodule_name(gm, QUANT_PREFIX, stem)
    for scan, _, arg, _ in members:
        if layout is not None and name not in SCAN_WEIGHT_OPERANDS:
            operand_layout(scan, name, arg).check_shape(arg.meta["tensor_meta"].shape,
                                                        f"operand {name} of scan '{scan.name}'")
        new = insert_module_on_edge(gm, scan, arg, module, path)
        ann = annotation(scan)
        extra = {"quantizes": scan.name, "edge": edge, **({"shared": rule.shared} if shared else {})}
        specs = {"weight_spec": spec} if name in SCAN_WEIGHT_OPERANDS else {"act_spec": spec}
        annotate(new, role, block=ann.block, direction=ann.direction, tokens=ann.tokens, mixer=ann.mixer,
                 extra=extra, **specs)
        own = operand_layout(scan, name, arg)
        if own is not None:
            annotation(new).layout = own


# -- reading ----------------------------------------------------------------------------------------


def _describe(module: nn.Module) -> str:
    describe = getattr(module, "describe", None)
    return describe() if callable(describe) else module.spec.describe()


def _quantizer_behind(node) -> nn.Module | None:
    """The quantizer (or observer) whose value ``node`` is, through value-preserving ops (views,
    transposes, slices, casts, flips), or None."""
    for _ in range(64):
        if not isinstance(node, fx.Node):
            return None
        m = module_of(node)
        if isinstance(m, (FakeQuantize, Observer)):
            return m
        if node.op in ("call_method", "call_function") and is_transparent(node) and node.args \
                and isinstance(node.args[0], fx.Node):
            node = node.args[0]
            continue
        return None
    return None


def quantized_operands(scan: fx.Node) -> dict[str, str]:
    """The quantized operands of a ``selective_scan`` node: ``{name: spec description}`` in the
    order ``u, delta, A, B, C, D, z, state`` (e.g. ``{"B": "uint8 asym per-token", "state":
    "int8 sym per-step +reparam"}``). An operand counts when its value comes out of a quantizer,
    directly or through views / transposes / slices / casts (an operand rule's quantizer, or an
    output rule's upstream: delta from ``dt_proj``'s or the softplus's, u from the conv SiLU's);
    ``state`` when the scan quantizes its hidden state (:class:`~vmfx.quant.state_quantizer.ScanStateQuant`)."""
    out: dict[str, str] = {}
    if not is_scan(scan):
        return out
    for name, node in scan_operand_nodes(scan).items():
        q = _quantizer_behind(node)
        if q is not None and getattr(q, "enabled", True):
            out[name] = _describe(q)
    state = scan_state_of(scan)
    if state is not None and state.quantize:
        out["state"] = f"int{state.bits} sym per-step" + (" +reparam" if state.reparameterized else "")
    return out


def planned_operands(config: QuantConfig, scan: fx.Node) -> dict[str, str]:
    """What ``config`` would quantize of ``scan``'s operands (its ``scan.*`` rules, on the operands
    the scan takes) and of its state (``config.scan_state``), as :func:`quantized_operands` lists
    them once quantized (quantizers that output rules put upstream are not foreseen here)."""
    out: dict[str, str] = {}
    if not is_scan(scan):
        return out
    present = scan_operand_nodes(scan)
    for name in SCAN_OPERANDS:
        rule = config.rule_for(f"scan.{name}", "scan", rule_module_path(scan), scan.name)
        if rule is not None and rule.spec is not None and name in present:
            out[name] = rule.spec.describe()
    state = config.scan_state
    if state is not None and state.quantize:
        out["state"] = f"int{state.bits} sym per-step" + (" +reparam" if state.reparameterize else "")
    return out
