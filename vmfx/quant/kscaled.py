"""k-scaled quantization (Shi et al., "Post-Training Quantization for Vision Mamba with k-Scaled
Quantization and Reparameterization"): cluster an activation's token positions or channels with
k-means and give each cluster one static symmetric scale.

The pieces here are pure functions on calibration statistics (no graph, no module state):

* :func:`kmeans`: Lloyd's k-means in torch, seeded k-means++ initialisation, deterministic for a
  given seed; clusters are relabelled by ascending centroid, so cluster 0 holds the smallest values.
* :func:`cluster_scales`: from the per-position absmax (one value per token position, or per
  channel) and a "cluster" :class:`~vmfx.quant.spec.QuantSpec`, the cluster of every position and
  the max-based scale of every cluster, ``max(absmax of its members) / qmax``.
* :func:`round_pow2_ratios`: every cluster's scale becomes the first cluster's scale times
  ``2^round(log2(s_j / s_0))``, so switching between cluster scales is a shift.
* :func:`expand`: a per-cluster vector into the per-position scale that
  :class:`~vmfx.quant.modules.FakeQuantize` and the lowering take.

Differences from the official code (Access-IC-Lab/PTQ_for_ViM, read, not copied): it clusters the
per-position *mean* of ``|x|`` from one random initialisation (``randperm``, unseeded); vmfx clusters
the per-position absmax (the statistic the scale is made of, kept as a running reduction) from a
seeded k-means++ start. Its initial scale is ``max / (2^(b-1) - 0.5)`` on the range
``[-2^(b-1), 2^(b-1) - 1]``; vmfx's symmetric range is the restricted ``[-(2^(b-1) - 1), 2^(b-1) - 1]``
and the initial scale ``max / qmax``.
"""

from __future__ import annotations

import torch

from ..errors import CalibrationDataError
from ..ops.quantize import MIN_SCALE

__all__ = ["kmeans", "cluster_scales", "round_pow2_ratios", "expand", "KMEANS_ITERS"]

#: Lloyd iterations at most (the official code's count); stops earlier when the labels settle.
KMEANS_ITERS = 100


def _as_points(values: torch.Tensor) -> torch.Tensor:
    pts = values.detach().double()
    return pts.reshape(-1, 1) if pts.dim() <= 1 else pts.reshape(pts.shape[0], -1)


def _kmeans_pp(points: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: the first centre uniformly, each next one with probability proportional
    to the squared distance to the nearest centre chosen so far (uniformly when all are 0)."""
    n = points.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [points[first]]
    dist = ((points - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(dist.sum())
        weights = dist / total if total > 0 else torch.full_like(dist, 1.0 / n)
        pick = int(torch.multinomial(weights, 1, generator=gen))
        centres.append(points[pick])
        dist = torch.minimum(dist, ((points - points[pick]) ** 2).sum(1))
    return torch.stack(centres)


def kmeans(values: torch.Tensor, k: int, *, iters: int = KMEANS_ITERS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster ``values`` (``(n,)`` scalars or ``(n, d)`` points) into at most ``k`` clusters.

    Seeded k-means++ initialisation, then Lloyd iterations until the labels stop changing (at
    most ``iters``). A cluster that empties is re-seeded at the point farthest from its centre.
    Deterministic: the same values, k and seed give the same labels.

    Args:
        values: the points, float.
        k: the number of clusters (>= 1). With fewer distinct points than ``k`` there are fewer
            clusters.
        iters: Lloyd iterations at most.
        seed: the seed of the initialisation.

    Returns:
        ``(labels (n,) long, centroids (m, d) float64)`` with ``m <= k`` used clusters, labels in
        ``0..m-1`` numbered by ascending centroid (by the first coordinate, then the next ones):
        cluster 0 holds the smallest values.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    points = _as_points(values)
    n = points.shape[0]
    if n == 0:
        raise CalibrationDataError("k-means over no points: the observed tensor has no positions")
    if not bool(torch.isfinite(points).all()):
        raise CalibrationDataError("k-means over non-finite statistics (NaN/Inf in the calibration activations)")
    distinct = torch.unique(points, dim=0)
    k = min(k, distinct.shape[0])
    gen = torch.Generator().manual_seed(int(seed))
    centres = _kmeans_pp(points, k, gen)
    labels = None
    for _ in range(max(1, iters)):
        dist = torch.cdist(points, centres)
        new = dist.argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(centres).index_add_(0, labels, points)
        counts = torch.bincount(labels, minlength=k)
        for j in torch.nonzero(counts == 0).flatten().tolist():  # empty: re-seed at the farthest point
            far = int(dist.gather(1, labels[:, None]).squeeze(1).argmax())
            sums[j], counts[j] = points[far], 1
            labels[far] = j
        centres = sums / counts[:, None].double()
    labels = torch.cdist(points, centres).argmin(1)
    used = torch.unique(labels)
    centres = centres[used]
    remap = torch.full((k,), -1, dtype=torch.long)
    remap[used] = torch.arange(used.numel())
    labels = remap[labels]
    order = _lexsort(centres)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return rank[labels], centres[order]


def _lexsort(centres: torch.Tensor) -> torch.Tensor:
    """Indices sorting the rows of ``centres`` by their first coordinate, then the next ones."""
    order = torch.arange(centres.shape[0])
    for d in reversed(range(centres.shape[1])):
        order = order[torch.sort(centres[order, d], stable=True).indices]
    return order


def cluster_scales(absmax: torch.Tensor, k: int, qmax: float, *, pow2: bool = False, seed: int = 0,
                   features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clusters of the positions and the max-based scale of each.

    Args:
        absmax: per-position ``max |x|`` (any shape; one value per token position or channel).
        k: clusters wanted.
        qmax: what a max-based scale divides by (the spec's ``scale_divisor``: its largest code,
            or ``2^(b-1) - 0.5`` for the "full" integer range).
        pow2: round the scales to the first cluster's scale times powers of two
            (:func:`round_pow2_ratios`).
        seed: k-means seed.
        features: the per-position values k-means clusters, shaped like ``absmax`` (e.g. the mean
            ``|x|``); None clusters ``absmax`` itself. The scales are max-based either way.

    Returns:
        ``(ids, scales)``: ``ids`` long of ``absmax``'s shape (cluster of each position, 0 = the
        smallest absmax), ``scales`` (m,) float32 with ``m <= k``,
        ``scales[j] = max(absmax[ids == j]) / qmax`` (at least ``MIN_SCALE``).
    """
    flat = absmax.detach().float().reshape(-1)
    points = flat if features is None else features.detach().float().reshape(-1)
    if points.numel() != flat.numel():
        raise ValueError(f"cluster_scales: {points.numel()} features for {flat.numel()} positions")
    labels, _ = kmeans(points, k, seed=seed)
    m = int(labels.max()) + 1
    top = torch.zeros(m).scatter_reduce_(0, labels, flat, reduce="amax", include_self=False)
    scales = torch.clamp(top / qmax, min=MIN_SCALE)
    if pow2:
        scales = round_pow2_ratios(scales)
    return labels.reshape(absmax.shape), scales


def round_pow2_ratios(scales: torch.Tensor) -> torch.Tensor:
    """``s_j -> s_0 * 2^round(log2(s_j / s_0))`` (the first scale is kept): the official code's
    power-of-two scaling."""
    s = scales.detach().float()
    if s.numel() <= 1:
        return s.clone()
    exponent = torch.round(torch.log2(s / s[0]))
    return s[0] * torch.pow(2.0, exponent)


def expand(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``values[ids]``: per-cluster values at every position (the shape of ``ids``)."""
    return values.to(torch.float32)[ids]
