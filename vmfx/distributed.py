"""Calibration and evaluation across processes (``torchrun``, ``torch.distributed``).

Run under ``torchrun --nproc-per-node N``, the ``vmfx`` command calls :func:`init`, which reads
torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) and starts the process group:
gloo on the CPU, NCCL where CUDA is available (``VMFX_DIST_BACKEND`` overrides). From then on the
data-reading parts of vmfx share their work, wherever the process group was started (by this
module or by the user's own ``torch.distributed.init_process_group``):

* **Sharding.** Every process is given the *whole* data set (same images, same order, same
  batch size) and keeps its share of the *batches*: batch ``j`` of the whole data goes to rank
  ``j % world_size`` (:func:`shard`). Batches are never re-cut, so every batch is the one a single
  process would run, image for image, and the model computes the same values on it.
* **Calibration** (:class:`~vmfx.passes.calibrate.CalibratePass`): each process feeds its batches
  to its observers, then every observer combines the statistics of all processes
  (``Observer.synchronize``) before the next pass over the data and before parameters are
  computed: running min / max and per-channel ``|x|`` maxima exactly (min and max do not depend
  on the order); the Lp grid search's error sums by gathering every batch's error sums and adding
  them in the order of the batches, as one process adds them, so the sums are the same bits.
* **JLSS** (:class:`~vmfx.passes.jlss.JLSSPass`): each step's batch is split over the processes;
  each backpropagates its share of the loss and the gradients are summed with ``all_reduce``
  before clipping and the optimizer step (DDP's scheme, with the loss's global normalization, so
  the step is the one-process step up to float rounding). Not bit-exact.
* **Evaluation** (:func:`vmfx.data.evaluate`, :func:`vmfx.data.collect_logits`): each process runs
  its batches; correct counts are summed (integers: exact), logits are gathered back into the order
  of the data, so accuracy, agreement and KL are those of one process.

Passes that are not listed here (the k-scaled similarity search, the scan-state passes, synthesis
of calibration images) run on the whole data in every process: the same result as one process,
without the speed-up.

Invariants: every process ends a calibration with the same statistics, hence the same quantized
model; with one process (no process group, or ``WORLD_SIZE`` unset or 1) nothing here changes
what vmfx computes. Collectives are called in the same order by every process, so every process
must run the same calls with the same data (:func:`single_process` opts a block out).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch

from .errors import CalibrationDataError, ConfigError

__all__ = [
    "Context",
    "SINGLE",
    "environment",
    "init",
    "shutdown",
    "current",
    "single_process",
    "shard",
    "owned_count",
    "global_index",
    "all_gather",
    "all_reduce_sum",
    "all_reduce_sum_",
    "broadcast_",
    "gather_batches",
]

BACKEND_ENV = "VMFX_DIST_BACKEND"


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``world_size`` processes, this one ``rank`` (``local_rank`` on
    its machine), talking over ``backend`` (None with one process)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        """Several processes share the work."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """This is rank 0, the process that prints and writes results."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether batch ``index`` of the whole data is this process's (``index % world_size``)."""
        return index % self.world_size == self.rank

    def device(self) -> torch.device:
        """The device collectives run on: the CUDA device of this process for NCCL, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


#: the context of a process on its own (no process group)
SINGLE = Context()
_disabled = 0
_started_here = False


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"the environment variable {name}={text!r} is not a whole number; "
                          "start the processes with torchrun, which sets it") from None


def environment() -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` from torchrun's environment ((1, 0, 0) when unset)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"WORLD_SIZE={world} and RANK={rank} do not describe a process of a group "
                          "(0 <= RANK < WORLD_SIZE); start the processes with torchrun")
    return world, rank, local


def init(backend: str | None = None) -> Context:
    """Join the process group torchrun's environment describes, and return :func:`current`.

    With ``WORLD_SIZE`` unset or 1 nothing is started (one process). Otherwise the group is
    initialised from the environment (``env://``) unless it already is, with ``backend`` or
    ``$VMFX_DIST_BACKEND``, else NCCL when CUDA is available and gloo otherwise; NCCL processes use
    the GPU ``LOCAL_RANK``. :func:`shutdown` ends a group started here.
    """
    global _started_here
    world, rank, local = environment()
    if world == 1:
        return current()
    import torch.distributed as dist

    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={world} asks for several processes, but this torch build has no "
                          "torch.distributed; run one process (plain vmfx, without torchrun)")
    if not dist.is_initialized():
        backend = backend or os.environ.get(BACKEND_ENV) or (
            "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo")
        if backend not in ("gloo", "nccl"):
            raise ConfigError(f"{BACKEND_ENV}={backend!r}: vmfx runs on the 'gloo' (CPU) or 'nccl' (CUDA) backend")
        if backend == "nccl":
            if not torch.cuda.is_available() or local >= torch.cuda.device_count():
                raise ConfigError(f"the NCCL backend needs a GPU per process: LOCAL_RANK {local} but "
                                  f"{torch.cuda.device_count()} GPU(s); use fewer processes or {BACKEND_ENV}=gloo")
            torch.cuda.set_device(local)
        elif not dist.is_gloo_available():
            raise ConfigError("this torch build has no gloo backend; set VMFX_DIST_BACKEND=nccl on GPUs")
        dist.init_process_group(backend=backend, init_method="env://", world_size=world, rank=rank)
        _started_here = True
    return current()


def shutdown() -> None:
    """End the process group if :func:`init` started it (a user's own group is left alone)."""
    global _started_here
    if _started_here:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        _started_here = False


def current() -> Context:
    """The context of the running process group (``SINGLE`` without one, or inside
    :func:`single_process`)."""
    if _disabled:
        return SINGLE
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed
        return SINGLE
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    world = dist.get_world_size()
    if world == 1:
        return SINGLE
    rank = dist.get_rank()
    local = _env_int("LOCAL_RANK", rank)
    return Context(world, rank, local, str(dist.get_backend()))


@contextlib.contextmanager
def single_process():
    """Within the block, vmfx ignores the process group: every process calibrates and evaluates on
    the data it was given, alone (e.g. different data per process, or one process only)."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


# -- sharding -------------------------------------------------------------------------------------


def owned_count(batches: int, ctx: Context) -> int:
    """How many of ``batches`` batches process ``ctx.rank`` owns (strided: ``j % world_size``)."""
    return max(0, math.ceil((batches - ctx.rank) / ctx.world_size))


def global_index(local: int, ctx: Context) -> int:
    """The index in the whole data of this process's ``local``-th batch."""
    return local * ctx.world_size + ctx.rank


def shard(data: Any, batch_size: int, ctx: Context, *, pairs: bool = False, num_workers: int = 0) -> Any:
    """This process's batches of ``data``, in the form the data loops of vmfx read.

    Batch ``j`` of the whole data goes to rank ``j % world_size``; the batches are the ones the
    whole data is cut into (tensors split by ``batch_size``, a ``DataLoader``'s own batches), so the
    ``k``-th batch returned is batch :func:`global_index` ``(k)`` of the whole data, unchanged.

    ``data`` may be a tensor of images (split by ``batch_size``); with ``pairs``, an
    ``(images, labels)`` pair of tensors or a map-style ``Dataset`` of pairs (batched by
    ``batch_size``); a ``DataLoader`` that reads its dataset in order (only the owned batches are
    loaded); a list or tuple of batches; or any other iterable of batches, read in full by every
    process, which keeps its own. Every process must be given the same data in the same order.
    ``num_workers`` loads a ``Dataset``'s batches (as ``DataLoader`` does).
    """
    from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, SequentialSampler

    if isinstance(data, torch.Tensor):
        batches = data.split(batch_size) if data.dim() else ()
        return [batches[j] for j in range(ctx.rank, len(batches), ctx.world_size)]
    if pairs and isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        images, labels = data
        if images.shape[0] != labels.shape[0]:
            raise CalibrationDataError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        starts = range(ctx.rank * batch_size, images.shape[0], ctx.world_size * batch_size)
        return [(images[s : s + batch_size], labels[s : s + batch_size]) for s in starts]
    if pairs and isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
        n = len(data)
        starts = range(ctx.rank * batch_size, n, ctx.world_size * batch_size)
        owned = [list(range(s, min(s + batch_size, n))) for s in starts]
        return DataLoader(data, batch_sampler=owned, num_workers=num_workers)
    if isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset) \
            and isinstance(data.batch_sampler, BatchSampler) and isinstance(data.sampler, SequentialSampler):
        owned = [b for j, b in enumerate(data.batch_sampler) if ctx.owns(j)]
        return DataLoader(data.dataset, batch_sampler=owned, num_workers=data.num_workers,
                          collate_fn=data.collate_fn, pin_memory=data.pin_memory, timeout=data.timeout,
                          worker_init_fn=data.worker_init_fn)
    if isinstance(data, (list, tuple)):
        return [data[j] for j in range(ctx.rank, len(data), ctx.world_size)]
    return _strided(data, ctx)


def _strided(data: Iterable, ctx: Context) -> Iterator:
    try:
        source = iter(data)
    except TypeError:
        return data  # not iterable: left to the reader, which names the problem
    return (batch for j, batch in enumerate(source) if ctx.owns(j))


# -- collectives ----------------------------------------------------------------------------------


def _dist():
    import torch.distributed as dist

    return dist


def all_gather(tensor: torch.Tensor, ctx: Context) -> list[torch.Tensor]:
    """Every process's ``tensor`` (shapes may differ, even be empty), in rank order, on the device
    of ``tensor``, bit for bit. Non-empty tensors must have the same dtype in every process; empty
    ones take it."""
    dist = _dist()
    metas: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(metas, (tuple(tensor.shape), str(tensor.dtype)))
    sizes = [math.prod(m[0]) for m in metas]
    dtypes = sorted({m[1] for m, n in zip(metas, sizes) if n})
    if len(dtypes) > 1:
        raise ConfigError(f"processes hold the same statistic in different dtypes ({', '.join(dtypes)}); "
                          "give every process the same model and data")
    dtype = getattr(torch, dtypes[0].removeprefix("torch.")) if dtypes else tensor.dtype
    wire = torch.float32 if dtype == torch.bool else dtype
    flat = torch.zeros(max(1, max(sizes)), dtype=wire, device=ctx.device())
    flat[: tensor.numel()] = tensor.detach().reshape(-1).to(device=flat.device, dtype=wire)
    outs = [torch.empty_like(flat) for _ in range(ctx.world_size)]
    dist.all_gather(outs, flat)
    return [o[:n].reshape(m[0]).to(device=tensor.device, dtype=dtype) for o, n, m in zip(outs, sizes, metas)]


def all_reduce_sum(values: Sequence[int], ctx: Context) -> list[int]:
    """Element-wise sum over the processes of a list of integers (exact: int64)."""
    t = torch.tensor(list(values), dtype=torch.int64, device=ctx.device())
    _dist().all_reduce(t)
    return [int(v) for v in t.tolist()]


def all_reduce_sum_(tensor: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Sum ``tensor`` over the processes, in place (every process gets the same bits); returns it."""
    wire = tensor.to(ctx.device())
    _dist().all_reduce(wire)
    if wire is not tensor:
        tensor.copy_(wire)
    return tensor


def broadcast_(tensor: torch.Tensor, ctx: Context, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in every process with rank ``src``'s, in place; returns it."""
    wire = tensor.detach().to(ctx.device())
    _dist().broadcast(wire, src)
    if wire.data_ptr() != tensor.data_ptr():
        tensor.data.copy_(wire)
    return tensor


def gather_batches(pieces: list[torch.Tensor], ctx: Context) -> list[torch.Tensor]:
    """The per-batch tensors of every process, in the order of the batches in the whole data.

    ``pieces`` are this process's, one per owned batch in order (its ``k``-th is batch
    :func:`global_index` ``(k)``); they must agree in every dimension but the first. Returns the
    whole data's per-batch tensors (batch ``j`` at position ``j``), identical in every process.
    """
    sizes = torch.tensor([p.shape[0] for p in pieces], dtype=torch.int64)
    local = torch.cat(pieces) if pieces else torch.empty(0)
    all_sizes = all_gather(sizes, ctx)
    all_data = all_gather(local, ctx)
    ordered: dict[int, torch.Tensor] = {}
    for rank, (n, data) in enumerate(zip(all_sizes, all_data)):
        for k, part in enumerate(data.split(n.tolist()) if n.numel() else ()):
            ordered[k * ctx.world_size + rank] = part
    return [ordered[j] for j in sorted(ordered)]
