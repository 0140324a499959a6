"""Training-style augmentations for calibration images, seeded (OuroMamba's calibration set).

The official OuroMamba quantization run reads its calibration batch from the *training* loader, so
the images pass through DeiT's training transform (ICCV-OuroMamba@562d7e3,
quant/vim/quantize/tools/datasets.py:80-99 with the defaults of quant/vim/quantize/quant.py:72-94):
timm's ``create_transform(is_training=True, color_jitter=0.3, auto_augment="rand-m9-mstd0.5-inc1",
interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1)``, i.e. random resized crop
(scale 0.08..1, ratio 3/4..4/3), horizontal flip (p 0.5), RandAugment at magnitude 9, normalisation,
random erasing (p 0.25, per-pixel normal noise). timm applies the colour jitter only without
auto-augment, so with RandAugment on it is not applied; :class:`CalibrationAugmentation` keeps it
as an option (0 by default).

:func:`augment_calibration_images` re-implements that pipeline with torchvision's transforms on
image tensors of any channel count (the proxy's 1-channel digits included), from a seed, without
touching the global random state. Differences from timm, on purpose or of the library:

* RandAugment is torchvision's (``num_ops=2``, ``magnitude=9`` of 31 bins, every op applied),
  not timm's ``rand-m9-mstd0.5-inc1`` (magnitude drawn around 9 with sd 0.5, its "increasing" op
  set, each op applied with probability 0.5);
* the images are already normalised tensors: they are mapped to ``uint8`` over the batch's value
  range for the photometric ops and back (a rounding of 1/255 of that range), and the erased
  patches get standard-normal values in the normalised space, as timm's ``mode="pixel"`` does.

Invariants: the output has the input's shape, dtype and device; the same ``(images, seed)`` gives
the same output; the global torch random state is left as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import CalibrationDataError, ConfigError

__all__ = ["CalibrationAugmentation", "augment_calibration_images"]


@dataclass(frozen=True)
class CalibrationAugmentation:
    """The training augmentations applied to calibration images (defaults: the official
    OuroMamba / DeiT ones, see the module docstring).

    Args:
        crop_scale: the area range of the random resized crop (0.08, 1.0).
        crop_ratio: its aspect-ratio range (3/4, 4/3).
        hflip: probability of a horizontal flip (0.5).
        randaugment_ops: RandAugment's operations per image (2).
        randaugment_magnitude: RandAugment's magnitude, 0..30 (9).
        color_jitter: brightness / contrast / saturation jitter factor (0: off; the official
            0.3 is not applied by timm when RandAugment is on).
        erase_prob: probability of one random-erasing patch per image (0.25).
    """

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    color_jitter: float = 0.0
    erase_prob: float = 0.25

    def __post_init__(self):
        for name in ("crop_scale", "crop_ratio"):
            lo, hi = getattr(self, name)
            if not (0 < lo <= hi) or not math.isfinite(hi):
                raise ConfigError(f"CalibrationAugmentation.{name} must be a range 0 < lo <= hi, got {(lo, hi)!r}")
        if self.crop_scale[1] > 1:
            raise ConfigError(f"CalibrationAugmentation.crop_scale is a fraction of the image area (at most 1), "
                              f"got {self.crop_scale!r}")
        for name in ("hflip", "erase_prob"):
            p = getattr(self, name)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
                raise ConfigError(f"CalibrationAugmentation.{name} must be a probability in [0, 1], got {p!r}")
        if isinstance(self.randaugment_ops, bool) or not isinstance(self.randaugment_ops, int) or self.randaugment_ops < 0:
            raise ConfigError(f"CalibrationAugmentation.randaugment_ops must be a non-negative integer, "
                              f"got {self.randaugment_ops!r}")
        m = self.randaugment_magnitude
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= 30:
            raise ConfigError(f"CalibrationAugmentation.randaugment_magnitude must be an integer 0..30, got {m!r}")
        if isinstance(self.color_jitter, bool) or not isinstance(self.color_jitter, (int, float)) or self.color_jitter < 0:
            raise ConfigError(f"CalibrationAugmentation.color_jitter must be a non-negative factor, "
                              f"got {self.color_jitter!r}")


def _photometric(augment: CalibrationAugmentation, size: tuple[int, int]):
    """The per-image torchvision pipeline on ``uint8`` images: crop, flip, RandAugment, jitter."""
    from torchvision.transforms import InterpolationMode, v2

    steps = [v2.RandomResizedCrop(size, scale=augment.crop_scale, ratio=augment.crop_ratio,
                                  interpolation=InterpolationMode.BICUBIC, antialias=True)]
    if augment.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(augment.hflip))
    if augment.randaugment_ops > 0:
        steps.append(v2.RandAugment(num_ops=augment.randaugment_ops, magnitude=augment.randaugment_magnitude))
    if augment.color_jitter > 0:
        f = augment.color_jitter
        steps.append(v2.ColorJitter(brightness=f, contrast=f, saturation=f))
    return v2.Compose(steps)


def augment_calibration_images(images: torch.Tensor, seed: int,
                               augment: CalibrationAugmentation = CalibrationAugmentation()) -> torch.Tensor:
    """``images`` (N, C, H, W), normalised floats, each through the training augmentations of
    ``augment`` with random draws from ``seed`` (see the module docstring).

    Raises:
        CalibrationDataError: ``images`` is not a 4-D floating-point tensor, or holds NaN / Inf.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise CalibrationDataError(
            f"augment_calibration_images takes a float image batch (N, C, H, W), got "
            f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}"
        )
    if not bool(torch.isfinite(images).all()):
        raise CalibrationDataError("the calibration images hold NaN or Inf values; fix them before augmenting")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"the augmentation seed must be an integer, got {seed!r}")
    x = images.detach().float().cpu()
    lo, hi = float(x.min()), float(x.max())
    span = hi - lo if hi > lo else 1.0
    codes = torch.round((x - lo) / span * 255).to(torch.uint8)
    pipeline = _photometric(augment, tuple(x.shape[-2:]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = torch.stack([pipeline(img) for img in codes]).float() / 255 * span + lo
        if augment.erase_prob > 0:
            out = torch.stack([_erase(img, augment.erase_prob) for img in out])
    return out.to(dtype=images.dtype, device=images.device)


def _erase(img: torch.Tensor, prob: float, area: tuple[float, float] = (0.02, 1 / 3),
           log_ratio: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3)), attempts: int = 10) -> torch.Tensor:
    """timm's ``RandomErasing(mode="pixel", max_count=1)`` on one normalised image: with
    probability ``prob`` a rectangle of ``area`` of the image and aspect ratio in ``exp(log_ratio)``
    gets standard-normal values per pixel and channel (up to ``attempts`` draws to fit it)."""
    if float(torch.rand(())) >= prob:
        return img
    c, h, w = img.shape
    for _ in range(attempts):
        target = float(torch.empty(()).uniform_(*area)) * h * w
        ratio = math.exp(float(torch.empty(()).uniform_(*log_ratio)))
        eh, ew = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < eh < h and 0 < ew < w:
            top = int(torch.randint(0, h - eh + 1, ()))
            left = int(torch.randint(0, w - ew + 1, ()))
            img = img.clone()
            img[:, top:top + eh, left:left + ew] = torch.randn(c, eh, ew)
            return img
    return img
