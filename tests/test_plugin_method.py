"""A method in one file outside vmfx (tests/plugins/clip_method.py): registered, compiled through
vmfx.compile and the staged API, saved and loaded, with its options in the saved config."""

from __future__ import annotations

import os

import pytest
import torch

import vmfx

PLUGIN = os.path.join(os.path.dirname(__file__), "plugins", "clip_method.py")


@pytest.fixture(scope="module")
def plugin():
    return vmfx.load_plugin(PLUGIN)


@pytest.fixture(scope="module")
def proxy():
    from vmfx.data import load_digits, load_proxy_model

    return load_proxy_model(), load_digits("train")[0][:16]


def test_a_plugin_method_compiles_saves_and_loads(plugin, proxy, tmp_path):
    model, images = proxy
    assert "clip" in vmfx.passes.methods() and "clip-w8a8" in vmfx.preset_names()
    q = vmfx.compile(model, images, "clip-w8a8")
    base = vmfx.compile(model, images, "minmax-w8a8")
    q_scales = [e.quantizer("input").scale for e in vmfx.passes.quantized_linears(q)]
    base_scales = [e.quantizer("input").scale for e in vmfx.passes.quantized_linears(base)]
    assert len(q_scales) == len(base_scales) > 0
    for got, ref in zip(q_scales, base_scales):
        assert torch.allclose(got, ref * 0.9)
    loaded = vmfx.load(vmfx.save(q, str(tmp_path / "clip.safetensors")))
    with torch.no_grad():
        assert torch.equal(loaded(images), q(images))
    assert loaded.meta["vmfx_config"]["method"] == "clip" and loaded.meta["vmfx_config"]["options"] == {"ratio": 0.9}


def test_a_plugin_method_runs_through_the_staged_api(plugin, proxy):
    model, images = proxy
    cfg = vmfx.preset("clip-w8a8").replace(options=plugin.ClipOptions(ratio=0.5))
    staged = vmfx.convert(vmfx.calibrate(vmfx.prepare(model, cfg, images), images))
    direct = vmfx.compile(model, images, cfg)
    with torch.no_grad():
        assert torch.equal(staged(images), direct(images))


def test_plugin_options_are_validated_and_round_trip(plugin):
    cfg = vmfx.preset("clip-w4a8")
    assert cfg.options == plugin.ClipOptions()
    assert vmfx.QuantConfig.from_dict(cfg.replace(options=plugin.ClipOptions(0.7)).to_dict()).options.ratio == 0.7
    with pytest.raises(vmfx.ConfigError, match="ratio must be a number in"):
        plugin.ClipOptions(ratio=1.5)
    with pytest.raises(vmfx.ConfigError, match="takes options of type ClipOptions"):
        cfg.replace(options=vmfx.SmoothingConfig())
    with pytest.raises(vmfx.ConfigError, match="declares none"):
        vmfx.preset("minmax-w8a8").replace(options=plugin.ClipOptions())
    with pytest.raises(vmfx.ConfigError, match="built-in preset"):
        vmfx.register_preset("minmax-w8a8", cfg)
    with pytest.raises(vmfx.ConfigError, match="no options class registered"):
        vmfx.QuantConfig.from_dict({**cfg.to_dict(), "method": "nowhere"})


def test_plugin_files_that_do_not_load_are_clear_errors(tmp_path):
    with pytest.raises(vmfx.ConfigError, match="no plug-in file"):
        vmfx.load_plugin(str(tmp_path / "missing.py"))
    broken = tmp_path / "broken.py"
    broken.write_text("import vmfx\nraise RuntimeError('half-written')\n")
    with pytest.raises(vmfx.ConfigError, match="broken.py failed while loading: RuntimeError: half-written"):
        vmfx.load_plugin(str(broken))
