"""Adapters turn upstream mamba-ssm modules into canonical vmfx modules (against the real package)."""

from __future__ import annotations

import torch
from torch import nn

import vmfx
from tests.upstream import import_mamba_ssm
from vmfx.frontends import canonicalize, trace
from vmfx.nn import MambaMixer


def _perturbed(module: nn.Module, seed: int) -> nn.Module:
    """Move every parameter off its init (biases, D and A_log included) so nothing is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


def test_upstream_mamba_block_becomes_canonical_and_matches():
    mamba_simple, _ = import_mamba_ssm()
    torch.manual_seed(0)
    upstream = _perturbed(mamba_simple.Mamba(d_model=24, d_state=8, use_fast_path=False, layer_idx=0), 1).eval()
    x = torch.randn(2, 21, 24)
    with torch.no_grad():
        expected = upstream(x)
    canonical = canonicalize(upstream)
    assert isinstance(canonical, MambaMixer)
    assert list(canonical.state_dict()) == list(upstream.state_dict())  # same keys, same order
    with torch.no_grad():
        torch.testing.assert_close(canonical(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(trace(canonical, (x,))(x), expected, rtol=1e-4, atol=1e-5)


class UpstreamBlocks(nn.Module):
    """Images -> patches -> upstream (norm, Mamba) blocks -> head: a model vmfx has never seen."""

    def __init__(self, mamba_simple, rmsnorm_cls, dim=32, depth=2):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.norms = nn.ModuleList(rmsnorm_cls(dim, eps=1e-5) for _ in range(depth))
        self.blocks = nn.ModuleList(
            mamba_simple.Mamba(d_model=dim, d_state=8, use_fast_path=False, layer_idx=i) for i in range(depth)
        )
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        for norm, block in zip(self.norms, self.blocks):
            x = x + block(norm(x))
        return self.head(x.mean(1))


def test_compile_a_model_of_upstream_blocks():
    mamba_simple, _ = import_mamba_ssm()
    from mamba_ssm.ops.triton.layer_norm import RMSNorm as UpstreamRMSNorm

    torch.manual_seed(0)
    model = _perturbed(UpstreamBlocks(mamba_simple, UpstreamRMSNorm), 2).eval()
    images = torch.randn(8, 3, 16, 16)
    qmodel = vmfx.compile(model, images, "minmax-w8a8", check=True)
    assert isinstance(model.blocks[0], mamba_simple.Mamba)  # the user's model is untouched
    mixers = qmodel.meta["vmfx_mixers"]
    assert [m["block"] for m in mixers] == [0, 1]
    assert all(list(m["directions"]) == ["forward"] for m in mixers)
    report = vmfx.inspect.compare(model, qmodel, images)
    assert report.output.cosine > 0.99
