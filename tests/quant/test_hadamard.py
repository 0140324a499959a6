"""Hadamard matrices and the rotations built from them (vmfx.quant.hadamard): ±1 entries and
H H^T = n I for every constructed order, orthogonal rotations for every width (block-diagonal where
no construction exists), seeded signs, and the KLT-enhanced rotation equalising channel energies."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vmfx.errors import ConfigError
from vmfx.quant.hadamard import (
    describe_blocks,
    hadamard_blocks,
    hadamard_matrix,
    hadamard_order,
    klt_hadamard,
    orthogonal_hadamard,
    random_hadamard,
)


def _eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 24, 28, 40, 56, 96, 192, 384, 768, 1024])
def test_constructed_orders_are_hadamard_matrices(n):
    h = hadamard_matrix(n)
    assert hadamard_order(n) is not None
    assert torch.equal(h.abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(h @ h.T, n * _eye(n))


def test_vim_widths_are_one_hadamard_block():
    # 12 x 2^k (Paley I from q = 11) covers Vim-T/S/B and the proxy; 20 and 28 come from Paley I / II
    assert hadamard_order(96)[1] % 12 == 0 and hadamard_order(28) == (0, 28, "paley2")
    for d in (96, 192, 384, 768, 20, 28, 40, 56, 80, 112):
        assert hadamard_blocks(d) == [d]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_every_width_gets_an_orthogonal_rotation(n, seed):
    r = random_hadamard(n, seed)
    assert r.dtype == torch.float64 and r.shape == (n, n)
    assert torch.allclose(r @ r.T, _eye(n), atol=1e-6, rtol=0)
    assert torch.allclose(r.T @ r, _eye(n), atol=1e-6, rtol=0)
    assert sum(hadamard_blocks(n)) == n


@pytest.mark.parametrize("n,blocks", [(97, [96, 1]), (10, [8, 2]), (52, [48, 4]), (7, [4, 2, 1])])
def test_widths_without_a_construction_are_block_diagonal(n, blocks):
    assert hadamard_order(n) is None
    assert hadamard_blocks(n) == blocks
    assert describe_blocks(n) == "+".join(map(str, blocks)) + " block-diagonal"
    q = orthogonal_hadamard(n)
    assert torch.allclose(q @ q.T, _eye(n), atol=1e-12)
    assert q[: blocks[0], blocks[0]:].abs().max() == 0  # nothing mixes across blocks
    with pytest.raises(ConfigError, match=f"no Hadamard matrix of order {n}"):
        hadamard_matrix(n)


def test_random_signs_are_seeded():
    assert torch.equal(random_hadamard(96, 3), random_hadamard(96, 3))
    assert not torch.equal(random_hadamard(96, 3), random_hadamard(96, 4))
    with pytest.raises(ConfigError, match="positive integer"):
        hadamard_blocks(0)


@pytest.mark.parametrize("d", [12, 24, 96])
def test_klt_hadamard_gives_every_channel_the_mean_eigenvalue(d):
    g = torch.Generator().manual_seed(d)
    scales = torch.logspace(-2, 2, d, dtype=torch.float64)
    x = torch.randn(4000, d, generator=g, dtype=torch.float64) * scales  # wildly unequal channels
    x[:, 1] += 3 * x[:, -1]  # and correlated
    moment = x.T @ x / x.shape[0]
    r, values = klt_hadamard(moment)
    assert torch.allclose(r @ r.T, _eye(d), atol=1e-10)
    assert torch.all(values[:-1] >= values[1:])
    rotated = torch.diagonal(r.T @ moment @ r)
    assert torch.allclose(rotated, values.mean().expand(d), rtol=1e-9)
    before = torch.diagonal(moment)
    assert before.max() / before.min() > 100 and rotated.max() / rotated.min() < 1 + 1e-9
    # the eigensolver's sign choices do not matter
    r2, _ = klt_hadamard(moment.clone())
    assert torch.equal(r, r2)


def test_klt_refuses_bad_statistics():
    with pytest.raises(ConfigError, match="square"):
        klt_hadamard(torch.zeros(3, 4))
    with pytest.raises(ConfigError, match="NaN or Inf"):
        klt_hadamard(torch.full((4, 4), float("nan")))
