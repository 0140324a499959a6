"""Coverage: every linear, conv and scan of a model, quantized or float, and why.

:func:`coverage` answers "what did vmfx quantize?" for a quantized graph (from ``vmfx.compile``),
a traced graph, or a float model (traced here; then the answer is what ``config`` *would*
quantize). Each :class:`LayerCoverage` is one layer with its status and the reason, in one of four
categories:

* ``"quantized"``: its input and/or weight edge has a quantizer (the bits are listed); a scan is
  quantized when any of its operands (``u, delta, A, B, C, D, z``) arrives quantized or it
  quantizes its hidden state (``state``), listed in :attr:`LayerCoverage.quantized_operands`;
* ``"config"``: float because the config says so (its role is not in ``QuantConfig.roles``, e.g.
  the classifier head by default, or a ``QuantRule`` keeps it float);
* ``"design"``: float by the method's design (vmfx's methods quantize linears: convs and the
  selective scan itself run in floating point, on float operands unless a rule quantizes them);
* ``"unsupported"``: float although the method would quantize it: a linear detection could not
  place, a scan that did not match a mixer, or a layer inside a module vmfx could not trace
  (:func:`vmfx.frontends.trace_with_fallback` kept it opaque).

``vmfx.compile`` warns once (:class:`CoverageWarning`) with the count of ``"unsupported"`` layers:
never a silent partial quantization.

A lowered model (:func:`vmfx.lowering.lower`) reports the quantized model it was lowered from
when it keeps it; loaded from a file it keeps none, and each kernel node lists the layers it
computes and their specs (:func:`kernel_layers`), so the report is the same either way.

Layers inside opaque modules are listed under the module's path (``<module>.<sub>``), from the
module's own children; everything else is a graph node, listed under its node name.

Besides the layers, :attr:`CoverageReport.outside_mixers` lists the quantized tensors outside every
Mamba mixer (the patch embedding's weight and output, the head's input, weight and output, the
norms' weights and outputs, the linears of hybrid models), and :attr:`CoverageReport.inside_mixers`
the quantized tensors inside the mixers of nodes that are no linear, conv or scan (a block's norm,
the SiLUs, among them the gate's ``act_z``, the softplus), one :class:`QuantizedTensor` each. A conv
is quantized when its weight or its output is.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .annotations import annotation
from .config import QuantConfig, resolve_config
from .errors import ConfigError
from .frontends.fallback import FALLBACK_META
from .passes.detect import DetectMambaMixersPass
from .passes.linear_edges import linear_edges
from .passes.manager import PassManager
from .passes.patterns import is_linear, is_scan, module_of
from .passes.pipeline import trace_for_quantization
from .quant.modules import FakeQuantize

__all__ = ["LayerCoverage", "CoverageReport", "CoverageWarning", "QuantizedTensor", "coverage", "warn_if_partial"]

_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d}


class CoverageWarning(UserWarning):
    """Some layers stay float although the method would quantize them."""


@dataclass
class LayerCoverage:
    """One linear, conv or scan.

    Attributes:
        name: the graph node's name, or ``<opaque module path>.<sub path>`` inside an opaque module.
        kind: "linear", "conv" or "scan".
        role: vmfx's role for it ("" if none).
        quantized: whether any of its edges is quantized (or, for a float model, would be).
        category: "quantized", "config", "design" or "unsupported" (see the module docstring).
        reason: why, in words.
        bits: e.g. "W8 A8" for a quantized linear, "A8 B8 C8 D8 state8" for a scan with
            quantized operands ("" otherwise).
        quantized_operands: for a scan, its quantized operands in the order ``u, delta, A, B, C,
            D, z, state``, each with its spec, e.g. ``{"B": "uint8 asym per-token", "state":
            "int8 sym per-step +reparam"}`` (:func:`vmfx.passes.scan_operands.quantized_operands`;
            for a plan, what the config's ``scan.*`` rules and ``scan_state`` would quantize).
            Empty for other layers and for a scan on float operands.
    """

    name: str
    kind: str
    role: str
    quantized: bool
    category: str
    reason: str
    bits: str = ""
    quantized_operands: dict[str, str] = field(default_factory=dict)


@dataclass
class QuantizedTensor:
    """One quantized tensor outside the Mamba mixers (:attr:`CoverageReport.outside_mixers`).

    Attributes:
        node: the node whose edge is quantized (e.g. ``"head"``, ``"norm_f"``).
        role: that node's role (``"head"``, ``"norm"``, ``"patch_embed"``, ``"linear"``, ...).
        edge: "input", "weight" or "output".
        spec: the quantizer's spec, e.g. ``"int8 sym per-channel"``.
        bits: its bit width.
    """

    node: str
    role: str
    edge: str
    spec: str
    bits: int


@dataclass
class CoverageReport:
    """The layers of one model (:func:`coverage`); ``str(report)`` is a table with a summary line."""

    layers: list[LayerCoverage]
    planned: bool = False
    config: str = ""
    outside_mixers: list[QuantizedTensor] = field(default_factory=list)
    inside_mixers: list[QuantizedTensor] = field(default_factory=list)

    @property
    def quantized(self) -> list[LayerCoverage]:
        return [layer for layer in self.layers if layer.quantized]

    @property
    def float_layers(self) -> list[LayerCoverage]:
        return [layer for layer in self.layers if not layer.quantized]

    @property
    def unsupported(self) -> list[LayerCoverage]:
        return [layer for layer in self.layers if layer.category == "unsupported"]

    def counts(self) -> dict[str, dict[str, int]]:
        """``{kind: {"quantized": n, "float": m}}``."""
        out: dict[str, dict[str, int]] = {}
        for layer in self.layers:
            c = out.setdefault(layer.kind, {"quantized": 0, "float": 0})
            c["quantized" if layer.quantized else "float"] += 1
        return out

    def as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(layer) for layer in self.layers]

    def summary_line(self) -> str:
        parts = [f"{c['quantized']}/{c['quantized'] + c['float']} {kind}s quantized"
                 for kind, c in sorted(self.counts().items())]
        tail = f"; {len(self.unsupported)} layers float although the method would quantize them" \
            if self.unsupported else ""
        head = f"planned under {self.config}: " if self.planned else ""
        return head + ", ".join(parts) + tail

    def __str__(self) -> str:
        headers = ["layer", "kind", "role", "status", "bits", "why"]
        body = [[layer.name, layer.kind, layer.role, "quantized" if layer.quantized else f"float ({layer.category})",
                 layer.bits, layer.reason] for layer in self.layers]
        widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in body]
        operands = [f"{layer.name}: " + ", ".join(f"{k} {v}" for k, v in layer.quantized_operands.items())
                    for layer in self.layers if layer.quantized_operands]
        if operands:
            lines += ["", "quantized scan operands:"] + [f"  {line}" for line in operands]
        if self.outside_mixers:
            lines += ["", "quantized outside the mixers:"] + [f"  {t.node} ({t.role}) {t.edge}: {t.spec}"
                                                            for t in self.outside_mixers]
        if self.inside_mixers:
            lines += ["", "quantized inside the mixers (besides linears, convs and scans):"] + [
                f"  {t.node} ({t.role}) {t.edge}: {t.spec}" for t in self.inside_mixers]
        return "\n".join(lines + ["", self.summary_line()])


def coverage(model: Any, config: str | QuantConfig | None = None, example_inputs: Any = None) -> CoverageReport:
    """Every linear, conv and scan of ``model``, quantized or float, and why.

    Args:
        model: a quantized graph (``vmfx.compile``), a lowered one (with a backend, or loaded
            from a file), a traced graph (``vmfx.trace``), or a float ``nn.Module`` (traced here;
            its copy, the model is not modified).
        config: for a graph that is not quantized yet (or a float model): the config whose plan
            to report (default ``"minmax-w8a8"``); ignored for a quantized graph.
        example_inputs: for a float model: an image batch for shape propagation (recommended:
            without shapes, token layouts and the ``"linear"`` roles cannot all be decided).
    """
    if isinstance(model, fx.GraphModule) and model.meta.get("vmfx_lowered"):
        # a lowered model quantizes what the quantized model it was lowered from quantizes: report on
        # that one where it is kept; a lowered model loaded from a file keeps none, and its kernels'
        # records (kernel_layers) say which layers each one computes and how they are quantized
        source = model.meta.get("vmfx_unlowered")
        if isinstance(source, fx.GraphModule):
            model = source
    gm = _as_graph(model, example_inputs)
    quantized_graph = any(isinstance(m, FakeQuantize) for m in gm.modules()) or "vmfx_config" in gm.meta
    if quantized_graph:
        cfg = QuantConfig.from_dict(gm.meta["vmfx_config"]) if "vmfx_config" in gm.meta else None
        planned = False
    else:
        cfg = resolve_config(config or "minmax-w8a8")
        planned = True
    fallback = {d["target"]: d for d in gm.meta.get(FALLBACK_META, [])}
    failures = dict(gm.meta.get("vmfx_detect_failures") or [])
    layers: list[LayerCoverage] = []
    outside: list[QuantizedTensor] = []
    inside: list[QuantizedTensor] = []
    for node in gm.graph.nodes:
        kernel = kernel_layers(node)
        if kernel is not None:  # a lowered partition: the layers it replaced, as lower() recorded them
            layers.extend(_kernel_layer(record, node.name) for record in kernel if record["kind"] != "rotation")
            outside.extend(t for record in kernel if record["kind"] == "linear"
                           and record.get("role") in _OUTSIDE_LINEAR_ROLES for t in _kernel_outside(record))
        elif is_linear(node):
            layers.append(_linear(gm, node, cfg, planned))
        elif _is_conv(node):
            layers.append(_conv(gm, node, cfg, planned))
        elif is_scan(node) or ((ann := annotation(node)) is not None and ann.role == "scan"):
            layers.append(_scan(node, failures, cfg if planned else None))
        elif node.op == "call_module" and _is_opaque(module_of(node)):
            layers.extend(_opaque(node, fallback))
        else:
            outside.extend(_outside_quantizer(gm, node))
            inside.extend(_inside_quantizer(gm, node))
    return CoverageReport(layers, planned, cfg.method + "-" + cfg.bits if cfg is not None else "", outside, inside)


def kernel_layers(node: fx.Node) -> list[dict] | None:
    """The layers a lowered kernel node computes (:func:`vmfx.lowering.runtime.kernel_layers`,
    recorded on its annotation by ``lower``), or None when ``node`` is not a kernel. A lowered model
    loaded from a file keeps them too: its kernels were made by ``lower`` on the rebuilt graph."""
    ann = annotation(node)
    if ann is None or ann.role != "kernel":
        return None
    return list(ann.extra.get("layers") or [])


def linear_spec_text(record: dict) -> str:
    """``"A <input spec> | W <weight spec>"`` of one linear record of a kernel (``float`` for an
    edge the kernel does not quantize)."""
    return f"A {record.get('input') or 'float'} | W {record.get('weight') or 'float'}"


def _kernel_layer(record: dict, kernel: str) -> LayerCoverage:
    name, kind, role = record["node"], record["kind"], record.get("role") or ""
    if kind == "linear":
        bits = " ".join(f"{label}{_bits_of(record.get(edge))}" for label, edge in (("W", "weight"), ("A", "input"))
                        if record.get(edge))
        quantized = bool(record.get("input") or record.get("weight"))
        return LayerCoverage(name, "linear", role, quantized, "quantized" if quantized else "config",
                             f"in kernel {kernel}" if quantized else f"in kernel {kernel}, in floating point", bits)
    if kind == "conv":
        return LayerCoverage(name, "conv", role, False, "design",
                             f"vmfx's methods quantize linears; convs run in floating point (in kernel {kernel})")
    operands = dict(record.get("operands") or {})
    if record.get("state") and "state" not in operands:  # a kernel recorded before operands were
        operands["state"] = record["state"]
    if operands:
        return LayerCoverage(name, "scan", role, True, "quantized",
                             f"the scan runs in floating point on its quantized operands (in kernel {kernel})",
                             _operand_bits(operands), operands)
    return LayerCoverage(name, "scan", role, False, "design",
                         f"the selective scan runs in floating point (in kernel {kernel})")


def _operand_bits(operands: dict[str, str]) -> str:
    """``"A8 B8 C8 state8"``: each quantized operand with its bit width."""
    return " ".join(f"{name}{_bits_of(spec.removeprefix('h '))}" for name, spec in operands.items())


#: Roles of linears that are never inside a mixer (their kernels' records are listed as outside).
_OUTSIDE_LINEAR_ROLES = ("head", "linear")


def _kernel_outside(record: dict) -> list[QuantizedTensor]:
    """The quantized edges of a lowered linear outside the mixers, as its kernel recorded them."""
    return [QuantizedTensor(record["node"], record.get("role") or "", edge, record[edge], _bit_width(record[edge]))
            for edge in ("input", "weight") if record.get(edge)]


def _bit_width(described: str) -> int:
    digits = _bits_of(described)
    return int(digits) if digits.isdigit() else 0


def _outside_quantizer(gm: fx.GraphModule, node: fx.Node) -> list[QuantizedTensor]:
    """``node`` as a quantized tensor outside the mixers, when it is a quantizer (or observer)
    node serving a node outside every mixer ([] otherwise)."""
    ann = annotation(node)
    if ann is None or ann.role not in ("quantizer", "observer") or ann.mixer is not None or node.op != "call_module":
        return []
    served = ann.extra.get("quantizes")
    edge = ann.extra.get("edge")
    if served is None or edge not in ("input", "weight", "output"):
        return []
    module = module_of(node)
    spec = getattr(module, "spec", None)
    if spec is None:
        return []
    describe = getattr(module, "describe", None)
    text = describe() if callable(describe) else spec.describe()
    producer = next((n for n in gm.graph.nodes if n.name == served), None)
    role = annotation(producer).role if producer is not None and annotation(producer) is not None else ""
    return [QuantizedTensor(served, role, edge, text, spec.bits)]


#: Roles whose quantized edges :class:`LayerCoverage` rows report (not listed again as tensors).
_LAYER_ROLES = ("in_proj", "x_proj", "dt_proj", "out_proj", "conv1d", "scan", "linear", "head", "patch_embed")


def _inside_quantizer(gm: fx.GraphModule, node: fx.Node) -> list[QuantizedTensor]:
    """``node`` as a quantized tensor inside a mixer, when it is a quantizer (or observer) on the
    weight or output of a node there that is no linear, conv or scan ([] otherwise)."""
    ann = annotation(node)
    if ann is None or ann.role not in ("quantizer", "observer") or ann.mixer is None or node.op != "call_module":
        return []
    served, edge = ann.extra.get("quantizes"), ann.extra.get("edge")
    if served is None or edge not in ("weight", "output"):
        return []
    producer = next((n for n in gm.graph.nodes if n.name == served), None)
    role = annotation(producer).role if producer is not None and annotation(producer) is not None else ""
    spec = getattr(module_of(node), "spec", None)
    if spec is None or role in _LAYER_ROLES:
        return []
    return [QuantizedTensor(served, role, edge, spec.describe(), spec.bits)]


def _edge_quantizers(gm: fx.GraphModule, node: fx.Node) -> dict[str, Any]:
    """``{"weight": spec, "output": spec}``: the quantizers (or observers) inserted on a node's
    weight and output edges, by their annotation's ``extra`` (``quantizes`` names the node)."""
    found = {}
    for other in gm.graph.nodes:
        ann = annotation(other)
        if ann is None or other.op != "call_module" or ann.extra.get("quantizes") != node.name:
            continue
        spec = getattr(module_of(other), "spec", None)
        if spec is not None and ann.extra.get("edge") in ("weight", "output"):
            found[ann.extra["edge"]] = spec
    return found


def _conv(gm: fx.GraphModule, node: fx.Node, cfg: QuantConfig | None, planned: bool) -> LayerCoverage:
    """A conv's coverage: quantized when its weight or output edge has a quantizer (or, planned,
    when the config's rules give one a spec)."""
    from .annotations import node_op
    from .passes.inserted import rule_module_path

    ann = annotation(node)
    role = ann.role if ann else ""
    if planned and cfg is not None and ann is not None:
        specs = {edge: cfg.spec_for(edge, role, rule_module_path(node), node.name, node_op(node))
                 for edge in ("weight", "output")}
        specs = {k: v for k, v in specs.items() if v is not None}
    else:
        specs = _edge_quantizers(gm, node)
    if specs:
        bits = " ".join(f"{'W' if edge == 'weight' else 'O'}{spec.bits}" for edge, spec in sorted(specs.items(),
                                                                                                 reverse=True))
        what = " and ".join(f"its {edge} ({spec.describe()})" for edge, spec in sorted(specs.items(), reverse=True))
        return LayerCoverage(node.name, "conv", role, True, "quantized", f"{what} quantized", bits)
    return LayerCoverage(node.name, "conv", role, False, "design",
                         "vmfx's methods quantize linears; convs run in floating point")


def _bits_of(described: str) -> str:
    """The bit width in a spec description (``"uint8 asym per-tensor"`` -> ``"8"``)."""
    digits = "".join(c for c in described.split()[0] if c.isdigit())
    return digits or "?"


def _as_graph(model: Any, example_inputs: Any) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule):
        if not any(annotation(n) is not None for n in model.graph.nodes):
            model = PassManager([DetectMambaMixersPass()])(model).graph_module
        return model
    if not isinstance(model, nn.Module):
        raise ConfigError(f"coverage expects a vmfx graph or a float nn.Module, got {type(model).__name__}")
    import torch

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report itself says what the warnings would
        gm, _ = trace_for_quantization(model, example_inputs=example_inputs)
        return PassManager([DetectMambaMixersPass()])(gm).graph_module


def _is_conv(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _CONV_FUNCTIONS
    return isinstance(module_of(node), _CONV_MODULES)


def _is_opaque(m: nn.Module | None) -> bool:
    """A leaf module that is not a torch.nn built-in or one of vmfx's own modules."""
    if m is None:
        return False
    module = type(m).__module__
    return not (module.startswith("torch.nn") or module.startswith("vmfx."))


def _bits(gm: fx.GraphModule, node: fx.Node) -> str:
    edges = linear_edges(node)
    out = []
    for label, q in (("W", edges.weight_quant), ("A", edges.act_quant)):
        m = module_of(q) if q is not None else None
        spec = getattr(m, "spec", None)
        if spec is not None:
            out.append(f"{label}{spec.bits}")
    return " ".join(out)


def _linear(gm: fx.GraphModule, node: fx.Node, cfg: QuantConfig | None, planned: bool) -> LayerCoverage:
    ann = annotation(node)
    role = ann.role if ann is not None else ""
    if not planned and node.op == "call_function":
        edges = linear_edges(node)
        if edges.act_quant is not None or edges.weight_quant is not None:
            return LayerCoverage(node.name, "linear", role, True, "quantized", "", _bits(gm, node))
    if ann is None:
        source = node.args[0] if node.args else None
        shape = getattr(getattr(source, "meta", {}).get("tensor_meta"), "shape", None)
        why = ("its input is not a token sequence (rank < 3), so vmfx gives it no role" if shape is not None
               and len(shape) < 3 else "detection gave it no role")
        return LayerCoverage(node.name, "linear", "", False, "unsupported", why)
    if cfg is None:
        return LayerCoverage(node.name, "linear", role, False, "config", "the graph carries no config")
    module = node.target if node.op == "call_module" else node.meta.get("vmfx_module")
    a_spec = cfg.spec_for("input", role, module, node.name)
    w_spec = cfg.spec_for("weight", role, module, node.name)
    if a_spec is not None or w_spec is not None:
        if planned:
            bits = " ".join(f"{k}{s.bits}" for k, s in (("W", w_spec), ("A", a_spec)) if s is not None)
            return LayerCoverage(node.name, "linear", role, True, "quantized", "", bits)
        return LayerCoverage(node.name, "linear", role, False, "unsupported",
                             "the config gives it a spec but the graph has no quantizer on it")
    if role not in cfg.roles and not any(r.matches("weight", role, module, node.name) or
                                         r.matches("input", role, module, node.name) for r in cfg.rules):
        what = "the classifier head" if role == "head" else f"role '{role}'"
        return LayerCoverage(node.name, "linear", role, False, "config",
                             f"{what} is not in QuantConfig.roles (a QuantRule with role='{role}' quantizes it)")
    return LayerCoverage(node.name, "linear", role, False, "config", "a QuantRule keeps it float")


def _scan(node: fx.Node, failures: dict, plan: QuantConfig | None = None) -> LayerCoverage:
    """A scan's coverage; ``plan``: the config whose plan to report (a graph not quantized yet)."""
    from .passes.scan_operands import planned_operands, quantized_operands

    ann = annotation(node)
    if ann is None or ann.role != "scan":
        why = failures.get(node.name, "not part of a detected mixer")
        return LayerCoverage(node.name, "scan", "", False, "unsupported",
                             f"its mixer was not recognised ({why}), so its linears got no mixer role")
    operands = planned_operands(plan, node) if plan is not None else quantized_operands(node)
    if operands:
        return LayerCoverage(node.name, "scan", "scan", True, "quantized",
                             "the scan runs in floating point on its quantized operands",
                             _operand_bits(operands), operands)
    kind = ann.extra.get("structural")
    if kind == "leaf":
        why = f"a scan vmfx does not know ({ann.extra.get('callable')}), kept as one opaque call; its mixer is quantized around it"
    elif kind == "inline":
        why = "a scan traced op by op (recognised by the mixer's structure); it runs in floating point"
    else:
        why = "the selective scan runs in floating point; the linears around it are quantized"
    return LayerCoverage(node.name, "scan", "scan", False, "design", why)


def _opaque(node: fx.Node, fallback: dict) -> list[LayerCoverage]:
    m = module_of(node)
    qual = f"{type(m).__module__}.{type(m).__qualname__}"
    decision = fallback.get(qual)
    why = (f"inside {node.target} ({type(m).__name__}), kept opaque because it cannot be traced: {decision['cause']}"
           if decision else f"inside {node.target} ({type(m).__name__}), a leaf module vmfx does not look into")
    out = []
    for sub, child in m.named_modules():
        kind = "linear" if isinstance(child, nn.Linear) else "conv" if isinstance(child, _CONV_MODULES) else None
        if kind is not None:
            name = f"{node.target}.{sub}" if sub else str(node.target)
            out.append(LayerCoverage(name, kind, "", False, "unsupported", why))
    return out


def warn_if_partial(qmodel: fx.GraphModule, stacklevel: int = 3) -> CoverageReport:
    """Warn once (:class:`CoverageWarning`) with the count when layers the method would quantize
    stay float; returns the report."""
    report = coverage(qmodel)
    bad = report.unsupported
    if bad:
        names = ", ".join(layer.name for layer in bad[:5]) + (" and more" if len(bad) > 5 else "")
        warnings.warn(
            f"vmfx left {len(bad)} layer(s) in float that the method would quantize ({names}); "
            f"{report.summary_line()}. See vmfx.inspect.coverage(qmodel) for each layer and why.",
            CoverageWarning, stacklevel=stacklevel,
        )
    return report
