"""Module kinds: every module vmfx inserts on edges round-trips through its description, and a
plug-in's own module class becomes savable by registering it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vmfx.quant import FakeQuantize, QuantSpec, Smooth
from vmfx.quant.observers import QParams
from vmfx.quant.registry import build_module, describe_module, module_kind, register_module_kind
from vmfx.quant.state_quantizer import ScanStateQuant


def _modules():
    spec = QuantSpec(8, False, "tensor")
    yield FakeQuantize(spec, QParams(torch.full((1,), 0.1), torch.full((1,), 3.0), spec.qmin, spec.qmax))
    yield FakeQuantize(QuantSpec(8, True, "channel"), QParams(torch.rand(4, 1), torch.zeros(4, 1), -127, 127), is_weight=True)
    yield FakeQuantize(QuantSpec(4, False, "tensor", dynamic=True))
    smooth = Smooth(torch.rand(6) + 0.5)
    smooth.folded_into = "norm"
    yield smooth
    yield ScanStateQuant(8, 5, 4, 8, True, True)


@pytest.mark.parametrize("module", list(_modules()), ids=lambda m: type(m).__name__)
def test_built_in_kinds_round_trip(module):
    entry = describe_module(module)
    assert entry["kind"] == type(module).__name__
    rebuilt = build_module(entry)
    assert type(rebuilt) is type(module) and describe_module(rebuilt) == entry
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in module.state_dict().items()}


def test_a_plugin_module_kind():
    class Offset(nn.Module):
        def __init__(self, channels: int):
            super().__init__()
            self.offset = nn.Parameter(torch.zeros(channels), requires_grad=False)

        def forward(self, x):
            return x + self.offset

        def to_dict(self):
            return {"channels": self.offset.numel()}

        @classmethod
        def from_dict(cls, d):
            return cls(int(d["channels"]))

    assert module_kind(Offset(3)) is None and describe_module(Offset(3)) is None
    register_module_kind(Offset, "test-offset")
    assert describe_module(Offset(3)) == {"kind": "test-offset", "channels": 3}
    assert isinstance(build_module({"kind": "test-offset", "channels": 3}), Offset)
    with pytest.raises(TypeError, match="needs to_dict"):
        register_module_kind(nn.Identity)
