"""QuantSpec validation, observers and the quantized modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.reference import fake_quant_ref
from vmfx.errors import CalibrationDataError, ConfigError, LayoutError
from vmfx.token_layout import TokenLayout
from vmfx.quant import FakeQuantize, MinMaxObserver, QuantSpec, Smooth, weight_quantizer_minmax


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 8.0, True, "8"])
def test_bits_outside_2_to_8_are_rejected(bits):
    with pytest.raises(ConfigError, match=r"bits must be an integer from 2 to 8"):
        QuantSpec(bits=bits)


def test_unknown_granularity_is_rejected():
    with pytest.raises(ConfigError, match="granularity must be one of tensor, channel, token"):
        QuantSpec(granularity="row")


def test_kept_dims():
    assert QuantSpec(granularity="tensor").kept_dims(3) == ()
    assert QuantSpec(granularity="channel").kept_dims(3) == (2,)
    assert QuantSpec(granularity="channel").kept_dims(2, is_weight=True) == (0,)
    layout = TokenLayout.token_major((2, 7, 5))
    assert QuantSpec(granularity="token").kept_dims(3, layout=layout) == (1,)
    assert QuantSpec(granularity="token", dynamic=True).kept_dims(3, layout=layout) == (0, 1)
    with pytest.raises(LayoutError, match="needs its token layout"):  # never a guessed axis
        QuantSpec(granularity="token").kept_dims(3)


def test_spec_round_trips_through_dict():
    spec = QuantSpec(4, symmetric=False, granularity="token", dynamic=False)
    assert QuantSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("granularity,reduce", [("tensor", (0, 1, 2)), ("channel", (0, 1)), ("token", (0, 2))])
def test_minmax_observer_matches_direct_reduction(granularity, reduce):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 7, 5, generator=g) * (i + 1) for i in range(4)]
    layout = TokenLayout.token_major((3, 7, 5)) if granularity == "token" else None
    obs = MinMaxObserver(QuantSpec(8, symmetric=False, granularity=granularity), layout=layout)
    for b in batches:
        assert obs(b) is b
    full = torch.cat(batches)
    torch.testing.assert_close(obs.min_val, full.amin(dim=reduce, keepdim=True))
    torch.testing.assert_close(obs.max_val, full.amax(dim=reduce, keepdim=True))
    qp = obs.calculate_qparams()
    y = FakeQuantize(obs.spec, qp)(full)
    # min-max covers the data: every value is within half a step of its quantized value
    assert bool(((y - full).abs() <= qp.scale / 2 + 1e-6).all())
    torch.testing.assert_close(y.double(), fake_quant_ref(full, qp.scale, qp.zero_point, qp.qmin, qp.qmax))


def test_observer_rejects_a_change_of_token_length():
    obs = MinMaxObserver(QuantSpec(8, False, "token"), layout=TokenLayout.token_major((2, 197, 4)))
    obs(torch.randn(2, 197, 4))
    with pytest.raises(LayoutError, match="has 50 positions .* recorded for 197 tokens"):
        obs(torch.randn(2, 50, 4))


def test_observer_without_data_cannot_give_qparams():
    with pytest.raises(CalibrationDataError, match="seen no data"):
        MinMaxObserver(QuantSpec()).calculate_qparams()


def test_per_token_static_scales_refuse_another_length_naming_both():
    obs = MinMaxObserver(QuantSpec(8, False, "token"), layout=TokenLayout.token_major((2, 197, 4)))
    obs(torch.randn(2, 197, 4))
    fq = FakeQuantize(obs.spec, obs.calculate_qparams())
    assert fq(torch.randn(5, 197, 4)).shape == (5, 197, 4)
    with pytest.raises(ValueError, match=r"calibrated for 197 tokens, but this input has 50 tokens"):
        fq(torch.randn(5, 50, 4))


def test_dynamic_per_token_uses_each_rows_range():
    fq = FakeQuantize(QuantSpec(8, True, "token", dynamic=True), layout=TokenLayout.token_major((2, 6, 16)))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 16, generator=g) * torch.tensor([1e-3, 1.0, 1e3]).repeat(2)[None, :, None]
    y = fq(x)
    scale = x.abs().amax(-1, keepdim=True) / 127
    assert bool(((y - x).abs() <= scale / 2 + 1e-9).all())


def test_smoothing_node_is_exact_in_float_and_quantizes_when_enabled():
    g = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(4, 10, 16, generator=g)
    smooth = torch.rand(16, generator=g) + 0.5
    sm = Smooth(smooth)
    # smoothing alone changes nothing: (x / s) @ (W * s)^T == x @ W^T
    torch.testing.assert_close(F.linear(sm(x), sm(lin.weight, weight=True), lin.bias), lin(x), rtol=1e-5, atol=1e-5)
    wspec = QuantSpec(4, True, "channel")
    wq = weight_quantizer_minmax(sm(lin.weight, weight=True).detach(), wspec)
    w_ref = fake_quant_ref(lin.weight * smooth, wq.scale, 0, -7, 7)
    y_ref = F.linear((x / smooth).double(), w_ref, lin.bias.double())
    y = F.linear(sm(x), wq(sm(lin.weight, weight=True)), lin.bias)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    assert wq.scale.shape == (8, 1)


def test_smoothing_factors_must_be_a_vector():
    with pytest.raises(ConfigError, match=r"must be a vector"):
        Smooth(torch.ones(8, 16))
