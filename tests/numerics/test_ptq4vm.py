"""PTQ4VM's pieces: Lp grid-search init, SmoothQuant, JLSS, folding, ablation pipelines."""

from __future__ import annotations

import pytest
import torch

import vmfx
from vmfx.config import InitConfig, JLSSConfig, QuantConfig, SmoothingConfig
from vmfx.passes import Pipeline, method_passes
from vmfx.passes.smoothquant import smoothing_factors
from vmfx.token_layout import TokenLayout
from vmfx.passes.linear_edges import linear_edges
from vmfx.quant import FakeQuantize, QuantSpec
from vmfx.quant.observers import LpObserver, lp_search_weight, qparams_from_minmax


def _edges(q, name):
    return linear_edges(next(n for n in q.graph.nodes if n.name == name))


def _scale(q, name, edge="input"):
    return _edges(q, name).quantizer(edge).scale


def _lp_loss_ref(x, lo, hi, bits, p):
    """Official-style scoring of one candidate range (per token of a (B, L, C) tensor), float64."""
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zp = torch.round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zp, 0, qmax)
    return ((x - (q - zp) * scale).abs() ** p).sum(dim=(0, 2))


def test_lp_observer_picks_the_best_candidate_per_token():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, 32, generator=g, dtype=torch.float64) * torch.linspace(0.2, 5, 9, dtype=torch.float64).view(1, 9, 1)
    x[0, 4, 0] = 60.0  # an outlier: clipping it pays off
    obs = LpObserver(QuantSpec(4, False, "token"), p=2.4, candidates=100, layout=TokenLayout.token_major(x.shape))
    for phase in (0, 1):
        obs.phase = phase
        for chunk in x.float().split(2):  # statistics accumulate over batches
            obs(chunk)
    lo_all, hi_all = x.amin(dim=(0, 2)), x.amax(dim=(0, 2))
    best = []
    ratios = [i / 100 for i in range(1, 50)]  # the official code's clipping ratios that keep a range
    for t in range(9):
        losses = []
        for a in ratios:
            lo = lo_all[t] + a * (hi_all[t] - lo_all[t])
            hi = hi_all[t] - a * (hi_all[t] - lo_all[t])
            losses.append(float(_lp_loss_ref(x[:, t : t + 1], lo, hi, 4, 2.4)))
        best.append(min(range(len(ratios)), key=losses.__getitem__))
    assert obs.losses.shape[0] == len(ratios)
    assert torch.equal(obs.losses.argmin(dim=0).view(-1), torch.tensor(best))
    qp = obs.calculate_qparams()
    assert qp.scale.shape == (1, 9, 1)
    mm = qparams_from_minmax(lo_all.view(1, 9, 1), hi_all.view(1, 9, 1), QuantSpec(4, False, "token"))
    assert float(qp.scale[0, 4, 0]) < float(mm.scale[0, 4, 0])  # the outlier token got clipped


def test_lp_weight_search_beats_minmax_in_lp_error():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g)
    w[3, 7] = 12.0
    spec = QuantSpec(4, True, "channel")
    lp = FakeQuantize(spec, lp_search_weight(w, spec), is_weight=True)
    mm = FakeQuantize(spec, qparams_from_minmax(w.amin(1, keepdim=True), w.amax(1, keepdim=True), spec), is_weight=True)
    err = lambda fq: ((fq(w) - w).abs() ** 2.4).mean(dim=1)  # noqa: E731
    assert bool((err(lp) <= err(mm) + 1e-7).all()) and float(err(lp)[3]) < float(err(mm)[3])


def test_smoothing_factors_match_the_smoothquant_formula():
    g = torch.Generator().manual_seed(2)
    act = torch.rand(24, generator=g) * 10
    act[0] = 0.0  # clamped to 1e-3
    w = torch.randn(8, 24, generator=g)
    s = smoothing_factors(act, w, 0.5)
    ref = (act.clamp(min=1e-3).double() ** 0.5 / w.abs().amax(0).clamp(min=1e-5).double() ** 0.5).clamp(min=1e-5)
    torch.testing.assert_close(s.double(), ref)


@pytest.mark.parametrize("preset", ["smoothquant-w8a8", "pts-smooth-w4a8"])
def test_smoothing_keeps_float_function_and_folds_into_the_norm(tiny_model, tiny_images, preset):
    qmodel = vmfx.compile(tiny_model, tiny_images, preset, check=True)
    in_proj = _edges(qmodel, "mixers_0_in_proj")
    assert in_proj.smooth_module() is not None and in_proj.weight_smooth is not None
    assert in_proj.act_smooth is None  # folded into the RMSNorm before it
    assert in_proj.smooth_module().folded_into == "norms_0"
    assert _edges(qmodel, "mixers_0_x_proj").act_smooth is not None  # after SiLU: not foldable
    with torch.no_grad(), vmfx.passes.quantization_disabled(qmodel):
        torch.testing.assert_close(qmodel(tiny_images), tiny_model(tiny_images), rtol=1e-4, atol=1e-5)


def test_per_token_scales_follow_each_direction_and_fix_the_length(tiny_model, tiny_images):
    qmodel = vmfx.compile(tiny_model, tiny_images, "pts-w8a8")
    fwd = _scale(qmodel, "mixers_0_x_proj")
    bwd = _scale(qmodel, "mixers_0_x_proj_b")
    assert fwd.shape == bwd.shape == (1, 16, 1)
    # the backward branch sees the tokens reversed: its causal conv makes its *first* token (the
    # last image token) the one with the least context, like the forward branch's first token
    assert not torch.allclose(fwd, bwd)
    with pytest.raises(vmfx.InputError, match=r"\(N, 3x16x16\), got \(N, 3x20x20\)"):
        qmodel(torch.randn(2, 3, 20, 20))
    with pytest.raises(ValueError, match="calibrated for 16 tokens, but this input has 25 tokens"):
        _edges(qmodel, "mixers_0_x_proj").quantizer("input")(torch.randn(2, 25, 64))  # the quantizer itself


def _cfg(learn_roles=("in_proj", "x_proj", "dt_proj", "out_proj"), steps=15):
    return QuantConfig(
        method="ptq4vm", weight=QuantSpec(4, True, "channel"), activation=QuantSpec(4, False, "token"),
        init=InitConfig("lp", 2.4, 40), smoothing=SmoothingConfig(0.5),
        jlss=JLSSConfig(steps=steps, batch_size=16, learn_roles=learn_roles),
    )


def test_jlss_lowers_the_block_loss_and_learns_x_proj_too(tiny_model, tiny_images):
    images = torch.cat([tiny_images, tiny_images.flip(-1)])  # 24 images, 2 batches of 16 / 8
    init_only = vmfx.compile(tiny_model, images, _cfg(steps=0))
    learned = vmfx.compile(tiny_model, images, _cfg())
    official = vmfx.compile(tiny_model, images, _cfg(learn_roles=("in_proj", "out_proj")))
    for block in learned.meta["vmfx_jlss"]["blocks"]:
        assert block["final_loss"] < block["initial_loss"]
    scale = _scale
    assert not torch.equal(scale(learned, "mixers_0_x_proj"), scale(init_only, "mixers_0_x_proj"))
    assert not torch.equal(scale(learned, "mixers_1_dt_proj_b"), scale(init_only, "mixers_1_dt_proj_b"))
    # the official switch leaves x_proj / dt_proj at their initial values, in_proj learns
    assert torch.equal(scale(official, "mixers_0_x_proj"), scale(init_only, "mixers_0_x_proj"))
    assert torch.equal(scale(official, "mixers_1_dt_proj_b"), scale(init_only, "mixers_1_dt_proj_b"))
    assert not torch.equal(scale(official, "mixers_0_in_proj"), scale(init_only, "mixers_0_in_proj"))
    assert all(not p.requires_grad for p in learned.parameters())


def test_ablations_are_reorderable_pipelines(tiny_model, tiny_images):
    names = [p.name for p in method_passes(vmfx.config.preset("ptq4vm-w4a4"))]
    assert names == ["DetectMambaMixersPass", "InsertObserversPass", "CalibratePass", "SmoothQuantPass",
                     "CalibratePass", "ConvertPass", "JLSSPass", "FoldSmoothingPass"]
    assert [p.name for p in method_passes(vmfx.config.preset("pts-w4a4"))] == [
        "DetectMambaMixersPass", "InsertObserversPass", "CalibratePass", "ConvertPass"]
    # a researcher's variant: PTS + JLSS without smoothing
    passes = method_passes(vmfx.config.preset("pts-w4a4")) + [vmfx.passes.JLSSPass(JLSSConfig(steps=3, batch_size=12))]
    q = Pipeline(passes, check=True)(tiny_model, tiny_images)
    assert len(q.meta["vmfx_jlss"]["blocks"]) == 2


def test_every_method_has_all_four_bit_settings():
    names = vmfx.preset_names()
    for method in ("minmax", "smoothquant", "pts", "pts-smooth", "ptq4vm", "ptq4vm-official"):
        for bits in ("w8a8", "w6a6", "w4a8", "w4a4"):
            assert f"{method}-{bits}" in names


def test_official_gradient_path_crosses_frozen_linears_through_float_weights(tiny_model, tiny_images):
    """frozen_gradient="float": x_proj's output stays quantized in the forward, but the gradient
    reaching its input is dy @ W_float (the official hand-written backward), not the STE's."""
    from vmfx.passes.jlss import _float_gradient_overrides

    q = vmfx.compile(tiny_model, tiny_images, "pts-smooth-w4a4")
    e = _edges(q, "mixers_0_x_proj")
    module = e.linear_module(q)
    x = (torch.randn(2, 16, module.in_features) * 3).requires_grad_(True)
    with torch.no_grad():
        sm = e.smooth_module()
        quantized = torch.nn.functional.linear(e.quantizer("input")(sm(x)), e.quantizer("weight")(sm(module.weight, weight=True)))
    override = _float_gradient_overrides(q, [e])[e.linear]
    y = override(quantized, {e.source: x})
    torch.testing.assert_close(y, quantized)  # forward: the quantized value
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    torch.testing.assert_close(x.grad, dy @ module.weight)  # backward: the float, unsmoothed weights


def test_each_block_learns_on_the_quantized_output_of_the_block_before(tiny_model, tiny_images):
    """JLSS block b must read the *quantized* stream: its inputs are block b-1's quantized output."""
    from vmfx.passes.jlss import JLSSPass
    from vmfx.passes.segments import SegmentRunner

    seen = []
    original = SegmentRunner.run

    def spy(self, k, env, keep=(), overrides=None):
        if keep and overrides is not None:  # a learning step
            seen.append((k, {n.name: v.detach().clone() for n, v in env.items() if isinstance(v, torch.Tensor)}))
        return original(self, k, env, keep, overrides)

    cfg = _cfg(steps=1)
    SegmentRunner.run = spy
    try:
        q = vmfx.compile(tiny_model, tiny_images, cfg)
    finally:
        SegmentRunner.run = original
    step_inputs = dict(seen)
    assert set(step_inputs) == {0, 1}
    # replay the finished model up to block 0's end, quantized and in float
    cuts = JLSSPass.block_ends(q)
    runner = SegmentRunner(q, cuts)
    env_q = runner.run(0, runner.initial_env(tiny_images[:12]))
    with torch.no_grad(), vmfx.passes.quantization_disabled(q):
        env_f = runner.run(0, runner.initial_env(tiny_images[:12]))
    live = cuts[0]  # block 0's out_proj: its value crosses into block 1's segment (the residual add)
    name = live.name
    assert name in step_inputs[1]
    # block 0's quantizers did not change after its own learning, so block 1 saw exactly this
    torch.testing.assert_close(step_inputs[1][name], env_q[live].detach())
    assert not torch.allclose(step_inputs[1][name], env_f[live])  # and not the float stream

def test_jlss_progress_shows_blocks_and_steps_with_a_total(tiny_model, tiny_images, capsys):
    vmfx.compile(tiny_model, tiny_images, _cfg(steps=3), progress=True)
    err = capsys.readouterr().err
    assert "ptq4vm: JLSS block 1/2" in err and "ptq4vm: JLSS block 2/2" in err
    assert "/6 [" in err  # a total: 3 steps x 2 blocks, with elapsed / remaining time


def _learned_tensors(q) -> list[torch.Tensor]:
    """Every step size and smoothing factor of the model, in module order."""
    from vmfx.quant.modules import Smooth

    out = []
    for m in q.modules():
        if isinstance(m, FakeQuantize) and m.scale is not None:
            out.append(m.scale.detach())
        elif isinstance(m, Smooth):
            out.append(m.factors.detach())
    return out


@pytest.mark.parametrize("batch_size, micro_batch", [(None, 5), (16, 3)])
def test_micro_batches_take_the_same_steps_as_whole_batches(tiny_model, tiny_images, batch_size, micro_batch):
    """A step run as several passes (gradients accumulated) equals the step run in one pass, up to
    rounding: the same losses (so each pass's share is normalised by the whole batch) and the same
    learned step sizes and smoothing factors. Official gradient path, uneven last passes."""
    images = torch.cat([tiny_images, tiny_images.flip(-1)])  # 24 images

    def cfg(micro):
        return _cfg(learn_roles=("in_proj", "out_proj"), steps=4).replace(jlss=JLSSConfig(
            steps=4, batch_size=batch_size, micro_batch=micro, learn_roles=("in_proj", "out_proj"),
            frozen_gradient="float"))

    whole = vmfx.compile(tiny_model, images, cfg(None))
    parts = vmfx.compile(tiny_model, images, cfg(micro_batch))
    init = vmfx.compile(tiny_model, images, cfg(None).replace(jlss=JLSSConfig(steps=0)))
    assert parts.meta["vmfx_jlss"]["micro_batch"] == micro_batch
    for a, b in zip(whole.meta["vmfx_jlss"]["blocks"], parts.meta["vmfx_jlss"]["blocks"]):
        assert a["train_losses"] and a["train_losses"] == pytest.approx(b["train_losses"], rel=1e-4, abs=1e-6)
    learned_whole, learned_parts = _learned_tensors(whole), _learned_tensors(parts)
    assert len(learned_whole) == len(learned_parts) > 0
    for a, b in zip(learned_whole, learned_parts):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    # and the steps did move them (the comparison is not between two initial states)
    assert any(not torch.allclose(a, c) for a, c in zip(learned_whole, _learned_tensors(init)))


def test_micro_batch_must_be_a_positive_integer():
    for bad in (0, -4, 2.5, True, "64"):
        with pytest.raises(vmfx.ConfigError, match="micro_batch must be a positive integer or None"):
            JLSSConfig(micro_batch=bad)
