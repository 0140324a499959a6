"""The ``kscaled-official-*`` presets and the general options they are made of: the "full" integer
range, k-means on the mean |x|, weight edges on convs and norms, the ``op`` rule selector and the
search's ``keep_roles``; compared against float64 references on fresh random inputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import vmfx
from vmfx.annotations import annotation, node_op
from vmfx.config import (PRESETS, QuantConfig, QuantRule, ScanStateConfig, SimilaritySearchConfig,
                         kscaled_official_rules, preset)
from vmfx.errors import ConfigError
from vmfx.nn import RMSNorm
from vmfx.passes.graph_utils import functionalize_weighted
from vmfx.quant import QuantSpec
from vmfx.quant.kscaled import kmeans
from vmfx.quant.modules import weight_quantizer_minmax
from vmfx.quant.observers import MinMaxObserver


def test_new_options_leave_every_other_preset_as_it_was():
    """The new fields default to the old behaviour, are not written at their defaults, and no
    preset but ``kscaled-official-*`` sets them."""
    spec = QuantSpec(8, True, "cluster", cluster_axis="channel")
    assert (spec.int_range, spec.cluster_stat) == ("restricted", "absmax")
    assert "int_range" not in QuantSpec(4).to_dict() and "cluster_stat" not in spec.to_dict()
    assert (QuantSpec(8).qmin, QuantSpec(8).qmax, QuantSpec(8).scale_divisor) == (-127, 127, 127)
    assert SimilaritySearchConfig().keep_roles == ()
    assert "op" not in QuantRule("output", QuantSpec(8)).to_dict()
    assert QuantConfig().split_softplus is False and "split_softplus" not in QuantConfig().to_dict()
    for name, cfg in PRESETS.items():
        if name.startswith("kscaled-official-"):
            continue
        specs = [cfg.weight, cfg.activation] + [r.spec for r in cfg.rules if r.spec is not None]
        assert all(s.int_range == "restricted" and s.cluster_stat == "absmax" for s in specs), name
        assert all(r.op is None for r in cfg.rules), name
        assert cfg.search is None or cfg.search.keep_roles == (), name
        assert not cfg.split_softplus and cfg.bias_correction == (), name


def test_bad_values_of_the_new_options_are_refused_by_name():
    with pytest.raises(ConfigError, match="int_range"):
        QuantSpec(8, True, int_range="wide")
    with pytest.raises(ConfigError, match="symmetric"):
        QuantSpec(8, False, int_range="full")
    with pytest.raises(ConfigError, match="cluster_stat"):
        QuantSpec(8, True, "cluster", cluster_stat="median")
    with pytest.raises(ConfigError, match="cluster_stat"):
        QuantSpec(8, True, "tensor", cluster_stat="mean_abs")
    with pytest.raises(ConfigError, match="keep_roles"):
        SimilaritySearchConfig(keep_roles=("nope",))
    with pytest.raises(ConfigError, match="op"):
        QuantRule("output", QuantSpec(8), op="")
    with pytest.raises(ConfigError, match="shared"):
        QuantRule("weight", QuantSpec(8), role="conv1d", shared="mixer")


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), seed=st.integers(0, 2**31 - 1), per_channel=st.booleans())
def test_full_range_quantizer_equals_the_float64_reference(bits, seed, per_channel):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 5, generator=g) * torch.rand(6, 1, generator=g) * 3
    spec = QuantSpec(bits, True, "channel" if per_channel else "tensor", int_range="full")
    fq = weight_quantizer_minmax(w, spec)
    w64 = w.double()
    amax = w64.abs().amax(dim=1, keepdim=True) if per_channel else w64.abs().max()
    scale = amax / (2 ** (bits - 1) - 0.5)
    want = torch.clamp(torch.round(w64 / scale), -2 ** (bits - 1), 2 ** (bits - 1) - 1) * scale
    assert torch.allclose(fq.scale.double().reshape(scale.shape), scale, rtol=1e-6)
    got = fq(w).double()
    clear = ((w64 / scale).frac().abs() - 0.5).abs() > 1e-4  # float32 may round a near-tie the other way
    assert torch.allclose(got[clear], want[clear], rtol=1e-5, atol=1e-6)
    assert bool(((got - want).abs() <= scale * (1 + 1e-5)).all())
    codes = fq.quantize(w)
    assert int(codes.min()) >= -2 ** (bits - 1) and int(codes.max()) <= 2 ** (bits - 1) - 1


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_mean_abs_clusters_are_kmeans_of_the_float64_mean(seed):
    """Channels with rare spikes: clustering by mean |x| and by max |x| disagree; the observer
    clusters the running mean |x| over every batch, and scales each cluster by its max |x|."""
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(3, 5, 12, generator=g) * torch.logspace(-1, 1, 12) for _ in range(3)]
    batches[1][0, 0, ::3] += 40.0
    spec = QuantSpec(8, True, "cluster", cluster_axis="channel", clusters=3, cluster_stat="mean_abs")
    obs = MinMaxObserver(spec)
    for x in batches:
        obs(x)
    qp = obs.calculate_qparams()
    data = torch.cat(batches).double()
    mean_abs = data.abs().mean(dim=(0, 1))
    assert torch.allclose(obs.abs_sum.reshape(-1) / obs.abs_count, mean_abs, rtol=1e-12)
    want_ids, _ = kmeans(mean_abs.float(), 3, seed=obs.cluster_seed)
    assert torch.equal(obs.cluster_ids.reshape(-1), want_ids)
    absmax = data.abs().amax(dim=(0, 1))
    for j in range(int(want_ids.max()) + 1):
        top = absmax[want_ids == j].max()
        assert torch.allclose(qp.scale.reshape(-1)[want_ids == j].double(), top / 127, rtol=1e-6)


class _Weighted(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(3, 4, 2, stride=2)
        self.conv1 = nn.Conv1d(4, 4, 3, padding=2, groups=4)
        self.rms = RMSNorm(4)
        self.ln = nn.LayerNorm(4)

    def forward(self, x):
        y = self.conv2(x).flatten(2)  # (B, 4, L)
        y = self.conv1(y)[..., :-2].transpose(1, 2)
        return self.ln(self.rms(y))


def test_functional_convs_and_norms_compute_what_the_modules_compute():
    torch.manual_seed(0)
    model = _Weighted().eval()
    x = torch.randn(2, 3, 8, 8)
    want = model(x)
    tracer = fx.Tracer()
    tracer.is_leaf_module = lambda m, q: isinstance(m, (RMSNorm, nn.Conv1d, nn.Conv2d, nn.LayerNorm))
    gm = fx.GraphModule(model, tracer.trace(model))
    for node in [n for n in gm.graph.nodes if n.op == "call_module"]:
        functionalize_weighted(gm, node)
    gm.recompile()
    assert [node_op(n) for n in gm.graph.nodes if n.op == "call_function" and "vmfx_module" in n.meta] == \
        ["conv2d", "conv1d", "rms_norm", "layer_norm"]
    assert torch.equal(gm(x), want)


def test_a_split_softplus_computes_what_the_fused_one_does(tiny_model, tiny_images):
    from vmfx.passes import DetectMambaMixersPass, PassManager, SplitDeltaSoftplusPass
    from vmfx.passes.matches import bind_scan

    gm = vmfx.trace(tiny_model, tiny_images[:1])
    gm = PassManager([DetectMambaMixersPass(), SplitDeltaSoftplusPass()])(gm).graph_module
    scans = [n for n in gm.graph.nodes if annotation(n) is not None and annotation(n).role == "scan"]
    assert scans and all(not bind_scan(s)["delta_softplus"] for s in scans)
    softplus = [n for n in gm.graph.nodes if annotation(n) is not None and annotation(n).role == "dt_act"]
    assert len(softplus) == len(scans) and all(n.target is F.softplus for n in softplus)
    x = tiny_images[:3].double()
    with torch.no_grad():
        assert torch.allclose(gm.double()(x), tiny_model.double()(x), rtol=1e-10, atol=1e-12)


def test_the_op_selector_picks_the_gate_silu_only():
    rule = QuantRule("output", QuantSpec(8), role="gate", op="silu")
    assert rule.matches("output", "gate", None, "silu_1", "silu")
    assert not rule.matches("output", "gate", None, "mul", "mul")
    assert not rule.matches("output", "gate", None, "silu_1")  # no op given: no match
    assert QuantRule.from_dict(rule.to_dict()) == rule and "op='silu'" in rule.describe()


def test_presets_exist_and_carry_the_official_settings():
    for w, a in ((8, 8), (6, 6), (4, 8), (4, 4)):
        cfg = preset(f"kscaled-official-w{w}a{a}")
        assert QuantConfig.from_dict(cfg.to_dict()) == cfg
        assert cfg.weight == QuantSpec(w, True, "tensor", int_range="full")
        assert cfg.scan_state == ScanStateConfig(bits=8, reparameterize=True, exhaustive=True)
        assert cfg.search.images is None and cfg.search.keep_roles == ("patch_embed", "norm")
        assert cfg.split_softplus and cfg.to_dict()["sections"]["split_softplus"] == {}
        assert cfg.bias_correction == ("dt_proj", "head") and QuantConfig.from_dict(cfg.to_dict()) == cfg
        for role in ("patch_embed", "norm", "conv1d", "head"):
            assert cfg.spec_for("weight", role) == QuantSpec(w, True, "tensor", int_range="full")
        assert cfg.spec_for("output", "gate", op="silu").cluster_stat == "mean_abs"
        assert cfg.spec_for("output", "gate", op="mul") is None
        assert cfg.spec_for("output", "conv1d").pow2 is False
        assert cfg.spec_for("output", "scan").pow2 and cfg.spec_for("output", "out_proj").pow2
        assert cfg.spec_for("input", "in_proj") is None


def _cheap(name: str) -> QuantConfig:
    """The preset with a small search (the set of quantized tensors is the preset's)."""
    cfg = preset(name)
    return cfg.replace(search=dataclasses.replace(cfg.search, rounds=1, candidates=5, images=2),
                       scan_state=dataclasses.replace(cfg.scan_state, candidates=5, search_samples=2))


def test_coverage_lists_every_tensor_the_official_code_quantizes(tiny_model, tiny_images, tmp_path):
    qmodel = vmfx.compile(tiny_model, tiny_images[:4], _cheap("kscaled-official-w8a8"))
    report = vmfx.inspect.coverage(qmodel)
    outside = {(t.role, t.edge) for t in report.outside_mixers}
    assert {("patch_embed", "weight"), ("patch_embed", "output"), ("head", "weight"), ("head", "output"),
            ("norm", "weight"), ("norm", "output")} <= outside
    inside = {(t.role, t.edge, t.spec) for t in report.inside_mixers}
    assert ("norm", "weight", "int8 sym per-tensor full-range") in inside
    assert ("gate", "output", "int8 sym per-cluster(channel,k=4,mean-abs) full-range") in inside
    assert ("conv_act", "output", "int8 sym per-cluster(channel,k=4,mean-abs) full-range") in inside
    assert ("dt_act", "output", "int8 sym per-cluster(channel,k=4,mean-abs) full-range") in inside
    gate_quantizers = {}  # block -> the quantizer paths of its gate SiLUs (act_z: one for both directions)
    for n in qmodel.graph.nodes:
        ann = annotation(n)
        if ann is not None and ann.role == "quantizer" and ann.extra.get("shared") == "mixer":
            gate_quantizers.setdefault(ann.block, []).append(n.target)
    assert len(gate_quantizers) == 2 and all(len(p) == 2 and p[0] == p[1] for p in gate_quantizers.values())
    convs = [layer for layer in report.layers if layer.role == "conv1d"]
    assert convs and all(layer.quantized and layer.bits == "W8 O8" for layer in convs)
    scans = [layer for layer in report.layers if layer.kind == "scan"]
    assert scans and all("state" in layer.quantized_operands for layer in scans)
    assert all(layer.quantized for layer in report.layers if layer.kind == "linear")
    # the functional convs and norms survive save / load: the rebuilt model computes the same
    path = tmp_path / "q.vmfx"
    vmfx.save(qmodel, path)
    loaded = vmfx.load(path, tiny_model)
    with torch.no_grad():
        assert torch.equal(loaded(tiny_images[4:8]), qmodel(tiny_images[4:8]))


def test_the_plan_on_the_proxy_lists_the_patch_embedding_and_the_head():
    from vmfx.data import load_digits, load_proxy_model

    images, _ = load_digits("test")
    report = vmfx.inspect.coverage(load_proxy_model(), "kscaled-official-w8a8", example_inputs=images[:1])
    quantized = {(layer.role, layer.kind) for layer in report.layers if layer.quantized}
    assert {("patch_embed", "conv"), ("head", "linear"), ("conv1d", "conv")} <= quantized
    assert all("state" in layer.quantized_operands for layer in report.layers if layer.kind == "scan")


def test_rules_cover_what_the_official_config_names():
    rules = kscaled_official_rules(4, 4)
    named = {(r.edge, r.role, r.op) for r in rules if r.spec is not None}
    assert {("weight", "patch_embed", None), ("weight", "norm", None), ("weight", "conv1d", None),
            ("weight", "head", None), ("output", "patch_embed", None), ("output", "head", None),
            ("output", "dt_act", None), ("output", "gate", "silu")} <= named
    assert all(r.spec.bits == 4 and r.spec.int_range == "full" for r in rules if r.spec is not None)


def test_bias_correction_cancels_the_mean_weight_error_on_calibration_data(tiny_model, tiny_images):
    from vmfx.passes import BiasCorrectionPass, PassContext
    from vmfx.passes.linear_edges import linear_edges
    from vmfx.passes.patterns import module_of

    calib = tiny_images[:4]
    cfg = _cheap("kscaled-official-w4a4")
    assert cfg.bias_correction == ("dt_proj", "head")
    qmodel = vmfx.compile(tiny_model, calib, cfg.replace(bias_correction=()))
    linears = [n for n in qmodel.graph.nodes if annotation(n) is not None and annotation(n).role in ("dt_proj", "head")
               and n.target is F.linear]
    inputs = {n: [] for n in linears}

    class Capture(fx.Interpreter):
        def run_node(self, n):
            if n in inputs:
                inputs[n].append(self.fetch_args_kwargs_from_env(n)[0][0].detach().double())
            return super().run_node(n)

    with torch.no_grad():
        Capture(qmodel).run(calib)
    before = {}
    for n in linears:
        edges = linear_edges(n)
        lin = edges.linear_module(qmodel)
        before[n] = (lin.weight.detach().double(), module_of(edges.weight_quant)(lin.weight).detach().double(),
                     lin.bias.detach().double().clone())
    BiasCorrectionPass(("dt_proj", "head"))(qmodel, PassContext(calib_data=calib))
    for n in linears:
        w, wq, b_old = before[n]
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[n]])
        b_new = linear_edges(n).linear_module(qmodel).bias.detach().double()
        assert torch.allclose(b_new, b_old - (x @ (wq - w).t()).mean(0), rtol=1e-5, atol=1e-6)
        float_mean = (x @ w.t() + b_old).mean(0)
        assert torch.allclose((x @ wq.t() + b_new).mean(0), float_mean, rtol=1e-5, atol=1e-5)
    assert set(qmodel.meta["vmfx_bias_correction"]) == {n.name for n in linears}
