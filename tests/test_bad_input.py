"""Every bad input gets a clear error that names the problem and the way out."""

from __future__ import annotations

import math

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


# -- issue 23 part 7: bad input from a fresh clone, one clear error (or warning) each ---------------


@pytest.fixture
def proxy_vim():
    """The proxy Vim's architecture (30x30 single-channel images, img_size declared), untrained."""
    from vmfx.data.proxy import build_proxy_model

    torch.manual_seed(0)
    return build_proxy_model().eval()


def test_constant_images_warn(tiny_model):
    with pytest.warns(vmfx.CalibrationDataWarning, match=r"all 4 calibration images are constant.*torch.ones"):
        vmfx.compile(tiny_model, torch.ones(4, 3, 16, 16))
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    images[2] = 0.5
    with pytest.warns(vmfx.CalibrationDataWarning, match=r"1 of 4 calibration images are constant.*images 2\)"):
        vmfx.compile(tiny_model, images)


def test_a_module_rule_that_matches_nothing_names_the_closest_pattern(tiny_model, tiny_images):
    cfg = vmfx.preset("minmax-w8a8").replace(rules=(vmfx.QuantRule("input", None, module="mixer.0.*"),))
    with pytest.raises(vmfx.ConfigError, match=r"QuantRule #0 \(input -> float where module='mixer.0.\*'\) matches "
                                               r"nothing.*closest: 'mixers.0.\*'"):
        vmfx.compile(tiny_model, tiny_images, cfg)


def test_a_node_rule_that_matches_nothing_names_the_closest_nodes(tiny_model, tiny_images):
    cfg = vmfx.preset("minmax-w8a8").replace(rules=(vmfx.QuantRule("weight", None, node="mixers_0_inproj"),))
    with pytest.raises(vmfx.ConfigError, match=r"node='mixers_0_inproj' is no linear's node name \(closest: "
                                               r"'mixers_0_in_proj'"):
        vmfx.prepare(tiny_model, cfg, tiny_images)


def test_a_role_the_model_lacks_warns_with_its_roles(tiny_model, tiny_images):
    spec = vmfx.QuantSpec(8, True, "tensor")
    cfg = vmfx.preset("minmax-w8a8").replace(rules=(vmfx.QuantRule("output", spec, role="dt_act"),))
    with pytest.warns(vmfx.ConfigWarning, match=r"role='dt_act' is not a role of any annotated node.*in_proj"):
        vmfx.compile(tiny_model, tiny_images, cfg)


def test_a_presets_own_rules_for_other_model_families_do_not_warn(tiny_model, tiny_images):
    import warnings

    cfg = vmfx.preset("kscaled-w8a8").replace(search=None)  # its dt_act rule is for models with one
    with warnings.catch_warnings():
        warnings.simplefilter("error", vmfx.ConfigWarning)
        vmfx.compile(tiny_model, tiny_images[:4], cfg)


def test_compare_refuses_roles_the_model_does_not_have(tiny_model, tiny_images):
    q = vmfx.compile(tiny_model, tiny_images)
    with pytest.raises(vmfx.ConfigError, match=r"no node with role 'outproj' \(did you mean 'out_proj'.*its roles are"):
        vmfx.inspect.compare(tiny_model, q, tiny_images, roles=["outproj"])


def test_compare_refuses_a_float_model_with_other_weights(tiny_model, tiny_images, tmp_path):
    from tests.conftest import TinyVimLike

    q = vmfx.compile(tiny_model, tiny_images, "smoothquant-w4a8")  # smoothed, folded, 4-bit: still the same model
    assert math.isfinite(vmfx.inspect.compare(tiny_model, q, tiny_images).output.sqnr_db)
    loaded = vmfx.load(vmfx.save(q, str(tmp_path / "q.safetensors")), model=tiny_model)
    vmfx.inspect.compare(tiny_model, loaded, tiny_images)
    torch.manual_seed(1)
    with pytest.raises(vmfx.ConfigError, match=r"the float model is not the one the quantized model was made from: "
                                               r"\d+ of \d+ of its weight tensors differ"):
        vmfx.inspect.compare(TinyVimLike().eval(), q, tiny_images)


@pytest.mark.parametrize("size", [28, 64])
def test_calibration_images_of_another_size_in_one_line(proxy_vim, size, capfd):
    with pytest.raises(vmfx.CalibrationDataError) as info:
        vmfx.compile(proxy_vim, torch.randn(4, 1, size, size))
    assert str(info.value) == (
        f"the calibration data has images of shape (N, 1, {size}, {size}), but the model expects (N, 1, 30, 30) "
        f"images (its img_size): resize or crop the images to 30x30, or build the model with img_size=({size}, {size})")
    assert capfd.readouterr().err == ""


def test_bad_example_inputs_name_the_argument(proxy_vim, capfd):
    images = torch.randn(4, 1, 30, 30)
    with pytest.raises(vmfx.InputError, match=r"^example_inputs has 3 channels \(shape \(1, 3, 30, 30\)\), but the "
                                              r"patch embedding 'patch_embed.proj' expects 1$"):
        vmfx.compile(proxy_vim, images, example_inputs=(torch.randn(1, 3, 30, 30),))
    with pytest.raises(vmfx.ConfigError, match=r"^example_inputs must be a tensor of images .* got str$"):
        vmfx.compile(proxy_vim, images, example_inputs="abc")
    wrong = r"^example_inputs has shape \(1, 1, 28, 28\), but the model expects \(N, 1, 30, 30\) images"
    with pytest.raises(vmfx.InputError, match=wrong):
        vmfx.trace(proxy_vim, torch.randn(1, 1, 28, 28))
    with pytest.raises(vmfx.InputError, match=wrong):
        vmfx.inspect.table(proxy_vim, example_inputs=torch.randn(1, 1, 28, 28))
    assert capfd.readouterr().err == ""


def test_a_failing_example_input_is_one_line_without_a_printed_traceback(tiny_model, capfd):
    with pytest.raises(vmfx.InputError) as info:
        vmfx.trace(tiny_model, torch.randn(1, 3, 2, 2))
    message = str(info.value)
    assert message.startswith("the model fails on an input of shape (1, 3, 2, 2) from example_inputs: RuntimeError: ")
    assert "\n" not in message and "ShapeProp" not in message
    assert capfd.readouterr().err == ""


def test_compare_on_images_of_another_size(proxy_vim):
    images = torch.randn(4, 1, 30, 30)
    q = vmfx.compile(proxy_vim, images)
    with pytest.raises(vmfx.InputError, match=r"^images have shape \(N, 1, 28, 28\), but the quantized model was "
                                              r"traced for \(N, 1, 30, 30\)"):
        vmfx.inspect.compare(proxy_vim, q, torch.randn(4, 1, 28, 28))


@pytest.mark.parametrize("config", ["pts-w4a8", "minmax-w8a8"])
def test_prepare_without_an_example_is_refused_with_the_way_out(tiny_model, config):
    with pytest.raises(vmfx.ConfigError, match=r"vmfx.prepare needs an example image.*example_inputs=\(images\[:1\],\)"):
        vmfx.prepare(tiny_model, config)


def test_inspection_of_the_wrong_kind_of_model(tiny_model, tiny_images):
    q = vmfx.compile(tiny_model, tiny_images)
    with pytest.raises(vmfx.ConfigError, match=r"second argument \(qmodel\) must be the quantized model.*TinyVimLike"):
        vmfx.inspect.compare(tiny_model, tiny_model, tiny_images)
    with pytest.raises(vmfx.ConfigError, match="batch_size must be a positive integer, got 0"):
        vmfx.inspect.compare(tiny_model, q, tiny_images, batch_size=0)
    s = vmfx.inspect.summary(tiny_model, tiny_images[:1])  # a float model is traced, as vmfx.trace does
    assert (s["mixers"], s["quantized_linears"]) == (2, 0)


def test_the_triton_backend_that_cannot_run_is_refused_before_calibrating(tiny_model, tiny_images, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("with a GPU the Triton backend runs")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    calibrated = []
    monkeypatch.setattr(vmfx.passes.calibrate.CalibratePass, "call", lambda *a: calibrated.append(1))
    with pytest.raises(vmfx.ConfigError, match=r"backend='triton' cannot run here: no CUDA device.*backend='auto'"):
        vmfx.compile(tiny_model, tiny_images, backend="triton")
    assert not calibrated


def test_a_model_without_a_mixer_says_what_to_check(tiny_images):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, 4), torch.nn.Flatten(), torch.nn.Linear(128, 10)).eval()
    with pytest.raises(vmfx.PassError) as info:
        vmfx.compile(model, tiny_images)
    message = str(info.value)
    assert "vmfx recognises no mixer in this model" in message and "vmfx.inspect.coverage(model" in message
    assert "register_adapter" in message and not message.startswith("Run DetectMambaMixersPass")


# -- models in unusual states, at every public entry point ------------------------------------------


@pytest.mark.parametrize("entry", ["compile", "prepare", "trace", "table", "coverage"])
def test_a_model_on_the_meta_device_is_refused(tiny_images, entry):
    from tests.conftest import TinyVimLike

    model = TinyVimLike().to("meta")
    call = {"compile": lambda: vmfx.compile(model, tiny_images), "prepare": lambda: vmfx.prepare(model, "minmax-w8a8", tiny_images),
            "trace": lambda: vmfx.trace(model, tiny_images[:1]), "table": lambda: vmfx.inspect.table(model),
            "coverage": lambda: vmfx.inspect.coverage(model)}[entry]
    with pytest.raises(vmfx.CheckpointError, match=r"on the meta device \(not materialised\).*assign=True"):
        call()


def test_a_model_in_training_mode_is_quantized_in_eval_mode_and_told(proxy_vim):
    images = torch.randn(4, 1, 30, 30, generator=torch.Generator().manual_seed(0))
    expected = vmfx.compile(proxy_vim, images)
    proxy_vim.train()
    with pytest.warns(vmfx.ModelStateWarning, match=r"training mode, in which 'pos_drop' \(Dropout\).*eval mode"):
        q = vmfx.compile(proxy_vim, images)
    assert proxy_vim.training and not q.training
    assert torch.equal(q(images), expected(images))


def test_forward_hooks_warn_that_quantized_layers_drop_them(tiny_model, tiny_images):
    tiny_model.mixers[0].in_proj.register_forward_hook(lambda module, args, out: None)
    with pytest.warns(vmfx.ModelStateWarning, match=r"forward hooks are registered on 'mixers.0.in_proj'"):
        vmfx.compile(tiny_model, tiny_images)


def test_a_half_precision_model_takes_half_precision_images(tiny_model, tiny_images):
    half = tiny_model.half()
    with pytest.raises(vmfx.CalibrationDataError, match=r"expected float16 images, got float32.*images.to\(torch.float16\)"):
        vmfx.compile(half, tiny_images)
    q = vmfx.compile(half, tiny_images.half())
    assert q(tiny_images[:2].half()).dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_images_on_another_device_than_the_model(tiny_model, tiny_images):
    with pytest.raises(vmfx.InputError, match=r"example_inputs is on cpu, but the model's parameters are on cuda"):
        vmfx.trace(tiny_model.cuda(), tiny_images[:1])


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
