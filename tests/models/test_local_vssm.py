"""LocalMamba's LocalVSSM (vmfx.models.LocalVSSM): official keys and shapes of the published
configurations, logits equal to the official ``local_vmamba.py`` on the same random weights,
detection of one K-direction mixer per block in each direction's scan order, PTQ4VM, coverage and
save / load.

The comparisons with the official ``local_vmamba.py`` run on the recorded fixture
(``fixtures/official/local_vssm.*``, written by ``make_official_fixtures.py``) and, when
``$VMFX_LOCALMAMBA_SRC`` names a copy of the repository, on the official code itself (on the CPU, see
``official_localmamba.py``)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import vmfx
import vmfx.models
from vmfx.annotations import LINEAR_ROLES, annotation
from vmfx.config import JLSSConfig, preset
from vmfx.errors import CheckpointError, ConfigError
from vmfx.models import LocalVSSM
from vmfx.models.localmamba import scan_order
from vmfx.passes.linear_edges import quantized_linears

from .official_fixtures import as_official_checkpoint, load, prefixed, sources
from .official_localmamba import (ENV, VSSM_CASES, VSSM_DIRS, VSSM_ENTRY_POINTS, VSSM_SIZES, VSSM_SMALL,
                                  import_official_local_vmamba, local_vssm_reference, vssm_images, vssm_randomize)

SOURCES = sources(ENV)

# -- the published configurations -------------------------------------------------------------------

# written out from the official local_vmamba.py entry points, not from vmfx's table:
# name -> (depths, dims, directions per block (K), search supernet)
PUBLISHED = {
    "local_vssm_tiny": ([2, 2, 9, 2], [96, 192, 384, 768], 4, False),
    "local_vssm_small": ([2, 2, 27, 2], [96, 192, 384, 768], 4, False),
    "local_vssm_tiny_search": ([2, 2, 9, 2], [32, 64, 128, 256], 8, True),
    "local_vssm_small_search": ([2, 2, 27, 2], [32, 64, 128, 256], 8, True),
}


def official_shapes(depths, dims, K: int, search: bool, N: int = 16, classes: int = 1000) -> dict:
    """The official key -> shape table (VMamba v0 keys, archs.md 2.4 / 3.3, K directions per block)."""
    s = {"patch_embed.0.weight": (dims[0], 3, 4, 4), "patch_embed.0.bias": (dims[0],),
         "patch_embed.2.weight": (dims[0],), "patch_embed.2.bias": (dims[0],)}
    for i, (depth, C) in enumerate(zip(depths, dims)):
        d, R = 2 * C, math.ceil(C / 16)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            s[p + "norm.weight"] = s[p + "norm.bias"] = (C,)
            o = p + "op."
            s[o + "out_norm.weight"] = s[o + "out_norm.bias"] = (d,)
            s[o + "in_proj.weight"] = (2 * d, C)
            s[o + "conv2d.weight"], s[o + "conv2d.bias"] = (d, 1, 3, 3), (d,)
            s[o + "x_proj_weight"] = (K, R + 2 * N, d)
            s[o + "dt_projs_weight"], s[o + "dt_projs_bias"] = (K, d, R), (K, d)
            s[o + "A_logs"], s[o + "Ds"] = (K * d, N), (K * d,)
            s[o + "out_proj.weight"] = (C, d)
            if search:
                s[o + "multi_scan.weights"] = (K, 1, 1, 1)
            a = o + "multi_scan.attn."
            s[a + "norm.weight"] = s[a + "norm.bias"] = (d,)
            s[a + "global_reduce.weight"], s[a + "global_reduce.bias"] = (d // 8, d), (d // 8,)
            s[a + "channel_select.weight"], s[a + "channel_select.bias"] = (d, d // 8), (d,)
        if i < len(depths) - 1:
            q = f"layers.{i}.downsample."
            s[q + "reduction.weight"] = (dims[i + 1], 4 * C)
            s[q + "norm.weight"] = s[q + "norm.bias"] = (4 * C,)
    s["classifier.norm.weight"] = s["classifier.norm.bias"] = (dims[-1],)
    s["classifier.head.weight"], s["classifier.head.bias"] = (classes, dims[-1]), (classes,)
    return s


@pytest.mark.parametrize("name", ["local_vssm_tiny", "local_vssm_small", "local_vssm_tiny_search"])  # small_search: slow
def test_published_configurations_have_the_official_keys_and_shapes(name):
    import timm

    with torch.device("meta"):
        model = timm.create_model(name)
    assert isinstance(model, LocalVSSM)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = official_shapes(*PUBLISHED[name])
    assert sorted(set(got) ^ set(want)) == []
    assert {k for k in want if got[k] != want[k]} == set()
    if name in ("local_vssm_tiny", "local_vssm_small"):  # the README's 26M / 50M
        params = sum(v.numel() for v in model.state_dict().values())
        assert round(params / 1e6) == {"local_vssm_tiny": 26, "local_vssm_small": 50}[name]


def test_pretrained_names_the_official_checkpoint_and_bad_configs_are_refused():
    with pytest.raises(CheckpointError, match="local_vssm_small.ckpt"):
        vmfx.models.local_vmamba.local_vssm_small(pretrained=True)
    with pytest.raises(ConfigError, match="one list per block"):
        LocalVSSM(depths=[1, 1], dims=8, directions=[["h", "v", "w2", "w7"]])
    with pytest.raises(ConfigError, match="unknown LocalMamba scan direction"):
        LocalVSSM(depths=[1], dims=8, directions=[["h", "diag"]], img_size=16)
    with pytest.raises(ConfigError, match="non-square"):
        LocalVSSM(depths=[1], dims=8, directions=[["h", "v"]], img_size=(16, 24))


# -- the official code on the same weights --------------------------------------------------------------

DIRS, SMALL = VSSM_DIRS, VSSM_SMALL
images, randomize = vssm_images, vssm_randomize


def small_model(seed: int = 0, **overrides) -> LocalVSSM:
    torch.manual_seed(seed)
    return LocalVSSM(**{**SMALL, "directions": [list(d) for d in DIRS], "img_size": 28, **overrides}).eval()


@pytest.fixture(scope="module", params=SOURCES)
def reference(request, tmp_path_factory):
    """(tensors, metadata) of :func:`local_vssm_reference`: recorded, or computed by the official code
    (whose stand-ins are undone before the tests run)."""
    if request.param == "recorded":
        return load("local_vssm")
    mp = pytest.MonkeyPatch()
    try:
        return local_vssm_reference(import_official_local_vmamba(tmp_path_factory.mktemp("local_mamba"), mp))
    finally:
        mp.undo()


def test_the_reference_holds_these_cases(reference):
    """The fixture was made for the cases tested here (else: rerun make_official_fixtures.py); live,
    the recorded tensors are what the official code gives now."""
    tensors, meta = reference
    recorded_tensors, recorded = load("local_vssm")
    assert meta["cases"] == recorded["cases"] == json.loads(json.dumps(VSSM_CASES))
    assert meta["sizes"] == recorded["sizes"] == list(VSSM_SIZES)
    assert meta["entry_points"] == recorded["entry_points"]
    assert sorted(tensors) == sorted(recorded_tensors)
    for key, value in tensors.items():  # the same math on another machine: not bit for bit
        torch.testing.assert_close(value, recorded_tensors[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("case", list(VSSM_CASES))
def test_logits_equal_the_official_code_on_the_same_weights(reference, case, tmp_path):
    tensors, _ = reference
    state = prefixed(tensors, f"{case}/state")
    with torch.device("meta"):
        ours = LocalVSSM(**VSSM_CASES[case], img_size=28)
    record = vmfx.models.load_checkpoint(ours, as_official_checkpoint(state, tmp_path / "local_vssm.ckpt"))
    assert not record.missing_keys and not record.unexpected_keys  # the official keys, strictly
    ours.eval()
    for size in VSSM_SIZES:  # 32: grids 8, 4, 2 (another size than the orders were built for: eager only)
        want = tensors[f"{case}/logits/{size}"]
        with torch.no_grad():
            got = ours(tensors[f"input/{size}"])
        assert float(want.std()) > 0.1  # logits of order 1, not a near-constant output
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # and our state_dict is the official one again
    back = ours.state_dict()
    assert list(back) == list(state) or sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_an_official_file_loads_through_load_checkpoint_into_a_meta_model(tmp_path):
    reference = small_model()
    state = randomize(reference.state_dict(), seed=4)  # the official layout (stacked per-direction tensors)
    reference.load_state_dict(state)
    torch.save({"model": state, "ema_model": state, "epoch": 3}, tmp_path / "local_vssm.ckpt")  # the release's dict
    with torch.device("meta"):
        model = small_model()
    record = vmfx.models.load_checkpoint(model, tmp_path / "local_vssm.ckpt")
    assert record.key == "model" and not record.missing_keys and not record.unexpected_keys
    x = images(2, 5)
    with torch.no_grad():  # the scan orders were computed on the CPU, not left on the meta device
        assert torch.equal(model.eval()(x), reference(x))


def test_the_official_directions_and_sizes_are_ours(reference):
    _, meta = reference
    for name in VSSM_ENTRY_POINTS:
        theirs = meta["entry_points"][name]
        ours = json.loads(json.dumps(vmfx.models.LOCAL_VSSM_VARIANTS[name][0]))
        for key in ("dims", "depths", "drop_path_rate"):
            assert theirs[key] == ours[key], (name, key)
        assert theirs.get("directions") == ours.get("directions"), name


# -- through the vmfx pipeline -----------------------------------------------------------------------------


def quick(name: str):
    """The preset with a short JLSS (the test checks the wiring, not the learning)."""
    cfg = preset(name)
    return cfg.replace(jlss=JLSSConfig(steps=3, batch_size=4)) if cfg.jlss is not None else cfg


def cosine(a, b) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def minmax(model):
    return vmfx.compile(model, images(8, 1), "minmax-w8a8")


def test_detection_finds_one_mixer_of_k_directions_per_block_in_each_scan_order(model, minmax):
    q = minmax
    assert q.meta["vmfx_detect_failures"] == []
    blocks = [b for layer in model.layers for b in layer.blocks]
    mixers = q.meta["vmfx_mixers"]
    assert len(mixers) == len(blocks) == 4
    assert [len(m["directions"]) for m in mixers] == [4] * 4
    assert list(mixers[0]["directions"]) == ["forward", "order1", "order2", "order3"]  # h: the identity order
    assert list(mixers[1]["directions"]) == ["backward", "order1", "order2", "order3"]  # h_flip: reversed
    assert [m["tokens"] for m in mixers] == [49, 16, 16, 4]
    every = {e.module: e for e in quantized_linears(q)}
    edges = {n: e for n, e in every.items() if annotation(e.linear).role in LINEAR_ROLES}
    grids = {0: (7, 7), 1: (4, 4), 2: (2, 2)}
    expected = set()
    for i, layer in enumerate(model.layers):
        for j, block in enumerate(layer.blocks):
            prefix = f"layers.{i}.blocks.{j}.op."
            expected |= {prefix + "in_proj", prefix + "out_proj"}
            for k, direction in enumerate(block.op.directions):
                order = scan_order(direction, grids[i])
                for role in ("x_proj", "dt_proj"):
                    e = edges[f"{prefix}{role}s.{k}"]
                    expected.add(e.module)
                    assert annotation(e.linear).role == role
                    assert e.quantizer("input").layout.order == order, (e.module, direction)
    assert set(edges) == expected
    assert len(scan_order("w2", (7, 7))) == 64 and len(scan_order("w7", (4, 4))) == 49  # the padded orders
    # every other linear but the head (patch merges, channel attentions) is quantized with the generic role
    others = {n for n in every if n not in edges}
    assert others == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                      and ".op." not in n and n != "classifier.head"} | {
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".attn." in n}
    assert {annotation(every[n].linear).role for n in others} == {"linear"}


def test_coverage_lists_every_linear_conv_and_scan(model, minmax):
    report = vmfx.inspect.coverage(minmax)
    counts = report.counts()
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    n_conv = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    # one entry per call: the shared channel attention's two linears run once per direction (K = 4)
    calls = n_linear + 4 * 2 * (4 - 1)
    assert counts["linear"] == {"quantized": calls - 1, "float": 1}  # the head stays float by default
    assert counts["conv"] == {"quantized": 0, "float": n_conv}  # the patch embed and the depthwise convs
    assert counts["scan"] == {"quantized": 0, "float": 4 * 4}
    assert not report.unsupported


def test_save_and_load_round_trip(minmax, tmp_path):
    vmfx.save(minmax, tmp_path / "q.vmfx")
    loaded = vmfx.load(tmp_path / "q.vmfx")  # LocalVSSM rebuilt from its recorded constructor arguments
    x = images(2, 3)
    with torch.no_grad():
        assert torch.equal(loaded(x), minmax(x))


@pytest.mark.parametrize("name, floor", [("ptq4vm-w8a8", 0.99), ("ptq4vm-w4a8", 0.95)])
def test_ptq4vm_compiles_local_vssm(model, name, floor, monkeypatch):
    monkeypatch.setitem(vmfx.config.PRESETS, name, quick(name))
    q = vmfx.compile(model, images(8, 1), name)
    assert q.meta["vmfx_config"]["sections"]["smoothing"]["alpha"] == 0.65  # VMamba's alpha (the model is a VSSM)
    assert len([e for e in quantized_linears(q) if annotation(e.linear).role == "x_proj"]) == 16
    test = images(6, 2)
    with torch.no_grad():
        expected, got = model(test), q(test)
    assert torch.isfinite(got).all() and not torch.equal(got, expected)
    assert cosine(got, expected) >= floor  # measured 0.995 (W8A8) and 0.994 (W4A8)


def test_reference_lowering_matches_the_fake_quant_graph(minmax):
    from vmfx.lowering import lower

    lowered = lower(minmax, "reference")
    assert lowered.meta["vmfx_lowered"]["left_float"] == []
    x = images(2, 3)
    with torch.no_grad():
        expected, got = minmax(x), lowered(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
