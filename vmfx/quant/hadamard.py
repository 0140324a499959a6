"""Hadamard matrices and the orthogonal rotations built from them (offline rotations, QuaRot and
MambaQuant style).

A Hadamard matrix ``H`` of order ``n`` has entries ±1 and ``H H^T = n I``; ``H / sqrt(n)`` is
orthogonal and spreads every channel over all ``n`` channels with equal weight, which is what makes
it flatten channel outliers. Orders built here (:func:`hadamard_matrix`):

* Sylvester: ``2^k`` (``H_{2m} = [[H_m, H_m], [H_m, -H_m]]``);
* Paley I: ``q + 1`` for a prime ``q ≡ 3 (mod 4)`` (12, 20, 24, 44, 48, ...);
* Paley II: ``2 (q + 1)`` for a prime ``q ≡ 1 (mod 4)`` (12, 28, 36, 60, ...);
* and every ``2^k`` multiple of those (Kronecker product with a Sylvester matrix): 12 x 2^k, 20 x
  2^k and 28 x 2^k cover Vim's widths (96, 192, 384, 768).

A width with none of these constructions (any width not divisible by 4 above 2, and a few
multiples of 4) gets a **block-diagonal** rotation (:func:`hadamard_blocks`): the width is cut
greedily into the largest constructible orders (97 -> 96 + 1, 10 -> 8 + 2), each block a
normalised Hadamard matrix. It is still orthogonal, but it mixes channels only within a block, and
its entries are no longer all of one magnitude, so the KLT-enhanced rotation equalises channel
energies exactly only for a single block (a constructible width).

:func:`random_hadamard` multiplies by a seeded random sign diagonal (QuaRot's randomized Hadamard);
:func:`klt_hadamard` is MambaQuant's KLT-enhanced rotation ``K H`` (eigenvectors of the calibration
second moment, then a Hadamard), after which every channel's mean square is the mean eigenvalue.

Every function returns float64 tensors on the CPU; callers cast when they fold.
"""

from __future__ import annotations

import functools

import torch

from ..errors import ConfigError

__all__ = [
    "hadamard_order",
    "hadamard_matrix",
    "hadamard_blocks",
    "orthogonal_hadamard",
    "random_signs",
    "random_hadamard",
    "klt_hadamard",
    "describe_blocks",
]


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    f = 3
    while f * f <= q:
        if q % f == 0:
            return False
        f += 2
    return True


def _paley_base(m: int) -> str | None:
    """``"paley1"`` / ``"paley2"`` if ``m`` is an order a Paley construction gives from a prime,
    ``"one"`` for 1, else None."""
    if m == 1:
        return "one"
    if m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
        return "paley1"
    if m % 4 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "paley2"
    return None


@functools.lru_cache(maxsize=None)
def hadamard_order(n: int) -> tuple[int, int, str] | None:
    """How :func:`hadamard_matrix` builds order ``n``: ``(k, m, base)`` with ``n = 2^k m`` and
    ``base`` the construction of order ``m`` (``"one"``, ``"paley1"``, ``"paley2"``), preferring
    the largest Paley base; None if no construction here gives order ``n``."""
    if not isinstance(n, int) or n < 1:
        return None
    options = []
    k, m = 0, n
    while True:
        base = _paley_base(m)
        if base is not None:
            options.append((k, m, base))
        if m % 2:
            break
        k, m = k + 1, m // 2
    return options[0] if options else None


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(j - i)``, chi the quadratic character of GF(q) (q prime)."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q).view(1, -1) - torch.arange(q).view(-1, 1)) % q
    return chi[idx]


def _paley1(m: int) -> torch.Tensor:
    q = m - 1
    s = torch.zeros(m, m, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(m, dtype=torch.float64) + s


def _paley2(m: int) -> torch.Tensor:
    q = m // 2 - 1
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


@functools.lru_cache(maxsize=64)
def _cached_hadamard(n: int) -> torch.Tensor:
    order = hadamard_order(n)
    if order is None:
        raise ConfigError(f"no Hadamard matrix of order {n} is built here (orders 2^k, 2^k (q+1) and 2^k 2(q+1) for "
                          "primes q): use hadamard_blocks / orthogonal_hadamard for a block-diagonal rotation")
    k, m, base = order
    h = {"one": lambda _: torch.ones(1, 1, dtype=torch.float64), "paley1": _paley1, "paley2": _paley2}[base](m)
    sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    for _ in range(k):
        h = torch.kron(sylvester, h)
    return h


def hadamard_matrix(n: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of order ``n`` (``H H^T = n I``), float64.

    Raises:
        ConfigError: ``n`` has no construction here (:func:`hadamard_order` is None).
    """
    return _cached_hadamard(n).clone()


def hadamard_blocks(n: int) -> list[int]:
    """The block sizes of the rotation of width ``n``: ``[n]`` if :func:`hadamard_order` builds
    ``n``, else the largest constructible order that fits, then the same for what is left (sizes
    sum to ``n``; 1 and 2 are always constructible, so this ends)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"a rotation width is a positive integer, got {n!r}")
    blocks = []
    left = n
    while left:
        size = next(m for m in range(left, 0, -1) if hadamard_order(m) is not None)
        blocks.append(size)
        left -= size
    return blocks


def describe_blocks(n: int) -> str:
    """``"96"`` for one Hadamard block, ``"96+1 block-diagonal"`` otherwise."""
    blocks = hadamard_blocks(n)
    return str(n) if len(blocks) == 1 else "+".join(map(str, blocks)) + " block-diagonal"


def orthogonal_hadamard(n: int) -> torch.Tensor:
    """An orthogonal ``n x n`` matrix: the normalised Hadamard ``H / sqrt(n)``, or a block-diagonal
    of normalised Hadamard blocks (:func:`hadamard_blocks`) when ``n`` has no construction."""
    out = torch.zeros(n, n, dtype=torch.float64)
    start = 0
    for size in hadamard_blocks(n):
        out[start:start + size, start:start + size] = _cached_hadamard(size) / size ** 0.5
        start += size
    return out


def random_signs(n: int, seed: int) -> torch.Tensor:
    """``n`` signs ±1 (float64) drawn from a generator seeded with ``seed`` (the same on every
    machine)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """QuaRot's randomized Hadamard rotation ``diag(s) H / sqrt(n)``, ``s`` seeded random signs;
    orthogonal (block-diagonal for a width without a construction)."""
    return random_signs(n, seed).view(-1, 1) * orthogonal_hadamard(n)


def klt_hadamard(second_moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MambaQuant's KLT-enhanced rotation of a ``d x d`` second-moment matrix ``M = E[x^T x]``.

    ``M = K diag(lambda) K^T`` (eigenvalues in decreasing order, each eigenvector's largest-magnitude
    entry made positive, so the result does not depend on the eigensolver's sign choices), then
    ``R = K H / sqrt(d)``. For the rotated ``x R`` the second moment is ``H^T diag(lambda) H / d``,
    whose diagonal is ``mean(lambda)`` in every channel when ``H`` is one Hadamard block.

    Returns:
        ``(R, eigenvalues)``, float64.
    """
    m = second_moment.detach().to(torch.float64).cpu()
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ConfigError(f"the KLT needs a square second-moment matrix, got shape {tuple(m.shape)}")
    if not bool(torch.isfinite(m).all()):
        raise ConfigError("the calibration second moment of the rotated stream holds NaN or Inf values "
                          "(non-finite activations in the model or the data)")
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    order = torch.argsort(values, descending=True, stable=True)
    values, vectors = values[order], vectors[:, order]
    peak = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[peak, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1
    vectors = vectors * signs
    return vectors @ orthogonal_hadamard(m.shape[0]), values
