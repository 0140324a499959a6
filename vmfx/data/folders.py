"""ImageNet-layout folders: the official Vim evaluation transform and calibration subsets.

A folder in ImageNet layout holds one sub-folder per class (``train/n01440764/*.JPEG``);
``torchvision.datasets.ImageFolder`` reads it. Vim evaluates with: resize the short side to
``int(224 / 0.875) = 256`` (bicubic), center-crop 224, ``ToTensor``, ImageNet mean/std; the same
transform serves calibration (deterministic, so a calibration set is reproducible from its seed).

Images are read lazily, batch by batch; a file that cannot be read as an image (corrupt,
truncated, not an image despite its extension) is a :class:`~vmfx.errors.CalibrationDataError`
naming the file, raised when its batch is read.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import CalibrationDataError, ConfigError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "vim_eval_transform",
    "image_folder",
    "calibration_subset",
    "calibration_loader",
    "read_image",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vim_eval_transform(img_size: int = 224, crop_pct: float = 0.875, channels: int = 3, border: int = 0):
    """Resize (bicubic) to ``int(size / crop_pct)``, center-crop ``size``, pad, normalize.

    ``size = img_size - 2 * border``; ``border`` background pixels are then added on every side
    (the proxy digits' 1-pixel border). ``channels=1`` converts to grey and uses the proxy digits'
    single-channel mean/std.
    """
    from torchvision import transforms

    from .digits import DIGITS_MEAN, DIGITS_STD

    if not 0 < crop_pct <= 1:
        raise ConfigError(
            f"crop_pct must be in (0, 1], the share of the resized image the center crop keeps; got {crop_pct}"
        )
    steps = []
    if channels == 1:
        steps.append(transforms.Grayscale(1))
    elif channels == 3:
        steps.append(transforms.Lambda(lambda im: im.convert("RGB")))
    else:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    size = img_size - 2 * border
    if size < 1:
        raise ConfigError(f"img_size {img_size} leaves no image inside a border of {border} pixels")
    steps += [
        transforms.Resize(int(size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
    ]
    if border:
        steps.append(transforms.Pad(border, fill=0))
    steps.append(transforms.ToTensor())
    if channels == 3:
        steps.append(transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    else:
        steps.append(transforms.Normalize((DIGITS_MEAN,), (DIGITS_STD,)))
    return transforms.Compose(steps)


def read_image(path: str):
    """Open ``path`` as an RGB ``PIL.Image`` (what ``ImageFolder`` does), or raise a
    :class:`~vmfx.errors.CalibrationDataError` naming the file it could not read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:  # PIL raises all four
        raise CalibrationDataError(
            f"cannot read the image {path!r} ({type(exc).__name__}: {exc}); remove or replace the file"
        ) from exc


def image_folder(root: str, transform=None, img_size: int = 224, channels: int = 3, border: int = 0) -> Dataset:
    """``ImageFolder(root)`` with the Vim evaluation transform by default.

    Raises:
        CalibrationDataError: ``root`` does not exist or holds no class folder with images; when an
            item is read, a file that is not a readable image (see :func:`read_image`).
    """
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(root):
        raise CalibrationDataError(f"image folder {root!r} does not exist")
    try:
        return ImageFolder(
            root,
            transform=transform or vim_eval_transform(img_size, channels=channels, border=border),
            loader=read_image,
        )
    except (FileNotFoundError, RuntimeError) as exc:
        raise CalibrationDataError(
            f"{root!r} is not an ImageNet-layout folder (one sub-folder of images per class): {exc}"
        ) from exc


def calibration_subset(dataset: Dataset, n: int, seed: int = 0) -> Subset:
    """``n`` images drawn without replacement with a fixed seed (reproducible calibration sets)."""
    total = len(dataset)
    if n < 1:
        raise CalibrationDataError(f"the calibration set needs at least one image, asked for {n}")
    if n > total:
        raise CalibrationDataError(f"asked for {n} calibration images but the folder holds only {total}")
    index = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(dataset, index.tolist())


def calibration_loader(
    root: str, n: int = 256, seed: int = 0, batch_size: int = 32, img_size: int = 224, channels: int = 3,
    num_workers: int = 0, transform=None,
) -> DataLoader:
    """A DataLoader over ``n`` seeded images of an ImageNet-layout train folder, for calibration."""
    subset = calibration_subset(image_folder(root, transform=transform, img_size=img_size, channels=channels), n, seed)
    return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
