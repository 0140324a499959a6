"""``CalibratePass``: run calibration images through the graph so its observers collect statistics.

Also home of the calibration-data checks every entry point uses (:func:`iter_calibration_batches`):
the data may be one tensor ``(N, C, H, W)`` (split into batches) or any iterable of batches —
tensors, ``(images, labels)`` pairs (a ``DataLoader``), or dicts with an ``"image"`` key. Empty
data, a batch of the wrong rank or channel count, a non-float batch, a float batch of another
dtype than the model's weights (float64 images for a float32 model: refused, not converted, so
nothing changes the user's numbers behind their back) and NaN/Inf values are
:class:`~vmfx.errors.CalibrationDataError`\\ s that name the batch and the way out.

Images far outside what a normalized image looks like get a
:class:`~vmfx.errors.CalibrationDataWarning` (see :data:`NORMALIZED_ABS_LIMIT`): the
quantization ranges would fit those images, not the ones the model is evaluated on.

Invariants: the graph is not modified (``modified`` is False); the graph runs in eval mode
without gradients; observers keep reductions only, so memory does not grow with the data.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.fx as fx

from .. import distributed
from ..errors import CalibrationDataError, CalibrationDataWarning, InputError
from ..quant.observers import Observer
from .base import Pass, PassContext, PassResult
from .patterns import module_of, walk_back

__all__ = [
    "CalibratePass",
    "InputExpectation",
    "input_expectation",
    "iter_calibration_batches",
    "owned_calibration_batches",
    "first_example",
    "check_example_batch",
    "NORMALIZED_ABS_LIMIT",
    "NORMALIZED_RMS_FLOOR",
]

#: Largest |x| a normalized image plausibly holds. A normalized pixel is ``(p - mean) / std`` with
#: ``p`` in [0, 1], so ``|x| <= 1 / std``; 100 admits a per-channel std down to 0.01, far below
#: any real image set's (ImageNet's are 0.22-0.23; vmfx.data's transforms give |x| <= 2.8).
#: Raw 0-255 pixels (max 255) and images scaled up by mistake exceed it.
NORMALIZED_ABS_LIMIT = 100.0
#: Smallest root-mean-square a normalized image set plausibly has: normalization makes each
#: channel's variance over the data set 1, so the RMS over all values is about 1; below 0.01 the
#: images were scaled down by mistake (or are constant). Images in [0, 1] that were never
#: normalized pass both bounds: they cannot be told from a model trained on such inputs.
NORMALIZED_RMS_FLOOR = 1e-2


@dataclass(frozen=True)
class InputExpectation:
    """What the model's image input must look like (``None``: not known)."""

    rank: int | None = None
    channels: int | None = None
    source: str = "model"
    dtype: torch.dtype | None = None

    def describe(self) -> str:
        parts = []
        if self.rank is not None:
            parts.append(f"rank {self.rank}")
        if self.channels is not None:
            parts.append(f"{self.channels} channels")
        return ", ".join(parts) or "anything"


def input_expectation(gm: fx.GraphModule) -> InputExpectation:
    """Read the expected input rank / channels / dtype from the patch-embedding conv reading the
    input, else the rank from the first placeholder's propagated shape and the dtype from the
    first floating-point parameter."""
    for node in gm.graph.nodes:
        m = module_of(node)
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)) and node.args and _reads_input(node.args[0]):
            rank = 4 if isinstance(m, torch.nn.Conv2d) else 5
            return InputExpectation(rank, m.in_channels, f"the patch embedding '{node.target}'", m.weight.dtype)
    dtype = next((p.dtype for p in gm.parameters() if p.is_floating_point()), None)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            meta = node.meta.get("tensor_meta")
            if meta is not None and hasattr(meta, "shape"):
                return InputExpectation(len(meta.shape), None, "the traced example input", dtype)
            break
    return InputExpectation(dtype=dtype)


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


def _check_batch(x: torch.Tensor, index: int, expect: InputExpectation, label: str | None = None) -> None:
    """Refuse a batch the model cannot take, naming it (``label``, default ``calibration batch <index>``)."""
    label = label or f"calibration batch {index}"
    if x.numel() == 0 or x.shape[0] == 0:
        raise CalibrationDataError(f"{label} is empty (shape {tuple(x.shape)})")
    if not torch.is_floating_point(x):
        raise CalibrationDataError(
            f"{label} has dtype {x.dtype}; convert images to float and normalize them "
            "as for evaluation (e.g. vmfx.data transforms)"
        )
    if expect.dtype is not None and x.dtype != expect.dtype:
        want, got = _dtype_name(expect.dtype), _dtype_name(x.dtype)
        raise CalibrationDataError(
            f"{label}: expected {want} images, got {got} (the model's weights are {want}); "
            f"convert them with images.to(torch.{want})"
        )
    if expect.rank is not None and x.dim() != expect.rank:
        hint = " (a single image? add the batch dimension with x.unsqueeze(0))" if x.dim() == expect.rank - 1 else ""
        raise CalibrationDataError(
            f"{label} has shape {tuple(x.shape)} (rank {x.dim()}), but {expect.source} "
            f"expects rank-{expect.rank} input (N, C, H, W){hint}"
        )
    if expect.channels is not None and x.shape[1] != expect.channels:
        raise CalibrationDataError(
            f"{label} has {x.shape[1]} channels (shape {tuple(x.shape)}), but "
            f"{expect.source} expects {expect.channels}"
        )
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(x.numel() - finite.sum()) - n_nan
        raise CalibrationDataError(
            f"{label} holds {n_nan} NaN and {n_inf} Inf values; clean or drop those "
            "images before calibrating"
        )


def check_example_batch(x: torch.Tensor, expect: InputExpectation, what: str = "example_inputs") -> None:
    """The checks of a calibration batch (rank, channels, dtype, finite values) for an example
    input, the message naming ``what`` (e.g. ``"example_inputs"``) instead of a batch. Raises
    :class:`~vmfx.errors.InputError`."""
    try:
        _check_batch(x, 0, expect, what)
    except CalibrationDataError as exc:
        raise InputError(str(exc)) from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _ScaleCheck:
    """Running max |x| and sum of squares of the calibration values (float64: no overflow)."""

    def __init__(self) -> None:
        self.abs_max = 0.0
        self.sum_sq = 0.0
        self.count = 0
        self.images = 0
        self.constant: list[int] = []  # indices (over all batches) of images with one value everywhere

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        self.abs_max = max(self.abs_max, float(x.abs().max()))
        self.sum_sq += float((x * x).sum())
        self.count += x.numel()
        flat = x.reshape(x.shape[0], -1)
        constant = (flat.amax(dim=1) == flat.amin(dim=1)).nonzero().flatten()
        self.constant += [self.images + int(i) for i in constant]
        self.images += x.shape[0]

    def warn_if_far_from_normalized(self) -> None:
        if self.count == 0:
            return
        if self.constant:  # zero variance within an image: no range of a real image to fit
            first = ", ".join(map(str, self.constant[:5])) + (" ..." if len(self.constant) > 5 else "")
            every = "all" if len(self.constant) == self.images else f"{len(self.constant)} of"
            warnings.warn(
                f"{every} {self.images} calibration images are constant (one value in every pixel and channel, "
                f"e.g. torch.ones / torch.zeros; images {first}): the quantization ranges would fit that value, "
                "not real images. Calibrate on real (or synthetic: calib_data='synthetic') images",
                CalibrationDataWarning,
                stacklevel=3,
            )
            if len(self.constant) == self.images:
                return  # the scale check below would only restate it
        rms = math.sqrt(self.sum_sq / self.count)
        if self.abs_max > NORMALIZED_ABS_LIMIT:
            found = f"max |x| = {self.abs_max:.4g}, above the {NORMALIZED_ABS_LIMIT:g} a normalized image stays within"
            if self.abs_max <= 255.0 and rms > 1.0:
                found += " (raw 0-255 pixels?)"
        elif rms < NORMALIZED_RMS_FLOOR:
            found = f"their root-mean-square is {rms:.3g}, where normalized images have about 1"
        else:
            return
        warnings.warn(
            f"the calibration images do not look normalized: {found}. Normalize them as the evaluation "
            "transform does (e.g. vmfx.data.vim_eval_transform); calibrating on them fits the quantization "
            "ranges to other values than the model sees at evaluation",
            CalibrationDataWarning,
            stacklevel=3,
        )


def iter_calibration_batches(
    data: Any, batch_size: int = 32, expect: InputExpectation = InputExpectation(), *, check_scale: bool = True,
    allow_empty: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield validated calibration batches.

    Args:
        data: a tensor ``(N, ...)`` or an iterable of batches (see the module docstring).
        batch_size: split size when ``data`` is one tensor.
        expect: the input the model expects (from :func:`input_expectation`).
        check_scale: once every batch was yielded, warn (:class:`~vmfx.errors.CalibrationDataWarning`)
            if the values are far from normalized images: max |x| above
            :data:`NORMALIZED_ABS_LIMIT` or root-mean-square below :data:`NORMALIZED_RMS_FLOOR`.
        allow_empty: yield nothing for data without batches instead of raising (one process's
            share of the data across processes, checked over all of them by the caller).

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
    scale = _ScaleCheck() if check_scale else None
    for index, batch in enumerate(batches):
        x = _extract_tensor(batch, index)
        _check_batch(x, index, expect)
        if scale is not None:
            scale.update(x)
        count += 1
        yield x
    if count == 0 and not allow_empty:
        raise CalibrationDataError("calibration data is empty: the iterable yielded no batch")
    if scale is not None:
        scale.warn_if_far_from_normalized()


def owned_calibration_batches(
    ctx: PassContext, expect: InputExpectation, dist_ctx: distributed.Context, *, check_scale: bool = True
) -> Iterator[torch.Tensor]:
    """This process's validated calibration batches of ``ctx.calib_data``: all of them, or under
    :mod:`vmfx.distributed` its shard (possibly empty; the caller combines the processes' results)."""
    source = distributed.shard(ctx.calib_data, ctx.calib_batch_size, dist_ctx) if dist_ctx.active else ctx.calib_data
    return iter_calibration_batches(source, ctx.calib_batch_size, expect, check_scale=check_scale,
                                    allow_empty=dist_ctx.active)


def first_example(data: Any, expect: InputExpectation = InputExpectation()) -> torch.Tensor:
    """One validated image (with its batch dimension) from the calibration data."""
    for batch in iter_calibration_batches(data, 1, expect, check_scale=False):
        return batch[:1]
    raise CalibrationDataError("calibration data is empty")


class CalibratePass(Pass):
    """Run ``ctx.calib_data`` through the graph (eval mode, no grad) to feed its observers.

    The data is run once per observer phase (``max(observer.num_phases)``: two for grid-search
    observers). Records ``gm.meta["vmfx_calibration"] = {"images", "batches", "seconds"}``:
    ``images`` and ``batches`` count the data the observers' statistics cover, so calibrating an
    already calibrated graph again adds to them (8 + 8 images: 16), while a pass whose observers
    are fresh (e.g. re-armed by SmoothQuant) starts them anew; ``seconds`` accumulate over every
    calibration pass. With ``ctx.progress`` a line announces the calibration (method, bits,
    images) and a bar per phase shows batches done of the total, with its ETA.

    Across processes (:mod:`vmfx.distributed`) each process runs its share of the batches
    (:func:`vmfx.distributed.shard`) and after every phase each observer combines the statistics
    of all processes (``Observer.synchronize``), so the next phase and the conversion see those of
    the whole data; the counts recorded are those of the whole data. A process given no batch is a
    :class:`~vmfx.errors.CalibrationDataError` in every process.
    """

    needs_data = True
    requires_facts = ("observers_inserted",)
    ensures_facts = ("observers_calibrated", "smoothing_statistics")

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
        resumed = all(o.num_batches > 0 for o in observers)  # statistics continue: counts add up
        phases = max(o.num_phases for o in observers)
        if phases > 1 and _is_one_shot(ctx.calib_data):
            raise CalibrationDataError(
                f"calibration needs {phases} passes over the data (grid-search observers); pass a tensor, "
                "a list of batches or a DataLoader, not a one-shot iterator"
            )
        total, size = _batch_count(ctx.calib_data, ctx.calib_batch_size)
        name = _method_name(ctx.config)
        if ctx.progress:
            from tqdm.auto import tqdm

            what = "" if total is None else f": {total} batch{'' if total == 1 else 'es'}"
            what += "" if total is None or size is None else f", {size} images"
            passes = "" if phases == 1 else f", {phases} passes over the data (grid search)"
            tqdm.write(f"calibrating{' ' + name if name else ''}{what}{passes}", file=sys.stderr)
        dist_ctx = distributed.current()
        if dist_ctx.active:  # this process's batches (vmfx.distributed); statistics are combined below
            total = None if total is None else distributed.owned_count(total, dist_ctx)
            counts_before = [o.num_batches for o in observers]
        was_training = gm.training
        gm.eval()
        images = batches = 0
        start = time.perf_counter()
        with torch.no_grad():
            for phase in range(phases):
                for obs in observers:
                    obs.phase = phase
                data = owned_calibration_batches(ctx, expect, dist_ctx, check_scale=phase == 0)
                if ctx.progress:
                    from tqdm.auto import tqdm

                    label = "calibrate" + (f" {name}" if name else "") + (f" ({phase + 1}/{phases})" if phases > 1 else "")
                    data = tqdm(data, desc=label, total=total, unit="batch")
                for index, x in enumerate(data):
                    if dist_ctx.active:
                        for obs in observers:
                            obs.batch_index = index
                    gm(x)
                    if phase == 0:
                        images += x.shape[0]
                        batches += 1
                if dist_ctx.active:  # every observer combines its statistics with the other processes'
                    if phase == 0:
                        images, batches = _check_shares(images, batches, dist_ctx)
                    for obs in observers:
                        obs.batch_index = None
                        obs.synchronize(phase, dist_ctx)
        for obs in observers:
            obs.phase = 0
        if dist_ctx.active:  # the batch counts of one process over the whole data
            done = distributed.all_reduce_sum([o.num_batches - c for o, c in zip(observers, counts_before)], dist_ctx)
            for obs, before, seen in zip(observers, counts_before, done):
                obs.num_batches = before + seen
        gm.train(was_training)
        previous = gm.meta.get("vmfx_calibration") or {}
        if resumed:
            images += previous.get("images", 0)
            batches += previous.get("batches", 0)
        gm.meta["vmfx_calibration"] = {
            "images": images,
            "batches": batches,
            "seconds": previous.get("seconds", 0.0) + time.perf_counter() - start,
        }
        return PassResult(gm, False)


def _check_shares(images: int, batches: int, ctx) -> tuple[int, int]:
    """The images and batches of every process together; a CalibrationDataError in every process
    (never a hang) when one of them was given no batch."""
    per_rank = distributed.all_gather(torch.tensor([batches], dtype=torch.int64), ctx)
    idle = [r for r, n in enumerate(per_rank) if int(n[0]) == 0]
    total = sum(int(n[0]) for n in per_rank)
    if total == 0:
        raise CalibrationDataError("calibration data is empty: it yielded no batch")
    if idle:
        raise CalibrationDataError(
            f"the calibration data holds {total} batch{'' if total == 1 else 'es'}, fewer than the "
            f"{ctx.world_size} processes (rank {idle[0]} got none): every process needs a batch; use at "
            f"most {total} process{'' if total == 1 else 'es'}, more calibration images or smaller "
            "calibration batches (QuantConfig.calib_batch_size for a tensor of images, the DataLoader's "
            "batch_size, vmfx --batch-size with --calib-dir)"
        )
    images, batches = distributed.all_reduce_sum([images, batches], ctx)
    return images, batches


def _method_name(config: Any) -> str:
    """``"minmax w8a8"`` from a QuantConfig (empty when the run has none)."""
    if config is None:
        return ""
    method = getattr(config, "method", "")
    try:
        return f"{method} w{config.weight.bits}a{config.activation.bits}"
    except AttributeError:
        return str(method)


def _batch_count(data: Any, batch_size: int) -> tuple[int | None, int | None]:
    """(batches, images) the calibration data will yield, where known without iterating it."""
    if isinstance(data, torch.Tensor):
        n = data.shape[0] if data.dim() else 0
        return math.ceil(n / batch_size), n
    try:
        batches = len(data)
    except TypeError:
        return None, None
    dataset = getattr(data, "dataset", None)
    try:
        images = len(dataset) if dataset is not None else None
    except TypeError:
        images = None
    return batches, images


def _is_one_shot(data: Any) -> bool:
    try:
        return iter(data) is data
    except TypeError:
        return False
