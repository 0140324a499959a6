"""Tests of vmfx.models.load_checkpoint: layouts, strict errors, hints and the pickle safety."""

from __future__ import annotations

import argparse
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from vmfx.errors import CheckpointError
from vmfx.models import CheckpointNotFoundError, LoadedCheckpoint, VisionMamba, load_checkpoint

_TINY = dict(img_size=32, patch_size=8, stride=8, embed_dim=32, depth=2, num_classes=10)


def _model(seed: int = 0, **kwargs) -> VisionMamba:
    torch.manual_seed(seed)
    return VisionMamba(**{**_TINY, **kwargs}).eval()


def _assert_same_weights(a: torch.nn.Module, b_state: dict) -> None:
    sa = a.state_dict()
    assert list(sa) == list(b_state)
    for k, v in b_state.items():
        assert torch.equal(sa[k], v), k


def _official_file(path: Path, model_sd, ema_sd) -> Path:
    """A file in the layout vim/main.py saves."""
    torch.save(
        {
            "model": model_sd,
            "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                          "param_groups": [{"lr": 5e-4, "weight_decay": 0.05, "params": [0]}]},
            "lr_scheduler": {"base_lrs": [5e-4], "last_epoch": 299},
            "epoch": 299,
            "model_ema": ema_sd,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
            "args": argparse.Namespace(
                model="vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
                batch_size=128, lr=5e-4, input_size=224, output_dir="./output", model_ema=True,
                drop_path=0.0, resume="", eval_crop_ratio=0.875, seed=0,
            ),
        },
        path,
    )
    return path


# ------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------


def test_official_layout_round_trip(tmp_path):
    src, ema = _model(1).state_dict(), _model(2).state_dict()
    path = _official_file(tmp_path / "vim_t_midclstok_76p1acc.pth", src, ema)
    safe_before = list(torch.serialization.get_safe_globals())

    model = _model(3)
    info = load_checkpoint(model, path)
    _assert_same_weights(model, src)
    assert isinstance(info, LoadedCheckpoint)
    assert info.key == "model" and info.num_tensors == len(src) == 41
    assert info.epoch == 299 and info.model_name.startswith("vim_tiny_patch16_224")
    assert set(info.file_keys) == {"model", "optimizer", "lr_scheduler", "epoch", "model_ema",
                                   "scaler", "args"}
    assert info.missing_keys == () and info.unexpected_keys == ()
    # argparse.Namespace was allowed only inside the load, not process-wide.
    assert set(torch.serialization.get_safe_globals()) == set(safe_before)  # (the order may differ)
    assert argparse.Namespace not in torch.serialization.get_safe_globals()

    info = load_checkpoint(model, str(path), key="model_ema")
    _assert_same_weights(model, ema)
    assert info.key == "model_ema"


def test_state_dict_layout_and_bare_round_trip(tmp_path):
    src = _model(1).state_dict()
    torch.save({"state_dict": src, "meta": {"note": "x"}}, tmp_path / "sd.pth")
    torch.save(OrderedDict(src), tmp_path / "bare.pth")

    model = _model(3)
    info = load_checkpoint(model, tmp_path / "sd.pth")
    _assert_same_weights(model, src)
    assert info.key == "state_dict" and info.num_tensors == len(src)

    model = _model(4)
    info = load_checkpoint(model, tmp_path / "bare.pth")
    _assert_same_weights(model, src)
    assert info.key is None and info.num_tensors == len(src) and info.file_keys == ()


def test_full_vim_tiny_official_file_round_trip(tmp_path):
    src = VisionMamba(final_pool_type="mean")  # Vim-T, 415 tensors
    path = _official_file(tmp_path / "vim_t.pth", src.state_dict(), src.state_dict())
    model = VisionMamba(final_pool_type="mean")
    info = load_checkpoint(model, path)
    assert info.num_tensors == 415
    _assert_same_weights(model, src.state_dict())


def test_meta_model_receives_the_tensors(tmp_path):
    src = _model(1)
    torch.save({"model": src.state_dict()}, tmp_path / "m.pth")
    model = VisionMamba(**_TINY, device="meta").eval()
    load_checkpoint(model, tmp_path / "m.pth")
    assert not any(p.is_meta for p in model.parameters())
    _assert_same_weights(model, src.state_dict())
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), src(images), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# Mismatches
# ------------------------------------------------------------------------------------------------


def test_strict_error_names_missing_unexpected_and_wrong_shape_keys(tmp_path):
    sd = _model(1).state_dict()
    del sd["norm_f.weight"]
    sd["extra.weight"] = torch.zeros(3)
    sd["head.weight"] = torch.zeros(7, 32)
    sd["head.bias"] = torch.zeros(7)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    model = _model(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, tmp_path / "bad.pth")
    msg = str(info.value)
    assert "missing keys" in msg and "norm_f.weight" in msg
    assert "unexpected keys" in msg and "extra.weight" in msg
    assert "wrong shapes [2]:" in msg
    assert "head.weight: model expects (10, 32), file has (7, 32)" in msg
    assert "head.bias: model expects (10,), file has (7,)" in msg
    _assert_same_weights(model, before)  # nothing was copied


def test_non_strict_reports_keys_but_still_requires_shapes(tmp_path):
    sd = _model(1).state_dict()
    del sd["norm_f.weight"]
    sd["extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "partial.pth")
    model = _model(3)
    info = load_checkpoint(model, tmp_path / "partial.pth", strict=False)
    assert info.missing_keys == ("norm_f.weight",) and info.unexpected_keys == ("extra.weight",)
    assert torch.equal(model.cls_token, sd["cls_token"])

    sd["head.bias"] = torch.zeros(3)
    torch.save(sd, tmp_path / "partial2.pth")
    with pytest.raises(CheckpointError, match=r"head\.bias: model expects \(10,\), file has \(3,\)"):
        load_checkpoint(model, tmp_path / "partial2.pth", strict=False)


def test_long_key_lists_are_truncated_with_a_count(tmp_path):
    torch.save({"cls_token": torch.zeros(1, 1, 32)}, tmp_path / "few.pth")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_model(), tmp_path / "few.pth")
    msg = str(info.value)
    assert "missing keys (in the model, not in the file) [40]" in msg
    assert "... and 30 more" in msg


def _stride_models(stride: int) -> VisionMamba:
    # Real 224 / 16 geometry (197 or 730 tokens) at a tiny width and depth.
    return VisionMamba(img_size=224, patch_size=16, stride=stride, embed_dim=8, depth=1,
                       num_classes=10, device="meta")


def test_stride8_checkpoint_into_stride16_model_gives_a_hint(tmp_path):
    sd = {k: torch.zeros(v.shape) for k, v in _stride_models(8).state_dict().items()}
    assert sd["pos_embed"].shape == (1, 730, 8)
    torch.save({"model": sd}, tmp_path / "plus.pth")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_stride_models(16), tmp_path / "plus.pth")
    msg = str(info.value)
    assert "pos_embed: model expects (1, 197, 8), file has (1, 730, 8)" in msg
    assert "stride-8" in msg and "vim_t_midclstok_ft_78p3acc.pth" in msg and "stride=8" in msg

    torch.save({"model": {k: torch.zeros(v.shape) for k, v in _stride_models(16).state_dict().items()}},
               tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="stride=16"):
        load_checkpoint(_stride_models(8), tmp_path / "plain.pth")


def test_width_mismatch_hint_and_training_args(tmp_path):
    small = VisionMamba(**{**_TINY, "embed_dim": 48})
    _official_file(tmp_path / "w.pth", small.state_dict(), small.state_dict())
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_model(), tmp_path / "w.pth")
    msg = str(info.value)
    assert "D=48" in msg and "D=32" in msg
    assert "args.model = 'vim_tiny_patch16_224" in msg


# ------------------------------------------------------------------------------------------------
# Safety and bad files
# ------------------------------------------------------------------------------------------------


def _touch(path):
    Path(path).write_text("code from the checkpoint ran")
    return 0


class ReducesToCall:
    """Unpickling this would call _touch(marker)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


class SetsStateWithSideEffect:
    """Unpickling this would run __setstate__, which creates the marker."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __setstate__(self, state):
        _touch(state["marker"])
        self.__dict__.update(state)


@pytest.mark.parametrize(
    "cls, global_name, zipfile",
    [(ReducesToCall, "_touch", True), (SetsStateWithSideEffect, "SetsStateWithSideEffect", True),
     (ReducesToCall, "_touch", False)],
    ids=["reduce", "setstate", "reduce-legacy-format"],
)
def test_pickled_code_is_refused_and_never_runs(tmp_path, cls, global_name, zipfile):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    torch.save({"model": _model().state_dict(), "payload": cls(marker)}, path,
               _use_new_zipfile_serialization=zipfile)
    assert not marker.exists()  # saving did not run it either
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_model(), path)
    msg = str(info.value)
    assert global_name in msg
    assert "will not run code from a downloaded file" in msg
    assert "save" in msg and "bare" in msg  # the way out
    assert not marker.exists()


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "vim_t_midclstok_76p1acc.pth"
    with pytest.raises(CheckpointNotFoundError, match="not found") as info:
        load_checkpoint(_model(), path)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, CheckpointError)
    assert str(path) in str(info.value)


def test_unreadable_or_unusable_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(os.urandom(64))
    with pytest.raises(CheckpointError, match="Could not read"):
        load_checkpoint(_model(), tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(_model(), tmp_path)

    torch.save({"weights": _model().state_dict(), "epoch": 3}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="'weights'.*key="):
        load_checkpoint(_model(), tmp_path / "odd.pth")
    info = load_checkpoint(_model(), tmp_path / "odd.pth", key="weights")
    assert info.key == "weights"
    with pytest.raises(CheckpointError, match="no key 'model_ema'"):
        load_checkpoint(_model(), tmp_path / "odd.pth", key="model_ema")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_checkpoint(_model(), tmp_path / "odd.pth", key="epoch")
