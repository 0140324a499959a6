"""The operands of the selective scan as quantizable edges (issue 24, part 2): ``QuantRule("scan.B",
spec)`` puts a quantizer on that input edge of every selected scan, with the scan's token layout;
``shared="mixer"`` gives both directions one quantizer; coverage lists each scan's quantized
operands with their bits and the quantized tensors outside the mixers; save / load and the
reference lowering keep the function bit for bit / to float rounding."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import vmfx
from vmfx.annotations import annotation
from vmfx.config import QuantConfig, QuantRule, ScanStateConfig
from vmfx.errors import ConfigError, ConfigWarning
from vmfx.models import VisionMamba
from vmfx.passes.patterns import is_scan
from vmfx.passes.scan_operands import scan_operand_nodes
from vmfx.quant import FakeQuantize, QuantSpec

TOKEN8 = QuantSpec(8, False, "token")
TENSOR8 = QuantSpec(8, True, "tensor")
OPERAND_RULES = (
    QuantRule("scan.B", TOKEN8),
    QuantRule("scan.C", TOKEN8),
    QuantRule("scan.A", TENSOR8),
    QuantRule("scan.D", TENSOR8),
)


@pytest.fixture(scope="module")
def vim():
    torch.manual_seed(0)
    return VisionMamba(img_size=16, patch_size=4, stride=4, embed_dim=32, depth=2, num_classes=5).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def qmodel(vim, images):
    return vmfx.compile(vim, images, vmfx.preset("minmax-w8a8").replace(rules=OPERAND_RULES))


def _scans(gm):
    return [n for n in gm.graph.nodes if is_scan(n)]


def _cos(a, b) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_operand_quantizers_sit_on_the_scan_edges_with_the_scans_layout(qmodel):
    scans = _scans(qmodel)
    assert len(scans) == 4  # two blocks, two directions
    for scan in scans:
        operands = scan_operand_nodes(scan)
        assert set(operands) == {"u", "delta", "A", "B", "C", "D"}  # Vim gates outside the scan: no z
        for name in ("u", "delta"):  # no rule: float
            assert not isinstance(qmodel.get_submodule(operands[name].target) if operands[name].op == "call_module"
                                  else None, FakeQuantize)
        direction = annotation(scan).direction
        for name in ("B", "C", "A", "D"):
            q = operands[name]
            fq = qmodel.get_submodule(q.target)
            ann = annotation(q)
            assert isinstance(fq, FakeQuantize) and ann.role == "quantizer"
            assert ann.extra == {"quantizes": scan.name, "edge": f"scan.{name}"}
            assert ann.direction == direction and ann.block == annotation(scan).block
            assert list(q.users) == [scan]  # only the scan reads the quantized value
        for name in ("B", "C"):  # (batch, N, L): one scale per time step of this scan
            fq = qmodel.get_submodule(operands[name].target)
            assert fq.spec == TOKEN8 and tuple(fq.scale.shape) == (1, 1, 17)
            layout = annotation(operands[name]).layout
            assert layout.token_dims == (2,) and layout.channel_dim == 1
            assert layout.direction == direction  # the backward scan's positions hold tokens reversed
        for name in ("A", "D"):  # weight-like: static, from the parameter's value
            fq = qmodel.get_submodule(operands[name].target)
            assert fq.is_weight and fq.scale.numel() == 1 and annotation(operands[name]).weight_spec == TENSOR8
    # A = -exp(A_log): its per-tensor symmetric min-max scale is max|A| / 127
    mixer = qmodel.get_submodule("layers.0.mixer")
    a_fq = qmodel.get_submodule(scan_operand_nodes(scans[0])["A"].target)
    torch.testing.assert_close(a_fq.scale.reshape(()), torch.exp(mixer.A_log.detach().float()).max() / 127)
    # inspect.table shows them like any quantizer
    rows = {r["node"]: r for r in vmfx.inspect.rows(qmodel)}
    b_node = scan_operand_nodes(scans[1])["B"]
    assert rows[b_node.name]["role"] == "quantizer" and rows[b_node.name]["spec"] == "uint8 asym per-token"


def test_quantized_operands_change_the_output_and_stay_close_to_float(vim, images, qmodel):
    base = vmfx.compile(vim, images, "minmax-w8a8")
    with torch.no_grad():
        ref, out, out_base = vim(images), qmodel(images), base(images)
    cos = _cos(ref, out)
    print(f"cosine(float, W8A8 + B/C per token, A/D per tensor at 8 bits) = {cos:.6f}; "
          f"without operand quantizers {_cos(ref, out_base):.6f}")
    assert cos > 0.99
    assert not torch.allclose(out, out_base, atol=1e-6)  # the operand quantizers do something


def test_shared_delta_quantizer_is_one_module_calibrated_on_both_directions(vim, images):
    cfg = vmfx.preset("minmax-w8a8").replace(rules=(
        QuantRule("scan.delta", QuantSpec(8, False, "tensor"), shared="mixer"),))
    prepared = vmfx.prepare(vim, cfg, images)
    scans = _scans(prepared)
    targets = [scan_operand_nodes(s)["delta"].target for s in scans]
    assert targets[0] == targets[1] != targets[2] == targets[3]  # one per mixer, both directions
    assert [annotation(scan_operand_nodes(s)["delta"]).extra["shared"] for s in scans] == ["mixer"] * 4
    observer = prepared.get_submodule(targets[0])
    seen = []
    handle = observer.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    calibrated = vmfx.calibrate(prepared, images)
    handle.remove()
    assert len(seen) >= 2 and not torch.equal(seen[0], seen[1])  # forward and backward deltas
    both = torch.stack(seen)
    observer = calibrated.get_submodule(targets[0])
    torch.testing.assert_close(observer.min_val.reshape(()), both.min())
    torch.testing.assert_close(observer.max_val.reshape(()), both.max())
    q = vmfx.convert(calibrated)
    fq = q.get_submodule(targets[0])
    assert isinstance(fq, FakeQuantize)
    assert all(annotation(scan_operand_nodes(s)["delta"]).role == "quantizer" for s in _scans(q))


def test_coverage_lists_the_operands_with_their_bits(vim, images, qmodel):
    report = vmfx.inspect.coverage(qmodel)
    scans = [layer for layer in report.layers if layer.kind == "scan"]
    assert len(scans) == 4
    for layer in scans:
        assert layer.quantized and layer.category == "quantized"
        assert layer.quantized_operands == {"A": "int8 sym per-tensor", "B": "uint8 asym per-token",
                                            "C": "uint8 asym per-token", "D": "int8 sym per-tensor"}
        assert layer.bits == "A8 B8 C8 D8"
    text = str(report)
    assert "quantized scan operands:" in text and text.splitlines()[-1].endswith("4/4 scans quantized")
    assert report.outside_mixers == []  # the head stays float, nothing else is quantized outside
    # the plan for the float model says the same
    plan = vmfx.inspect.coverage(vim, vmfx.preset("minmax-w8a8").replace(rules=OPERAND_RULES),
                                 example_inputs=images[:1])
    assert [l.quantized_operands for l in plan.layers if l.kind == "scan"] == [l.quantized_operands for l in scans]


def test_coverage_counts_delta_from_an_output_rule_the_state_and_tensors_outside_mixers(vim, images):
    cfg = vmfx.preset("minmax-w8a8").replace(
        rules=(QuantRule("output", QuantSpec(8, False, "tensor"), role="dt_proj"),   # delta, upstream
               QuantRule("scan.u", QuantSpec(4, False, "token")),
               QuantRule("input", QuantSpec(8, False, "tensor"), role="head"),
               QuantRule("weight", QuantSpec(8, True, "channel"), role="head"),
               QuantRule("output", QuantSpec(8, True, "tensor"), node="norm_f")),
        scan_state=ScanStateConfig(bits=8, reparameterize=False, candidates=5, search_samples=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = vmfx.compile(vim, images[:8], cfg)
    report = vmfx.inspect.coverage(q)
    scans = [layer for layer in report.layers if layer.kind == "scan"]
    for layer in scans:
        assert layer.quantized_operands == {"u": "uint4 asym per-token", "delta": "uint8 asym per-tensor",
                                            "state": "int8 sym per-step"}
        assert layer.bits == "u4 delta8 state8"
    outside = {(t.node, t.edge): (t.role, t.spec, t.bits) for t in report.outside_mixers}
    assert outside == {("head", "input"): ("head", "uint8 asym per-tensor", 8),
                       ("head", "weight"): ("head", "int8 sym per-channel", 8),
                       ("norm_f", "output"): ("norm", "int8 sym per-tensor", 8)}
    assert "quantized outside the mixers:" in str(report)


def test_save_and_load_rebuild_the_operand_quantizers_bit_for_bit(vim, images, qmodel, tmp_path):
    shared = vmfx.compile(vim, images, vmfx.preset("minmax-w8a8").replace(
        rules=OPERAND_RULES + (QuantRule("scan.delta", QuantSpec(8, False, "token"), shared="mixer"),)))
    for name, q in (("operands", qmodel), ("shared", shared)):
        loaded = vmfx.load(vmfx.save(q, str(tmp_path / f"{name}.safetensors")), model=vim)
        with torch.no_grad():
            assert torch.equal(loaded(images), q(images))
        assert [(n.name, n.target) for n in loaded.graph.nodes if n.op == "call_module"] == \
            [(n.name, n.target) for n in q.graph.nodes if n.op == "call_module"]
        for scan in _scans(loaded):
            for operand, node in scan_operand_nodes(scan).items():
                if node.op == "call_module":
                    assert annotation(node).extra["edge"] == f"scan.{operand}"
        assert [l.quantized_operands for l in vmfx.inspect.coverage(loaded).layers] == \
            [l.quantized_operands for l in vmfx.inspect.coverage(q).layers]
    delta = [scan_operand_nodes(s)["delta"].target for s in _scans(loaded)]
    assert delta[0] == delta[1] and delta[2] == delta[3]  # still one module per mixer


def test_reference_lowering_computes_the_fake_quant_graph_and_names_the_operand_quantizers(vim, images, qmodel, tmp_path):
    with pytest.warns(UserWarning, match=r"vmfx_q_selective_scan__b \[uint8 asym per-token of selective_scan "
                                         r"\(scan\.B\): the scan kernels read float operands"):
        lowered = vmfx.lowering.lower(qmodel, "reference")
    left = lowered.meta["vmfx_lowered"]["left_float"]
    assert len(left) == 16  # B, C, A, D of four scans, each a fake-quant op before its kernel
    assert "scan_merge" in lowered.meta["vmfx_lowered"]["partitions"]
    with torch.no_grad():
        expected, got = qmodel(images), lowered(images)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(vmfx.LoweringError, match=r"scan\.A"):
        vmfx.lowering.lower(qmodel, "reference", strict=True)
    # a lowered file keeps no quantized graph: its scan kernels recorded their quantized operands
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = vmfx.load(vmfx.save(lowered, str(tmp_path / "lowered.safetensors")), model=vim)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), got, atol=1e-6, rtol=1e-6)
    scans = [l for l in vmfx.inspect.coverage(loaded).layers if l.kind == "scan"]
    assert len(scans) == 4 and all(l.bits == "A8 B8 C8 D8" and l.quantized for l in scans)


def test_operand_rule_errors_name_the_problem_and_the_way_out():
    with pytest.raises(ConfigError, match=r"'scan\.E' names no operand of the selective scan.*scan\.u, scan\.delta"):
        QuantRule("scan.E", TOKEN8)
    with pytest.raises(ConfigError, match=r"hidden state is not a rule edge.*ScanStateConfig"):
        QuantRule("scan.state", TENSOR8)
    with pytest.raises(ConfigError, match=r"role selector can only be 'scan'"):
        QuantRule("scan.B", TOKEN8, role="x_proj")
    # A static per-token spec reads A as one time step (OuroMamba's flat layout); a dynamic one is refused
    assert QuantRule("scan.A", TOKEN8).operand == "A"
    with pytest.raises(ConfigError, match=r"scan operand A .*cannot be dynamic"):
        QuantRule("scan.A", QuantSpec(8, False, "token", dynamic=True))
    with pytest.raises(ConfigError, match=r"cannot be dynamic"):
        QuantRule("scan.D", QuantSpec(8, True, "tensor", dynamic=True))
    with pytest.raises(ConfigError, match=r"shared must be None or one of 'mixer'"):
        QuantRule("scan.delta", TOKEN8, shared="block")
    with pytest.raises(ConfigError, match=r"does not apply to 'input' edges"):
        QuantRule("input", TOKEN8, role="dt_proj", shared="mixer")
    with pytest.raises(ConfigError, match=r"unknown QuantRule fields"):
        QuantRule.from_dict({"edge": "scan.B", "spec": None, "operand": "B"})


def test_operand_rules_round_trip_through_config_dicts():
    cfg = vmfx.preset("minmax-w8a8").replace(
        rules=OPERAND_RULES + (QuantRule("scan.delta", TOKEN8, module="layers.1.*", shared="mixer"),))
    again = QuantConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert "shared" not in cfg.to_dict()["rules"][0]  # written only when set
    assert again.spec_for("scan.B", "scan", "layers.0.mixer", "selective_scan") == TOKEN8
    assert again.spec_for("scan.B", "x_proj", "layers.0.mixer.x_proj", "x") is None  # scans only
    assert again.rule_for("scan.delta", "scan", "layers.1.mixer", "selective_scan_2").shared == "mixer"


def test_a_rule_on_an_operand_the_scans_lack_warns_and_a_rule_matching_no_scan_is_refused(vim, images):
    cfg = vmfx.preset("minmax-w8a8").replace(rules=(QuantRule("scan.z", TOKEN8),))
    with pytest.warns(ConfigWarning, match=r"take no z operand.*silu\(z\) itself"):
        vmfx.prepare(vim, cfg, images[:2])
    cfg = vmfx.preset("minmax-w8a8").replace(rules=(QuantRule("scan.B", TOKEN8, module="layer.0.*"),))
    with pytest.raises(ConfigError, match=r"scan\.B.*matches no scan's module path \(closest: 'layers\.0\.\*'"):
        vmfx.prepare(vim, cfg, images[:2])


def test_a_module_pattern_selects_the_scans_of_one_mixer(vim, images):
    cfg = vmfx.preset("minmax-w8a8").replace(rules=(QuantRule("scan.C", TOKEN8, module="layers.1.mixer"),))
    prepared = vmfx.prepare(vim, cfg, images[:2])
    quantized = [s.name for s in _scans(prepared) if scan_operand_nodes(s)["C"].op == "call_module"]
    assert quantized == ["selective_scan_2", "selective_scan_3"]  # block 1, both directions
