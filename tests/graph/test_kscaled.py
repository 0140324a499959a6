"""k-scaled ViM PTQ as passes: the similarity search, the kscaled presets on a random Vim, the
inspector, save/load and what the lowering does with cluster quantizers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vmfx
from vmfx.config import PRESETS, QuantConfig, QuantRule, SimilaritySearchConfig, preset
from vmfx.lowering import lower
from vmfx.models import VisionMamba
from vmfx.passes.similarity_search import _Ids, candidate_multipliers, coordinate_cosine_scores
from vmfx.quant import QuantSpec
from vmfx.quant.modules import FakeQuantize


def _fq(x, s, q):
    return torch.clamp(torch.round(x / s), -q, q) * s


def test_presets_exist_at_every_bit_setting():
    for bits in ("w8a8", "w6a6", "w4a8", "w4a4"):
        cfg = preset(f"kscaled-{bits}")
        assert cfg.method == "kscaled" and cfg.search == SimilaritySearchConfig()
        assert cfg.weight == QuantSpec(int(bits[1]), True, "tensor")
        assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    cfg = PRESETS["kscaled-w8a8"]
    assert cfg.spec_for("input", "in_proj") is None  # outputs are quantized, not linear inputs
    assert cfg.spec_for("output", "out_proj") == QuantSpec(8, True, "cluster", cluster_axis="token", pow2=True)
    assert cfg.spec_for("output", "conv1d") == QuantSpec(8, True, "cluster", cluster_axis="channel", pow2=True)
    assert cfg.spec_for("output", "conv_act") == QuantSpec(8, True, "cluster", cluster_axis="channel")
    assert cfg.spec_for("output", "scan").cluster_axis == "token"
    assert cfg.spec_for("output", "in_proj") == QuantSpec(8, True, "tensor")
    assert candidate_multipliers(cfg.search).numel() == 101
    assert float(candidate_multipliers(cfg.search)[0]) == pytest.approx(0.01)
    assert float(candidate_multipliers(cfg.search)[-1]) == pytest.approx(1.2)


def _brute_force(ref, y, base, ids_full, current_scales, mults, q):
    """Score of every (coordinate, candidate) by quantizing the whole tensor each time (float64)."""
    out = torch.zeros(base.numel(), mults.numel(), dtype=torch.float64)
    for j in range(base.numel()):
        for c, m in enumerate(mults):
            s = current_scales.clone()
            s[j] = base[j] * m
            yq = _fq(y, s[ids_full], q)
            out[j, c] = F.cosine_similarity(ref, yq, dim=-1).sum()
    return out


@pytest.mark.parametrize("layout", ["row", "col"])
def test_coordinate_scores_equal_the_brute_force(layout):
    g = torch.Generator().manual_seed(3)
    R, C, k, q = 7, 6, 3, 7
    ref = torch.randn(R, C, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, C, dtype=torch.float64)
    y = ref + 0.05 * torch.randn(R, C, generator=g, dtype=torch.float64)
    if layout == "row":
        per = torch.tensor([0, 1, 2, 0, 1, 2, 2])
        ids_full = per[:, None].expand(R, C)
        ids = _Ids("row", k, F.one_hot(per, k).double(), per_row=per)
    else:
        per = torch.tensor([0, 0, 1, 1, 2, 2])
        ids_full = per[None, :].expand(R, C)
        ids = _Ids("col", k, F.one_hot(per, k).double(), per_col=per)
    base = torch.tensor([0.3, 0.5, 1.5], dtype=torch.float64)
    current = base * torch.tensor([0.9, 0.7, 1.1], dtype=torch.float64)
    mults = torch.linspace(0.2, 1.2, 11, dtype=torch.float64)
    cur = _fq(y, current[ids_full], q)
    chunks = (_fq(y.unsqueeze(0), base[ids_full].unsqueeze(0) * mults[i:i + 4].reshape(-1, 1, 1), q)
              for i in range(0, 11, 4))
    got = coordinate_cosine_scores(ref, cur, chunks, ids, None)
    want = _brute_force(ref, y, base, ids_full, current, mults, q)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)


def test_search_picks_the_cosine_best_candidate_on_a_constructed_case():
    """A linear whose per-tensor output quantizer has one clear best scale: the search finds the
    candidate a direct evaluation of every candidate prefers."""
    torch.manual_seed(0)
    model = VisionMamba(img_size=16, patch_size=4, stride=4, embed_dim=16, depth=1, num_classes=3).eval()
    images = torch.randn(8, 3, 16, 16)
    search = SimilaritySearchConfig(rounds=1, candidates=21, images=8, weights=False)
    cfg = QuantConfig(method="kscaled", weight=QuantSpec(8, True, "tensor"), activation=QuantSpec(4, True, "tensor"),
                      rules=tuple(QuantRule("input", None, role=r) for r in ("in_proj", "x_proj", "dt_proj", "out_proj"))
                      + (QuantRule("output", QuantSpec(3, True, "tensor"), role="out_proj"),), search=search)
    q = vmfx.compile(model, images, cfg)
    out_q = [n for n in q.graph.nodes if n.name.endswith("out_proj__output")]
    assert len(out_q) == 1
    fq = q.get_submodule(out_q[0].target)
    # the float out_proj output, and its linear's quantized-weight output, from a float run
    captured = {}
    lin = out_q[0].args[0]

    class Grab(torch.fx.Interpreter):
        def run_node(self, n):
            r = super().run_node(n)
            if n is lin:
                captured["ref"] = r
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                captured["args"] = args
            return r

    from vmfx.passes.jlss import quantization_disabled

    with torch.no_grad(), quantization_disabled(q):
        Grab(q).run(images)
    x, w, b = captured["args"]
    wq = q.get_submodule([n for n in q.graph.nodes if n.name.endswith("out_proj__weight")][0].target)
    y = F.linear(x, wq(w), b)
    ref = captured["ref"]
    base = ref.abs().max() / fq.qmax  # the max-based start
    mults = candidate_multipliers(search)
    sims = torch.stack([F.cosine_similarity(ref, _fq(y, base * m, fq.qmax), dim=-1).mean() for m in mults])
    best = base * mults[sims.argmax()]
    assert float(fq.scale.reshape(())) == pytest.approx(float(best), rel=1e-5)
    assert sims.max() > sims[-1]  # the constructed case is not decided by the max-based scale


@pytest.fixture(scope="module")
def kscaled_vim():
    torch.manual_seed(0)
    model = VisionMamba(img_size=16, patch_size=4, stride=4, embed_dim=32, depth=2, num_classes=5).eval()
    images = torch.randn(12, 3, 16, 16)
    cfg = preset("kscaled-w8a8").replace(search=SimilaritySearchConfig(rounds=2, candidates=11, images=6))
    return model, images, vmfx.compile(model, images, cfg)


def test_random_vim_compiles_and_the_table_shows_clusters(kscaled_vim):
    model, images, q = kscaled_vim
    text = vmfx.inspect.table(q)
    assert "int8 sym per-cluster(token,k=4,pow2)" in text
    assert "int8 sym per-cluster(channel,k=4,pow2)" in text
    assert "int8 sym per-cluster(channel,k=4)" in text
    clusters = {n.name: q.get_submodule(n.target) for n in q.graph.nodes
                if n.op == "call_module" and isinstance(q.get_submodule(n.target), FakeQuantize)
                and q.get_submodule(n.target).spec.granularity == "cluster"}
    assert len(clusters) == 2 * (2 + 2 + 2 + 1)  # per block: conv1d, conv_act, scan (x2 directions), out_proj
    for name, fq in clusters.items():
        s = fq.cluster_scales()
        assert 1 <= s.numel() <= 4 and torch.equal(fq.scale.reshape(-1), s[fq.cluster_ids.reshape(-1)])
        if fq.spec.pow2:
            e = torch.log2(s / s[0])
            assert torch.allclose(e, torch.round(e), atol=1e-5), name
    tokens = [fq for fq in clusters.values() if fq.spec.cluster_axis == "token"]
    assert all(fq.scale.numel() == 17 for fq in tokens)  # per-token: the 16 patches + the class token
    assert set(q.meta["vmfx_search"]["outputs"]) >= {n for n in clusters}
    with torch.no_grad():
        out, ref = q(images), model(images)
    assert torch.isfinite(out).all()
    assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.9


def test_save_load_round_trip(kscaled_vim, tmp_path):
    model, images, q = kscaled_vim
    loaded = vmfx.load(vmfx.save(q, str(tmp_path / "k.safetensors")))
    with torch.no_grad():
        assert torch.equal(loaded(images), q(images))
    assert vmfx.inspect.rows(loaded) == vmfx.inspect.rows(q)
    for n in loaded.graph.nodes:
        m = loaded.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(m, FakeQuantize) and m.spec.granularity == "cluster":
            assert torch.equal(m.cluster_ids, q.get_submodule(n.target).cluster_ids)


def test_lowering_lists_cluster_quantizers_as_float(kscaled_vim):
    _, images, q = kscaled_vim
    with pytest.raises(vmfx.LoweringError, match="float"):
        lower(q, "reference", strict=True)
    with pytest.warns(UserWarning):
        lowered = lower(q, "reference")
    left = set(lowered.meta["vmfx_lowered"]["left_float"])
    clusters = {n.name for n in q.graph.nodes if n.op == "call_module"
                and isinstance(q.get_submodule(n.target), FakeQuantize)
                and q.get_submodule(n.target).spec.granularity == "cluster"}
    assert clusters <= left
    with torch.no_grad():
        assert torch.allclose(lowered(images), q(images), atol=1e-5)


def test_per_channel_weights_are_searched_channel_by_channel():
    torch.manual_seed(1)
    model = VisionMamba(img_size=16, patch_size=4, stride=4, embed_dim=16, depth=1, num_classes=3).eval()
    images = torch.randn(6, 3, 16, 16)
    search = SimilaritySearchConfig(rounds=1, candidates=11, images=4)
    cfg = preset("kscaled-w4a8").replace(weight=QuantSpec(4, True, "channel"), search=search)
    q = vmfx.compile(model, images, cfg)
    mults = candidate_multipliers(search)
    node = [n for n in q.graph.nodes if n.name.endswith("in_proj__weight")][0]
    fq = q.get_submodule(node.target)
    w = q.get_submodule("layers.0.mixer.in_proj").weight.detach()
    base = w.abs().amax(dim=1, keepdim=True) / fq.qmax
    ratio = (fq.scale.detach() / base).reshape(-1)
    assert fq.scale.shape == (w.shape[0], 1)
    # every channel took one of the candidates, and not all the same one
    assert torch.isclose(ratio[:, None], mults[None, :], rtol=1e-5).any(dim=1).all()
    assert ratio.unique().numel() > 1
    assert node.name in q.meta["vmfx_search"]["weights"]
