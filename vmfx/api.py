"""The public entry points: ``compile`` and its stages ``trace``, ``prepare``, ``calibrate``,
``convert``.

``compile(model, calib_data, config)`` is exactly ``prepare -> calibrate -> convert`` on a copy of
the model: the method named by the config is a list of passes (:mod:`vmfx.passes.pipeline`), and
the stages are segments of that list (:func:`vmfx.passes.pipeline.split_stages`), so running the stages by
hand gives the same result as the one call. The user's model is never modified.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

from .config import QuantConfig, resolve_config
from .coverage import warn_if_partial
from .errors import CalibrationDataError, ConfigError
from .lowering import lower, resolve_backend
from .lowering.runtime import check_backend_runs
from .passes.detect import DetectMambaMixersPass
from .passes.manager import PassManager
from .passes.pipeline import Pipeline, method_passes, split_stages, trace_for_quantization, warn_model_state

__all__ = ["compile", "trace", "prepare", "calibrate", "convert"]


def compile(
    model: nn.Module,
    calib_data: Any = None,
    config: str | QuantConfig = "minmax-w8a8",
    *,
    example_inputs: tuple | None = None,
    progress: bool = False,
    check: bool | None = None,
    backend: str | None = None,
) -> fx.GraphModule:
    """Quantize a Vision Mamba model in one call.

    Args:
        model: a float model (a vmfx/timm Vim, or any module built from canonical vmfx modules or
            modules with a registered adapter). It is copied, not modified.
        calib_data: calibration images: a tensor ``(N, C, H, W)`` or an iterable of batches
            (tensors or ``(images, labels)`` pairs, e.g. a ``DataLoader``); or ``"synthetic"``
            (128 images synthesized from the model itself, OuroMamba-Gen) or a
            :class:`vmfx.data.Synthetic` saying how many, with which seed and steps.
        config: a preset name (``vmfx.config.preset_names()``, e.g. ``"minmax-w8a8"``) or a
            :class:`~vmfx.config.QuantConfig`.
        example_inputs: inputs for shape propagation (default: the first calibration image);
            checked like calibration images (a wrong type, rank, channel count, dtype or image
            size is an :class:`~vmfx.errors.InputError` naming ``example_inputs``).
        progress: show progress bars.
        check: lint and run the graph after every pass (default: ``VMFX_CHECK_PASSES``).
        backend: None (default) returns the simulated-quantization graph; "triton",
            "reference" or "auto" also lowers it (:func:`vmfx.lowering.lower`): generated
            Triton kernels on a GPU, the exact integer reference on a CPU. A backend that could
            not run here ("triton" without CUDA and with Triton's interpreter off) is refused
            before calibrating.

    The model is quantized in eval mode (a copy: a model in training mode with dropout, batch
    norm or drop-path gets a :class:`~vmfx.errors.ModelStateWarning`, as does one with forward
    hooks, which stop running on quantized layers); its parameters must be materialised (not on
    the ``meta`` device) and on the calibration images' device.

    Returns:
        The quantized model (a :class:`~vmfx.coverage.CoverageWarning` says how many layers
        stayed float although the method would quantize them, see
        :func:`vmfx.inspect.coverage`): a ``torch.fx.GraphModule`` in which every quantized tensor passes
        through its own quantizer node (``smooth -> quantize(act) -> F.linear(., quantize(W))``;
        with a backend, lowered kernel calls); ``qmodel.meta["vmfx_config"]`` holds the config.

    Example::

        qmodel = vmfx.compile(model, calib_images, config="minmax-w8a8")
        print(vmfx.inspect.table(qmodel))
    """
    _refuse_quantized_model(model, "compile")
    warn_model_state(model)
    cfg = resolve_config(config)
    # vmamba: a preset name gets the model's declared defaults (PTQ4VM's alpha 0.65 for VMamba)
    from .models.hints import config_for_model

    cfg = config_for_model(model, config, cfg)
    if backend is not None:
        check_backend_runs(resolve_backend(backend))  # a bad name / no way to run fails before calibration
    # data-free calibration (OuroMamba-Gen): "synthetic" / vmfx.data.Synthetic -> images from the model
    from .data.synthetic import resolve_calibration_data

    calib_data = resolve_calibration_data(model, calib_data, progress=progress)
    qmodel = Pipeline(method_passes(cfg), check=check)(
        model, calib_data, config=cfg, example_inputs=example_inputs, progress=progress
    )
    warn_if_partial(qmodel)  # never a silent partial quantization (vmfx.coverage)
    return qmodel if backend is None else lower(qmodel, backend)


def trace(model: nn.Module, example_inputs: tuple | None = None, *, detect: bool = True) -> fx.GraphModule:
    """Canonicalize and trace a copy of ``model``; with ``detect``, annotate its Mamba patterns.

    Args:
        model: the float model (not modified).
        example_inputs: a tensor or tuple for shape propagation (token lengths need it); one the
            model cannot take is an :class:`~vmfx.errors.InputError` naming the shape expected.
        detect: run :class:`~vmfx.passes.DetectMambaMixersPass` so the graph can be inspected.
    """
    warn_model_state(model)
    gm, example_inputs = trace_for_quantization(model, example_inputs=example_inputs)
    gm.meta["vmfx_example_inputs"] = example_inputs
    if detect:
        gm = PassManager([DetectMambaMixersPass()])(gm).graph_module
    return gm


def _require_prepared(gm: Any, stage: str) -> None:
    if not isinstance(gm, fx.GraphModule):
        raise ConfigError(f"vmfx.{stage} takes the graph vmfx.prepare returns, got a {type(gm).__name__}; "
                          "start with gm = vmfx.prepare(model, config, example_inputs=...)")


def _stage(gm: fx.GraphModule, index: int) -> list:
    config = gm.meta.get("vmfx_config")
    if config is None:
        raise ConfigError("this graph was not made by vmfx.prepare; call vmfx.prepare(model, config, ...) first")
    return split_stages(method_passes(QuantConfig.from_dict(config)))[index]


def prepare(
    model: nn.Module,
    config: str | QuantConfig = "minmax-w8a8",
    calib_data: Any = None,
    *,
    example_inputs: tuple | None = None,
) -> fx.GraphModule:
    """Stage 1: trace a copy of ``model`` and run the method's passes that need no data
    (detection, observer insertion). ``calib_data`` (or ``example_inputs``) only supplies the
    example image for shape propagation; one of them is required (token layouts, per-token scales
    and the saved model's input shape all come from it), so a call with neither is refused here,
    not at ``calibrate`` or ``save``."""
    _refuse_quantized_model(model, "prepare")
    warn_model_state(model)
    cfg = resolve_config(config)
    _refuse_named_data(calib_data, "prepare")
    if calib_data is None and example_inputs is None:
        raise ConfigError(
            "vmfx.prepare needs an example image to propagate shapes with (token layouts, per-token scales and "
            "the input shape a saved model records come from it): pass the calibration images, "
            "vmfx.prepare(model, config, images), or one of them, vmfx.prepare(model, config, "
            "example_inputs=(images[:1],))"
        )
    gm, example_inputs = trace_for_quantization(model, calib_data, example_inputs)
    gm.meta["vmfx_config"] = cfg.to_dict()
    passes = split_stages(method_passes(cfg))[0]
    return Pipeline(passes)(gm, config=cfg, example_inputs=example_inputs)


def calibrate(gm: fx.GraphModule, calib_data: Any, *, progress: bool = False) -> fx.GraphModule:
    """Stage 2: run the method's data passes (observer statistics and, for learning methods,
    everything up to the last pass that reads data) on ``calib_data``."""
    _require_prepared(gm, "calibrate")
    _refuse_named_data(calib_data, "calibrate")
    cfg = QuantConfig.from_dict(gm.meta.get("vmfx_config") or {})
    return Pipeline(_stage(gm, 1))(gm, calib_data, config=cfg, progress=progress)


def convert(gm: fx.GraphModule) -> fx.GraphModule:
    """Stage 3: the method's remaining passes (observers become quantization parameters)."""
    _require_prepared(gm, "convert")
    cfg = QuantConfig.from_dict(gm.meta.get("vmfx_config") or {})
    return Pipeline(_stage(gm, 2))(gm, config=cfg)


def _refuse_quantized_model(model: Any, stage: str) -> None:
    """``compile`` / ``prepare`` take a float model: one that already holds vmfx quantizers (a
    compiled, prepared or lowered model) would be quantized twice, or edited in place."""
    from .lowering.runtime import LoweredPartition
    from .quant.modules import FakeQuantize, Smooth
    from .quant.observers import Observer

    if not isinstance(model, nn.Module):
        return
    found = next((name for name, m in model.named_modules()
                  if isinstance(m, (FakeQuantize, Smooth, Observer, LoweredPartition))), None)
    if found is not None:
        raise ConfigError(
            f"vmfx.{stage} takes the float model, but this one already holds vmfx quantization modules "
            f"(e.g. {found!r}): it was prepared, compiled or lowered before; quantize the original float "
            "model with the new config (or continue a prepared graph with vmfx.calibrate / vmfx.convert)"
        )


def _refuse_named_data(calib_data: Any, stage: str) -> None:
    """The staged API takes images only: synthetic images come from the float model, which
    ``calibrate`` no longer has, so they are made first (and a typo'd name is refused)."""
    from .data.synthetic import is_synthetic

    if is_synthetic(calib_data):
        raise CalibrationDataError(
            f"vmfx.{stage} takes calibration images, not 'synthetic': synthesize them from the float model "
            "first (images = vmfx.data.synthesize(model, 128, seed=0)) and pass them to vmfx.prepare / "
            "vmfx.calibrate, or let vmfx.compile(model, 'synthetic', config) do both"
        )
    if isinstance(calib_data, str):
        from .data.synthetic import resolve_calibration_data

        resolve_calibration_data(None, calib_data)  # raises, naming the one known name
