"""``CalibratePass``: run calibration images through the graph so its observers collect statistics.

Also home of the calibration-data checks every entry point uses (:func:`iter_calibration_batches`):
the data may be one tensor ``(N, C, H, W)`` (split into batches) or any iterable of batches —
tensors, ``(images, labels)`` pairs (a ``DataLoader``), or dicts with an ``"image"`` key. Empty
data, a batch of the wrong rank or channel count, a non-float batch and NaN/Inf values are
:class:`~vmfx.errors.CalibrationDataError`\\ s that name the batch and the way out.

Invariants: the graph is not modified (``modified`` is False); the graph runs in eval mode
without gradients; observers keep reductions only, so memory does not grow with the data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.fx as fx

from ..errors import CalibrationDataError
from ..quant.observers import Observer
from .base import Pass, PassContext, PassResult
from .patterns import module_of, walk_back

__all__ = ["CalibratePass", "InputExpectation", "input_expectation", "iter_calibration_batches", "first_example"]


@dataclass(frozen=True)
class InputExpectation:
    """What the model's image input must look like (``None``: not known)."""

    rank: int | None = None
    channels: int | None = None
    source: str = "model"

    def describe(self) -> str:
        parts = []
        if self.rank is not None:
            parts.append(f"rank {self.rank}")
        if self.channels is not None:
            parts.append(f"{self.channels} channels")
        return ", ".join(parts) or "anything"


def input_expectation(gm: fx.GraphModule) -> InputExpectation:
    """Read the expected input rank / channels from the patch-embedding conv reading the input,
    else from the first placeholder's propagated shape."""
    for node in gm.graph.nodes:
        m = module_of(node)
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)) and node.args and _reads_input(node.args[0]):
            rank = 4 if isinstance(m, torch.nn.Conv2d) else 5
            return InputExpectation(rank, m.in_channels, f"the patch embedding '{node.target}'")
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            meta = node.meta.get("tensor_meta")
            if meta is not None and hasattr(meta, "shape"):
                return InputExpectation(len(meta.shape), None, "the traced example input")
            break
    return InputExpectation()


def _reads_input(node) -> bool:
    source, _ = walk_back(node)
    return source is not None and source.op == "placeholder"


def _extract_tensor(batch: Any, index: int) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("image", "images", "pixel_values", "input"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    raise CalibrationDataError(
        f"calibration batch {index} is a {type(batch).__name__}; expected a tensor of images, an "
        "(images, labels) pair or a dict with an 'image' tensor"
    )


def _check_batch(x: torch.Tensor, index: int, expect: InputExpectation) -> None:
    if x.numel() == 0 or x.shape[0] == 0:
        raise CalibrationDataError(f"calibration batch {index} is empty (shape {tuple(x.shape)})")
    if not torch.is_floating_point(x):
        raise CalibrationDataError(
            f"calibration batch {index} has dtype {x.dtype}; convert images to float and normalize them "
            "as for evaluation (e.g. vmfx.data transforms)"
        )
    if expect.rank is not None and x.dim() != expect.rank:
        hint = " (a single image? add the batch dimension with x.unsqueeze(0))" if x.dim() == expect.rank - 1 else ""
        raise CalibrationDataError(
            f"calibration batch {index} has shape {tuple(x.shape)} (rank {x.dim()}), but {expect.source} "
            f"expects rank-{expect.rank} input (N, C, H, W){hint}"
        )
    if expect.channels is not None and x.shape[1] != expect.channels:
        raise CalibrationDataError(
            f"calibration batch {index} has {x.shape[1]} channels (shape {tuple(x.shape)}), but "
            f"{expect.source} expects {expect.channels}"
        )
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(x.numel() - finite.sum()) - n_nan
        raise CalibrationDataError(
            f"calibration batch {index} holds {n_nan} NaN and {n_inf} Inf values; clean or drop those "
            "images before calibrating"
        )


def iter_calibration_batches(
    data: Any, batch_size: int = 32, expect: InputExpectation = InputExpectation()
) -> Iterator[torch.Tensor]:
    """Yield validated calibration batches.

    Args:
        data: a tensor ``(N, ...)`` or an iterable of batches (see the module docstring).
        batch_size: split size when ``data`` is one tensor.
        expect: the input the model expects (from :func:`input_expectation`).

    Raises:
        CalibrationDataError: no data, or a batch that cannot be used (the message names it).
    """
    if data is None:
        raise CalibrationDataError(
            "calibration data is required: pass a tensor of images (N, C, H, W) or a DataLoader"
        )
    if isinstance(data, torch.Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise CalibrationDataError(f"calibration data is empty (a tensor of shape {tuple(data.shape)})")
        batches = data.split(batch_size)
    else:
        try:
            batches = iter(data)
        except TypeError:
            raise CalibrationDataError(
                f"calibration data must be a tensor or an iterable of batches, got {type(data).__name__}"
            ) from None
    count = 0
    for index, batch in enumerate(batches):
        x = _extract_tensor(batch, index)
        _check_batch(x, index, expect)
        count += 1
        yield x
    if count == 0:
        raise CalibrationDataError("calibration data is empty: the iterable yielded no batch")


def first_example(data: Any, expect: InputExpectation = InputExpectation()) -> torch.Tensor:
    """One validated image (with its batch dimension) from the calibration data."""
    for batch in iter_calibration_batches(data, 1, expect):
        return batch[:1]
    raise CalibrationDataError("calibration data is empty")


class CalibratePass(Pass):
    """Run ``ctx.calib_data`` through the graph (eval mode, no grad) to feed its observers.

    The data is run once per observer phase (``max(observer.num_phases)``: two for grid-search
    observers). Records ``gm.meta["vmfx_calibration"] = {"images", "batches", "seconds"}``
    (seconds accumulate over every calibration pass of a pipeline).
    """

    needs_data = True
    requires_facts = ("observers_inserted",)
    ensures_facts = ("observers_calibrated",)

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if not any(isinstance(m, Observer) for m in gm.modules()):
            raise self.fail("the graph has no observers to calibrate; run InsertObserversPass first")
        if ctx.calib_data is None:
            raise CalibrationDataError(
                "calibration data is required: pass a tensor of images (N, C, H, W) or a DataLoader "
                "as calib_data to vmfx.compile / vmfx.calibrate / the Pipeline"
            )

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        expect = input_expectation(gm)
        observers = [m for m in gm.modules() if isinstance(m, Observer)]
        phases = max(o.num_phases for o in observers)
        if phases > 1 and _is_one_shot(ctx.calib_data):
            raise CalibrationDataError(
                f"calibration needs {phases} passes over the data (grid-search observers); pass a tensor, "
                "a list of batches or a DataLoader, not a one-shot iterator"
            )
        was_training = gm.training
        gm.eval()
        images = batches = 0
        start = time.perf_counter()
        with torch.no_grad():
            for phase in range(phases):
                for obs in observers:
                    obs.phase = phase
                data = iter_calibration_batches(ctx.calib_data, ctx.calib_batch_size, expect)
                if ctx.progress:
                    from tqdm.auto import tqdm

                    data = tqdm(data, desc=f"calibrate ({phase + 1}/{phases})", unit="batch")
                for x in data:
                    gm(x)
                    if phase == 0:
                        images += x.shape[0]
                        batches += 1
        for obs in observers:
            obs.phase = 0
        gm.train(was_training)
        previous = gm.meta.get("vmfx_calibration") or {}
        gm.meta["vmfx_calibration"] = {
            "images": images,
            "batches": batches,
            "seconds": previous.get("seconds", 0.0) + time.perf_counter() - start,
        }
        return PassResult(gm, False)


def _is_one_shot(data: Any) -> bool:
    try:
        return iter(data) is data
    except TypeError:
        return False
