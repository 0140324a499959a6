"""The online Hadamard: ``x -> x H / sqrt(n)`` applied at run time by a fast Walsh-Hadamard
transform, for an edge whose rotation no weight before it can absorb (``out_proj``'s input,
after the gate).

The matrix
----------

``H = S_{2^k} (x) H_m`` (Kronecker product), ``S_{2^k}`` the Sylvester matrix and ``H_m`` the
smallest Hadamard base of :mod:`vmfx.quant.hadamard` with ``n = 2^k m`` (1 for a power of two,
12, 20, 28 for Vim's widths 192 = 12 x 16, 384 = 12 x 32, 768 = 12 x 64). QuaRot factors its
online Hadamard the same way, a small base matrix Kronecker a Sylvester matrix, applied as a
Walsh-Hadamard transform plus a dense ``m x m`` product (spcl/QuaRot@0f6acd8
``quarot/functional/hadamard.py``, ``get_hadK`` and ``matmul_hadU_cuda``, which orders the factors
the other way round: ``H_m (x) S``); vmfx uses its own ``H_m``. This ``H`` is *not* always the
matrix :func:`~vmfx.quant.hadamard.hadamard_matrix` returns for ``n`` (that one prefers the
largest Paley base, e.g. a dense Paley matrix of order 192), because only this factorisation has a
fast transform.

With the channel index ``c = a m + b`` (``a < 2^k``, ``b < m``), the row ``x`` seen as the
``2^k x m`` matrix ``X[a, b]`` becomes ``S X H_m / sqrt(n)``: ``m^2`` additions per row of ``X``
(the base, whose entries are ±1), then ``k`` butterfly stages over the ``2^k`` rows
(``n (m + k)`` additions in all, against ``n^2`` multiply-adds for a dense product).

Every function works in the dtype of its input (float64 for exact tests). ``H / sqrt(n)`` is
orthogonal but not symmetric for a Paley base, so the weight after the rotated edge absorbs
``H^T`` on its input side as ``W <- W H / sqrt(n)`` (:func:`online_hadamard_matrix` gives ``H``).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..errors import ConfigError, InputError
from .hadamard import hadamard_matrix, hadamard_order
from .registry import register_module_kind

__all__ = ["fast_hadamard_factors", "hadamard_base", "online_hadamard_matrix", "fast_hadamard_transform", "OnlineHadamard",
           "FAST_BASES", "GEMM_PROLOGUE_DOT_K", "fits_gemm_prologue"]

#: The base orders ``m`` the Triton kernel unrolls (the transform in torch takes any Paley base).
FAST_BASES = (1, 12, 20, 28)

#: ``tl.dot``'s smallest K for int8 tiles on NVIDIA GPUs: the depth each dot of the GEMM needs when
#: the lowering runs the transform as the prologue of the next linear's int8 GEMM
#: (:mod:`vmfx.lowering.kernels.hadamard_linear`).
GEMM_PROLOGUE_DOT_K = 32


@functools.lru_cache(maxsize=None)
def fast_hadamard_factors(n: int) -> tuple[int, int] | None:
    """``(k, m)`` with ``n = 2^k m`` and ``m`` the smallest order with a Hadamard construction here
    (1, or a Paley order: 12, 20, 28, ...; a constructible ``m`` halves down to its base); None when
    ``n`` has none (e.g. 96 + 1 channels, or a width not divisible by 4 above 2)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return None
    best = None
    k, m = 0, n
    while True:
        if hadamard_order(m) is not None:
            best = (k, m)
        if m % 2:
            break
        k, m = k + 1, m // 2
    return best


def fits_gemm_prologue(n: int) -> bool:
    """Whether the transform of width ``n`` can run as the prologue of the next linear's int8 GEMM:
    ``n = 2^k m`` with ``m`` in :data:`FAST_BASES` and every dot :data:`GEMM_PROLOGUE_DOT_K` deep,
    i.e. ``2^k >= 32``, or ``2^k = 16`` and ``m`` even (two base-product columns per dot). Vim's
    192 = 12 x 16, 384 = 12 x 32 and 768 = 12 x 64 do; 48 = 12 x 4 and 16 do not."""
    found = fast_hadamard_factors(n)
    if found is None or found[1] not in FAST_BASES:
        return False
    p, m = 2 ** found[0], found[1]
    return p >= GEMM_PROLOGUE_DOT_K or (2 * p == GEMM_PROLOGUE_DOT_K and m % 2 == 0)


def _factors_or_refuse(n: int) -> tuple[int, int]:
    found = fast_hadamard_factors(n)
    if found is None:
        raise ConfigError(f"no fast Hadamard transform of width {n!r}: the online Hadamard needs a width 2^k m with a "
                          "Hadamard base m (1, 12, 20, 28, ...; e.g. 192 = 12 x 16); leave this edge unrotated "
                          "(RotationOptions(online_out_proj=False))")
    return found


@functools.lru_cache(maxsize=16)
def hadamard_base(m: int) -> torch.Tensor:
    """The ±1 base ``H_m`` (float64, cached: do not modify it)."""
    return hadamard_matrix(m)


def online_hadamard_matrix(n: int) -> torch.Tensor:
    """The ±1 matrix ``H = S_{2^k} (x) H_m`` (float64, ``H H^T = n I``) that
    :func:`fast_hadamard_transform` applies (divided by ``sqrt(n)``)."""
    k, m = _factors_or_refuse(n)
    h = hadamard_base(m).clone()
    sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    for _ in range(k):
        h = torch.kron(sylvester, h)
    return h


def fast_hadamard_transform(x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """``x H / sqrt(n)`` over the last axis (``n = x.shape[-1]``), computed in ``x``'s dtype.

    The order of the operations is fixed, so that the lowered kernel
    (:mod:`vmfx.lowering.kernels.hadamard`) rounds exactly as this function does in float32:
    column ``j`` of the base product is ``±x_0 ± x_1 ... ± x_{m-1}`` summed left to right
    (``H_m[i, j]`` gives each sign; no multiplications), then ``k`` butterfly stages
    (``lo + hi``, ``lo - hi``, stride 1, 2, 4, ...), then one multiplication by ``1 / sqrt(n)``
    rounded to ``x``'s dtype.

    Args:
        x: (..., n) floating tensor.
        base: the ``m x m`` base ``H_m`` (default: built here); only its signs are read.
    """
    n = x.shape[-1]
    k, m = _factors_or_refuse(n)
    lead = x.shape[:-1]
    y = x.reshape(*lead, 2**k, m)
    if m > 1:
        positive = ((hadamard_base(m) if base is None else base) > 0).tolist()
        columns = []
        for j in range(m):
            acc = y[..., 0] if positive[0][j] else -y[..., 0]
            for i in range(1, m):
                acc = acc + y[..., i] if positive[i][j] else acc - y[..., i]
            columns.append(acc)
        y = torch.stack(columns, dim=-1)
    half = 1
    while half < 2**k:  # butterfly: rows a and a + half (bit log2(half) of a) -> sum, difference
        y = y.reshape(*lead, 2**k // (2 * half), 2, half, m)
        lo, hi = y.select(-3, 0), y.select(-3, 1)
        y = torch.stack((lo + hi, lo - hi), dim=-3)
        half *= 2
    return y.reshape(*lead, n) * torch.tensor(1.0 / n**0.5, dtype=x.dtype, device=x.device)


class OnlineHadamard(nn.Module):
    """``x -> x H / sqrt(dim)`` over the last axis, at run time (see the module docstring).

    Args:
        dim: the width ``n`` of the rotated axis; must factor as ``2^k m`` with a Hadamard base ``m``.

    Invariants: orthogonal (norms are kept); shape and dtype in = out; no parameters (the base is
    a non-persistent buffer, rebuilt from ``dim``), so saving records ``dim`` alone.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.k, self.m = _factors_or_refuse(dim)
        self.dim = dim
        self.register_buffer("base", hadamard_base(self.m).float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise InputError(f"OnlineHadamard of width {self.dim} got an input of width {x.shape[-1]}: it rotates the "
                             f"last axis of the tensors it was built for (rebuild it with OnlineHadamard({x.shape[-1]}))")
        return fast_hadamard_transform(x, self.base)

    def describe(self) -> str:
        """``"online Hadamard 192 = 12 x 2^4 (FWHT)"``."""
        factor = f"{self.m} x 2^{self.k}" if self.m > 1 else f"2^{self.k}"
        return f"online Hadamard {self.dim} = {factor} (FWHT)"

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.m}, k={self.k}"

    def to_dict(self) -> dict:
        return {"dim": self.dim}

    @classmethod
    def from_dict(cls, d: dict) -> "OnlineHadamard":
        return cls(int(d["dim"]))


register_module_kind(OnlineHadamard)
