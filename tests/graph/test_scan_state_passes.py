"""ScanStateConfig, ReparameterizeScanPass / QuantizeScanStatePass on traced models, save/load and
inspection of the quantized scan state."""

from __future__ import annotations

import pytest
import torch

import vmfx
from vmfx.config import QuantConfig, ScanStateConfig
from vmfx.errors import ConfigError, PassError
from vmfx.models.vim import VisionMamba
from vmfx.passes import (
    DetectMambaMixersPass,
    Pipeline,
    QuantizeScanStatePass,
    ReparameterizeScanPass,
    method_passes,
    ptq_passes,
)
from vmfx.passes.scan_state_passes import scan_nodes
from vmfx.quant.state_quantizer import ScanStateQuant, scan_state_of


@pytest.fixture(scope="module")
def small_vim():
    torch.manual_seed(0)
    return VisionMamba(img_size=16, patch_size=4, stride=4, embed_dim=32, depth=2, num_classes=5).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def quantized(small_vim, images):
    cfg = vmfx.preset("pts-w8a8").replace(scan_state=ScanStateConfig(search_samples=6, candidates=21))
    return vmfx.compile(small_vim, images, config=cfg)


def test_config_round_trip_and_validation():
    cfg = vmfx.preset("pts-w4a4").replace(scan_state=ScanStateConfig(bits=6, reparameterize=False, lookahead=2))
    back = QuantConfig.from_dict(cfg.to_dict())
    assert back == cfg and back.scan_state.bits == 6 and not back.scan_state.reparameterize
    assert QuantConfig.from_dict(vmfx.preset("minmax-w8a8").to_dict()).scan_state is None
    for bad, match in [(dict(bits=1), "bits"), (dict(candidates=0), "candidates"), (dict(lo=1.5, hi=1.0), "exceed"),
                       (dict(reparameterize=False, quantize=False), "does nothing"), (dict(search_samples=0), "search_samples"),
                       (dict(lookahead=-1), "lookahead"), (dict(quantize=1), "True or False")]:
        with pytest.raises(ConfigError, match=match):
            ScanStateConfig(**bad)
    d = cfg.to_dict()
    d["sections"]["scan_state"]["colour"] = 1
    with pytest.raises(ConfigError, match="unknown ScanStateConfig fields"):
        QuantConfig.from_dict(d)
    with pytest.raises(ConfigError, match="ScanStateConfig or None"):
        QuantConfig(scan_state={"bits": 8})


def test_pipelines_add_the_scan_passes_when_asked():
    plain = vmfx.preset("pts-w8a8")
    assert not any(isinstance(p, (ReparameterizeScanPass, QuantizeScanStatePass)) for p in ptq_passes(plain))
    cfg = plain.replace(scan_state=ScanStateConfig())
    kinds = [type(p).__name__ for p in ptq_passes(cfg)]
    assert kinds[-2:] == ["ReparameterizeScanPass", "QuantizeScanStatePass"]
    assert [type(p).__name__ for p in method_passes(cfg)] == kinds  # added once
    only_q = [type(p).__name__ for p in ptq_passes(plain.replace(scan_state=ScanStateConfig(reparameterize=False)))]
    assert only_q[-1] == "QuantizeScanStatePass" and "ReparameterizeScanPass" not in only_q


def test_reparameterize_after_quantize_is_refused(small_vim, images):
    with pytest.raises(PassError, match="ReparameterizeScanPass"):
        Pipeline([DetectMambaMixersPass(), QuantizeScanStatePass(), ReparameterizeScanPass()])(small_vim, images)


def test_reparameterization_alone_keeps_the_float_output(small_vim, images):
    """On the float graph: the reparameterized scans compute the same model output (float32)."""
    cfg = ScanStateConfig(quantize=False)
    gm = Pipeline([DetectMambaMixersPass(), ReparameterizeScanPass(cfg)])(small_vim, images)
    states = [scan_state_of(n) for n in scan_nodes(gm)]
    assert len(states) == 4 and all(s is not None and s.reparameterized and not s.quantize for s in states)
    assert any(float((s.r_L.max() / s.r_L.min())) > 1.01 for s in states)  # the factors are not trivial
    with torch.no_grad():
        ref, out = small_vim(images), gm(images)
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_quantized_state_compiles_saves_loads_and_shows(quantized, small_vim, images, tmp_path):
    facts = set(quantized.meta["vmfx_facts"])
    assert {"scan_reparameterized", "scan_state_quantized"} <= facts
    states = [scan_state_of(n) for n in scan_nodes(quantized)]
    assert len(states) == 4
    for s in states:
        assert isinstance(s, ScanStateQuant) and s.quantize and s.reparameterized and s.bits == 8
        assert bool((s.scales > 0).all()) and not torch.equal(s.scales, torch.ones_like(s.scales))
    with torch.no_grad():
        out = quantized(images)
        unquantized_state = vmfx.compile(small_vim, images, config="pts-w8a8")(images)
    assert not torch.equal(out, unquantized_state)  # the state quantization is in the graph
    path = vmfx.save(quantized, tmp_path / "q.safetensors")
    loaded = vmfx.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(images), out)
    for a, b in zip(scan_nodes(quantized), scan_nodes(loaded)):
        sa, sb = scan_state_of(a), scan_state_of(b)
        assert sa.to_dict() == sb.to_dict()
        for name in ("r_C", "r_L", "r_D", "scales"):
            assert torch.equal(getattr(sa, name), getattr(sb, name))
    assert loaded.meta["vmfx_config"]["sections"]["scan_state"]["bits"] == 8
    table = vmfx.inspect.table(quantized)
    scan_rows = [line for line in table.splitlines() if line.startswith("selective_scan")]
    assert len(scan_rows) == 4 and all("h int8 sym per-step +reparam" in r and "h 17" in r for r in scan_rows)


def test_state_without_reparameterization(small_vim, images):
    cfg = vmfx.preset("minmax-w8a8").replace(scan_state=ScanStateConfig(bits=6, reparameterize=False, search_samples=4,
                                                                         candidates=11))
    q = vmfx.compile(small_vim, images, config=cfg)
    states = [scan_state_of(n) for n in scan_nodes(q)]
    assert all(s.quantize and not s.reparameterized and s.bits == 6 and s.factors() is None for s in states)


def test_quantizers_on_the_scan_inputs_compose_with_the_state(small_vim, images, tmp_path):
    """Output quantizers on u (conv + SiLU) and delta (softplus input) by QuantRule, plus the
    quantized state: the scan reads the quantized inputs, the search sees them, save/load keeps all."""
    from vmfx import QuantRule, QuantSpec

    cfg = vmfx.preset("minmax-w8a8").replace(
        rules=(QuantRule("output", QuantSpec(8, True, "tensor"), role="conv_act"),
               QuantRule("output", QuantSpec(8, False, "tensor"), role="dt_proj")),
        scan_state=ScanStateConfig(search_samples=4, candidates=11))
    q = vmfx.compile(small_vim, images, config=cfg)
    for scan in scan_nodes(q):
        u = scan.args[0]
        assert u.op == "call_module" and "__output" in u.target  # a quantizer on the u edge
        assert scan_state_of(scan).quantize
    with torch.no_grad():
        out = q(images)
    loaded = vmfx.load(vmfx.save(q, tmp_path / "q.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded(images), out)
