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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_images_of_another_float_dtype_are_refused_by_name(tiny_model, tiny_images, dtype):
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(vmfx.CalibrationDataError, match=f"batch 0: expected float32 images, got {name}.*images.to"):
        vmfx.compile(tiny_model, tiny_images.to(dtype))


def test_a_later_batch_of_another_dtype_is_named(tiny_model, tiny_images):
    with pytest.raises(vmfx.CalibrationDataError, match="batch 1: expected float32 images, got float64"):
        vmfx.compile(tiny_model, [tiny_images[:6], tiny_images[6:].double()])


@pytest.mark.parametrize(
    "factor,what", [(1e30, r"max \|x\| = \d\.\d+e\+30, above the 100"), (300.0, r"max \|x\| = 1\d\d\d, above"),
                    (1e-6, r"their root-mean-square is [\d.]+e-06, where")]
)
def test_images_far_from_normalized_warn(tiny_model, tiny_images, factor, what):
    with pytest.warns(vmfx.CalibrationDataWarning, match=f"do not look normalized: {what}"):
        vmfx.compile(tiny_model, tiny_images * factor)


def test_raw_pixel_range_is_named(tiny_model):
    pixels = torch.randint(0, 256, (4, 3, 16, 16), generator=torch.Generator().manual_seed(0)).float()
    with pytest.warns(vmfx.CalibrationDataWarning, match=r"raw 0-255 pixels\?"):
        vmfx.compile(tiny_model, pixels)


def test_normalized_images_do_not_warn(tiny_model, tiny_images):
    import warnings

    from vmfx.data import load_digits

    digits, _ = load_digits("test")  # the bundled, normalized proxy images: the bound's reference
    assert 2.0 < float(digits.abs().max()) < vmfx.passes.calibrate.NORMALIZED_ABS_LIMIT
    with warnings.catch_warnings():
        warnings.simplefilter("error", vmfx.CalibrationDataWarning)
        vmfx.compile(tiny_model, tiny_images)
        vmfx.compile(tiny_model, tiny_images * 20)  # |x| up to ~70: a low-contrast set, still plausible


def test_calibrating_twice_counts_every_image(tiny_model, tiny_images):
    gm = vmfx.prepare(tiny_model, "minmax-w8a8", tiny_images)
    gm = vmfx.calibrate(gm, tiny_images[:8])
    assert gm.meta["vmfx_calibration"]["images"] == 8
    gm = vmfx.calibrate(gm, tiny_images[:8])
    assert (gm.meta["vmfx_calibration"]["images"], gm.meta["vmfx_calibration"]["batches"]) == (16, 2)


def test_recalibrating_fresh_observers_does_not_double_count(tiny_model, tiny_images):
    # SmoothQuant calibrates, then replaces the observers by fresh ones and calibrates again.
    q = vmfx.compile(tiny_model, tiny_images, "smoothquant-w8a8")
    assert q.meta["vmfx_calibration"]["images"] == 12


def test_a_quantized_model_is_not_quantized_again(tiny_model, tiny_images):
    """compile / prepare take the float model: a compiled, prepared or lowered one would be
    quantized twice (and a compiled GraphModule used to be edited in place before failing)."""
    q = vmfx.compile(tiny_model, tiny_images, "minmax-w8a8")
    before = {k: v.clone() for k, v in q.state_dict().items()}
    prepared = vmfx.prepare(tiny_model, "minmax-w8a8", example_inputs=tiny_images[:1])
    for model in (q, prepared, vmfx.lowering.lower(q, "reference")):
        for stage in (vmfx.compile, vmfx.prepare):
            with pytest.raises(vmfx.ConfigError, match=f"vmfx.{stage.__name__} takes the float model.*already holds"):
                stage(model, tiny_images, "pts-w8a8") if stage is vmfx.compile else stage(model, "pts-w8a8")
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items()) and len(before) == len(q.state_dict())


@pytest.mark.parametrize("stage", ["calibrate", "convert"])
def test_staged_calls_on_a_float_model_name_the_first_stage(tiny_model, tiny_images, stage):
    with pytest.raises(vmfx.ConfigError, match=f"vmfx.{stage} takes the graph vmfx.prepare returns.*TinyVimLike"):
        vmfx.calibrate(tiny_model, tiny_images) if stage == "calibrate" else vmfx.convert(tiny_model)


@pytest.mark.parametrize("content,message", [
    (b"not a checkpoint" * 8, "Could not read .* as a torch checkpoint .*: the file is damaged"),
    (b"", "the file is empty or truncated"),
])
def test_a_corrupt_checkpoint_gets_no_advice_to_load_it_unsafely(tmp_path, content, message):
    from vmfx.models import load_checkpoint

    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(vmfx.CheckpointError, match=message) as info:
        load_checkpoint(torch.nn.Linear(2, 2), str(path))
    assert "weights_only=False" not in str(info.value) and "set to `False`" not in str(info.value)
