"""Top-1 / top-5 evaluation with a progress bar."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import CalibrationDataError

__all__ = ["EvalResult", "evaluate", "predictions"]


@dataclass(frozen=True)
class EvalResult:
    """Accuracy in percent over ``images`` images, and the wall time it took."""

    top1: float
    top5: float
    images: int
    seconds: float

    def __str__(self) -> str:
        return f"top-1 {self.top1:.2f}%  top-5 {self.top5:.2f}%  ({self.images} images, {self.seconds:.1f} s)"


def _batches(data: Any, batch_size: int, num_workers: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        images, labels = data
        if images.shape[0] != labels.shape[0]:
            raise CalibrationDataError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        for i in range(0, images.shape[0], batch_size):
            yield images[i : i + batch_size], labels[i : i + batch_size]
        return
    if isinstance(data, Dataset):
        data = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for batch in data:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise CalibrationDataError("evaluation batches must be (images, labels) pairs")
        yield batch[0], batch[1]



def _batch_total(data: Any, batch_size: int) -> int | None:
    """How many batches :func:`_batches` will yield, where known without reading the data."""
    try:
        if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
            return math.ceil(data[0].shape[0] / batch_size)
        if isinstance(data, Dataset):
            return math.ceil(len(data) / batch_size)
        return len(data)
    except TypeError:
        return None


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Any, *, batch_size: int = 100, progress: bool = False, num_workers: int = 0,
    desc: str = "eval",
) -> EvalResult:
    """Top-1 and top-5 accuracy (percent) of ``model`` on ``data``.

    Args:
        model: any module mapping images to logits (a float model or a vmfx quantized graph).
        data: ``(images, labels)`` tensors, a ``Dataset`` of pairs or a ``DataLoader``.
        batch_size: for tensors and datasets.
        progress: show a tqdm progress bar (with the number of batches and an ETA where the
            data's length is known).
    """
    model.eval()
    correct1 = correct5 = seen = 0
    start = time.perf_counter()
    batches = _batches(data, batch_size, num_workers)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=_batch_total(data, batch_size), desc=desc, unit="batch")
    for images, labels in batches:
        logits = model(images)
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hit = top == labels.view(-1, 1)
        correct1 += int(hit[:, 0].sum())
        correct5 += int(hit.any(dim=1).sum())
        seen += labels.shape[0]
    if seen == 0:
        raise CalibrationDataError("evaluation data is empty")
    return EvalResult(100.0 * correct1 / seen, 100.0 * correct5 / seen, seen, time.perf_counter() - start)


@torch.no_grad()
def predictions(model: nn.Module, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """Arg-max class of every image (used to compare two backends prediction by prediction)."""
    model.eval()
    return torch.cat([model(images[i : i + batch_size]).argmax(-1) for i in range(0, images.shape[0], batch_size)])
