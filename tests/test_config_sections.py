"""QuantConfig's sections: the built-in methods' settings are registered sections like a plug-in's,
read and written through keyword aliases, saved as version 4, and older saved configs still read."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle

import pytest
from safetensors import safe_open

import vmfx
from vmfx.config import (
    BiasCorrectionConfig,
    InitConfig,
    JLSSConfig,
    OutlierConfig,
    QuantConfig,
    ScanStateConfig,
    SimilaritySearchConfig,
    SmoothingConfig,
    SplitSoftplusConfig,
)
from vmfx.errors import ConfigError
from vmfx.quant.spec import QuantSpec
from vmfx.sections import Sections, section_info

DATA = os.path.join(os.path.dirname(__file__), "data")
#: Configs as vmfx wrote them before sections (QuantConfig version 3), one per kind of field.
V3_CONFIGS = os.path.join(DATA, "configs", "quantconfig_v3.json")
V1_FILE = os.path.join(DATA, "artifacts", "v1_ptq4vm_w4a8_vim16.safetensors")

BUILTIN = {"smoothing": SmoothingConfig, "jlss": JLSSConfig, "search": SimilaritySearchConfig,
           "outliers": OutlierConfig, "scan_state": ScanStateConfig, "split_softplus": SplitSoftplusConfig,
           "bias_correction": BiasCorrectionConfig}


def test_the_builtin_settings_are_registered_sections():
    for name, cls in BUILTIN.items():
        info = section_info(name)
        assert info.cls is cls and info.builtin and info.method is None
    assert section_info("init") is None  # every method initialises step sizes: a core field
    assert {f.name for f in dataclasses.fields(QuantConfig)} == {
        "method", "weight", "activation", "roles", "calib_batch_size", "init", "rules", "settings", "sections"}


def test_keywords_and_sections_build_the_same_config():
    by_keyword = QuantConfig(method="ptq4vm", smoothing=SmoothingConfig(0.6), jlss=JLSSConfig(steps=3),
                             split_softplus=True, bias_correction=["dt_proj"])
    by_section = QuantConfig(method="ptq4vm", sections={
        "smoothing": SmoothingConfig(0.6), "jlss": JLSSConfig(steps=3), "split_softplus": SplitSoftplusConfig(),
        "bias_correction": BiasCorrectionConfig(("dt_proj",))})
    assert by_keyword == by_section and hash(by_keyword) == hash(by_section) and len({by_keyword, by_section}) == 1
    assert isinstance(by_keyword.sections, Sections) and list(by_keyword.sections) == sorted(by_keyword.sections)
    assert by_keyword.smoothing == SmoothingConfig(0.6) and by_keyword.jlss.steps == 3
    assert by_keyword.split_softplus is True and by_keyword.bias_correction == ("dt_proj",)
    assert by_keyword.search is None and by_keyword.outliers is None and by_keyword.scan_state is None
    assert QuantConfig().split_softplus is False and QuantConfig().bias_correction == ()
    assert QuantConfig(split_softplus=False, bias_correction=()).sections == {}
    assert pickle.loads(pickle.dumps(by_keyword)) == by_keyword
    with pytest.raises(AttributeError, match="immutable"):
        by_keyword.sections.jlss = None


def test_replace_sets_and_removes_sections_keeping_the_rest():
    cfg = vmfx.preset("ptq4vm-w4a4")
    fewer = cfg.replace(jlss=None, scan_state=ScanStateConfig(bits=6))
    assert fewer.jlss is None and fewer.scan_state.bits == 6 and fewer.smoothing == cfg.smoothing
    assert fewer.init == cfg.init and fewer.weight == cfg.weight
    assert dataclasses.replace(cfg, jlss=JLSSConfig(steps=1)).jlss.steps == 1  # dataclasses.replace takes them too
    assert dataclasses.replace(cfg, jlss=JLSSConfig(steps=1)).smoothing == cfg.smoothing
    assert cfg.replace(sections={}).sections == {} and cfg.replace(sections={}).smoothing is None
    assert cfg.replace(method="minmax").jlss == cfg.jlss


@pytest.mark.parametrize("kwargs, match", [
    (dict(smoothing=InitConfig()), "QuantConfig.smoothing must be a SmoothingConfig or None, got InitConfig"),
    (dict(scan_state={"bits": 8}), "QuantConfig.scan_state must be a ScanStateConfig or None, got dict"),
    (dict(sections={"jlss": SmoothingConfig()}), r"QuantConfig.sections\['jlss'\] must be a JLSSConfig or None"),
    (dict(split_softplus=1), "QuantConfig.split_softplus must be True or False, got 1"),
    (dict(bias_correction=("bogus",)), r"QuantConfig.bias_correction \(BiasCorrectionConfig.roles\) must be"),
    (dict(bias_correction="dt_proj"), "QuantConfig.bias_correction must be a tuple of linear roles"),
    (dict(smothing=SmoothingConfig()), "'smothing' is neither a QuantConfig field .* nor a registered config section"),
    (dict(sections=[("jlss", JLSSConfig())]), "QuantConfig.sections must map section names to sections"),
    (dict(weight=None), "QuantConfig.weight and QuantConfig.activation must be QuantSpec"),
    (dict(init=None), "QuantConfig.init must be an InitConfig, got NoneType"),
    (dict(options=SmoothingConfig()), "method 'minmax' declares none"),
    (dict(activation=QuantSpec(8, False, "tensor", dynamic=True), jlss=JLSSConfig()),
     "dynamic activation specs cannot be combined with jlss"),
])
def test_bad_configs_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QuantConfig(**kwargs)


def test_setting_rules_read_the_sections():
    cfg = vmfx.preset("ptq4vm-w4a4").replace(settings=(
        vmfx.SettingRule("smoothing.alpha", 0.8, vmfx.Selector(role="out_proj")),))
    assert cfg.setting_for("smoothing.alpha", "out_proj") == 0.8 and cfg.setting_for("smoothing.alpha", "in_proj") == 0.5
    with pytest.raises(ConfigError, match="has no smoothing"):
        cfg.replace(smoothing=None)


def test_every_preset_round_trips_as_version_4():
    for name in vmfx.preset_names():
        cfg = vmfx.preset(name)
        d = json.loads(json.dumps(cfg.to_dict()))  # JSON values only
        assert d["version"] == 4 and set(d["sections"]) == set(cfg.sections)
        assert not {"options", "smoothing", "jlss", "split_softplus"} & set(d)
        back = QuantConfig.from_dict(d)
        assert back == cfg and back.options == cfg.options, name


def test_version_3_configs_read_as_before():
    """Dicts written by vmfx before sections (commit 3f6d2a4): each reads as the config the same
    preset builds now, with the same values behind every alias."""
    saved = json.load(open(V3_CONFIGS))
    assert all(d["version"] == 3 for d in saved.values())
    for name, d in saved.items():
        preset_name, _, extra = name.partition("+")
        cfg = QuantConfig.from_dict(d)
        want = vmfx.preset(preset_name)
        if extra:
            assert cfg.settings and cfg.replace(settings=()) == want
        else:
            assert cfg == want, name
    official = QuantConfig.from_dict(saved["kscaled-official-w4a8"])
    assert official.split_softplus and official.bias_correction == ("dt_proj", "head")
    assert official.scan_state == ScanStateConfig(bits=8, reparameterize=True, exhaustive=True)
    assert QuantConfig.from_dict(saved["rotate-w4a4"]).options == vmfx.passes.RotationOptions()
    with pytest.raises(ConfigError, match=r"unknown QuantConfig fields \['sections'\] \(version 3\)"):
        QuantConfig.from_dict({**saved["rotate-w4a4"], "sections": {}})
    with pytest.raises(ConfigError, match=r"unknown QuantConfig fields \['jlss'\] \(version 4\)"):
        QuantConfig.from_dict({**vmfx.preset("minmax-w8a8").to_dict(), "jlss": {}})
    with pytest.raises(ConfigError, match="version 5 is not supported"):
        QuantConfig.from_dict({"version": 5})


def test_a_version_1_file_config_still_reads():
    with safe_open(V1_FILE, "pt") as f:
        d = json.loads(f.metadata()["vmfx"])["config"]
    cfg = QuantConfig.from_dict(d)
    assert d["version"] == 1 and cfg.method == "ptq4vm" and cfg.rules == () and cfg.settings == ()
    assert cfg.smoothing == SmoothingConfig(0.5) and cfg.jlss == JLSSConfig(steps=4, batch_size=8)
    assert cfg.init == InitConfig("lp", 2.4, 20) and set(cfg.sections) == {"smoothing", "jlss"}


def test_a_saved_section_with_unknown_fields_is_refused_by_name():
    d = vmfx.preset("kscaled-official-w4a4").to_dict()
    d["sections"]["bias_correction"]["colour"] = 1
    with pytest.raises(ConfigError, match=r"unknown BiasCorrectionConfig fields \['colour'\]"):
        QuantConfig.from_dict(d)
    d = vmfx.preset("minmax-w8a8").to_dict()
    d["sections"]["smoothing"] = {"alpha": 2.0}
    with pytest.raises(ConfigError, match=r"SmoothingConfig.alpha must be in \[0, 1\]"):
        QuantConfig.from_dict(d)
