"""``InsertObserversPass``: decide each linear's specs and put an observer on its input edge.

For every annotated linear node (detected role: in_proj, x_proj, dt_proj, out_proj, head), the
specs of its two edges come from the config's rules (:meth:`vmfx.config.QuantConfig.spec_for`:
defaults by role, then rules by role, module-name pattern or node name), or, without a config,
from the ``activation`` / ``weight`` specs for the linears of ``roles``. A linear with at least one
quantized edge is made functional (``F.linear(x, W, b)`` on ``get_attr`` nodes, so the weight is
an edge too; :func:`~vmfx.passes.graph_utils.functionalize_linear`), its annotation records
``act_spec`` / ``weight_spec``, and a static activation spec gets an observer node on the input
edge (module path ``vmfx_q.<linear>__input``), annotated with role ``observer``, the linear it
serves (``extra["quantizes"]``), its edge and the layout of the tensor it watches. Weights are
quantized at convert (their quantizer is computed from the weight itself). With a config, "output"
rules put an observer on the output of any annotated node (every user reads through it), path
``vmfx_q.<node>__output``; a dynamic spec there gets its (run-time) quantizer at once. "scan.<operand>"
rules put one on that input edge of the selected scans (:mod:`vmfx.passes.scan_operands`).
"weight" rules that select a conv or a norm (``conv1d``, ``patch_embed``, ``norm``) make it
functional (:func:`~vmfx.passes.graph_utils.functionalize_weighted`) and record its
``weight_spec``; convert quantizes the weight (min-max).

Requires: mixers detected. Invariants: observers pass their input through unchanged, so the graph
computes the same function; node names of the float graph are kept (functional linears take the
name of the module call they replace); every edit is recorded for ``vmfx.save``.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch.fx as fx

from ..annotations import INSERTED_ROLES, LINEAR_ROLES, annotate, annotation, node_op
from ..config import QuantConfig, check_rules_match
from ..quant.observers import MinMaxObserver, Observer
from ..quant.spec import QuantSpec
from .base import Pass, PassContext, PassResult
from .detect import detected_mixers
from .graph_utils import (
    functionalize_linear,
    functionalize_weighted,
    insert_module_after,
    weighted_module_types,
    insert_module_on_edge,
    unique_submodule_name,
)
from .inserted import QUANT_PREFIX, activation_observer, edge_layout, make_observer, rule_module_path
from .patterns import is_linear, module_of

__all__ = ["InsertObserversPass", "quantized_linear_nodes", "activation_observer", "QUANT_PREFIX", "edge_layout",
           "make_observer", "rule_module_path"]

def quantized_linear_nodes(gm: fx.GraphModule, roles: Iterable[str] = LINEAR_ROLES) -> list[fx.Node]:
    """Linear nodes whose detected role is in ``roles``, in graph order."""
    roles = set(roles)
    return [n for n in gm.graph.nodes if is_linear(n) and (a := annotation(n)) is not None and a.role in roles]


class InsertObserversPass(Pass):
    """Decide specs per linear and insert activation observers (see module docstring).

    Args:
        activation: spec of the inputs of the linears of ``roles`` (None: weights only).
        weight: spec of their weights (None keeps weights float).
        roles: linear roles the two specs above apply to.
        observer: observer factory, called as ``observer(spec)`` (or with ``layout=``).
        config: a :class:`~vmfx.config.QuantConfig` whose defaults and rules decide every edge's
            spec; when given, ``activation`` / ``weight`` / ``roles`` are not used.
    """

    requires_facts = ("mixers_detected",)
    ensures_facts = ("observers_inserted",)

    def __init__(
        self,
        activation: QuantSpec | None = None,
        weight: QuantSpec | None = None,
        roles: Iterable[str] = LINEAR_ROLES,
        observer: Callable[[QuantSpec], Observer] = MinMaxObserver,
        *,
        config: QuantConfig | None = None,
    ):
        self.activation = activation
        self.weight = weight
        self.roles = tuple(roles)
        self.observer = observer
        self.config = config

    def spec_for(self, edge: str, role: str | None, module: str | None, node: str) -> QuantSpec | None:
        if self.config is not None:
            return self.config.spec_for(edge, role, module, node)
        if role not in self.roles:
            return None
        return self.weight if edge == "weight" else self.activation

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if not detected_mixers(gm):
            failures = gm.meta.get("vmfx_detect_failures") or []
            why = "; ".join(f"{n}: {r}" for n, r in failures) or "no selective_scan node in the graph"
            opaque = [d for d in gm.meta.get("vmfx_fallback") or [] if d.get("kind") == "float_module"]
            if opaque:  # vmfx.frontends.trace_with_fallback kept untraceable modules whole
                why += "; these modules could not be traced and stay opaque: " + ", ".join(
                    f"'{d['module']}' ({d['module_type']}: {d['cause']})" for d in opaque)
            raise self.fail(
                f"no Mamba mixer was detected ({why}): vmfx recognises no mixer in this model, so there is "
                "nothing to quantize. Check what vmfx sees with vmfx.inspect.table(model, example_inputs=images[:1]) or "
                "vmfx.inspect.coverage(model, example_inputs=images[:1]); a third-party mixer needs an adapter "
                "(vmfx.frontends.register_adapter), a custom scan function a registration "
                "(vmfx.frontends.register_leaf_function). (A hand-built Pipeline must run DetectMambaMixersPass "
                "before this pass.)"
            )

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.config is not None and self.config.rules:  # a rule that selects nothing is refused (or warned)
            check_rules_match(self.config, *_rule_targets(gm))
        modified = False
        quantized = 0
        for node in [n for n in gm.graph.nodes if is_linear(n) and annotation(n) is not None]:
            ann = annotation(node)
            module = rule_module_path(node)
            a_spec = self.spec_for("input", ann.role, module, node.name)
            w_spec = self.spec_for("weight", ann.role, module, node.name)
            if a_spec is None and w_spec is None:
                continue
            if node.op == "call_module":
                node = functionalize_linear(gm, node)
            ann = annotate(node, ann.role, act_spec=a_spec, weight_spec=w_spec)
            quantized += 1
            modified = True
            if a_spec is None or a_spec.dynamic:
                continue
            source = node.args[0]
            layout = edge_layout(source)
            path = unique_submodule_name(gm, QUANT_PREFIX, f"{node.name}__input")
            watched = f"'{source.name}' (the input of {node.name})"
            obs = insert_module_on_edge(gm, node, source, make_observer(self.observer, a_spec, layout, watched), path)
            annotate(obs, "observer", block=ann.block, direction=ann.direction, tokens=ann.tokens,
                     mixer=ann.mixer, act_spec=a_spec, extra={"quantizes": node.name, "edge": "input"})
            if layout is not None:
                annotation(obs).layout = layout
        if self.config is not None and any(r.edge == "weight" for r in self.config.rules):
            quantized += self._mark_weighted_nodes(gm)
        if self.config is not None and any(r.edge == "output" for r in self.config.rules):
            quantized += self._insert_output_observers(gm)
            modified = True
        if self.config is not None and any(r.operand is not None for r in self.config.rules):
            from .scan_operands import insert_scan_operand_quantizers

            quantized += insert_scan_operand_quantizers(gm, self.config, self.observer)
            modified = True
        if quantized == 0:
            raise self.fail(
                "no linear gets a quantization spec: the config's roles and rules match none of the "
                "detected linears (see vmfx.inspect.table(vmfx.trace(model)) for their roles and names)"
            )
        return PassResult(gm, modified)

    def _mark_weighted_nodes(self, gm: fx.GraphModule) -> int:
        """Record the ``weight_spec`` of every conv or norm a "weight" rule selects, made functional
        so that its weight is an edge; the number of such nodes."""
        count = 0
        for node in list(gm.graph.nodes):
            ann = annotation(node)
            if ann is None or not _is_weighted(node):
                continue
            spec = self.config.spec_for("weight", ann.role, rule_module_path(node), node.name, node_op(node))
            if spec is None:
                continue
            functionalize_weighted(gm, node)
            annotate(node, ann.role, weight_spec=spec)
            count += 1
        return count

    def _insert_output_observers(self, gm: fx.GraphModule) -> int:
        from ..quant.modules import FakeQuantize

        count = 0
        shared_paths: dict[tuple, str] = {}  # (mixer, rule) -> the path of the quantizer its nodes share
        for node in list(gm.graph.nodes):
            ann = annotation(node)
            if ann is None or ann.role in INSERTED_ROLES or node.op == "output":
                continue
            module = rule_module_path(node)
            spec = self.config.spec_for("output", ann.role, module, node.name, node_op(node))
            if spec is None:
                continue
            rule = self.config.rule_for("output", ann.role, module, node.name, node_op(node))
            key = (ann.mixer, id(rule)) if rule.shared == "mixer" and ann.mixer is not None else None
            layout = edge_layout(node)
            extra = {"quantizes": node.name, "edge": "output", **({"shared": rule.shared} if key else {})}
            if key in shared_paths:
                path = shared_paths[key]
                observer = gm.get_submodule(path)
            else:
                path = unique_submodule_name(gm, QUANT_PREFIX, f"{node.name}__output")
                if spec.dynamic:
                    observer = FakeQuantize(spec) if layout is None else FakeQuantize(spec, layout=layout)
                else:
                    observer = make_observer(self.observer, spec, layout, f"'{node.name}' (its output)")
                if key is not None:
                    shared_paths[key] = path
            new = insert_module_after(gm, node, observer, path)
            annotate(new, "quantizer" if spec.dynamic else "observer", block=ann.block, direction=ann.direction,
                     tokens=ann.tokens, mixer=ann.mixer, act_spec=spec, extra=extra)
            if layout is not None:
                annotation(new).layout = layout
            count += 1
        return count


def _is_weighted(node: fx.Node) -> bool:
    """A conv or norm module call with a weight (or one already made functional)."""
    if node.op == "call_function":
        return "vmfx_module" in node.meta and not is_linear(node)
    return isinstance(module_of(node), weighted_module_types()) and getattr(module_of(node), "weight", None) is not None


def _rule_targets(gm: fx.GraphModule) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """(linears, outputs, weighted): ``(role, module path, node name, operation)`` of the annotated
    linears, of every annotated node a rule could select, and of the annotated convs and norms a
    "weight" rule can select too (:func:`vmfx.config.check_rules_match`)."""
    linears, outputs, weighted = [], [], []
    for node in gm.graph.nodes:
        ann = annotation(node)
        if ann is None or ann.role in INSERTED_ROLES or node.op == "output":
            continue
        facts = (ann.role, rule_module_path(node), node.name, node_op(node))
        outputs.append(facts)
        if is_linear(node):
            linears.append(facts)
        elif _is_weighted(node):
            weighted.append(facts)
    return linears, outputs, weighted
