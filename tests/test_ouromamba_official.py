"""OuroMamba as its official code quantizes (issue 24, part 1): the batch-wide outlier trigger and
float outliers of the mixed-precision quantizer against loop references; activations rounded
without straight-through estimator; A / D as one time step with outliers; the calibration
augmentations; the ``ouromamba-official-*`` presets (defaults of the new options unchanged, the
coverage report of the proxy listing delta, A, B, C (and D) among every scan's quantized operands,
one delta quantizer per mixer, only in_proj / out_proj learning)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vmfx
from vmfx.config import InitConfig, JLSSConfig, OutlierConfig, QuantRule
from vmfx.data.augment import CalibrationAugmentation, augment_calibration_images
from vmfx.errors import CalibrationDataError, ConfigError
from vmfx.ops.quantize import fake_quantize, qrange
from vmfx.quant.mixed import (FLAT_LAYOUT, FlatMixedPrecisionQuantize, MixedPrecisionQuantize, calibrate_flat,
                              select_outliers)
from vmfx.quant.observers import QParams
from vmfx.quant.spec import QuantSpec


def _select_reference(x, k, refresh, trigger_scale, qmax, trigger):
    """Loop reference of the selection rule (float64): per window and step, the channels past
    mean + k sd of |x| join the window's set when the step fires; "batch": step i of every window
    fires when any sample, in any window, exceeds the static scale at offset i."""
    s, p, c = x.shape
    a = x.double().abs()
    fired = a.amax(-1) / qmax > trigger_scale.double().reshape(1, p)  # (S, P)
    if trigger == "batch":
        offsets = torch.zeros(refresh, dtype=torch.bool)
        for t in range(p):
            offsets[t % refresh] |= bool(fired[:, t].any())
        fired = torch.stack([offsets[t % refresh].expand(s) for t in range(p)], dim=1)
    mask = torch.zeros(s, p, c, dtype=torch.bool)
    for n in range(s):
        current = torch.zeros(c, dtype=torch.bool)
        for t in range(p):
            if t % refresh == 0:
                current = torch.zeros(c, dtype=torch.bool)
            if fired[n, t]:
                row = a[n, t]
                current = current | (row > row.mean() + k * row.std())
            mask[n, t] = current
    return mask


@settings(max_examples=30, deadline=None)
@given(s=st.integers(1, 4), p=st.integers(1, 23), c=st.integers(2, 12), refresh=st.integers(1, 10),
       trigger=st.sampled_from(["sample", "batch"]), seed=st.integers(0, 2**31 - 1))
def test_select_outliers_matches_the_loop_reference(s, p, c, refresh, trigger, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s, p, c, generator=g) * torch.rand(1, 1, c, generator=g).mul(8).exp()
    _, qmax = qrange(4, True)
    # per-step static scales around the steps' own (about half fire; no exact ties with a dynamic scale)
    static = x.abs().amax(-1).mean(0) / qmax * (0.5 + torch.rand(p, generator=g, dtype=torch.float64)).float()
    got = select_outliers(x, 3.0, refresh, static, -qmax, qmax, True, trigger)
    assert torch.equal(got, _select_reference(x, 3.0, refresh, static, qmax, trigger))


def test_batch_trigger_couples_the_images_of_a_batch():
    layout = FLAT_LAYOUT.__class__(3, (1,), 2, 12, tuple(range(12)), batch_dim=0)
    q = {t: MixedPrecisionQuantize(QuantSpec(4, True, "token"), QParams(torch.full((1, 12, 1), 0.05),
                                                                         torch.zeros(1, 12, 1), -7, 7),
                                   layout, trigger=t) for t in ("sample", "batch")}
    torch.manual_seed(0)
    quiet = torch.randn(1, 12, 16) * 0.01
    loud = quiet.clone()
    loud[0, :, 3] = 5.0  # an outlier channel in every step of the second image
    alone = {t: m(quiet) for t, m in q.items()}
    together = {t: m(torch.cat([quiet, loud]))[:1] for t, m in q.items()}
    assert torch.equal(alone["sample"], together["sample"])  # per image: its batch does not matter
    assert not torch.equal(alone["batch"], together["batch"])  # official: the loud image fires the quiet one


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([4, 8]))
def test_float_outliers_keep_their_values_and_quantize_the_inliers(seed, bits):
    g = torch.Generator().manual_seed(seed)
    layout = FLAT_LAYOUT.__class__(3, (1,), 2, 7, tuple(range(7)), batch_dim=0)
    x = torch.randn(3, 7, 20, generator=g, dtype=torch.float64).float()
    x[:, :, 5] *= 40
    qmin, qmax = qrange(bits, True)
    scale = (x.abs().amax(dim=(0, 2), keepdim=True) / qmax / 4).clamp(min=1e-8)
    m = MixedPrecisionQuantize(QuantSpec(bits, True, "token"), QParams(scale, torch.zeros_like(scale), qmin, qmax),
                               layout, outlier_bits=16, outlier_float=True)
    y = m(x)
    mask = m.outlier_mask(x)
    assert mask.any()
    assert torch.equal(y[mask], x[mask])
    inliers = torch.clamp(torch.round(x.double() / scale.double()), qmin, qmax) * scale.double()
    assert torch.allclose(y[~mask].double(), inliers[~mask], rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="floating point"):
        m.quantize_parts(x)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), symmetric=st.booleans())
def test_rounding_without_straight_through_gives_q_to_the_scale(seed, symmetric):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(5, 9, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    scale = torch.tensor(0.37, dtype=torch.float64, requires_grad=True)
    qmin, qmax = qrange(4, symmetric)
    zero = 0.0 if symmetric else 7.0
    y = fake_quantize(x, scale, zero, qmin, qmax, straight_through=False)
    y.sum().backward()
    q = torch.clamp(torch.round(x.detach() / 0.37) + zero, qmin, qmax) - zero
    assert torch.equal(y.detach(), q * scale.detach())
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.allclose(scale.grad, q.sum(), rtol=1e-12, atol=0)


def test_flat_quantizer_is_the_mixed_quantizer_of_one_step():
    from vmfx.passes.ouromamba import outlier_observer

    torch.manual_seed(0)
    a_fwd, a_bwd = -torch.rand(24, 8).mul(3).exp(), -torch.rand(24, 8).mul(3).exp()
    spec = QuantSpec(4, True, "token")
    factory = outlier_observer(OutlierConfig(bits=8, trigger="batch"), 2.4, 20)
    flat = calibrate_flat(factory, spec, [a_fwd, a_bwd])
    assert isinstance(flat, FlatMixedPrecisionQuantize) and flat.scale.numel() == 1
    plain = MixedPrecisionQuantize(spec, QParams(flat.scale, flat.zero_point, -7, 7), FLAT_LAYOUT, 8, 3.0, 10,
                                   trigger="batch")
    assert torch.equal(flat(a_fwd), plain(a_fwd.reshape(1, 1, -1)).reshape(24, 8))
    assert flat(a_fwd).shape == a_fwd.shape and not torch.equal(flat(a_fwd), a_fwd)
    assert "whole value as one step" in flat.describe()
    with pytest.raises(ConfigError, match="outliers"):
        calibrate_flat(vmfx.passes.pipeline.activation_observer("lp", 2.4, 10), spec, [a_fwd])


def test_new_options_keep_their_defaults():
    assert (OutlierConfig().trigger, OutlierConfig().float_outliers) == ("sample", False)
    assert JLSSConfig().activation_rounding == "ste"
    for name in ("ouromamba-w4a4", "ouromamba-w4a8"):
        d = vmfx.preset(name).to_dict()["sections"]
        assert d["outliers"] == {"bits": int(name[-1]) * 2, "sigma": 3.0, "sigma_asym": 4.0, "refresh": 10}
        assert "activation_rounding" not in d["jlss"]
    official = vmfx.preset("ouromamba-official-w4a8")
    assert vmfx.QuantConfig.from_dict(official.to_dict()) == official
    assert official.outliers == OutlierConfig(bits=16, trigger="batch", float_outliers=True)
    assert vmfx.preset("ouromamba-official-w4a4").outliers == OutlierConfig(bits=8, trigger="batch")
    jl = official.jlss
    assert (jl.steps, jl.batch_size, jl.learn_roles, jl.weight_decay, jl.grad_clip, jl.activation_rounding,
            jl.learn_outputs) == (10, None, ("in_proj", "out_proj"), 1e-5, 2.0, "zero", False)


def test_bad_options_are_refused_with_the_way_out():
    with pytest.raises(ConfigError, match="'sample'"):
        OutlierConfig(trigger="any")
    with pytest.raises(ConfigError, match="True or False"):
        OutlierConfig(float_outliers=1)
    with pytest.raises(ConfigError, match="'ste'"):
        JLSSConfig(activation_rounding="none")
    with pytest.raises(ConfigError, match="cannot be dynamic"):
        QuantRule("scan.A", QuantSpec(4, True, "token", dynamic=True))
    with pytest.raises(CalibrationDataError, match=r"\(N, C, H, W\)"):
        augment_calibration_images(torch.zeros(3, 8, 8), 0)
    with pytest.raises(ConfigError, match="probability"):
        CalibrationAugmentation(erase_prob=1.5)


def test_augmentation_is_seeded_and_keeps_shapes_of_one_channel_digits():
    from vmfx.data import load_digits

    train, _ = load_digits("train")
    x = train[:8]
    state = torch.random.get_rng_state()
    a, b, c = (augment_calibration_images(x, s) for s in (3, 3, 4))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, x) and bool(torch.isfinite(a).all())
    off = CalibrationAugmentation(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, randaugment_ops=0,
                                  erase_prob=0.0)
    span = float(x.max() - x.min())
    assert torch.allclose(augment_calibration_images(x, 0, off), x, atol=span / 255)  # only the uint8 rounding


@pytest.fixture(scope="module")
def proxy_official():
    from vmfx.data import load_digits, load_proxy_model

    model = load_proxy_model()
    train, _ = load_digits("train")
    images = augment_calibration_images(train[:6], 0)
    cfg = vmfx.preset("ouromamba-official-w4a4")
    cfg = cfg.replace(init=InitConfig("lp", 2.4, 10), jlss=replace(cfg.jlss, steps=1))
    untrained = vmfx.compile(model, images, cfg.replace(jlss=None))
    return model, images, vmfx.compile(model, images, cfg), untrained


def test_proxy_coverage_lists_the_official_scan_operands(proxy_official):
    model, images, q, _ = proxy_official
    scans = [layer for layer in vmfx.inspect.coverage(q).layers if layer.kind == "scan"]
    assert len(scans) == 2 * len(model.layers)
    for layer in scans:
        assert {"delta", "A", "B", "C", "D"} <= set(layer.quantized_operands), layer.name
        assert "batch trigger" in layer.quantized_operands["B"]
    with torch.no_grad():
        assert bool(torch.isfinite(q(images)).all())


def test_one_delta_quantizer_per_mixer_and_only_in_out_proj_learn(proxy_official):
    model, images, q, untrained = proxy_official
    delta = [n for n in q.graph.nodes if n.op == "call_module" and n.target.endswith("__scan_delta")]
    assert len(delta) == 2 * len(model.layers) and len({n.target for n in delta}) == len(model.layers)
    learned = {}
    for node in q.graph.nodes:
        if node.op == "call_module" and isinstance(q.get_submodule(node.target), MixedPrecisionQuantize):
            m, m0 = q.get_submodule(node.target), untrained.get_submodule(node.target)
            learned[node.target] = not torch.equal(m.scale, m0.scale)
            assert m.round_gradient == "ste"  # restored after learning
    assert any(v for k, v in learned.items() if "in_proj" in k or "out_proj" in k)
    assert not any(v for k, v in learned.items() if "x_proj" in k or "dt_proj" in k or "__scan_" in k)


def _harness():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "ouromamba_official.py")
    spec = importlib.util.spec_from_file_location("bench_ouromamba_official", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _naive_scan(u, delta, A, B, C, D, z):
    """float64 loop reference of mamba's scan with softplus(delta), B / C as (b, 1, n, l), the gate silu(z)."""
    delta = torch.nn.functional.softplus(delta)
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(delta[..., t, None] * A) * h + delta[..., t, None] * B[:, 0, None, :, t] * u[..., t, None]
        ys.append((h * C[:, 0, None, :, t]).sum(-1))
    y = torch.stack(ys, -1) + D[:, None] * u
    return y * torch.nn.functional.silu(z)


def test_the_benchmarks_cpu_standins_match_a_float64_reference():
    harness = _harness()
    scan, conv = harness._selective_scan_cuda(), harness._causal_conv1d_cuda()
    g = torch.Generator().manual_seed(0)
    b, d, n, length = 2, 5, 3, 7
    args = [torch.randn(b, d, length, generator=g), torch.randn(b, d, length, generator=g),
            -torch.rand(d, n, generator=g).exp(), torch.randn(b, 1, n, length, generator=g),
            torch.randn(b, 1, n, length, generator=g), torch.randn(d, generator=g), torch.randn(b, d, length, generator=g)]
    _, _, out_z = scan.fwd(*args, None, True)
    leaves = [a.double().requires_grad_(True) for a in args]
    ref = _naive_scan(*leaves)
    assert torch.allclose(out_z.double(), ref, rtol=1e-4, atol=1e-5)
    dout = torch.randn(b, d, length, generator=g)
    grads = torch.autograd.grad(ref, leaves, dout.double())
    dz = torch.zeros(b, d, length)
    du, ddelta, dA, dB, dC, dD, ddelta_bias, dz_out, _ = scan.bwd(*args, None, dout, None, None, dz, True, True)
    assert ddelta_bias is None and dz_out is dz and torch.equal(dz, dz_out)  # written into the caller's buffer
    for got, want in zip((du, ddelta, dA, dB, dC, dD, dz), grads):
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5)
    x, w, bias = torch.randn(b, d, length, generator=g), torch.randn(d, 4, generator=g), torch.randn(d, generator=g)
    xl = [t.double().requires_grad_(True) for t in (x, w, bias)]
    padded = torch.nn.functional.pad(xl[0], (3, 0))
    ref = torch.nn.functional.silu(sum(padded[..., k:k + length] * xl[1][:, k, None] for k in range(4)) + xl[2][:, None])
    assert torch.allclose(conv.causal_conv1d_fwd(x, w, bias, None, True).double(), ref, atol=1e-5)
    dx = torch.zeros_like(x)
    gx, gw, gb = conv.causal_conv1d_bwd(x, w, bias, dout, None, dx, True)
    want = torch.autograd.grad(ref, xl, dout.double())
    assert gx is dx and all(torch.allclose(a.double(), e, atol=1e-5) for a, e in zip((gx, gw, gb), want))


class _Recorder(torch.nn.Module):
    """A stand-in for the official Q_Act: remembers what it saw, scales by its own factor."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x)
        return x * (len(self.seen) + 1)


def test_per_direction_quantizers_see_only_their_own_directions_calls():
    harness = _harness()
    ops = type("QuantOps", (), {"Act": _Recorder, "Act_d": type("ActD", (_Recorder,), {})})
    mods = {"ouroquant.quantizer": type("module", (), {"QuantOps": ops})}
    mixer = torch.nn.Module()
    for name in harness.SHARED_SCAN_QUANTIZERS:
        setattr(mixer, name, ops.Act_d() if name == "act_funcd" else ops.Act())
    model = torch.nn.Sequential(torch.nn.Sequential(mixer))
    assert harness.unshare_scan_quantizers(mods, model) == len(harness.SHARED_SCAN_QUANTIZERS)
    assert isinstance(mixer.act_funcd.directions[1], ops.Act_d) and mixer.act_funcA.name == "0.0.act_funcA"
    g = torch.Generator().manual_seed(3)
    calls = [torch.randn(2, 5, generator=g) for _ in range(4)]  # forward, backward, forward, backward
    outs = [mixer.act_funcB(x) for x in calls]
    forward, backward = mixer.act_funcB.directions
    assert [t.data_ptr() for t in forward.seen] == [calls[0].data_ptr(), calls[2].data_ptr()]
    assert [t.data_ptr() for t in backward.seen] == [calls[1].data_ptr(), calls[3].data_ptr()]
    assert torch.equal(outs[2], calls[2] * 3) and torch.equal(outs[3], calls[3] * 3)
    assert harness.unshare_scan_quantizers(mods, torch.nn.Linear(2, 2)) == 0
