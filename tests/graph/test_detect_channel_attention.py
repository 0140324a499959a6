"""Detection through a channel attention after the gate (``y * sigmoid(fc(mean(y)))``, as in
LocalMamba's BiAttn), through a constant-index token gather with zero padding, and its refusal of
branches that do not gate the scan output back."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vmfx
from vmfx.annotations import annotation
from vmfx.token_layout import layout_of
from vmfx.ops import selective_scan


class GatheredSEMixer(nn.Module):
    """A Mamba mixer that reads its tokens in a permuted order with one zero padding token, and
    scales the gated output by a squeeze-excitation before out_proj. ``leak`` adds the pooled output
    to out_proj's result instead (its branches then meet after out_proj: not a gate)."""

    def __init__(self, d=16, n=4, tokens=6, leak=False):
        super().__init__()
        self.e, self.r, self.n, self.leak = 2 * d, math.ceil(d / 16), n, leak
        self.in_proj = nn.Linear(d, 2 * self.e, bias=False)
        self.conv = nn.Conv1d(self.e, self.e, 4, groups=self.e, padding=3)
        self.xp = nn.Linear(self.e, self.r + 2 * n, bias=False)
        self.dt = nn.Linear(self.r, self.e)
        self.se = nn.Linear(self.e, self.e)
        self.out = nn.Linear(self.e, d, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1).float()).repeat(self.e, 1))
        self.D = nn.Parameter(torch.ones(self.e))
        order = [2, 0, tokens, 1] + list(range(3, tokens))  # position 2 reads the zero token
        inverse = [order.index(i) for i in range(tokens)]
        self.register_buffer("order", torch.tensor(order), persistent=False)
        self.register_buffer("inverse", torch.tensor(inverse), persistent=False)

    def forward(self, h):
        xz = F.pad(self.in_proj(h), (0, 0, 0, 1)).index_select(1, self.order)
        L = xz.shape[1]
        x, z = xz[..., : self.e].transpose(1, 2), xz[..., self.e :].transpose(1, 2)
        x = F.silu(self.conv(x)[..., :L])
        dbl = self.xp(x.transpose(1, 2))
        delta = self.dt(dbl[..., : self.r]).transpose(1, 2)
        y = selective_scan(x, delta, -torch.exp(self.A_log), dbl[..., self.r : self.r + self.n].transpose(1, 2),
                           dbl[..., self.r + self.n :].transpose(1, 2), self.D, delta_softplus=True)
        y = (y * F.silu(z)).transpose(1, 2).index_select(1, self.inverse)
        gate = torch.sigmoid(self.se(y.mean(1, keepdim=True)))
        if self.leak:
            return self.out(y) + gate.sum()
        return self.out(y * gate)


def test_channel_attention_and_padded_gather_are_walked_through():
    model = GatheredSEMixer().eval()
    gm = vmfx.trace(model, (torch.randn(2, 6, 16),))
    assert gm.meta["vmfx_detect_failures"] == []
    roles = {n.target: annotation(n).role for n in gm.graph.nodes if n.op == "call_module" and annotation(n)}
    # the channel attention's linear is not a mixer linear: the generic role, quantized like any linear
    assert roles == {"in_proj": "in_proj", "conv": "conv1d", "xp": "x_proj", "dt": "dt_proj", "out": "out_proj",
                     "se": "linear"}
    scan = next(n for n in gm.graph.nodes if annotation(n) is not None and annotation(n).role == "scan")
    assert layout_of(scan).order == (2, 0, -1, 1, 3, 4, 5)  # the gather's order, -1 the padding
    assert annotation(scan).direction == "order0"
    out = next(n for n in gm.graph.nodes if n.target == "out")
    assert layout_of(out.args[0]).is_identity  # the gate multiply keeps the raster order


@pytest.mark.filterwarnings("ignore:vmfx detection skipped")
def test_branches_that_do_not_gate_the_output_are_not_walked_through():
    gm = vmfx.trace(GatheredSEMixer(leak=True).eval(), (torch.randn(2, 6, 16),))
    assert gm.meta["vmfx_mixers"] == []
    assert "2 users before reaching out_proj" in gm.meta["vmfx_detect_failures"][0][1]
