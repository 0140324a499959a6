"""The bundled proxy model and data: the regression anchors of the yardstick."""

from __future__ import annotations

import pytest
import torch

import vmfx
from vmfx.data import evaluate, load_digits, load_proxy_model, proxy_metadata


def test_fixed_split_is_disjoint_balanced_and_stable():
    train_x, train_y = load_digits("train")
    test_x, test_y = load_digits("test")
    assert train_x.shape == (4000, 1, 30, 30) and test_x.shape == (1000, 1, 30, 30)
    assert load_digits("test", border=0)[0].shape == (1000, 1, 28, 28)
    assert torch.bincount(train_y, minlength=10).min() > 300 and torch.bincount(test_y, minlength=10).min() > 60
    all_x, _ = load_digits("all")
    assert torch.equal(all_x[:4000], train_x) and torch.equal(all_x[4000:], test_x)
    # no test image is also a training image
    train_keys = {hash(x.numpy().tobytes()) for x in train_x}
    assert sum(hash(x.numpy().tobytes()) in train_keys for x in test_x) == 0
    with pytest.raises(ValueError, match="split must be"):
        load_digits("val")


def test_proxy_model_is_the_official_architecture_with_197_tokens():
    meta = proxy_metadata()
    model = load_proxy_model()
    assert isinstance(model, vmfx.models.VisionMamba)
    assert meta["model_kwargs"]["bimamba_type"] == "v2" and meta["model_kwargs"]["use_middle_cls_token"]
    gm = vmfx.trace(model, (load_digits("test")[0][:1],))
    mixers = gm.meta["vmfx_mixers"]
    assert len(mixers) == meta["model_kwargs"]["depth"]
    assert all(m["tokens"] == 197 and list(m["directions"]) == ["forward", "backward"] for m in mixers)


def test_committed_checkpoint_reproduces_its_recorded_accuracy_exactly():
    meta = proxy_metadata()
    result = evaluate(load_proxy_model(), load_digits("test"))
    assert result.images == 1000
    assert result.top1 == meta["test_top1"], (result.top1, meta["test_top1"])
    assert meta["test_top1"] >= 95.0


def test_minmax_w8a8_stays_within_one_point_of_fp():
    model = load_proxy_model()
    test = load_digits("test")
    train, _ = load_digits("train")
    calib = train[torch.randperm(4000, generator=torch.Generator().manual_seed(0))[:256]]
    fp = evaluate(model, test).top1
    q = evaluate(vmfx.compile(model, calib, "minmax-w8a8"), test).top1
    print(f"proxy FP {fp:.2f}%, minmax-w8a8 {q:.2f}%")
    assert fp - q <= 1.0
