"""LocalVim (hunto/LocalMamba): official keys and shapes, scan orders, equality with the official code.

The comparisons with the official ``local_vim.py`` run on the recorded fixture
(``fixtures/official/local_vim.*``, written by ``make_official_fixtures.py``) and, when
``$VMFX_LOCALMAMBA_SRC`` names a copy of the repository, on the official code itself (on the CPU, see
``official_localmamba.py``)."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from hypothesis import given, settings, strategies as st

import vmfx.models
from vmfx.errors import CheckpointError, ConfigError
from vmfx.models import LOCAL_VIM_VARIANTS, LocalVim, load_checkpoint
from vmfx.models.localmamba import ALL_DIRECTIONS, MultiScan, scan_order

from ..reference import local_scan_ref
from .official_fixtures import as_official_checkpoint, load, prefixed, sources
from .official_localmamba import (ENV, VIM_CASES, VIM_PUBLISHED, VIM_SMALL, import_official_local_vim,
                                  local_vim_reference, vim_published_args)

SOURCES = sources(ENV)

# (variant, state_dict entries, parameters): LocalVim-T is 8M and LocalVim-S 28M in the official
# README; the exact counts are checked against the official code in
# test_state_dict_matches_the_official_model.
_COUNTS = {
    "local_vim_tiny_search": (1328, 5_473_288),
    "local_vim_tiny": (748, 7_994_152),
    "local_vim_tiny_middle_cls_token": (747, 7_994_536),
    "local_vim_small": (748, 27_783_784),
    "local_vim_tiny_wo_search": (748, 7_994_152),
}


def _build(name: str, device="meta", **overrides) -> LocalVim:
    return LocalVim(**dict(LOCAL_VIM_VARIANTS[name][0], **overrides), device=device)


def _shapes(model) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("name", list(_COUNTS))
def test_published_configurations_have_the_official_key_counts(name):
    model = _build(name)
    entries, params = _COUNTS[name]
    assert len(model.state_dict()) == entries
    assert sum(p.numel() for p in model.parameters()) == params


def test_local_vim_tiny_keys_and_shapes():
    shapes = dict(_shapes(_build("local_vim_tiny")))
    keys = list(shapes)
    assert keys[:7] == ["pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "rope.freqs_cos",
                        "rope.freqs_sin", "head.weight", "head.bias"]
    assert keys[-1] == "norm_f.weight"
    assert shapes["pos_embed"] == (1, 196, 192)
    assert shapes["rope.freqs_cos"] == shapes["rope.freqs_sin"] == (196, 192)
    layer = [k[len("layers.0."):] for k in keys if k.startswith("layers.0.")]
    per_direction = [f"{n}_{k}" for k in range(4) for n in ("A_log", "D")]
    paths = [f"{n}_{k}.{p}" for k in range(4) for n, p in (("conv1d", "weight"), ("conv1d", "bias"),
                                                          ("x_proj", "weight"), ("dt_proj", "weight"),
                                                          ("dt_proj", "bias"))]
    assert layer == (
        [f"mixer.{n}" for n in per_direction] + ["mixer.in_proj.weight"] + [f"mixer.{p}" for p in paths]
        + ["mixer.out_proj.weight", "mixer.attn.norm.weight", "mixer.attn.norm.bias",
           "mixer.attn.global_reduce.weight", "mixer.attn.global_reduce.bias",
           "mixer.attn.channel_select.weight", "mixer.attn.channel_select.bias", "norm.weight"]
    )
    m = "layers.19.mixer."
    assert shapes[m + "in_proj.weight"] == (768, 192)
    assert shapes[m + "A_log_3"] == (384, 16) and shapes[m + "D_3"] == (384,)
    assert shapes[m + "conv1d_3.weight"] == (384, 1, 4)
    assert shapes[m + "x_proj_3.weight"] == (12 + 32, 384)
    assert shapes[m + "dt_proj_3.weight"] == (384, 12)
    assert shapes[m + "out_proj.weight"] == (192, 384)
    assert shapes[m + "attn.global_reduce.weight"] == (48, 384)
    assert shapes[m + "attn.channel_select.weight"] == (384, 48)


def test_middle_cls_token_and_search_variants():
    mid = dict(_shapes(_build("local_vim_tiny_middle_cls_token")))
    assert list(mid)[:2] == ["cls_token", "pos_embed"] and mid["pos_embed"] == (1, 197, 192)
    assert not any(k.startswith("rope.") for k in mid)
    search = _build("local_vim_tiny_search")
    assert search.layers[0].mixer.directions == ALL_DIRECTIONS
    assert dict(_shapes(search))["layers.0.mixer.multi_scan.weights"] == (8, 1, 1, 1)
    small = _build("local_vim_small")
    assert all(b.mixer.directions == ("h", "h_flip", "w2", "w2_flip") for b in small.layers)
    tiny = _build("local_vim_tiny")
    assert tiny.layers[0].mixer.directions == ("h", "v_flip", "w7", "w7_flip")
    assert tiny.layers[19].mixer.directions == ("v", "v_flip", "w2", "w2_flip")


# -- scan orders ----------------------------------------------------------------------------------


def test_scan_orders_on_a_small_grid():
    assert scan_order("h", (2, 3)) == (0, 1, 2, 3, 4, 5)
    assert scan_order("v", (2, 3)) == (0, 3, 1, 4, 2, 5)
    assert scan_order("v_flip", (2, 3)) == (5, 2, 4, 1, 3, 0)
    # 3x3 in 2x2 windows, padded to 4x4: windows (0,0) (0,1) (1,0) (1,1)
    assert scan_order("w2", (3, 3)) == (0, 1, 3, 4, 2, -1, 5, -1, 6, 7, -1, -1, 8, -1, -1, -1)
    # a middle class token (canonical index 2 of 5) is put back at scan position 2
    assert scan_order("h_flip", (2, 2), cls_position=2) == (4, 3, 2, 1, 0)
    assert scan_order("v", (2, 2), cls_position=2) == (0, 3, 2, 1, 4)
    with pytest.raises(ConfigError, match="unknown LocalMamba scan direction"):
        scan_order("d", (2, 2))


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), k=st.integers(1, 8), flip=st.booleans())
def test_windowed_scan_matches_the_loop_reference_and_reverses(h, w, k, flip):
    direction = f"w{k}" + ("_flip" if flip else "")
    scan = MultiScan(3, choices=(direction,), token_size=(h, w))
    x = torch.randn(2, h * w, 3, dtype=torch.float64)
    expected = local_scan_ref(x.view(2, h, w, 3), k)
    if flip:
        expected = expected.flip(1)
    scanned = scan.scan(x, 0)
    torch.testing.assert_close(scanned, expected, rtol=0, atol=0)
    torch.testing.assert_close(scan.reverse(scanned, 0), x, rtol=0, atol=0)


# -- equality with the official code -------------------------------------------------------------

_SMALL, _CASES = VIM_SMALL, VIM_CASES


@pytest.fixture(scope="module", params=SOURCES)
def reference(request, tmp_path_factory):
    """(tensors, metadata) of :func:`local_vim_reference`: recorded, or computed by the official code
    (whose stand-ins are undone before the tests run)."""
    if request.param == "recorded":
        return load("local_vim")
    mp = pytest.MonkeyPatch()
    try:
        return local_vim_reference(import_official_local_vim(tmp_path_factory.mktemp("local_vim"), mp))
    finally:
        mp.undo()


def test_the_reference_holds_these_cases(reference):
    """The fixture was made for the cases tested here (else: rerun make_official_fixtures.py); live,
    the recorded tensors are what the official code gives now."""
    tensors, meta = reference
    recorded_tensors, recorded = load("local_vim")
    assert meta["cases"] == recorded["cases"] == json.loads(json.dumps(VIM_CASES))
    assert meta["published_args"] == recorded["published_args"] == json.loads(json.dumps(vim_published_args()))
    assert meta["shapes"] == recorded["shapes"]
    assert sorted(tensors) == sorted(recorded_tensors)
    for key, value in tensors.items():  # the same math on another machine: not bit for bit
        torch.testing.assert_close(value, recorded_tensors[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("case", list(_CASES))
def test_logits_match_the_official_code_for_the_same_weights(reference, case, tmp_path):
    tensors, _ = reference
    state = prefixed(tensors, f"{case}/state")
    ours = LocalVim(**_CASES[case], device="meta")
    record = load_checkpoint(ours, as_official_checkpoint(state, tmp_path / "local_vim.ckpt"))
    assert not record.missing_keys and not record.unexpected_keys
    x, expected = tensors["input"], tensors[f"{case}/logits"]
    with torch.no_grad():
        got = ours.eval()(x)
    assert float(expected.std()) > 0.1  # logits of order 1, not a near-constant output
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("name", VIM_PUBLISHED)
def test_state_dict_matches_the_official_model(reference, name):
    _, meta = reference
    assert _shapes(_build(name)) == [(k, tuple(shape)) for k, shape in meta["shapes"][name]]


# -- timm, checkpoints, bad configurations --------------------------------------------------------


def test_timm_names_and_pretrained_flag():
    model = timm.create_model("local_vim_tiny_wo_search", num_classes=10, depth=2)
    assert isinstance(model, LocalVim) and model.head.out_features == 10 and len(model.layers) == 2
    assert model.pretrained_cfg["checkpoint_file"] is None
    with pytest.raises(CheckpointError, match="local_vim_tiny.ckpt"):
        timm.create_model("local_vim_tiny", pretrained=True)
    vmfx.models.register_timm_models()  # idempotent
    assert timm.models.model_entrypoint("local_vim_tiny") is vmfx.models.localmamba.local_vim_tiny


def test_official_checkpoint_file_loads(tmp_path):
    args = dict(_CASES["middle-cls+padding"])
    torch.manual_seed(1)
    source = LocalVim(**args).eval()
    path = tmp_path / "local_vim_tiny_middle_cls_token.ckpt"
    torch.save({"model": source.state_dict(), "ema_model": source.state_dict(), "epoch": 299}, path)
    target = LocalVim(**args).eval()
    record = load_checkpoint(target, path)
    assert record.key == "model" and record.epoch == 299
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    on_meta = LocalVim(**args, device="meta")
    load_checkpoint(on_meta, path)
    with torch.no_grad():
        assert torch.equal(on_meta.eval()(x), source(x))  # the scan indices are real, not meta


@pytest.mark.parametrize("kwargs, match", [
    (dict(if_cls_token=True), "class token at the front"),
    (dict(use_middle_cls_token=True), "needs if_cls_token"),
    (dict(if_cls_token=True, use_middle_cls_token=True, if_rope=True), "rope"),
    (dict(img_size=44), "not a multiple of patch_size"),
    (dict(directions=[("h",)]), "directions lists 1 layers"),
    (dict(directions=[("h", "z7"), ("h",)]), "unknown LocalMamba scan direction"),
    (dict(mamba_cls=torch.nn.Linear), "MultiMamba only"),
])
def test_bad_configurations_raise_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LocalVim(**dict(_SMALL, **kwargs))
