"""Partition kinds and their lowerings are looked up in registries a plug-in extends
(:func:`vmfx.lowering.register_partition_kind`, :func:`vmfx.lowering.register_lowering`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch.fx as fx

from vmfx.errors import LoweringError
from vmfx.lowering import Partition, PartitionInfo, register_lowering, register_partition_kind
from vmfx.lowering.partition import PARTITION_KINDS, ConvInfo, MergeInfo
from vmfx.lowering.runtime import LOWERINGS, _build


@pytest.fixture
def registries():
    """Whatever a test registers is gone afterwards."""
    kinds, lowerings = dict(PARTITION_KINDS), dict(LOWERINGS)
    yield
    PARTITION_KINDS.clear(), PARTITION_KINDS.update(kinds)
    LOWERINGS.clear(), LOWERINGS.update(lowerings)


def _node() -> fx.Node:
    graph = fx.Graph()
    return graph.placeholder("x")


def test_every_built_in_kind_has_typed_info_and_a_lowering():
    assert set(PARTITION_KINDS) == {"qlinear", "conv", "scan", "merge", "hadamard", "hadamard_qlinear", "mixed_qlinear",
                                    "conv_bidir", "qlinear_group", "scan_merge"}
    assert set(LOWERINGS) == set(PARTITION_KINDS)
    x = _node()
    p = Partition("m", [x], [x], x, MergeInfo(0.5))
    assert p.kind == "merge" and p.info.scale == 0.5 and p.info.consumer is None


def test_a_plugin_kind_registers_its_info_and_its_lowering(registries):
    @register_partition_kind
    @dataclass(eq=False)
    class ClampInfo(PartitionInfo):
        kind: ClassVar[str] = "clamp"
        bound: float

    x = _node()
    p = Partition("clamp0", [x], [x], x, ClampInfo(2.0))
    with pytest.raises(LoweringError, match="no lowering is registered for kind 'clamp'"):
        _build(p, "reference", {})

    @register_lowering("clamp")
    def build(part, backend, linears):
        return ("built", part.info.bound, backend)

    assert _build(p, "reference", {}) == ("built", 2.0, "reference")
    with pytest.raises(ValueError, match="already has a lowering"):
        register_lowering("clamp")(lambda part, backend, linears: None)


def test_bad_registrations_are_refused(registries):
    @dataclass(eq=False)
    class Unregistered(PartitionInfo):
        kind: ClassVar[str] = "unregistered"

    x = _node()
    with pytest.raises(TypeError, match="not a registered partition kind"):
        Partition("u", [x], [x], x, Unregistered())
    with pytest.raises(ValueError, match="unknown partition kind 'unregistered'"):
        register_lowering("unregistered")
    with pytest.raises(TypeError, match="PartitionInfo subclass with a 'kind' name"):
        register_partition_kind(dict)

    @dataclass(eq=False)
    class AnotherConv(PartitionInfo):
        kind: ClassVar[str] = "conv"

    with pytest.raises(ValueError, match="'conv' is already registered by ConvInfo"):
        register_partition_kind(AnotherConv)
    assert PARTITION_KINDS["conv"] is ConvInfo
