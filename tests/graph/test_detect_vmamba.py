"""Detection of multi-direction 2D scans: VMamba's SS2D (4 directions over an (H, W) grid per stage)
and a from-scratch 2D mixer with 1, 2, 4 or 8 scan orders."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vmfx
from vmfx.annotations import annotation
from vmfx.token_layout import layout_of
from vmfx.models import VSSM
from vmfx.ops import selective_scan
from vmfx.passes.insert_observers import quantized_linear_nodes


def cross_scan_orders(H: int, W: int) -> list[tuple[int, ...]]:
    """VMamba's four orders as canonical (row-major) indices: row, column, and their reversals."""
    row = list(range(H * W))
    col = [h * W + w for w in range(W) for h in range(H)]
    return [tuple(row), tuple(col), tuple(reversed(row)), tuple(reversed(col))]


def _by_role(gm, role):
    return [n for n in gm.graph.nodes if (a := annotation(n)) is not None and a.role == role]


@pytest.mark.parametrize("kind", ["v2", "v0"])
def test_vssm_mixers_have_four_directions_in_the_cross_scan_orders_per_stage(kind):
    torch.manual_seed(0)
    if kind == "v2":
        model = VSSM(depths=[1, 2, 1], dims=16, num_classes=5, ssm_d_state=1, ssm_ratio=1.0, forward_type="v05_noz",
                     mlp_ratio=2.0, norm_layer="ln2d", downsample_version="v3", patchembed_version="v2").eval()
        grids = [(8, 6), (4, 3), (4, 3), (2, 2)]  # 32x24 input: patch embed /4, v3 downsample ceil(/2)
    else:
        model = VSSM(depths=[1, 2, 1], dims=16, num_classes=5, ssm_d_state=4, forward_type="v0", mlp_ratio=0.0,
                     norm_layer="ln", downsample_version="v1", patchembed_version="v1").eval()
        grids = [(8, 6), (4, 3), (4, 3), (2, 2)]  # v1 merging pads odd sizes
    gm = vmfx.trace(model, (torch.randn(1, 3, 32, 24),))
    assert gm.meta["vmfx_detect_failures"] == [] and gm.meta["vmfx_layout_unknown"] == []
    mixers = gm.meta["vmfx_mixers"]
    assert [m["tokens"] for m in mixers] == [h * w for h, w in grids]
    for block, (H, W) in enumerate(grids):
        assert len(mixers[block]["directions"]) == 4
        x_projs = [n for n in _by_role(gm, "x_proj") if annotation(n).block == block]
        # each direction's x_proj reads its scan order (per-token scales follow it)
        orders = sorted(layout_of(n.args[0]).order for n in x_projs)
        assert orders == sorted(cross_scan_orders(H, W))
        assert len({annotation(n).direction for n in x_projs}) == 4
        in_proj = next(n for n in _by_role(gm, "in_proj") if annotation(n).block == block)
        assert layout_of(in_proj).token_dims == (1, 2)
    counts = {role: len(_by_role(gm, role)) for role in ("in_proj", "x_proj", "dt_proj", "scan", "out_proj", "conv1d")}
    assert counts == {"in_proj": 4, "x_proj": 16, "dt_proj": 16, "scan": 16, "out_proj": 4, "conv1d": 4}
    assert len(quantized_linear_nodes(gm)) == 4 * 10
    # the head is the classifier's linear only (an MLP after the last mixer is not the head)
    assert [n.target for n in _by_role(gm, "head")] == ["classifier.head"]
    gates = _by_role(gm, "gate")
    assert len(gates) == (8 if kind == "v0" else 0)  # v0: silu(z) and the multiply, after out_norm


class GridMixer(nn.Module):
    """A 2D Mamba mixer written from scratch with ``k`` scan orders of the (H, W) grid (1, 2, 4 or 8:
    row, column, their reversals, and all of those on the vertically flipped grid)."""

    def __init__(self, d=8, n=2, k=4):
        super().__init__()
        self.k, self.n, self.r = k, n, 1
        self.inp = nn.Linear(d, d)
        self.dw = nn.Conv2d(d, d, 3, padding=1, groups=d)
        self.xp = nn.ModuleList(nn.Linear(d, self.r + 2 * n, bias=False) for _ in range(k))
        self.dp = nn.ModuleList(nn.Linear(self.r, d) for _ in range(k))
        self.A = nn.Parameter(-torch.rand(k, d, n) - 0.5)
        self.outp = nn.Linear(d, d)

    def _orders(self, g):  # g (B, d, H, W) -> k sequences (B, d, L)
        seqs = []
        for grid in (g, g.flip(2)):
            for s in (grid.flatten(2), grid.transpose(2, 3).flatten(2)):
                seqs += [s, s.flip(-1)]
        return [seqs[i] for i in (0, 2, 1, 3, 4, 6, 5, 7)][: self.k]

    def _undo(self, i, y, H, W):  # back to row-major (B, d, L)
        if i in (2, 3, 6, 7):  # a reversed order
            y = y.flip(-1)
        if i in (1, 3, 5, 7):  # a column-major order
            y = y.unflatten(-1, (W, H)).transpose(2, 3)
        else:
            y = y.unflatten(-1, (H, W))
        if i >= 4:
            y = y.flip(2)
        return y.flatten(2)

    def forward(self, x):  # (B, H, W, d)
        H, W = x.shape[1], x.shape[2]
        g = F.silu(self.dw(self.inp(x).permute(0, 3, 1, 2)))
        ys = []
        for i, u in enumerate(self._orders(g)):
            dbl = self.xp[i](u.transpose(1, 2))
            delta = self.dp[i](dbl[..., : self.r])
            y = selective_scan(u, delta.transpose(1, 2), self.A[i], dbl[..., self.r: self.r + self.n].transpose(1, 2),
                               dbl[..., self.r + self.n:].transpose(1, 2), delta_softplus=True)
            ys.append(self._undo(i, y, H, W))
        y = ys[0]
        for other in ys[1:]:
            y = y + other
        return self.outp(y.transpose(1, 2).unflatten(1, (H, W)))


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_any_number_of_2d_scan_orders_is_one_mixer_with_distinct_layouts(k):
    torch.manual_seed(k)
    H, W = 3, 4
    gm = vmfx.trace(GridMixer(k=k).eval(), (torch.randn(2, H, W, 8),))
    assert gm.meta["vmfx_detect_failures"] == [] and gm.meta["vmfx_layout_unknown"] == []
    (mixer,) = gm.meta["vmfx_mixers"]
    assert len(mixer["directions"]) == k and mixer["tokens"] == H * W
    orders = [layout_of(n.args[0]).order for n in _by_role(gm, "x_proj")]
    assert len(set(orders)) == k
    grid = torch.arange(H * W).view(H, W)
    expected = []
    for gg in (grid, grid.flip(0)):
        for s in (gg.flatten(), gg.t().flatten()):
            expected += [tuple(s.tolist()), tuple(s.flip(0).tolist())]
    expected = [expected[i] for i in (0, 2, 1, 3, 4, 6, 5, 7)][:k]
    assert sorted(orders) == sorted(expected)
    if k > 1:
        assert annotation(_by_role(gm, "x_proj")[1]).direction != "forward"
