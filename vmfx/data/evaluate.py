"""Top-1 / top-5 evaluation with a progress bar, and comparison of a model's outputs with a reference's.

:func:`evaluate` gives accuracy. :func:`collect_logits` runs a model once over a labelled set and
keeps its logits; :func:`compare_logits` then compares them with a reference model's logits on the
same images (top-1 agreement, KL divergence) without running either model again, so one forward of
the float model serves every quantized model compared with it."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import distributed
from ..errors import CalibrationDataError

__all__ = ["EvalResult", "evaluate", "predictions", "collect_logits", "AgreementResult", "compare_logits"]


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


def _progress(batches: Iterable, data: Any, batch_size: int, progress: bool, desc: str) -> Iterable:
    """``batches`` behind a tqdm progress bar (with a total where :func:`_batch_total` knows it)."""
    if not progress:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, total=_batch_total(data, batch_size), desc=desc, unit="batch")


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

    Across processes (:mod:`vmfx.distributed`: every process passes the whole data) each runs its
    share of the batches and the correct counts are summed: every process returns the figures of
    one process over the whole data (``seconds`` is this process's own wall time).
    """
    model.eval()
    correct1 = correct5 = seen = 0
    start = time.perf_counter()
    ctx = distributed.current()
    if ctx.active:  # this process's batches; the counts of every process are summed below
        data = distributed.shard(data, batch_size, ctx, pairs=True, num_workers=num_workers)
    for images, labels in _progress(_batches(data, batch_size, num_workers), data, batch_size, progress, desc):
        logits = model(images)
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hit = top == labels.view(-1, 1)
        correct1 += int(hit[:, 0].sum())
        correct5 += int(hit.any(dim=1).sum())
        seen += labels.shape[0]
    if ctx.active:  # integers: the sums are exact, so the figures are one process's
        correct1, correct5, seen = distributed.all_reduce_sum([correct1, correct5, seen], ctx)
    if seen == 0:
        raise CalibrationDataError("evaluation data is empty")
    return EvalResult(100.0 * correct1 / seen, 100.0 * correct5 / seen, seen, time.perf_counter() - start)


@torch.no_grad()
def predictions(model: nn.Module, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """Arg-max class of every image (used to compare two backends prediction by prediction)."""
    model.eval()
    return torch.cat([model(images[i : i + batch_size]).argmax(-1) for i in range(0, images.shape[0], batch_size)])


@torch.no_grad()
def collect_logits(
    model: nn.Module, data: Any, *, batch_size: int = 100, num_workers: int = 0, progress: bool = False,
    desc: str = "eval",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass of ``model`` over ``data``: ``(logits, labels)``, float32 on the CPU, in the
    order of ``data`` (``data`` as for :func:`evaluate`; ``progress`` and ``desc`` as there). The
    logits of N images over C classes take 4 N C bytes (200 MB for ImageNet's 50000 x 1000).

    Across processes (:mod:`vmfx.distributed`) each runs its batches and every process returns the
    logits and labels of the whole data, in its order: the same tensors as one process."""
    model.eval()
    ctx = distributed.current()
    if ctx.active:
        data = distributed.shard(data, batch_size, ctx, pairs=True, num_workers=num_workers)
    outs, labels = [], []
    for images, y in _progress(_batches(data, batch_size, num_workers), data, batch_size, progress, desc):
        outs.append(model(images).detach().float().cpu())
        labels.append(torch.as_tensor(y).cpu())
    if ctx.active:
        outs, labels = distributed.gather_batches(outs, ctx), distributed.gather_batches(labels, ctx)
    if not outs:
        raise CalibrationDataError("evaluation data is empty")
    return torch.cat(outs), torch.cat(labels)


def _top1(logits: torch.Tensor) -> torch.Tensor:
    # the same rule as evaluate(): first index of topk, so ties break the same way
    return logits.topk(1, dim=-1).indices[:, 0]


@dataclass(frozen=True)
class AgreementResult:
    """A model's outputs on a labelled set compared with the labels and with a reference model's.

    Percentages are over ``images``. Per-image fields are 1-D tensors of length ``images`` in the
    order of the data.

    Attributes:
        top1, top5: accuracy (percent), computed as :func:`evaluate` does.
        agree: percent of images whose top-1 class equals the reference's top-1 class.
        kl: mean over images of ``KL(p_ref || p)``, the softmaxes of the reference's and this
            model's logits (nats; computed in float64, each image's value clamped at 0).
        correct: per image, top-1 equals the label (bool).
        agrees: per image, top-1 equals the reference's top-1 (bool).
        kl_per_image: per image KL (float64).
    """

    top1: float
    top5: float
    agree: float
    kl: float
    images: int
    correct: torch.Tensor
    agrees: torch.Tensor
    kl_per_image: torch.Tensor

    def __str__(self) -> str:
        return (f"top-1 {self.top1:.2f}%  top-5 {self.top5:.2f}%  agree {self.agree:.2f}%  "
                f"KL {self.kl:.3g}  ({self.images} images)")


def compare_logits(reference_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> AgreementResult:
    """Compare ``logits`` (N, classes) with ``reference_logits`` (same shape, same images) and with
    ``labels`` (N,). Runs no model: pass the outputs of :func:`collect_logits`.

    Invariants: comparing a model with itself gives ``agree == 100`` and ``kl == 0``; ``top1`` and
    ``top5`` equal :func:`evaluate`'s on the same outputs.
    """
    if reference_logits.shape != logits.shape or logits.dim() != 2:
        raise CalibrationDataError(
            f"logits of shape {tuple(logits.shape)} cannot be compared with reference logits of shape "
            f"{tuple(reference_logits.shape)}: both must be (images, classes) over the same images"
        )
    if labels.shape != (logits.shape[0],):
        raise CalibrationDataError(f"{logits.shape[0]} logits but labels of shape {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise CalibrationDataError("evaluation data is empty")
    n = logits.shape[0]
    k = min(5, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    hit = top == labels.view(-1, 1)
    correct = hit[:, 0]
    agrees = _top1(logits) == _top1(reference_logits)
    log_p = torch.log_softmax(reference_logits.double(), dim=-1)
    log_q = torch.log_softmax(logits.double(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)
    return AgreementResult(
        top1=100.0 * int(correct.sum()) / n,
        top5=100.0 * int(hit.any(dim=1).sum()) / n,
        agree=100.0 * int(agrees.sum()) / n,
        kl=float(kl.mean()),
        images=n,
        correct=correct,
        agrees=agrees,
        kl_per_image=kl,
    )
