"""Inspection at every stage: per-node tables, graph drawings, and per-layer error.

* :func:`table` / :func:`rows`: ``print_tabular`` plus vmfx's columns (role, block, direction,
  tokens, quantization spec, scale shape).
* :func:`summary`: counts of roles, mixers and quantized layers.
* :func:`coverage`: every linear, conv and scan, quantized or float, and why (:mod:`vmfx.coverage`).
* :func:`to_networkx`, :func:`to_dot`, :func:`draw`: the graph as a networkx ``DiGraph`` or DOT
  text, nodes labelled and coloured by role.
* :func:`compare`: run a float and a quantized graph on the same images and report SQNR and
  cosine similarity per annotated node (FP vs quantized), the answer to "which layer broke?".
* :func:`activation_stats`, :func:`plot_distributions`: the three effects the Vision-Mamba PTQ
  papers name (per-token variance, per-channel outliers, long tails) for one block, as PNGs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn

from .annotations import annotation
from .coverage import CoverageReport, coverage, kernel_layers, linear_spec_text
from .errors import ConfigError, InputError
from .passes.calibrate import input_expectation, iter_calibration_batches
from .passes.detect import DetectMambaMixersPass
from .passes.manager import PassManager
from .passes.patterns import module_of
from .passes.pipeline import trace_for_quantization
from .passes.linear_edges import linear_edges, quantized_linears
from .passes.patterns import is_linear
from .quant.mixed import MixedPrecisionQuantize
from .quant.state_quantizer import scan_state_of
from .quant.modules import FakeQuantize, Smooth
from .quant.observers import Observer

__all__ = [
    "coverage",
    "CoverageReport",
    "rows",
    "table",
    "summary",
    "to_networkx",
    "to_dot",
    "draw",
    "compare",
    "CompareReport",
    "LayerError",
    "ActivationStats",
    "activation_stats",
    "plot_distributions",
    "OutlierSets",
    "outlier_sets",
    "plot_outliers",
]

_ROLE_COLOURS = {
    "patch_embed": "#c6dbef", "norm": "#e5e5e5", "in_proj": "#fdd0a2", "conv1d": "#c7e9c0",
    "conv_act": "#e5f5e0", "x_proj": "#fdae6b", "dt_proj": "#fd8d3c", "dt_act": "#fee6ce",
    "scan": "#9e9ac8", "gate": "#dadaeb", "merge": "#f0f0f0", "out_proj": "#e6550d",
    "head": "#6baed6", "observer": "#fff7bc", "quantizer": "#fec44f", "smooth": "#fdbe85",
}

_DIR_SHORT = {"forward": "fwd", "backward": "bwd"}


# -- tables ---------------------------------------------------------------------------------------


def _target(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    return getattr(t, "__qualname__", getattr(t, "__name__", str(t)))


def _shape(node: fx.Node) -> str:
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return "x".join(str(d) for d in meta.shape)
    return ""


def _fq_text(fq: FakeQuantize | None) -> tuple[str, str]:
    if fq is None:
        return "float", ""
    shape = "dynamic" if fq.scale is None else "x".join(str(d) for d in fq.scale.shape) or "scalar"
    if isinstance(fq, MixedPrecisionQuantize):  # OuroMamba: inliers + dynamic outlier channels
        return fq.describe(), shape
    return fq.spec.describe(), shape


def _spec_text(spec) -> str:
    return "float" if spec is None else spec.describe()


def _quant_columns(node: fx.Node) -> tuple[str, str]:
    """The spec and scale-shape columns: a quantizer or observer node shows its own; a linear the
    specs of its two edges (``A ... | W ...``), as decided by the config's rules."""
    m = module_of(node)
    if isinstance(m, FakeQuantize):
        return _fq_text(m)
    if isinstance(m, Observer):
        return f"observing {m.spec.describe()}", ""
    if isinstance(m, Smooth):
        side = "W * s" if node.kwargs.get("weight") else "x / s"
        alpha = (annotation(node).extra.get("alpha") if annotation(node) is not None else None)
        return f"smooth {side}" + (f" alpha {alpha:g}" if alpha is not None else ""), "x".join(str(d) for d in m.factors.shape)
    state = scan_state_of(node) if node.op == "call_function" else None
    if state is not None:  # a scan with a quantized (or reparameterized) hidden state
        return state.describe(), f"h {state.length}" if state.quantize else ""
    ann = annotation(node)
    kernel = kernel_layers(node)
    if kernel is not None:  # a lowered partition: what each linear it computes quantizes
        return _kernel_spec_text(kernel), ""
    if ann is not None and is_linear(node) and (ann.act_spec is not None or ann.weight_spec is not None):
        edges = linear_edges(node)
        alpha = ann.extra.get("smoothing_alpha")
        smooth = "" if edges.smooth_module() is None else " +smooth" + (f" alpha {alpha:g}" if alpha is not None else "")
        shapes = []
        for label, edge in (("A", "input"), ("W", "weight")):
            q = edges.quantizer(edge)
            shapes.append(f"{label} {_fq_text(q)[1] if isinstance(q, FakeQuantize) else ''}".rstrip())
        scale = " | ".join(shapes) if any(len(x) > 1 for x in shapes) else ""
        iq = edges.quantizer("input")
        a_text = iq.describe() if isinstance(iq, MixedPrecisionQuantize) else _spec_text(ann.act_spec)
        return f"A {a_text} | W {_spec_text(ann.weight_spec)}{smooth}", scale
    return "", ""


def _kernel_spec_text(records: list[dict]) -> str:
    """The spec column of a lowered kernel: ``A .. | W ..`` of the one linear it computes, else
    ``<role> [dir]: A .. | W ..`` per linear (``; ``-separated), plus a quantized scan state, the
    online Hadamard it applies and the rotations its linears' weights absorbed."""
    linears = [r for r in records if r["kind"] == "linear"]
    parts = [linear_spec_text(r) if len(linears) == 1 else
             f"{r.get('role') or r['node']}{' ' + _DIR_SHORT.get(r['direction'], r['direction']) if r.get('direction') else ''}: "
             f"{linear_spec_text(r)}" for r in linears]
    parts += [f"scan state {r['state']}" for r in records if r["kind"] == "scan" and r.get("state")]
    parts += [r["rotation"] for r in records if r["kind"] == "rotation" and r.get("rotation")]
    parts += [r["rotated"] for r in linears if r.get("rotated")]
    return "; ".join(parts)


def _as_graph(model: Any, example_inputs: Any = None) -> fx.GraphModule:
    """A graph to inspect: ``model`` itself if it is one, else a float ``nn.Module`` traced (a
    copy; the model is not modified) with its Mamba patterns detected."""
    if isinstance(model, fx.GraphModule):
        from .lowering.runtime import lost_metadata_hint

        hint = lost_metadata_hint(model)
        if hint:  # roles, blocks and token layouts are gone: say so rather than print a bare table
            warnings.warn("vmfx.inspect: the table has no roles, blocks or layouts" + hint, stacklevel=3)
        return model
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"expected a vmfx graph (from vmfx.trace / vmfx.compile) or a float nn.Module, got {type(model).__name__}"
        )
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    gm, _ = trace_for_quantization(model, example_inputs=example_inputs)
    return PassManager([DetectMambaMixersPass()])(gm).graph_module


def rows(gm: fx.GraphModule | nn.Module, all_nodes: bool = False, example_inputs: Any = None) -> list[dict[str, Any]]:
    """One dict per node: name, op, target, role, block, direction, tokens, shape, spec, scale.

    Args:
        gm: a vmfx graph (traced, prepared or converted), or a float ``nn.Module``, which is
            traced here (as :func:`vmfx.trace` does) so its patterns can be listed.
        all_nodes: include nodes without a vmfx role (views, casts, ...); default: annotated
            nodes and quantization modules only.
        example_inputs: for an ``nn.Module``: an image batch (or tuple) to propagate shapes
            with, which fills the shape and tokens columns (empty without it).
    """
    gm = _as_graph(gm, example_inputs)
    out = []
    for node in gm.graph.nodes:
        ann = annotation(node)
        spec, scale = _quant_columns(node)
        rotated = ann.extra.get("rotated") if ann is not None else None
        if rotated:  # an offline rotation this node's weights absorbed (vmfx.passes.rotate)
            spec = f"{spec} | {rotated}" if spec else rotated
        if not all_nodes and ann is None and not spec:
            continue
        out.append(
            {
                "node": node.name,
                "op": node.op,
                "target": _target(node),
                "role": ann.role if ann else "",
                "block": "" if ann is None or ann.block is None else ann.block,
                "dir": "" if ann is None or ann.direction is None else _DIR_SHORT.get(ann.direction, ann.direction),
                "tokens": "" if ann is None or ann.tokens is None else ann.tokens,
                "shape": _shape(node),
                "spec": spec,
                "scale": scale,
            }
        )
    return out


def table(gm: fx.GraphModule | nn.Module, all_nodes: bool = False, example_inputs: Any = None) -> str:
    """The per-node table as text (see :func:`rows`; a float ``nn.Module`` is traced first)."""
    data = rows(gm, all_nodes, example_inputs)
    headers = ["node", "op", "target", "role", "block", "dir", "tokens", "shape", "spec", "scale"]
    return _format_table(headers, [[str(r[h]) for h in headers] for r in data])


def _format_table(headers: list[str], body: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(row[i]) for row in body]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()
    rule = "  ".join("-" * w for w in widths)
    text = [line, rule] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
    return "\n".join(text)


def summary(gm: fx.GraphModule | nn.Module, example_inputs: Any = None) -> dict[str, Any]:
    """Counts: nodes per role, mixers and their directions, quantized linears, calibration info.

    ``gm`` is a vmfx graph (traced, prepared, quantized or lowered) or a float ``nn.Module``,
    traced here as :func:`vmfx.trace` does (``example_inputs`` for shape propagation). A lowered
    model counts the linears its kernels quantize (``kernels`` counts the kernels), so it reports
    what the quantized model it was lowered from reports, whether or not it was loaded from a file.
    """
    gm = _as_graph(gm, example_inputs)
    roles: dict[str, int] = {}
    for node in gm.graph.nodes:
        ann = annotation(node)
        if ann is not None:
            roles[ann.role] = roles.get(ann.role, 0) + 1
    mixers = gm.meta.get("vmfx_mixers", [])
    qlinears = [e for e in quantized_linears(gm) if e.act_quant is not None or e.weight_quant is not None]
    kernels = [layers for node in gm.graph.nodes if (layers := kernel_layers(node)) is not None]
    kernel_linears = sum(1 for layers in kernels for r in layers
                         if r["kind"] == "linear" and (r.get("input") or r.get("weight")))
    return {
        "nodes": len(gm.graph.nodes),
        "roles": roles,
        "mixers": len(mixers),
        "scans": sum(len(m["directions"]) for m in mixers),
        "quantized_linears": len(qlinears) + kernel_linears,
        "kernels": len(kernels),
        "observers": sum(isinstance(m, Observer) for m in gm.modules()),
        "config": gm.meta.get("vmfx_config"),
        "calibration": gm.meta.get("vmfx_calibration"),
    }


# -- drawings -------------------------------------------------------------------------------------


def to_networkx(gm: fx.GraphModule):
    """The graph as a ``networkx.DiGraph``; node attributes are the :func:`rows` columns."""
    import networkx as nx

    g = nx.DiGraph()
    info = {r["node"]: r for r in rows(gm, all_nodes=True)}
    for node in gm.graph.nodes:
        g.add_node(node.name, **info[node.name])
    for node in gm.graph.nodes:
        for src in node.all_input_nodes:
            g.add_edge(src.name, node.name)
    return g


def to_dot(gm: fx.GraphModule, name: str = "vmfx") -> str:
    """The graph in Graphviz DOT, nodes labelled ``name / role [block dir]`` and coloured by role."""

    def quote(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"digraph {quote(name)} {{", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fontsize=10];']
    for r in rows(gm, all_nodes=True):
        label = r["node"]
        if r["role"]:
            extra = " ".join(str(x) for x in (r["block"], r["dir"]) if x != "")
            label += f"\\n{r['role']}" + (f" [{extra}]" if extra else "")
        if r["spec"]:
            label += f"\\n{r['spec']}"
        colour = _ROLE_COLOURS.get(r["role"], "#ffffff")
        lines.append(f"  {quote(r['node'])} [label={quote(label)}, fillcolor={quote(colour)}];")
    for node in gm.graph.nodes:
        for src in node.all_input_nodes:
            lines.append(f"  {quote(src.name)} -> {quote(node.name)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw(gm: fx.GraphModule, path: str) -> str:
    """Write :func:`to_dot` to ``path`` (render with ``dot -Tsvg path``); returns the path."""
    with open(path, "w") as f:
        f.write(to_dot(gm))
    return path


# -- per-layer error ------------------------------------------------------------------------------


@dataclass
class LayerError:
    """Error of one node's output, quantized vs float, accumulated over all compared images."""

    node: str
    role: str
    block: int | None
    direction: str | None
    sqnr_db: float
    cosine: float


@dataclass
class CompareReport:
    """Per-layer SQNR (dB) and cosine similarity of a quantized graph against its float graph."""

    layers: list[LayerError] = field(default_factory=list)
    images: int = 0

    def __getitem__(self, node: str) -> LayerError:
        for layer in self.layers:
            if layer.node == node:
                return layer
        raise KeyError(node)

    @property
    def output(self) -> LayerError:
        """The error of the model output."""
        return self["output"]

    def worst(self, n: int = 5) -> list[LayerError]:
        return sorted(self.layers, key=lambda l: l.sqnr_db)[:n]

    def __str__(self) -> str:
        headers = ["node", "role", "block", "dir", "SQNR dB", "cosine"]
        body = [
            [l.node, l.role, "" if l.block is None else str(l.block), _DIR_SHORT.get(l.direction, ""),
             f"{l.sqnr_db:.2f}", f"{l.cosine:.5f}"]
            for l in self.layers
        ]
        return f"{self.images} images\n" + _format_table(headers, body)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names = names
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.name in self.names and isinstance(result, torch.Tensor):
            self.values[n.name] = result.detach().double()
        return result

    def output(self, target, args, kwargs):
        result = super().output(target, args, kwargs)
        if isinstance(result, torch.Tensor):
            self.values["output"] = result.detach().double()
        return result


def _float_graph(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule) and "vmfx_source_type" in model.meta:
        return model
    if not isinstance(model, nn.Module):
        raise ConfigError(f"compare: the first argument must be the float model (an nn.Module), got {type(model).__name__}")
    gm, _ = trace_for_quantization(model, example_inputs=(example,), what="images")
    return gm


def _check_quantized_graph(qmodel: Any, function: str, argument: str) -> None:
    """Refuse anything but a vmfx graph (from vmfx.compile / vmfx.convert / vmfx.lowering.lower /
    vmfx.load) where ``function`` needs the quantized model, naming what was passed instead."""
    if isinstance(qmodel, fx.GraphModule) and "vmfx_source_type" in qmodel.meta:
        return
    if isinstance(qmodel, nn.Module):
        from .lowering.runtime import lost_metadata_hint

        what = "a GraphModule without vmfx's metadata" if isinstance(qmodel, fx.GraphModule) else \
            f"the float model {type(qmodel).__name__}"
        raise ConfigError(f"vmfx.inspect.{function}: its {argument} must be the quantized model vmfx.compile returns, "
                          f"got {what}: quantize it first (qmodel = vmfx.compile(model, images, config))"
                          + (lost_metadata_hint(qmodel) if isinstance(qmodel, fx.GraphModule) else ""))
    raise ConfigError(f"vmfx.inspect.{function}: its {argument} must be the quantized model vmfx.compile returns, "
                      f"got {type(qmodel).__name__}")


def _check_roles(gm: fx.GraphModule, roles: Iterable[str] | None) -> None:
    """Refuse role names the graph does not have, naming the closest ones and those it has."""
    if roles is None:
        return
    import difflib

    present = sorted({a.role for n in gm.graph.nodes
                      if (a := annotation(n)) is not None and a.role not in ("observer", "quantizer", "smooth")})
    unknown = [r for r in roles if r not in present]
    if unknown:
        hints = []
        for r in unknown:
            close = difflib.get_close_matches(str(r), present, n=2, cutoff=0.5)
            hints.append(f"{r!r}" + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""))
        raise ConfigError(f"roles: this model has no node with role {', '.join(hints)}; its roles are "
                          f"{', '.join(present)}")


def _check_image_shape(qmodel: fx.GraphModule, x: torch.Tensor, what: str) -> None:
    """Refuse images of another shape than the one ``qmodel`` was traced and quantized for."""
    shapes = qmodel.meta.get("vmfx_input_shapes") or []
    if not shapes or x.dim() != len(shapes[0]) or list(x.shape[1:]) == list(shapes[0][1:]):
        return
    want = ", ".join(map(str, shapes[0][1:]))
    raise InputError(f"{what} have shape (N, {', '.join(map(str, x.shape[1:]))}), but the quantized model was traced "
                     f"for (N, {want}): resize or crop them to that size")


#: Largest relative difference (``|a - b| / |a|``, Frobenius) between a float parameter and the one
#: in the quantized model for them to count as the same: a loaded model may hold dequantized codes
#: (one quantization step off, about 1/15 of a 4-bit range); independent initialisations differ by ~100%.
SAME_WEIGHTS_RTOL = 0.3


def check_same_weights(float_gm: nn.Module, qmodel: fx.GraphModule) -> None:
    """Refuse a float model that is not the one ``qmodel`` was quantized from.

    Parameters and buffers are matched by name and shape; constant tensors (a norm's ones, a
    zero bias: equal in any two initialisations) are no evidence and skipped. The models differ
    when most of the rest (more than half) differ by more than :data:`SAME_WEIGHTS_RTOL`
    relative: quantized weights that were smoothed, or stored as dequantized codes, stay
    within it or are a minority. A quantized model sharing no tensor with the float one (a loaded
    lowered model) cannot be checked and passes."""
    ours = dict(qmodel.named_parameters())
    ours.update(dict(qmodel.named_buffers()))
    differ, same = [], 0
    for name, a in list(float_gm.named_parameters()) + list(float_gm.named_buffers()):
        b = ours.get(name)
        if b is None or b.shape != a.shape or not torch.is_floating_point(a) or a.numel() < 2 or a.is_meta:
            continue
        a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
        if bool((a64 == a64.flatten()[0]).all()):
            continue  # constant: equal in any two initialisations
        rel = float((a64 - b64).norm() / a64.norm().clamp(min=1e-30))
        if rel > SAME_WEIGHTS_RTOL:
            differ.append((name, rel))
        else:
            same += 1
    if differ and len(differ) > same:
        examples = ", ".join(f"'{n}' ({100 * r:.0f}%)" for n, r in differ[:3])
        raise ConfigError(
            f"compare: the float model is not the one the quantized model was made from: {len(differ)} of "
            f"{len(differ) + same} of its weight tensors differ (relative difference: {examples}); pass the very "
            "model (with the same weights) given to vmfx.compile"
        )


def compare(
    model: nn.Module,
    qmodel: fx.GraphModule,
    images: Any,
    *,
    batch_size: int = 32,
    roles: Iterable[str] | None = None,
) -> CompareReport:
    """Per-layer SQNR and cosine between the float model and the quantized graph.

    Both are run on the same images; nodes are matched by name (vmfx keeps the float graph's
    node names through every pass). Norms whose output carries folded smoothing factors, and nodes
    whose output an offline rotation rotated (``extra["rotated_output"]``), are skipped (their
    output differs on purpose). Statistics are accumulated over all images, so memory does
    not grow with their number.

    Args:
        model: the float model (``nn.Module``, traced here) or its vmfx float graph.
        qmodel: the quantized graph from :func:`vmfx.compile`.
        images: a tensor ``(N, C, H, W)`` or an iterable of batches.
        batch_size: split size for a tensor.
        roles: roles to report (default: every annotated node); the model output is always last.
            A role the quantized model has no node of is a :class:`~vmfx.errors.ConfigError`
            naming the closest ones.

    Raises:
        ConfigError: ``qmodel`` is not a vmfx graph (e.g. the float model), ``batch_size`` is not
            positive, or ``model``'s weights are not those ``qmodel`` was quantized from
            (:func:`check_same_weights`: compared by name, up to quantization error).
        InputError: ``images`` of another shape than ``qmodel`` was traced for.

    Returns:
        A :class:`CompareReport`; ``print`` it for a table, ``report.output`` for the logits.
    """
    _check_quantized_graph(qmodel, "compare", "second argument (qmodel)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"compare: batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(roles, str):
        roles = (roles,)
    _check_roles(qmodel, roles)
    batches = iter_calibration_batches(images, batch_size, input_expectation(qmodel))
    first = next(batches)
    _check_image_shape(qmodel, first, "images")
    float_gm = _float_graph(model, first[:1])
    check_same_weights(float_gm, qmodel)
    float_names = {n.name for n in float_gm.graph.nodes}
    order: list[tuple[str, str, Any, Any]] = []
    for node in qmodel.graph.nodes:
        ann = annotation(node)
        if ann is None or node.name not in float_names or ann.role in ("observer", "quantizer"):
            continue
        if ann.extra.get("smoothing_folded_into") or ann.extra.get("rotated_output"):
            continue  # its output is deliberately scaled by 1/s (folded smoothing) or rotated: not comparable
        if roles is not None and ann.role not in set(roles):
            continue
        order.append((node.name, ann.role, ann.block, ann.direction))
    names = {o[0] for o in order}
    sums = {name: torch.zeros(4, dtype=torch.float64) for name in list(names) + ["output"]}
    count = 0
    float_gm.eval()
    qmodel.eval()

    def feed(x: torch.Tensor) -> None:
        ref = _Recorder(float_gm, names)
        got = _Recorder(qmodel, names)
        with torch.no_grad():
            ref.run(x)
            got.run(x)
        for name, s in sums.items():
            if name not in ref.values or name not in got.values:
                continue
            a, b = ref.values[name], got.values[name]
            if a.shape != b.shape:
                continue
            s += torch.stack([(a * a).sum(), ((a - b) ** 2).sum(), (a * b).sum(), (b * b).sum()])

    for x in _chain(first, batches):
        feed(x)
        count += x.shape[0]

    report = CompareReport(images=count)
    for name, role, block, direction in order + [("output", "output", None, None)]:
        sig, noise, dot, qq = sums[name].tolist()
        sqnr = math.inf if noise == 0 else 10 * math.log10(max(sig, 1e-300) / noise)
        cos = dot / math.sqrt(sig * qq) if sig > 0 and qq > 0 else float("nan")
        report.layers.append(LayerError(name, role, block, direction, sqnr, cos))
    return report


def _chain(first, rest):
    yield first
    yield from rest


# -- activation distributions ---------------------------------------------------------------------


@dataclass
class ActivationStats:
    """Running statistics of one linear's input (a ``(B, L, C)`` tensor) over many images.

    Attributes:
        name: ``"<role> (<direction>)"``.
        token_var: variance of each token position over images and channels, ``(L,)``.
        channel_absmax: max |x| of each channel over images and tokens, ``(C,)``.
        hist_edges, hist_counts: a histogram of the values (the long tail).
    """

    name: str
    token_var: torch.Tensor
    channel_absmax: torch.Tensor
    hist_edges: torch.Tensor
    hist_counts: torch.Tensor


class _InputStats(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, targets: dict[str, str], bins: int):
        super().__init__(gm)
        self.targets, self.bins = targets, bins
        self.acc: dict[str, dict[str, torch.Tensor]] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.targets:
            x = self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else None
            if isinstance(x, torch.Tensor) and x.dim() > 3 and isinstance(self.module.get_submodule(n.target), nn.Linear):
                x = x.flatten(1, -2)  # a linear on a token grid (VMamba's (B, H, W, C)): tokens in row-major order
            if isinstance(x, torch.Tensor) and x.dim() == 3:
                self._update(self.targets[n.name], x.detach().double())
        return super().run_node(n)

    def _update(self, name: str, x: torch.Tensor) -> None:
        a = self.acc.get(name)
        if a is None:
            limit = float(x.abs().max()) * 1.5 or 1.0
            a = self.acc[name] = {
                "sum": torch.zeros(x.shape[1], dtype=torch.float64),
                "sumsq": torch.zeros(x.shape[1], dtype=torch.float64),
                "count": torch.zeros((), dtype=torch.float64),
                "absmax": torch.zeros(x.shape[2], dtype=torch.float64),
                "edges": torch.linspace(-limit, limit, self.bins + 1, dtype=torch.float64),
                "counts": torch.zeros(self.bins, dtype=torch.float64),
            }
        a["sum"] += x.sum(dim=(0, 2))
        a["sumsq"] += (x * x).sum(dim=(0, 2))
        a["count"] += x.shape[0] * x.shape[2]
        a["absmax"] = torch.maximum(a["absmax"], x.abs().amax(dim=(0, 1)))
        edges = a["edges"]
        clipped = x.clamp(float(edges[0]), float(edges[-1]) - 1e-12)
        a["counts"] += torch.histc(clipped, bins=self.bins, min=float(edges[0]), max=float(edges[-1]))


def activation_stats(
    model: nn.Module,
    images: Any,
    block: int,
    *,
    roles: Iterable[str] = ("in_proj", "x_proj", "dt_proj", "out_proj"),
    bins: int = 200,
    batch_size: int = 32,
) -> list[ActivationStats]:
    """Statistics of the inputs of the linears of one mixer block (see :class:`ActivationStats`).

    The backward-scan linears see the tokens reversed; their token axis is in their own scan
    order, as their per-token scales are.
    """
    batches = iter_calibration_batches(images, batch_size)
    first = next(batches)
    gm = model if isinstance(model, fx.GraphModule) and "vmfx_mixers" in model.meta else None
    if gm is None:
        gm, _ = trace_for_quantization(model, example_inputs=(first[:1],))
        gm = PassManager([DetectMambaMixersPass()])(gm).graph_module
    roles = tuple(roles)
    targets = {}
    for node in gm.graph.nodes:
        ann = annotation(node)
        if ann is not None and ann.block == block and ann.role in roles and node.op == "call_module":
            targets[node.name] = ann.role + (f" ({ann.direction})" if ann.direction else "")
    if not targets:
        blocks = sorted({m["block"] for m in gm.meta.get("vmfx_mixers", [])})
        raise ConfigError(f"no linear with roles {roles} in block {block}; the graph has blocks {blocks}")
    runner = _InputStats(gm, targets, bins)
    with torch.no_grad():
        for x in _chain(first, batches):
            runner.run(x)
    out = []
    for name in targets.values():
        a = runner.acc.get(name)
        if a is None:  # its input is not a (batch, tokens, channels) tensor (e.g. a channel-first conv)
            continue
        mean = a["sum"] / a["count"]
        var = a["sumsq"] / a["count"] - mean**2
        out.append(ActivationStats(name, var.clamp(min=0), a["absmax"], a["edges"], a["counts"]))
    if not out:
        raise ConfigError(f"block {block}: no linear with roles {roles} reads (batch, tokens, channels) activations "
                          "(or a token grid), which the statistics need")
    return out


def plot_distributions(
    model: nn.Module, images: Any, out_dir: str, *, block: int = 0, batch_size: int = 32
) -> list[str]:
    """Draw the three effects the Vision-Mamba PTQ papers name, for the linears of one block:

    * ``token_variance.png``: variance of each token position (token-wise variance);
    * ``channel_max.png``: max |x| of each channel (channel-wise outliers);
    * ``long_tail.png``: histogram of the values on a log scale (long tail), one panel per
      linear on its own value range, so one wide range does not squeeze the others.

    Returns:
        The paths of the three PNG files written to ``out_dir``.
    """
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = activation_stats(model, images, block, batch_size=batch_size)
    os.makedirs(out_dir, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(9, 4))
    for s in stats:
        ax.plot(s.token_var.numpy(), label=s.name, linewidth=1)
    ax.set_yscale("log")
    ax.set(title=f"block {block}: per-token variance of linear inputs", xlabel="token position (own scan order)",
           ylabel="variance over images and channels")
    ax.legend(fontsize=8)
    paths.append(_save(fig, os.path.join(out_dir, "token_variance.png")))

    fig, axes = plt.subplots(len(stats), 1, figsize=(9, 1.8 * len(stats)), squeeze=False)
    for ax, s in zip(axes[:, 0], stats):
        ax.bar(range(s.channel_absmax.numel()), s.channel_absmax.numpy(), width=1.0)
        ax.set_ylabel("max |x|", fontsize=8)
        ax.set_title(s.name, fontsize=9)
    axes[-1, 0].set_xlabel("channel")
    fig.suptitle(f"block {block}: per-channel maxima (outliers)")
    paths.append(_save(fig, os.path.join(out_dir, "channel_max.png")))

    fig, axes = plt.subplots(len(stats), 1, figsize=(9, 1.8 * len(stats)), squeeze=False)
    for ax, s in zip(axes[:, 0], stats):  # one panel each: every linear on its own value range
        centres = ((s.hist_edges[1:] + s.hist_edges[:-1]) / 2).numpy()
        ax.plot(centres, s.hist_counts.clamp(min=0.5).numpy(), linewidth=1)
        ax.set_yscale("log")
        ax.set_xlim(float(s.hist_edges[0]), float(s.hist_edges[-1]))
        ax.set_ylabel("count (log)", fontsize=8)
        ax.set_title(f"{s.name}: max |x| = {float(s.channel_absmax.max()):.3g}", fontsize=9)
    axes[-1, 0].set_xlabel("activation value (each panel on its own range)")
    fig.suptitle(f"block {block}: value histograms (long tail)")
    paths.append(_save(fig, os.path.join(out_dir, "long_tail.png")))
    return paths


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# -- OuroMamba's outlier sets ----------------------------------------------------------------------


@dataclass
class OutlierSets:
    """The outlier channels one mixed-precision quantizer selected on some images.

    Attributes:
        node: the quantizer node's name; ``quantizes`` / ``edge``: the linear (or node) it serves
            and on which edge; ``block``, ``direction``: from its annotation.
        mask: (images, steps, channels) bool, True where a channel was an outlier at a step.
        refresh: the quantizer's window length in steps.
    """

    node: str
    quantizes: str | None
    edge: str | None
    block: int | None
    direction: str | None
    mask: torch.Tensor
    refresh: int

    @property
    def count_per_step(self) -> torch.Tensor:
        """(steps,) mean number of outlier channels per step over the images."""
        return self.mask.float().sum(-1).mean(0)

    @property
    def channel_frequency(self) -> torch.Tensor:
        """(channels,) fraction of (image, step) pairs in which each channel is an outlier."""
        return self.mask.float().mean((0, 1))

    def channels(self, min_frequency: float = 0.0) -> list[int]:
        """The channels that are outliers in more than ``min_frequency`` of (image, step) pairs."""
        return torch.nonzero(self.channel_frequency > min_frequency).flatten().tolist()

    @property
    def change_rate(self) -> float:
        """Fraction of steps, inside windows (window starts excluded: the set is reset there),
        at which the set grows, averaged over images: how often it changes."""
        s, p, _ = self.mask.shape
        if p < 2:
            return 0.0
        grew = (self.mask[:, 1:] & ~self.mask[:, :-1]).any(-1)  # (S, P-1): step t+1 added channels
        inside = (torch.arange(1, p) % self.refresh) != 0
        return float(grew[:, inside].float().mean()) if bool(inside.any()) else 0.0

    def summary(self) -> dict[str, Any]:
        freq = self.channel_frequency
        top = torch.argsort(freq, descending=True)[:8]
        return {"node": self.node, "quantizes": self.quantizes, "edge": self.edge, "block": self.block,
                "direction": self.direction, "steps": int(self.mask.shape[1]), "channels": int(self.mask.shape[2]),
                "mean_outliers_per_step": round(float(self.count_per_step.mean()), 3),
                "max_outliers_per_step": int(self.mask.sum(-1).max()) if self.mask.numel() else 0,
                "distinct_channels": len(self.channels()), "change_rate": round(self.change_rate, 4),
                "top_channels": [(int(c), round(float(freq[c]), 4)) for c in top if freq[c] > 0]}


def outlier_sets(qmodel: fx.GraphModule, images: torch.Tensor, batch_size: int = 32) -> list[OutlierSets]:
    """Run ``images`` through ``qmodel`` and list the outlier sets of every
    :class:`~vmfx.quant.mixed.MixedPrecisionQuantize` node (OuroMamba), in graph order, per
    block and step (see :class:`OutlierSets`; ``.summary()`` for a line each).

    Raises:
        ConfigError: the model has no mixed-precision quantizer (quantize with an ``ouromamba-*``
            preset first).
    """
    from .errors import ConfigError

    nodes = [(n, qmodel.get_submodule(n.target)) for n in qmodel.graph.nodes
             if n.op == "call_module" and isinstance(qmodel.get_submodule(n.target), MixedPrecisionQuantize)]
    if not nodes:
        raise ConfigError("the model has no mixed-precision (OuroMamba) quantizer: quantize it with an "
                          "'ouromamba-*' preset (or a config with outliers=OutlierConfig(...)) first")
    masks: dict[str, list[torch.Tensor]] = {n.name: [] for n, _ in nodes}
    try:
        for _, m in nodes:
            m.record = True
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                qmodel(images[start:start + batch_size])
                for n, m in nodes:
                    masks[n.name].append(m.last_mask)
    finally:
        for _, m in nodes:
            m.record, m.last_mask = False, None
    out = []
    for n, m in nodes:
        ann = annotation(n)
        extra = ann.extra if ann is not None else {}
        out.append(OutlierSets(n.name, extra.get("quantizes"), extra.get("edge"), ann.block if ann else None,
                               ann.direction if ann else None, torch.cat(masks[n.name]), m.refresh))
    return out


def plot_outliers(sets: list[OutlierSets], out_dir: str, block: int | None = None) -> list[str]:
    """Draw the outlier sets of one block (all blocks' summary when ``block`` is None):

    * ``outliers_count_block<b>.png``: mean number of outlier channels per step, per quantizer;
    * ``outliers_channels_block<b>.png``: per quantizer, which channels are outliers at which step
      (fraction of images, a step x channel heat map; the window boundaries marked);
    * ``outliers_blocks.png``: per block and quantizer, the mean set size and how often it changes.

    Returns:
        The paths written.
    """
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    if block is not None:
        chosen = [s for s in sets if s.block == block]
        if not chosen:
            raise ValueError(f"no mixed-precision quantizer in block {block}; blocks with one: "
                             f"{sorted({s.block for s in sets if s.block is not None})}")
        fig, ax = plt.subplots(figsize=(9, 4))
        for s in chosen:
            ax.plot(s.count_per_step.numpy(), label=f"{s.quantizes} {s.edge}" + (f" ({s.direction})" if s.direction else ""),
                    linewidth=1)
        ax.set(title=f"block {block}: outlier channels per step (mean over images)",
               xlabel="step (the tensor's own scan order)", ylabel="outlier channels")
        ax.legend(fontsize=7)
        paths.append(_save(fig, os.path.join(out_dir, f"outliers_count_block{block}.png")))

        fig, axes = plt.subplots(len(chosen), 1, figsize=(9, 2.2 * len(chosen)), squeeze=False)
        for ax, s in zip(axes[:, 0], chosen):
            freq = s.mask.float().mean(0).T.numpy()  # (channels, steps)
            ax.imshow(freq, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
            for b in range(s.refresh, s.mask.shape[1], s.refresh):
                ax.axvline(b - 0.5, color="white", linewidth=0.3)
            ax.set_title(f"{s.quantizes} {s.edge}: {len(s.channels())} distinct channels, "
                         f"set grows at {100 * s.change_rate:.1f}% of steps", fontsize=8)
            ax.set_ylabel("channel", fontsize=7)
        axes[-1, 0].set_xlabel("step (windows of refresh steps marked)")
        fig.suptitle(f"block {block}: which channels are outliers (fraction of images)")
        paths.append(_save(fig, os.path.join(out_dir, f"outliers_channels_block{block}.png")))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    kinds = sorted({(s.quantizes or "").split("_")[-1] + f" {s.edge}" for s in sets})
    for kind in kinds:
        rows = [s for s in sets if (s.quantizes or "").split("_")[-1] + f" {s.edge}" == kind]
        xs = [s.block if s.block is not None else -1 for s in rows]
        ax1.plot(xs, [float(s.count_per_step.mean()) for s in rows], "o", label=kind, markersize=3)
        ax2.plot(xs, [100 * s.change_rate for s in rows], "o", label=kind, markersize=3)
    ax1.set(title="mean outlier channels per step", xlabel="block", ylabel="channels")
    ax2.set(title="steps at which the set grows (%)", xlabel="block", ylabel="% of steps in windows")
    ax1.legend(fontsize=7)
    paths.append(_save(fig, os.path.join(out_dir, "outliers_blocks.png")))
    return paths
