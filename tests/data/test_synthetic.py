"""OuroMamba-Gen (vmfx.data.synthetic): the scan-state hook, the patched state, InfoNCE, synthesis."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

import vmfx
from tests.reference import patch_infonce_ref, patched_states_ref, scan_states_ref
from vmfx.data import synthetic as S
from vmfx.errors import CalibrationDataError, ConfigError
from vmfx.models.vim import VisionMamba
from vmfx.ops import selective_scan

# 16x16 images in 4x4 patches with stride 2: a 7x7 grid, 49 patch tokens + a middle class token.
_TINY = dict(img_size=16, patch_size=4, stride=2, channels=1, embed_dim=16, depth=2, d_state=4,
             num_classes=5, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
             final_pool_type="mean", if_abs_pos_embed=True, bimamba_type="v2", if_cls_token=True,
             if_divide_out=True, use_middle_cls_token=True)
_FAST = S.SynthesisConfig(steps=3, batch_size=4, blocks=None)


@pytest.fixture(scope="module")
def tiny_vim():
    torch.manual_seed(0)
    model = VisionMamba(**_TINY).eval()
    model.pretrained_cfg = {"mean": (0.5,), "std": (0.25,)}  # valid pixels: [-2, 2]
    return model


@pytest.fixture(scope="module")
def traced(tiny_vim):
    return S._trace(tiny_vim, torch.zeros(1, 1, 16, 16))


# -- the hidden states, differentiably -----------------------------------------------------------


@pytest.mark.parametrize("b_form", ["dn", "bnl", "bgnl"])
@pytest.mark.parametrize("softplus,bias", [(True, True), (False, False)])
def test_scan_state_gradients_match_the_float64_recurrence(b_form, softplus, bias):
    g = torch.Generator().manual_seed(3)
    b, dim, length, n = 2, 6, 9, 3
    u = torch.randn(b, dim, length, generator=g, requires_grad=True)
    delta = (0.5 * torch.randn(b, dim, length, generator=g)).requires_grad_(True)
    A = (-torch.rand(dim, n, generator=g) - 0.2).requires_grad_(True)
    shape = {"dn": (dim, n), "bnl": (b, n, length), "bgnl": (b, 2, n, length)}[b_form]
    B = torch.randn(*shape, generator=g, requires_grad=True)
    delta_bias = (0.1 * torch.randn(dim, generator=g)).requires_grad_(True) if bias else None
    C = torch.randn(b, n, length, generator=g)
    recorder = S.StateRecorder()
    with torch.no_grad():
        selective_scan(u, delta, A, B, C, delta_bias=delta_bias, delta_softplus=softplus, state_reader=recorder)
    h = S._ScanStates.apply(recorder.states, u, delta, A, B, delta_bias, softplus)
    cot = torch.randn(h.shape, generator=g)
    inputs = [t for t in (u, delta, A, B, delta_bias) if t is not None]
    got = torch.autograd.grad((h * cot).sum(), inputs)
    ref_h = scan_states_ref(u, delta, A, B, delta_bias, softplus)
    torch.testing.assert_close(h.double(), ref_h.detach(), rtol=1e-5, atol=1e-5)
    want = torch.autograd.grad((ref_h * cot.double()).sum(), inputs)
    for name, a, w in zip(("u", "delta", "A", "B", "delta_bias"), got, want):
        torch.testing.assert_close(a.double(), w.double(), rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")


def test_patched_states_match_the_loop_reference():
    g = torch.Generator().manual_seed(4)
    grid, total, cls = (3, 4), 13, 6
    order = list(range(total - 1, -1, -1))  # a backward scan: position p holds token L-1-p
    positions = tuple(order.index(i) for i in range(total))
    patch_tokens = tuple(i for i in range(total) if i != cls)
    site = S.ScanSite("scan", 0, "backward", positions, patch_tokens)
    states = torch.randn(2, 3, total, 2, generator=g, dtype=torch.float64)
    dt = torch.rand(2, 3, total, generator=g, dtype=torch.float64)
    for patch in (1, 3, 5):
        got = S.patched_states(states, dt, site, grid, patch)
        torch.testing.assert_close(got, patched_states_ref(states, dt, positions, patch_tokens, grid, patch))


# -- InfoNCE against a float64 loop ----------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 2), tokens=st.integers(5, 12),
       channels=st.integers(2, 8), positives=st.integers(1, 3), temperature=st.sampled_from([0.07, 0.2, 1.0]))
def test_infonce_matches_the_float64_reference(seed, b, tokens, channels, positives, temperature):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(b, tokens, channels, generator=g, dtype=torch.float64)
    # the positive set must be unambiguous: no near-tie at the k-th most similar token
    f = torch.nn.functional.normalize(features, dim=-1)
    sims = (f @ f.transpose(1, 2)).masked_fill(torch.eye(tokens, dtype=torch.bool), -2).sort(-1, descending=True).values
    assume(bool((sims[..., positives - 1] - sims[..., positives]).min() > 1e-6))
    got = S.patch_infonce(features, positives, temperature)
    assert abs(float(got) - patch_infonce_ref(features, positives, temperature)) < 1e-9 * max(1.0, float(got))
    got32 = S.patch_infonce(features.float(), positives, temperature)
    assert abs(float(got32) - float(got)) < 1e-4 * max(1.0, float(got))


def test_infonce_needs_a_negative_per_token():
    with pytest.raises(ConfigError, match="positives"):
        S.patch_infonce(torch.randn(1, 5, 3), positives=4)


# -- the hook on the traced graph ------------------------------------------------------------------


def test_the_hook_finds_every_scan_and_leaves_the_output_unchanged(traced):
    sites = S.scan_sites(traced, (7, 7), (24,), None)
    assert [(s.block, s.direction) for s in sites] == [(0, "forward"), (0, "backward"), (1, "forward"), (1, "backward")]
    assert sites[1].positions == tuple(range(49, -1, -1))  # the backward scan holds the tokens reversed
    assert all(len(s.patch_tokens) == 49 and 24 not in s.patch_tokens for s in sites)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    logits, features = S.capture_patched_states(traced, x, sites, (7, 7), 3)
    torch.testing.assert_close(logits, traced(x))
    assert [tuple(f.shape) for f in features] == [(3, 49, 32 * 4)] * 4  # d_inner 32 x d_state 4
    assert [s.block for s in S.scan_sites(traced, (7, 7), (24,), (-1,))] == [1, 1]


def test_the_hook_reads_the_states_the_scan_computes(traced):
    """The captured patched state equals the loop reference applied to the float64 recurrence
    of the scan node's own inputs (read by a second, plain interpreter)."""
    site = S.scan_sites(traced, (7, 7), (24,), (0,))[1]  # block 0, backward
    node = next(n for n in traced.graph.nodes if n.name == site.node)
    seen = {}

    class Grab(torch.fx.Interpreter):
        def run_node(self, n):
            if n is node:
                seen["args"], seen["kwargs"] = self.fetch_args_kwargs_from_env(n)
            return super().run_node(n)

    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    Grab(traced).run(x)
    _, features = S.capture_patched_states(traced, x, [site], (7, 7), 3)
    u, delta, A, B = seen["args"][:4]
    softplus = seen["kwargs"].get("delta_softplus", False)
    h = scan_states_ref(u, delta, A, B, None, softplus)
    dt = torch.nn.functional.softplus(delta.double()) if softplus else delta.double()
    want = patched_states_ref(h, dt, site.positions, site.patch_tokens, (7, 7), 3)
    torch.testing.assert_close(features[0].double(), want, rtol=1e-4, atol=1e-4)


def test_contrastive_gradient_reaches_the_images(traced):
    sites = S.scan_sites(traced, (7, 7), (24,), (-1,))
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(7), requires_grad=True)
    _, features = S.capture_patched_states(traced, x, sites, (7, 7), 3)
    (grad,) = torch.autograd.grad(sum(S.patch_infonce(f, 12, 0.2) for f in features), x)
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()


# -- synthesis ----------------------------------------------------------------------------------


def test_same_seed_same_images_other_seed_other_images(tiny_vim):
    a = S.synthesize(tiny_vim, 6, seed=0, config=_FAST, progress=False)
    b = S.synthesize(tiny_vim, 6, seed=0, config=_FAST, progress=False)
    c = S.synthesize(tiny_vim, 6, seed=1, config=_FAST, progress=False)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.shape == (6, 1, 16, 16) and a.dtype == torch.float32
    assert a.min() >= -2.0 - 1e-6 and a.max() <= 2.0 + 1e-6  # clamped to the valid pixel range


def test_batches_in_parallel_threads_give_the_same_images(tiny_vim):
    cfg = S.SynthesisConfig(steps=3, batch_size=2, blocks=None)
    one = S.synthesize_with_log(tiny_vim, 5, seed=3, config=cfg, progress=False, log_every=1)
    three = S.synthesize_with_log(tiny_vim, 5, seed=3, config=cfg, progress=False, log_every=1, workers=3)
    assert torch.equal(one.images, three.images)  # 3 batches (2, 2, 1 images) at once: bit for bit the same
    assert one.log == three.log
    with pytest.raises(ConfigError, match="workers"):
        S.synthesize(tiny_vim, 2, workers=0, progress=False)


def test_the_losses_decrease(tiny_vim):
    cfg = S.SynthesisConfig(steps=20, batch_size=4, lr=0.1, blocks=None)
    result = S.synthesize_with_log(tiny_vim, 4, seed=2, config=cfg, progress=False, log_every=19)
    first, last = result.log[0][0], result.log[0][-1]
    assert last["step"] == 19
    assert last["total"] < first["total"]
    assert last["output"] < first["output"]
    only_contrastive = S.SynthesisConfig(steps=20, batch_size=4, output_weight=0.0, tv_weight=0.0, l2_weight=0.0,
                                         blocks=None)
    log = S.synthesize_with_log(tiny_vim, 4, seed=2, config=only_contrastive, progress=False, log_every=19).log[0]
    assert log[-1]["contrastive"] < log[0]["contrastive"]


def test_targets_are_dealt_evenly(tiny_vim):
    result = S.synthesize_with_log(tiny_vim, 10, seed=3, config=S.SynthesisConfig(steps=1, batch_size=10),
                                   progress=False)
    assert sorted(result.targets.tolist()) == sorted(list(range(5)) * 2)


def test_progress_bar(tiny_vim, capsys):
    S.synthesize(tiny_vim, 2, seed=0, config=S.SynthesisConfig(steps=2), progress=True)
    assert "synthesizing 2 images" in capsys.readouterr().err


def test_save_images_writes_pngs(tiny_vim, tmp_path):
    images = S.synthesize(tiny_vim, 3, seed=0, config=S.SynthesisConfig(steps=1), progress=False)
    paths = S.save_images(images, str(tmp_path / "out"), normalization=S.input_normalization(tiny_vim))
    assert [os.path.basename(p) for p in paths] == ["synthetic_0000.png", "synthetic_0001.png",
                                                    "synthetic_0002.png", "synthetic_grid.png"]
    with Image.open(paths[0]) as img:
        assert img.size == (16, 16) and img.mode == "L"
    with pytest.raises(ConfigError, match="is a file"):
        S.save_images(images, paths[0])


# -- calibration without data ---------------------------------------------------------------------


def test_compile_on_synthetic_images(tiny_vim):
    spec = S.Synthetic(n=4, seed=0, config=S.SynthesisConfig(steps=2, batch_size=4))
    qmodel = vmfx.compile(tiny_vim, spec, config="minmax-w8a8")
    x = S.synthesize(tiny_vim, 4, seed=0, config=spec.config, progress=False)
    direct = vmfx.compile(tiny_vim, x, config="minmax-w8a8")
    test = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(qmodel(test), direct(test))  # the same images, the same calibration


def test_compile_synthetic_by_name_uses_the_defaults(tiny_vim, monkeypatch):
    calls = {}

    def fake_generate(self, model, *, progress=False):
        calls["spec"] = self
        return torch.randn(4, 1, 16, 16)

    monkeypatch.setattr(S.Synthetic, "generate", fake_generate)
    vmfx.compile(tiny_vim, "synthetic", config="minmax-w8a8")
    assert calls["spec"] == S.Synthetic()


def test_bad_uses_fail_clearly(tiny_vim):
    with pytest.raises(CalibrationDataError, match="'synthetic'"):
        vmfx.compile(tiny_vim, "synthtic", config="minmax-w8a8")
    with pytest.raises(CalibrationDataError, match="synthesize them from the float model"):
        vmfx.prepare(tiny_vim, "minmax-w8a8", "synthetic")
    with pytest.raises(ConfigError, match="odd"):
        S.SynthesisConfig(patch=2)
    with pytest.raises(ConfigError, match="positive"):
        S.Synthetic(n=0)
    with pytest.raises(ConfigError, match="blocks \\[7\\] do not exist"):
        S.synthesize(tiny_vim, 2, config=S.SynthesisConfig(steps=1, blocks=(7,)), progress=False)
    with pytest.raises(ConfigError, match="image_size"):
        S.synthesize(torch.nn.Linear(3, 3), 2, progress=False)


# -- the command line ----------------------------------------------------------------------------


def test_cli_eval_calibrates_on_synthetic_images(tmp_path, capsys):
    from vmfx.cli import main

    out_dir = tmp_path / "synth"
    code = main(["eval", "--calib", "synthetic", "--calib-n", "2", "--synthetic-steps", "1", "--limit", "20",
                 "--config", "minmax-w8a8", "--save-synthetic", str(out_dir), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "minmax-w8a8" in captured.out and "s on 2 images" in captured.out
    assert sorted(os.listdir(out_dir)) == ["synthetic_0000.png", "synthetic_0001.png", "synthetic_grid.png"]


@pytest.mark.parametrize("argv,message", [
    (["--calib", "synthetic", "--calib-dir", "."], "drop --calib-dir"),
    (["--save-synthetic", "x"], "add --calib synthetic"),
    (["--synthetic-steps", "3"], "add --calib synthetic"),
])
def test_cli_refuses_contradicting_calibration_options(argv, message, capsys):
    from vmfx.cli import main

    assert main(["eval", "--config", "minmax-w8a8", "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_synthetic_images_need_a_preset(capsys):
    from vmfx.cli import main

    assert main(["eval", "--calib", "synthetic", "--no-progress"]) == 2
    assert "add --config PRESET" in capsys.readouterr().err


def test_cli_default_calibration_sizes():
    from vmfx.cli import build_parser, validate

    for calib, n in (("real", 256), ("synthetic", 128)):
        args = build_parser().parse_args(["eval", "--calib", calib, "--config", "minmax-w8a8"])
        validate(args)
        assert args.calib_n == n
