"""OuroMamba-Quant end to end (issue 11): a random-weight Vim with Vim-T's width (embed 192,
d_state 16, bidirectional v2, middle class token) but 2 blocks and 17 tokens compiles with both
presets (JLSS shortened to 2 steps per block to keep the test small); the graph holds a
mixed-precision quantizer on the inputs of in_proj, x_proj, dt_proj, out_proj and on delta; JLSS
learns delta's step size; the lowering runs the mixed linears as integer kernels; vmfx.save / vmfx.load round-trips bit for bit; the outlier sets can be
listed and plotted, and `vmfx inspect --outliers` prints and draws them."""

from __future__ import annotations

import os

import pytest
import torch

import vmfx
from vmfx.config import InitConfig, JLSSConfig
from vmfx.models import VisionMamba
from vmfx.quant.mixed import MixedPrecisionQuantize


def _vim_t_shaped():
    torch.manual_seed(0)
    return VisionMamba(img_size=64, patch_size=16, stride=16, embed_dim=192, depth=2, num_classes=10).eval()


def _short(name: str):
    return vmfx.preset(name).replace(init=InitConfig("lp", 2.4, 10), jlss=JLSSConfig(steps=2, batch_size=4,
                                                                                   learn_outputs=True))


@pytest.fixture(scope="module")
def vim_q():
    model = _vim_t_shaped()
    images = torch.randn(8, 3, 64, 64)
    return model, images, vmfx.compile(model, images, _short("ouromamba-w4a4"))


def _mixed(gm):
    return {n.name: gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), MixedPrecisionQuantize)}


def test_w4a4_graph_has_the_mixed_quantizers(vim_q):
    model, images, q = vim_q
    mixed = _mixed(q)
    # 2 blocks: in_proj + out_proj, and per direction x_proj, dt_proj inputs and delta
    assert len(mixed) == 2 * (2 + 2 * 3)
    roles = sorted({name.split("mixer_")[1] for name in mixed})
    assert any(r.startswith("dt_proj__output") for r in roles) and any(r.startswith("in_proj__input") for r in roles)
    for name, m in mixed.items():
        assert m.outlier_bits == 8 and m.spec.bits == 4
        assert m.spec.symmetric == (not name.endswith("__output")) and m.sigma == (3.0 if m.spec.symmetric else 4.0)
    with torch.no_grad():
        y, ref = q(images), model(images)
    assert bool(torch.isfinite(y).all()) and y.shape == ref.shape
    table = vmfx.inspect.table(q)
    assert "int4 sym per-token + int8 outliers (mean+3sd, refresh 10)" in table
    assert "uint4 asym per-token + uint8 outliers (mean+4sd, refresh 10)" in table


def test_jlss_learns_the_delta_step_size(vim_q):
    model, images, q = vim_q
    untrained = vmfx.compile(model, images, _short("ouromamba-w4a4").replace(jlss=None))
    name = next(n for n in _mixed(q) if n.endswith("dt_proj__output"))
    assert not torch.equal(_mixed(q)[name].scale, _mixed(untrained)[name].scale)
    assert q.meta["vmfx_jlss"]["blocks"][0]["steps"] == 2


def test_w4a8_o16_compiles():
    model = _vim_t_shaped()
    images = torch.randn(8, 3, 64, 64)
    q = vmfx.compile(model, images, _short("ouromamba-w4a8"))
    mixed = _mixed(q)
    assert mixed and all(m.outlier_bits == 16 and m.spec.bits == 8 for m in mixed.values())
    with torch.no_grad():
        assert bool(torch.isfinite(q(images)).all())


def test_save_load_round_trip(vim_q, tmp_path):
    model, images, q = vim_q
    path = vmfx.save(q, str(tmp_path / "ouro.safetensors"))
    loaded = vmfx.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(images), q(images))
    assert vmfx.inspect.rows(loaded) == vmfx.inspect.rows(q)
    for name, m in _mixed(loaded).items():
        orig = _mixed(q)[name]
        assert (m.outlier_bits, m.sigma, m.refresh, m.layout) == (orig.outlier_bits, orig.sigma, orig.refresh, orig.layout)
    assert loaded.meta["vmfx_config"]["sections"]["outliers"] == {"bits": 8, "sigma": 3.0, "sigma_asym": 4.0, "refresh": 10}


def test_lowering_runs_the_mixed_linears_as_integer_kernels(vim_q):
    from vmfx.lowering import lower, lowered_partitions

    model, images, q = vim_q
    with pytest.raises(vmfx.LoweringError, match="dt_proj__output"):  # delta's quantizer feeds the scan: simulated
        lower(q, "reference", strict=True)
    with pytest.warns(UserWarning, match="dt_proj__output"):
        lowered = lower(q, "reference")
    kinds = [p.kind for p in lowered_partitions(lowered)]
    assert kinds.count("mixed_qlinear") == 2 * (2 + 2 * 2)  # in_proj, out_proj, x_proj and dt_proj of each direction
    assert not [n for n in lowered.meta["vmfx_lowered"]["left_float"] if "__output" not in n]
    with torch.no_grad():
        y, y_fake = lowered(images), q(images)
    # the same codes up to rounding ties; the float parts to float32 rounding
    torch.testing.assert_close(y, y_fake, rtol=1e-3, atol=1e-3 * float(y_fake.abs().max()))


def test_outlier_sets_are_listed_and_plotted(vim_q, tmp_path):
    model, images, q = vim_q
    sets = vmfx.inspect.outlier_sets(q, images, batch_size=4)
    assert len(sets) == len(_mixed(q))
    for s in sets:
        assert s.mask.shape[0] == images.shape[0] and s.mask.dtype == torch.bool
        d = s.summary()
        assert d["block"] in (0, 1) and 0.0 <= d["change_rate"] <= 1.0
        assert d["distinct_channels"] == len(s.channels())
    # the recorded mask is the one the quantizer applies
    mixed = _mixed(q)
    assert all(not m.record and m.last_mask is None for m in mixed.values())
    paths = vmfx.inspect.plot_outliers(sets, str(tmp_path), block=1)
    assert [os.path.basename(p) for p in paths] == ["outliers_count_block1.png", "outliers_channels_block1.png",
                                                    "outliers_blocks.png"]
    assert all(os.path.getsize(p) > 1000 for p in paths)
    with pytest.raises(vmfx.ConfigError, match="ouromamba"):
        vmfx.inspect.outlier_sets(vmfx.compile(model, images, "minmax-w8a8"), images)


def test_cli_inspect_outliers(tmp_path, capsys, monkeypatch):
    import vmfx.cli as cli

    def quick(work, preset, progress):  # the preset, with a short calibration (a test, not a measurement)
        cfg = vmfx.preset(preset).replace(init=InitConfig("lp", 2.4, 4), jlss=None)
        return vmfx.compile(work.model, work.calib_data, config=cfg), 0.0

    monkeypatch.setattr(cli, "_quantize", quick)
    out = str(tmp_path / "plots")
    assert cli.main(["inspect", "--config", "ouromamba-w4a4", "--outliers", out, "--block", "2", "--calib-n", "8",
                     "--limit", "8", "--plot-images", "8", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "mean/step" in text and "in_proj" in text and "dt_proj" in text
    assert sorted(os.listdir(out)) == ["outliers_blocks.png", "outliers_channels_block2.png", "outliers_count_block2.png"]


def test_ouromamba_compiles_on_vmamba():
    """OuroMamba's paper quantizes VMamba too: the preset runs on a VSSM's four-direction mixers
    (mixed quantizers on every mixer linear's input; worst-image logits cosine measured 0.9993)."""
    from vmfx.models import VSSM

    torch.manual_seed(0)
    model = VSSM(depths=[1, 1, 1], dims=16, num_classes=6, ssm_d_state=1, ssm_ratio=1.0, forward_type="v05_noz",
                 mlp_ratio=2.0, norm_layer="ln2d", downsample_version="v3", patchembed_version="v2").eval()
    g = torch.Generator().manual_seed(1)
    calib, test = torch.randn(8, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    q = vmfx.compile(model, calib, _short("ouromamba-w4a4"))
    mixed = _mixed(q)
    # in_proj, 4 x_proj, 4 dt_proj, out_proj per block (3 blocks), each input through a mixed quantizer
    assert sum(name.endswith("__input") for name in mixed) >= 3 * 10
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(model(test).double(), q(test).double(), dim=-1).min().item()
    assert cosine >= 0.98
