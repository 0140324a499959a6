"""Every bad input gets a clear error that names the problem and the way out."""

from __future__ import annotations

import pytest
import torch

import vmfx


def test_unknown_preset_lists_the_known_ones(tiny_model, tiny_images):
    with pytest.raises(vmfx.ConfigError) as info:
        vmfx.compile(tiny_model, tiny_images, config="minmax-w3a3")
    message = str(info.value)
    assert "unknown preset 'minmax-w3a3'" in message
    for name in ("minmax-w8a8", "minmax-w6a6", "minmax-w4a8", "minmax-w4a4"):
        assert name in message


def test_config_of_wrong_type(tiny_model, tiny_images):
    with pytest.raises(vmfx.ConfigError, match="preset name"):
        vmfx.compile(tiny_model, tiny_images, config=8)


@pytest.mark.parametrize("bits", [1, 9])
def test_bit_width_outside_2_to_8(bits):
    with pytest.raises(vmfx.ConfigError, match="from 2 to 8"):
        vmfx.QuantConfig(weight=vmfx.QuantSpec(bits, True, "channel"))


def test_missing_calibration_data(tiny_model):
    with pytest.raises(vmfx.CalibrationDataError, match="calibration data is required"):
        vmfx.compile(tiny_model, None)


@pytest.mark.parametrize("empty", [torch.empty(0, 3, 16, 16), [], iter([])])
def test_empty_calibration_data(tiny_model, empty):
    with pytest.raises(vmfx.CalibrationDataError, match="empty"):
        vmfx.compile(tiny_model, empty)


def test_wrong_rank_names_the_batch_and_hint(tiny_model):
    with pytest.raises(vmfx.CalibrationDataError, match=r"batch 0 has shape \(3, 16, 16\).*rank-4.*unsqueeze"):
        vmfx.compile(tiny_model, [torch.randn(3, 16, 16)])


def test_wrong_channel_count(tiny_model):
    with pytest.raises(vmfx.CalibrationDataError, match=r"batch 0 has 1 channels.*patch embedding 'patch' expects 3"):
        vmfx.compile(tiny_model, torch.randn(4, 1, 16, 16))


@pytest.mark.parametrize("bad,what", [(float("nan"), "1 NaN and 0 Inf"), (float("inf"), "0 NaN and 1 Inf")])
def test_nan_or_inf_names_the_batch(tiny_model, tiny_images, bad, what):
    batches = [tiny_images[:4], tiny_images[4:8].clone(), tiny_images[8:]]
    batches[2] = batches[2].clone()
    batches[2][1, 0, 3, 3] = bad
    with pytest.raises(vmfx.CalibrationDataError, match=f"calibration batch 2 holds {what} values"):
        vmfx.compile(tiny_model, batches)


def test_integer_images_are_refused(tiny_model):
    with pytest.raises(vmfx.CalibrationDataError, match="dtype torch.uint8"):
        vmfx.compile(tiny_model, torch.zeros(2, 3, 16, 16, dtype=torch.uint8))


def test_batches_of_another_kind(tiny_model):
    with pytest.raises(vmfx.CalibrationDataError, match="batch 0 is a str"):
        vmfx.compile(tiny_model, ["not an image"])


def test_model_that_fails_on_the_calibration_shape(tiny_model):
    with pytest.raises(vmfx.CalibrationDataError, match=r"fails on an input of shape \(1, 3, 2, 2\)"):
        vmfx.compile(tiny_model, torch.randn(2, 3, 2, 2))  # smaller than one 4x4 patch
