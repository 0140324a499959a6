"""The tracer: graphs equal eager, the scan is one leaf, untraceable code gives a TraceError."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vmfx
from vmfx.frontends import register_leaf_module, trace
from vmfx.frontends.leaves import _LEAF_MODULE_TYPES
from vmfx.ops import selective_scan


class DataDependentGate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: fx cannot trace this
            return x
        return -x


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), DataDependentGate())

    def forward(self, x):
        return self.body(x)


def test_trace_matches_eager_and_keeps_the_scan_as_one_node(tiny_model, tiny_images):
    gm = trace(tiny_model, (tiny_images[:2],))
    torch.testing.assert_close(gm(tiny_images), tiny_model(tiny_images))
    scans = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is selective_scan]
    assert len(scans) == 4  # 2 blocks x 2 directions
    norms = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("norms.")]
    assert len(norms) == 2  # RMSNorm is a leaf
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op != "output")


def test_untraceable_model_names_module_line_and_way_out():
    with pytest.raises(vmfx.TraceError) as info:
        trace(Wrapped())
    err = info.value
    message = str(err)
    assert err.module_path == "body.1" and err.module_type == "DataDependentGate"
    assert "module 'body.1' (DataDependentGate)" in message
    assert "if x.sum() > 0" in message and "test_tracer.py" in message
    assert "register_leaf_module(DataDependentGate)" in message and "register_adapter" in message
    assert err.__cause__ is not None


def test_compile_reports_the_untraceable_module_too(tiny_images):
    # compile does not stop at the trace error (the module is kept opaque, vmfx.frontends.fallback),
    # but a model with no mixer left to quantize is refused, naming the module it could not trace
    with pytest.warns(vmfx.FallbackWarning, match="DataDependentGate"):
        with pytest.raises(vmfx.PassError, match=r"'body.1' \(DataDependentGate: TraceError"):
            vmfx.compile(Wrapped(), torch.randn(4, 4))


def test_registering_a_leaf_makes_it_traceable():
    model = Wrapped()
    register_leaf_module(DataDependentGate)
    try:
        gm = trace(model)
        x = torch.randn(3, 4)
        torch.testing.assert_close(gm(x), model(x))
        assert any(n.op == "call_module" and n.target == "body.1" for n in gm.graph.nodes)
    finally:
        _LEAF_MODULE_TYPES.remove(DataDependentGate)


def test_register_leaf_module_rejects_non_modules():
    with pytest.raises(TypeError):
        register_leaf_module(int)
