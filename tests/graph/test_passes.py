"""Pass infrastructure: the contract, the manager's checks and errors, pipelines, staged API."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import vmfx
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
from vmfx.quant import QuantLinear, QuantSpec


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
    with pytest.raises(vmfx.PassError, match="InsertObserversPass: no Mamba mixer was detected"):
        PassManager([InsertObserversPass(QuantSpec(), QuantSpec(granularity="channel"))])(_gm(tiny_model, tiny_images))


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
    quantized = [n.target for n in q.graph.nodes if n.op == "call_module" and isinstance(q.get_submodule(n.target), QuantLinear)]
    assert quantized == ["mixers.0.out_proj", "mixers.1.out_proj"]
    assert q.get_submodule("mixers.0.out_proj").input_quantizer.scale.shape == (1, 16, 1)


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
    qmodel = vmfx.compile(tiny_model, tiny_images, "minmax-w8a8")
    assert [n.name for n in float_gm.graph.nodes] == [n.name for n in qmodel.graph.nodes]
    assert isinstance(qmodel, fx.GraphModule)


def test_config_round_trip_and_validation():
    cfg = QuantConfig(method="minmax", weight=QuantSpec(4, True, "channel"), activation=QuantSpec(8, False, "token"))
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.bits == "w4a8"
    with pytest.raises(vmfx.ConfigError, match="cannot be dynamic"):
        QuantConfig(weight=QuantSpec(8, True, "channel", dynamic=True))
    with pytest.raises(vmfx.ConfigError, match="roles"):
        QuantConfig(roles=("conv1d",))
    with pytest.raises(vmfx.ConfigError, match="unknown method 'gptq'; known methods: minmax"):
        vmfx.passes.method_passes(QuantConfig(method="gptq"))
