"""A method in one file outside vmfx (tests/plugins/clip_method.py): registered, compiled through
vmfx.compile and the staged API, saved and loaded, with its options and its own config section
(``clip_scope``) in the saved config."""

from __future__ import annotations

import os

import fnmatch

import pytest
import torch

import vmfx
import vmfx.sections

PLUGIN = os.path.join(os.path.dirname(__file__), "plugins", "clip_method.py")


@pytest.fixture(scope="module")
def plugin():
    return vmfx.load_plugin(PLUGIN)


@pytest.fixture(scope="module")
def proxy():
    from vmfx.data import load_digits, load_proxy_model

    return load_proxy_model(), load_digits("train")[0][:16]


@pytest.fixture(scope="module")
def base_scales(proxy):
    """The input step sizes of minmax-w8a8 (the clip method's starting point), by linear module."""
    model, images = proxy
    return {e.module: e.quantizer("input").scale for e in vmfx.passes.quantized_linears(
        vmfx.compile(model, images, "minmax-w8a8"))}


def _input_scales(qmodel) -> dict:
    return {e.module: e.quantizer("input").scale for e in vmfx.passes.quantized_linears(qmodel)}


def test_a_plugin_method_compiles_saves_and_loads(plugin, proxy, base_scales, tmp_path):
    model, images = proxy
    assert "clip" in vmfx.passes.methods() and "clip-w8a8" in vmfx.preset_names()
    q = vmfx.compile(model, images, "clip-w8a8")
    q_scales = _input_scales(q)
    assert q_scales.keys() == base_scales.keys() and len(q_scales) > 0
    for module, got in q_scales.items():
        assert torch.allclose(got, base_scales[module] * 0.9)
    loaded = vmfx.load(vmfx.save(q, str(tmp_path / "clip.safetensors")))
    with torch.no_grad():
        assert torch.equal(loaded(images), q(images))
    saved = loaded.meta["vmfx_config"]
    assert saved["method"] == "clip" and saved["sections"] == {"clip": {"ratio": 0.9}}
    assert saved["section_modules"] == {"clip": plugin.__name__}


def test_a_plugin_section_selects_saves_and_loads(plugin, proxy, base_scales, tmp_path):
    """The plug-in's own section (registered with vmfx.register_section, nothing in vmfx/config.py)
    reaches its pass, and is saved with the model and read back."""
    model, images = proxy
    cfg = vmfx.preset("clip-w8a8").replace(clip_scope=plugin.ClipScope("layers.0.*"))
    assert cfg.clip_scope == cfg.section("clip_scope") == cfg.sections["clip_scope"] == plugin.ClipScope("layers.0.*")
    q = vmfx.compile(model, images, cfg)
    scales = _input_scales(q)
    clipped = [m for m in scales if fnmatch.fnmatchcase(m, "layers.0.*")]
    assert 0 < len(clipped) < len(scales)
    for module, got in scales.items():
        assert torch.allclose(got, base_scales[module] * (0.9 if module in clipped else 1.0))
    loaded = vmfx.load(vmfx.save(q, str(tmp_path / "scoped.safetensors")))
    with torch.no_grad():
        assert torch.equal(loaded(images), q(images))
    saved = loaded.meta["vmfx_config"]
    assert saved["sections"]["clip_scope"] == {"module": "layers.0.*"}
    assert vmfx.QuantConfig.from_dict(saved) == cfg
    assert vmfx.QuantConfig.from_dict(cfg.replace(clip_scope=None).to_dict()).clip_scope is None
    with pytest.raises(vmfx.ConfigError, match="ClipScope.module must be a non-empty"):
        plugin.ClipScope("")
    with pytest.raises(vmfx.ConfigError, match="QuantConfig.clip_scope must be a ClipScope or None, got ClipOptions"):
        cfg.replace(clip_scope=plugin.ClipOptions())


def test_a_config_with_an_unregistered_section_says_what_to_load(plugin, monkeypatch):
    saved = vmfx.preset("clip-w8a8").replace(clip_scope=plugin.ClipScope("layers.1.*")).to_dict()
    monkeypatch.delitem(vmfx.sections._SECTIONS, "clip_scope")  # a process that has not loaded the plug-in
    with pytest.raises(vmfx.ConfigError, match=r"section 'clip_scope', which is not registered here .*"
                                               r"plug-in file clip_method\.py: load it first \(vmfx\.load_plugin"):
        vmfx.QuantConfig.from_dict(saved)
    saved["section_modules"] = {}
    with pytest.raises(vmfx.ConfigError, match="section 'clip_scope'.*import the module that registers it"):
        vmfx.QuantConfig.from_dict(saved)
    with pytest.raises(vmfx.ConfigError, match="'clip_scope' is neither a QuantConfig field"):
        vmfx.preset("clip-w8a8").replace(clip_scope=None)


def test_a_plugin_method_runs_through_the_staged_api(plugin, proxy):
    model, images = proxy
    cfg = vmfx.preset("clip-w8a8").replace(options=plugin.ClipOptions(ratio=0.5),
                                           clip_scope=plugin.ClipScope("layers.1.*"))
    prepared = vmfx.prepare(model, cfg, images)
    assert vmfx.QuantConfig.from_dict(prepared.meta["vmfx_config"]) == cfg
    staged = vmfx.convert(vmfx.calibrate(prepared, images))
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
    with pytest.raises(vmfx.ConfigError, match="holds the options of method 'clip', but this config's method is 'nowhere'"):
        vmfx.QuantConfig.from_dict({**cfg.to_dict(), "method": "nowhere"})
    with pytest.raises(vmfx.ConfigError, match="no options class registered"):  # a version-3 file
        vmfx.QuantConfig.from_dict({"version": 3, "method": "nowhere", "options": {"ratio": 0.5}})
    assert vmfx.QuantConfig.from_dict({"version": 3, "method": "clip", "options": {"ratio": 0.5}}).options.ratio == 0.5
    with pytest.raises(vmfx.ConfigError, match="is a built-in config section"):
        vmfx.register_section("jlss", plugin.ClipScope)
    with pytest.raises(vmfx.ConfigError, match="is a field or attribute of QuantConfig"):
        vmfx.register_section("bits", plugin.ClipScope)


def test_plugin_files_that_do_not_load_are_clear_errors(tmp_path):
    with pytest.raises(vmfx.ConfigError, match="no plug-in file"):
        vmfx.load_plugin(str(tmp_path / "missing.py"))
    broken = tmp_path / "broken.py"
    broken.write_text("import vmfx\nraise RuntimeError('half-written')\n")
    with pytest.raises(vmfx.ConfigError, match="broken.py failed while loading: RuntimeError: half-written"):
        vmfx.load_plugin(str(broken))
