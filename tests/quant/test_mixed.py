"""OuroMamba's mixed-precision activation quantizer (issue 11), against direct references.

* outlier selection: :func:`select_outliers` (vectorised) equals a direct loop over samples,
  windows and steps that keeps the outlier set as a Python set, with and without the trigger;
* the quantizer: every output element equals a float64 quantize-dequantize with the inlier
  (static) or outlier (dynamic, per sample and step) parameters, one step apart at most where
  ``x / s`` is within float32 rounding of a tie; inlier outputs lie on the inlier grid within its
  range, outlier outputs within ``s_o / 2`` of the input; the integer form
  (``quantize_parts``) dequantizes to the forward's output; permuted layouts (Vim's
  ``(B, E, L)``) give the same result as the token-major one;
* the observer removes outliers before the grid search; configs validate and round-trip.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vmfx.config import OutlierConfig, QuantConfig, preset
from vmfx.errors import ConfigError, LayoutError
from vmfx.token_layout import TokenLayout
from vmfx.quant.mixed import (
    MixedPrecisionQuantize,
    OutlierLpObserver,
    from_steps,
    select_outliers,
    to_steps,
)
from vmfx.quant.observers import QParams
from vmfx.quant.spec import QuantSpec


def _loop_outliers(x, k, refresh, trigger=None, qmin=None, qmax=None, symmetric=True):
    """Direct per-window loop, float64 statistics, a Python set per window."""
    s, p, c = x.shape
    mask = torch.zeros(s, p, c, dtype=torch.bool)
    xd = x.double()
    for n in range(s):
        current: set[int] = set()
        for t in range(p):
            if t % refresh == 0:
                current = set()
            a = xd[n, t].abs()
            thr = a.mean() + k * (a.std() if c > 1 else 0.0)
            fire = True
            if trigger is not None:
                if symmetric:
                    dyn = a.max() / qmax
                else:
                    dyn = (xd[n, t].max().clamp(min=0) - xd[n, t].min().clamp(max=0)) / (qmax - qmin)
                fire = bool(dyn > trigger[t])
            if fire:
                current |= {i for i in range(c) if a[i] > thr}
            for i in current:
                mask[n, t, i] = True
    return mask


def _data(seed, s, p, c, hot_scale=30.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s, p, c, generator=g)
    hot = torch.rand(s, p, c, generator=g) < 0.04
    return torch.where(hot, x * hot_scale, x)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), s=st.integers(1, 3), p=st.integers(1, 27), c=st.integers(2, 24),
       refresh=st.integers(1, 12), k=st.sampled_from([2.0, 3.0, 4.0]), trig=st.booleans(), symmetric=st.booleans())
def test_selection_matches_a_direct_window_loop(seed, s, p, c, refresh, k, trig, symmetric):
    x = _data(seed, s, p, c)
    qmin, qmax = (-7, 7) if symmetric else (0, 15)
    trigger = None
    if trig:
        trigger = torch.rand(p, generator=torch.Generator().manual_seed(seed + 1)) * x.abs().amax() / qmax
    got = select_outliers(x, k, refresh, trigger, qmin, qmax, symmetric)
    want = _loop_outliers(x, k, refresh, trigger, qmin, qmax, symmetric)
    # the vectorised statistics are float32: a value within float32 rounding of the threshold may
    # land on either side; everything else must agree exactly
    a = x.double().abs()
    thr = a.mean(-1, keepdim=True) + k * (a.std(-1, keepdim=True) if c > 1 else 0)
    near = ((a - thr).abs() <= 1e-5 * thr.abs().clamp(min=1)).any(-1, keepdim=True).expand_as(got)
    assert torch.equal(got[~near], want[~near])


def test_the_set_is_reset_at_each_window():
    x = torch.ones(1, 25, 32)  # (with 32 channels one value can lie 5.5 sd above the mean)
    x[0, 3, 5] = 100.0  # an outlier at step 3 only
    m = select_outliers(x, 3.0, 10)
    assert not m[0, :3, 5].any() and m[0, 3:10, 5].all() and not m[0, 10:, 5].any()
    assert m.sum() == 7


def _quantizer(a_bits, o_bits, p, c, symmetric=True, seed=0, layout=None):
    g = torch.Generator().manual_seed(seed)
    qmin, qmax = (-(2 ** (a_bits - 1) - 1), 2 ** (a_bits - 1) - 1) if symmetric else (0, 2**a_bits - 1)
    scale = (0.5 + torch.rand(1, p, 1, generator=g)) * 2.5 / (qmax if symmetric else (qmax - qmin) / 2)
    zp = torch.zeros(1, p, 1) if symmetric else torch.full((1, p, 1), float((qmax + 1) // 2))
    layout = layout or TokenLayout.token_major((2, p, c))
    return MixedPrecisionQuantize(QuantSpec(a_bits, symmetric, "token"), QParams(scale, zp, qmin, qmax), layout,
                                  outlier_bits=o_bits, sigma=3.0 if symmetric else 4.0)


def _reference(x, q):
    """Float64 quantize-dequantize with the quantizer's own mask."""
    mask = q.outlier_mask(x)
    xd = x.double()
    s_in = q.scale.double().reshape(1, -1, 1)
    z_in = q.zero_point.double().reshape(1, -1, 1)
    inl = torch.clamp(torch.round(torch.where(mask, 0.0, xd) / s_in) + z_in, q.qmin, q.qmax)
    y_in = (inl - z_in) * s_in
    xo = torch.where(mask, xd, 0.0)
    bits = q.outlier_bits
    if q.spec.symmetric:
        oqmax = 2 ** (bits - 1) - 1
        so = (xo.abs().amax(-1, keepdim=True) / oqmax).clamp(min=1e-8)
        y_out = torch.clamp(torch.round(xo / so), -oqmax, oqmax) * so
        ratio_o = xo / so
    else:
        oqmax = 2**bits - 1
        lo, hi = xo.amin(-1, keepdim=True).clamp(max=0), xo.amax(-1, keepdim=True).clamp(min=0)
        so = ((hi - lo) / oqmax).clamp(min=1e-8)
        zo = torch.clamp(-torch.round(lo / so), 0, oqmax)
        y_out = (torch.clamp(torch.round(xo / so) + zo, 0, oqmax) - zo) * so
        ratio_o = xo / so
    ratio_in = torch.where(mask, 0.0, xd) / s_in
    # a code the float32 quantizer may round the other way: x / s within float32's precision of a
    # half-integer (16-bit outlier codes reach 65535, where that is ~1e-2 of a step, not 1e-4)
    ratio = torch.where(mask, ratio_o, ratio_in)
    tie = (ratio - ratio.floor() - 0.5).abs() < 1e-4 + ratio.abs() * 2.0**-21
    step = torch.where(mask, so.expand_as(xd), s_in.expand_as(xd))
    return torch.where(mask, y_out, y_in), mask, tie, step, s_in, z_in, so


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), p=st.integers(1, 25), c=st.integers(2, 20),
       bits=st.sampled_from([(4, 8), (8, 16), (4, 4), (3, 8)]), symmetric=st.booleans())
def test_forward_matches_float64_and_stays_in_bounds(seed, p, c, bits, symmetric):
    a_bits, o_bits = bits
    x = _data(seed, 2, p, c)
    q = _quantizer(a_bits, o_bits, p, c, symmetric, seed)
    y = q(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    ref, mask, tie, step, s_in, z_in, so = _reference(x, q)
    err = (y.double() - ref).abs()
    assert bool((err <= 1e-5 * ref.abs().clamp(min=1) + torch.where(tie, step * 1.0001, 0.0)).all())
    # inliers: on the grid, inside the range; outliers: within half a step of the input
    codes = (y.double() / s_in + z_in)
    inl = ~mask
    assert bool(((codes - codes.round()).abs()[inl] < 1e-3).all())
    assert bool((codes.round()[inl] >= q.qmin).all() and (codes.round()[inl] <= q.qmax).all())
    # (plus float32's rounding of x / s: ~4e-3 of a step at the 16-bit codes' 65535)
    slack = (so / 2 * 1.0001 + 1e-6).expand_as(x) + x.double().abs() * 2.0**-21
    assert bool(((y.double() - x.double()).abs()[mask] <= slack[mask]).all())
    # the integer form dequantizes to the same values
    parts = q.quantize_parts(x)
    deq = (parts["codes_in"].double() - parts["zero_in"].double()) * parts["scale_in"].double()
    deq = torch.where(parts["mask"], (parts["codes_out"].double() - parts["zero_out"].double()) * parts["scale_out"].double(), deq)
    torch.testing.assert_close(deq.float(), y, rtol=1e-6, atol=1e-6)


def test_gradients_reach_x_and_the_inlier_step_size():
    x = _data(3, 2, 12, 16).requires_grad_(True)
    q = _quantizer(4, 8, 12, 16)
    q.scale.requires_grad_(True)
    q(x).pow(2).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and x.grad.abs().sum() > 0
    assert q.scale.grad is not None and q.scale.grad.abs().sum() > 0


def test_a_permuted_layout_gives_the_token_major_result():
    x = _data(4, 2, 13, 10)  # (B, L, C)
    tm = _quantizer(4, 8, 13, 10, seed=4)
    lay = TokenLayout(3, (2,), 1, 13, tuple(range(13)))  # (B, C, L): Vim's conv / scan layout
    cl = MixedPrecisionQuantize(tm.spec, QParams(tm.scale.data.reshape(1, 1, 13), tm.zero_point.reshape(1, 1, 13),
                                                 tm.qmin, tm.qmax), lay, 8)
    xt = x.transpose(1, 2).contiguous()
    assert torch.equal(to_steps(xt, lay), x)
    assert torch.equal(from_steps(to_steps(xt, lay), xt, lay), xt)
    assert torch.equal(cl(xt).transpose(1, 2), tm(x))


def test_disabled_quantizer_is_the_identity():
    x = _data(5, 2, 7, 6)
    q = _quantizer(4, 8, 7, 6)
    q.enabled = False
    assert q(x) is x


def test_observer_ignores_outlier_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 20, 32, generator=g)
    # channel 3 an outlier at every token: magnitude 50..~200, random sign (|randn| alone can be ~0)
    x[..., 3] = torch.sign(x[..., 3]) * 50.0 * (1.0 + torch.randn(8, 20, generator=g).abs())
    lay = TokenLayout.token_major(x.shape)
    plain_spec = QuantSpec(4, True, "token")
    obs = OutlierLpObserver(plain_spec, layout=lay, candidates=20)
    for phase in (0, 1):
        obs.phase = phase
        obs(x)
    scale = obs.calculate_qparams().scale
    # fitted to the inliers: every token's 4-bit range ends far below the outlier channel (>= 50)
    assert float(scale.max()) * plain_spec.qmax < 10.0
    q = obs.build_quantizer(obs.calculate_qparams())
    assert isinstance(q, MixedPrecisionQuantize) and q.outlier_bits == 8
    assert bool(q.outlier_mask(x)[..., 3].float().mean() > 0.9)


def test_bad_arguments_are_refused():
    lay = TokenLayout.token_major((1, 4, 3))
    qp = QParams(torch.ones(1, 4, 1), torch.zeros(1, 4, 1), -7, 7)
    spec = QuantSpec(4, True, "token")
    with pytest.raises(ConfigError, match="outlier_bits"):
        MixedPrecisionQuantize(spec, qp, lay, outlier_bits=17)
    with pytest.raises(ConfigError, match="refresh"):
        MixedPrecisionQuantize(spec, qp, lay, refresh=0)
    with pytest.raises(LayoutError, match="token layout"):
        MixedPrecisionQuantize(spec, qp, None)
    with pytest.raises(ConfigError, match="static per-token"):
        MixedPrecisionQuantize(QuantSpec(4, True, "channel"), qp, lay)
    with pytest.raises(ConfigError, match="OutlierConfig.bits"):
        OutlierConfig(bits=1)
    with pytest.raises(ConfigError, match="refresh"):
        OutlierConfig(refresh=0)


@pytest.mark.parametrize("name,abits,obits", [("ouromamba-w4a4", 4, 8), ("ouromamba-w4a8", 8, 16)])
def test_presets_and_config_round_trip(name, abits, obits):
    cfg = preset(name)
    assert cfg.outliers.bits == obits and cfg.activation.bits == abits and cfg.weight.bits == 4
    assert cfg.jlss.lr_weight == cfg.jlss.lr_act == 5e-4 and cfg.jlss.grad_clip == 2.0 and cfg.jlss.learn_outputs
    assert cfg.init.method == "lp" and math.isclose(cfg.init.p, 2.4)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
