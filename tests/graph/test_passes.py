"""Pass infrastructure: the contract, the manager's checks and errors, pipelines, staged API."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import vmfx
from vmfx.testing import assert_nodes
from vmfx.annotations import annotation
from vmfx.config import QuantConfig
from vmfx.passes import (
    CalibratePass,
    ConvertPass,
    DetectMambaMixersPass,
    InsertObserversPass,
    Pass,
    PassContext,
    PassManager,
    PassResult,
    Pipeline,
)
from vmfx.passes.linear_edges import quantized_linears
from vmfx.quant import FakeQuantize, QuantSpec


class BreakGraph(Pass):
    """Leaves a graph that lints but cannot run (an impossible reshape before the output)."""

    def call(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            bad = gm.graph.call_method("reshape", (out.args[0], 7, 7, 7))
        out.args = (bad,)
        return PassResult(gm, True)


class Boom(Pass):
    def call(self, gm, ctx):
        raise RuntimeError("kaboom")


class NeedsThing(Pass):
    def requires(self, gm, ctx):
        if "thing" not in gm.meta:
            raise self.fail("a thing is required")

    def call(self, gm, ctx):
        return PassResult(gm, False)


def _gm(model, images):
    return vmfx.trace(model, (images[:1],), detect=False)


def test_manager_names_the_pass_that_broke_the_graph(tiny_model, tiny_images):
    gm = _gm(tiny_model, tiny_images)
    ctx = PassContext(example_inputs=(tiny_images[:1],))
    with pytest.raises(vmfx.PassError, match=r"(?s)after pass BreakGraph.*passes run before it: DetectMambaMixersPass"):
        PassManager([DetectMambaMixersPass(), BreakGraph()], run_checks_after_each_pass=True)(gm, ctx)


def test_manager_names_a_failing_pass_and_its_predecessors(tiny_model, tiny_images):
    gm = _gm(tiny_model, tiny_images)
    with pytest.raises(vmfx.PassError, match=r"(?s)pass Boom failed: RuntimeError: kaboom.*before it: DetectMambaMixersPass"):
        PassManager([DetectMambaMixersPass(), Boom()])(gm)


def test_requires_failure_names_pass(tiny_model, tiny_images):
    with pytest.raises(vmfx.PassError, match="pass NeedsThing: a thing is required"):
        PassManager([NeedsThing()])(_gm(tiny_model, tiny_images))


def test_manager_rejects_non_passes():
    with pytest.raises(TypeError, match="Pass instances"):
        PassManager([lambda gm: gm])


def test_insert_observers_requires_detection(tiny_model, tiny_images):
    with pytest.raises(vmfx.PassError, match="InsertObserversPass .* needs 'mixers_detected'.*which no pass before it"):
        PassManager([InsertObserversPass(QuantSpec(), QuantSpec(granularity="channel"))])(_gm(tiny_model, tiny_images))
    # run directly (no pipeline), the pass still checks the graph itself
    with pytest.raises(vmfx.PassError, match="InsertObserversPass: no Mamba mixer was detected"):
        InsertObserversPass(QuantSpec(), QuantSpec(granularity="channel"))(_gm(tiny_model, tiny_images))


def test_wrong_pass_order_fails_before_running_naming_both_passes(tiny_model, tiny_images):
    from vmfx.config import JLSSConfig
    from vmfx.passes import FoldSmoothingPass, JLSSPass, SmoothQuantPass
    from vmfx.quant.observers import AbsMaxObserver

    act, weight = QuantSpec(8, False, "token"), QuantSpec(8, True, "channel")
    ran = []

    class Spy(Pass):
        def call(self, gm, ctx):
            ran.append(True)
            return PassResult(gm, False)

    head = [Spy(), DetectMambaMixersPass(), InsertObserversPass(act, weight, observer=AbsMaxObserver), CalibratePass(),
            SmoothQuantPass(0.5), CalibratePass(), ConvertPass()]
    # JLSS after the smoothing factors were folded: they can no longer be learned
    with pytest.raises(vmfx.PassError, match="JLSSPass .* cannot run after FoldSmoothingPass"):
        Pipeline(head + [FoldSmoothingPass(), JLSSPass(JLSSConfig(steps=1))])(tiny_model, tiny_images)
    # calibrating before the observers exist
    with pytest.raises(vmfx.PassError, match="CalibratePass .* needs 'observers_inserted'.*InsertObserversPass establishes "
                                             "only later.*move InsertObserversPass before CalibratePass"):
        Pipeline([DetectMambaMixersPass(), CalibratePass(), InsertObserversPass(act, weight), ConvertPass()])(
            tiny_model, tiny_images)
    # converting twice / calibrating after convert: convert consumed the observers
    with pytest.raises(vmfx.PassError, match="CalibratePass .* no pass before it establishes \\(ConvertPass undid it\\)"):
        Pipeline([DetectMambaMixersPass(), InsertObserversPass(act, weight), ConvertPass(requires_calibration=False),
                  CalibratePass()])(tiny_model, tiny_images)
    assert not ran  # nothing ran: the order is checked first


def test_a_config_that_quantizes_nothing_is_an_error(tiny_model, tiny_images):
    from vmfx.config import QuantRule

    cfg = vmfx.preset("minmax-w8a8").replace(rules=tuple(
        QuantRule(edge, None, role=r) for r in ("in_proj", "x_proj", "dt_proj", "out_proj") for edge in ("input", "weight")))
    with pytest.raises(vmfx.PassError, match="no linear gets a quantization spec"):
        vmfx.compile(tiny_model, tiny_images, cfg)


def test_mixed_precision_by_rules_shows_in_the_table(tiny_model, tiny_images):
    from vmfx.config import QuantRule

    cfg = vmfx.preset("minmax-w8a8").replace(rules=(
        QuantRule("input", QuantSpec(4, False, "tensor"), role="out_proj"),
        QuantRule("weight", QuantSpec(4, True, "channel"), role="out_proj"),
    ))
    q = vmfx.compile(tiny_model, tiny_images, cfg)
    rows = {r["node"]: r for r in vmfx.inspect.rows(q)}
    assert rows["mixers_0_in_proj"]["spec"] == "A uint8 asym per-tensor | W int8 sym per-channel"
    assert rows["mixers_0_out_proj"]["spec"] == "A uint4 asym per-tensor | W int4 sym per-channel"
    assert rows["vmfx_q_mixers_0_out_proj__input"]["spec"] == "uint4 asym per-tensor"
    assert rows["vmfx_q_mixers_0_in_proj__weight"]["spec"] == "int8 sym per-channel"
    text = vmfx.inspect.table(q)
    assert "uint4 asym per-tensor" in text and "uint8 asym per-tensor" in text
    # the converted graph reads producer -> quantize -> consumer
    lin = next(n for n in q.graph.nodes if n.name == "mixers_0_out_proj")
    assert lin.args[0].name == "vmfx_q_mixers_0_out_proj__input"
    assert lin.args[1].name == "vmfx_q_mixers_0_out_proj__weight"
    assert lin.args[1].args[0].op == "get_attr"


def test_every_pass_keeps_the_graph_runnable(tiny_model, tiny_images):
    config = vmfx.config.preset("minmax-w4a8")
    qmodel = vmfx.compile(tiny_model, tiny_images, config, check=True)
    assert qmodel(tiny_images).isfinite().all()
    assert set(qmodel.meta["vmfx_pass_seconds"]) == {
        "DetectMambaMixersPass", "InsertObserversPass", "CalibratePass", "ConvertPass"
    }
    assert qmodel.meta["vmfx_calibration"]["images"] == len(tiny_images)


def test_custom_pipeline_equals_preset(tiny_model, tiny_images):
    act, weight = QuantSpec(8, False, "tensor"), QuantSpec(8, True, "channel")
    pipe = Pipeline([DetectMambaMixersPass(), InsertObserversPass(act, weight), CalibratePass(), ConvertPass()], check=True)
    custom = pipe(tiny_model, tiny_images)
    preset = vmfx.compile(tiny_model, tiny_images, "minmax-w8a8")
    assert torch.equal(custom(tiny_images), preset(tiny_images))
    assert "InsertObserversPass" in repr(pipe) and len(pipe) == 4


def test_custom_pipeline_can_quantize_a_subset(tiny_model, tiny_images):
    act, weight = QuantSpec(8, False, "token"), QuantSpec(4, True, "channel")
    pipe = Pipeline([DetectMambaMixersPass(), InsertObserversPass(act, weight, roles=("out_proj",)), CalibratePass(), ConvertPass()])
    q = pipe(tiny_model, tiny_images)
    quantized = [e.module for e in quantized_linears(q)]
    assert quantized == ["mixers.0.out_proj", "mixers.1.out_proj"]
    assert_nodes(q, {FakeQuantize: 4, "out_proj": 2})  # both edges of the two out_proj, nothing else
    edges = quantized_linears(q)[0]
    assert isinstance(edges.quantizer("input"), FakeQuantize) and isinstance(edges.quantizer("weight"), FakeQuantize)
    assert edges.quantizer("input").scale.shape == (1, 16, 1)


def test_staged_api_equals_compile(tiny_model, tiny_images):
    prepared = vmfx.prepare(tiny_model, "minmax-w6a6", tiny_images)
    observers = [n for n in prepared.graph.nodes if annotation(n) is not None and annotation(n).role == "observer"]
    assert len(observers) == 12  # 6 linears per bidirectional mixer x 2 blocks
    calibrated = vmfx.calibrate(prepared, tiny_images)
    staged = vmfx.convert(calibrated)
    assert not any(annotation(n) and annotation(n).role == "observer" for n in staged.graph.nodes)
    one_call = vmfx.compile(tiny_model, tiny_images, "minmax-w6a6")
    assert torch.equal(staged(tiny_images), one_call(tiny_images))


def test_node_names_survive_conversion(tiny_model, tiny_images):
    float_gm = vmfx.trace(tiny_model, (tiny_images[:1],))
    qmodel = vmfx.compile(tiny_model, tiny_images, "ptq4vm-w4a4".replace("ptq4vm", "pts-smooth"))
    float_names = [n.name for n in float_gm.graph.nodes]
    kept = [n.name for n in qmodel.graph.nodes if n.name in set(float_names)]
    assert kept == float_names  # every float node survives, in order; quantization only adds nodes
    assert isinstance(qmodel, fx.GraphModule)


def test_config_round_trip_and_validation():
    cfg = QuantConfig(method="minmax", weight=QuantSpec(4, True, "channel"), activation=QuantSpec(8, False, "token"))
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.bits == "w4a8"
    with pytest.raises(vmfx.ConfigError, match="cannot be dynamic"):
        QuantConfig(weight=QuantSpec(8, True, "channel", dynamic=True))
    with pytest.raises(vmfx.ConfigError, match="roles"):
        QuantConfig(roles=("conv1d",))
    with pytest.raises(vmfx.ConfigError, match="unknown method 'gptq'; known methods: .*minmax"):
        vmfx.passes.method_passes(QuantConfig(method="gptq"))


def test_printing_a_pipeline_shows_every_pass_setting():
    text = repr(Pipeline(vmfx.passes.method_passes(vmfx.preset("ptq4vm-official-w4a4"))))
    assert "SmoothQuantPass(alpha=0.5, observer=LpObserver(p=2.4, candidates=100), select=None, settings=())" in text
    assert "ConvertPass(weight_init='lp', p=2.4, candidates=100, requires_calibration=True" in text
    assert "learn_roles=('in_proj', 'out_proj')" in text and "batch_size=None" in text
    assert "frozen_gradient='float'" in text
