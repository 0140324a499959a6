"""Detection finds mixers by structure: roles, blocks, directions, token lengths."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vmfx
from vmfx.annotations import annotation
from vmfx.ops import selective_scan
from vmfx.passes import DetectMambaMixersPass, PassManager
from vmfx.passes.insert_observers import quantized_linear_nodes


def _roles(gm):
    out = {}
    for node in gm.graph.nodes:
        ann = annotation(node)
        if ann is not None:
            out.setdefault(ann.role, []).append(node)
    return out


def test_bidirectional_mixers_are_found(tiny_model, tiny_images):
    gm = vmfx.trace(tiny_model, (tiny_images[:1],))
    mixers = gm.meta["vmfx_mixers"]
    assert [m["block"] for m in mixers] == [0, 1]
    assert all(list(m["directions"]) == ["forward", "backward"] for m in mixers)
    assert all(m["tokens"] == 16 for m in mixers)
    roles = _roles(gm)
    counts = {role: len(nodes) for role, nodes in roles.items()}
    assert counts["in_proj"] == counts["out_proj"] == 2
    assert counts["x_proj"] == counts["dt_proj"] == counts["scan"] == counts["conv1d"] == 4
    assert counts["patch_embed"] == 1 and counts["head"] == 1 and counts["norm"] == 3
    backward = [n.target for n in roles["x_proj"] if annotation(n).direction == "backward"]
    assert backward == ["mixers.0.x_proj_b", "mixers.1.x_proj_b"]
    assert all(annotation(n).matched_by == "structure" for nodes in roles.values() for n in nodes)
    assert gm.meta["vmfx_detect_failures"] == []


def test_unidirectional_mixer(tiny_images):
    from tests.conftest import TinyVimLike

    gm = vmfx.trace(TinyVimLike(bimamba_type="none").eval(), (tiny_images[:1],))
    assert [list(m["directions"]) for m in gm.meta["vmfx_mixers"]] == [["forward"], ["forward"]]


class ObscureMixer(nn.Module):
    """The Mamba math with meaningless attribute names, z gated inside the scan op, and the
    dt bias passed to the scan: detection must still find every role by structure."""

    def __init__(self, d=16, n=4):
        super().__init__()
        self.e, self.r, self.n = 2 * d, math.ceil(d / 16), n
        self.p = nn.Linear(d, 2 * self.e, bias=False)
        self.q = nn.Conv1d(self.e, self.e, 4, groups=self.e, padding=3)
        self.s = nn.Linear(self.e, self.r + 2 * n, bias=False)
        self.t = nn.Linear(self.r, self.e, bias=True)
        self.u = nn.Linear(self.e, d, bias=False)
        self.a = nn.Parameter(torch.log(torch.arange(1, n + 1).float()).repeat(self.e, 1))
        self.dd = nn.Parameter(torch.ones(self.e))

    def forward(self, h):
        L = h.shape[1]
        xz = self.p(h).transpose(1, 2)
        x, z = xz[:, : self.e], xz[:, self.e :]
        x = F.silu(self.q(x)[..., :L])
        dbl = self.s(x.transpose(1, 2))
        dt = self.t(dbl[..., : self.r]).transpose(1, 2)
        y = selective_scan(x, dt, -torch.exp(self.a), dbl[..., self.r : self.r + self.n].transpose(1, 2),
                           dbl[..., self.r + self.n :].transpose(1, 2), self.dd, z=z, delta_softplus=True)
        return self.u(y.transpose(1, 2))


def test_detection_matches_structure_not_names():
    model = ObscureMixer().eval()
    x = torch.randn(2, 11, 16)
    gm = vmfx.trace(model, (x,))
    roles = {n.target: annotation(n).role for n in gm.graph.nodes if annotation(n) and n.op == "call_module"}
    assert roles == {"p": "in_proj", "q": "conv1d", "s": "x_proj", "t": "dt_proj", "u": "out_proj"}
    assert gm.meta["vmfx_mixers"][0]["tokens"] == 11
    qmodel = vmfx.compile(model, [x], "minmax-w8a8")
    assert len(quantized_linear_nodes(qmodel)) == 4


@pytest.mark.filterwarnings("ignore:vmfx detection skipped")
def test_unmatched_scan_is_reported_not_silently_dropped():
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.A = nn.Parameter(-torch.ones(3, 2))
            self.B = nn.Parameter(torch.ones(1, 2, 5))

        def forward(self, u):
            return selective_scan(u, u.abs(), self.A, self.B, self.B)

    gm = vmfx.trace(Bare(), (torch.randn(1, 3, 5),), detect=False)
    with pytest.warns(UserWarning, match="could not match"):
        gm = PassManager([DetectMambaMixersPass()])(gm).graph_module
    assert gm.meta["vmfx_mixers"] == []
    assert "u does not come from a SiLU" in gm.meta["vmfx_detect_failures"][0][1]
    with pytest.raises(vmfx.PassError, match="no Mamba mixer was detected"):
        vmfx.compile(Bare(), torch.randn(1, 3, 5))


class MambaVisionLikeMixer(nn.Module):
    """MambaVision's mixer shape: no gate (the z branch is convolved and concatenated), non-causal
    'same' convs, the scan on half the channels."""

    def __init__(self, d=16, n=8):
        super().__init__()
        self.e, self.r, self.n = d // 2, 2, n
        self.in_proj = nn.Linear(d, d, bias=False)
        self.conv1d_x = nn.Conv1d(self.e, self.e, 3, groups=self.e, padding=1, bias=False)
        self.conv1d_z = nn.Conv1d(self.e, self.e, 3, groups=self.e, padding=1, bias=False)
        self.x_proj = nn.Linear(self.e, self.r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(self.r, self.e)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1).float()).repeat(self.e, 1))
        self.D = nn.Parameter(torch.ones(self.e))
        self.out_proj = nn.Linear(d, d, bias=False)

    def forward(self, h):
        xz = self.in_proj(h).transpose(1, 2)
        x, z = xz[:, : self.e], xz[:, self.e :]
        x, z = F.silu(self.conv1d_x(x)), F.silu(self.conv1d_z(z))
        dbl = self.x_proj(x.transpose(1, 2))
        dt = self.dt_proj(dbl[..., : self.r]).transpose(1, 2)
        y = selective_scan(x, dt, -torch.exp(self.A_log), dbl[..., self.r : self.r + self.n].transpose(1, 2),
                           dbl[..., self.r + self.n :].transpose(1, 2), self.D, delta_softplus=True)
        return self.out_proj(torch.cat([y, z], dim=1).transpose(1, 2))


def test_ungated_concatenating_mixer_is_detected():
    model = MambaVisionLikeMixer().eval()
    x = torch.randn(2, 9, 16)
    gm = vmfx.trace(model, (x,))
    roles = {n.target: annotation(n).role for n in gm.graph.nodes if annotation(n) and n.op == "call_module"}
    assert roles == {"in_proj": "in_proj", "conv1d_x": "conv1d", "x_proj": "x_proj", "dt_proj": "dt_proj",
                     "out_proj": "out_proj"}
    assert gm.meta["vmfx_detect_failures"] == []
    q = vmfx.compile(model, [x], "pts-w8a8")
    assert len(quantized_linear_nodes(q)) == 4
