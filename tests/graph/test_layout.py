"""Token layouts: detection records them on every mixer edge; per-token statistics follow them.

Models here: a cross-scan mixer on a VMamba-style (B, H, W, C) tensor reading its tokens in 1, 2
or 4 orders (raster, column-major and their reversals), a mixer whose x_proj reads a merged
``(b l) d`` reshape, and the trained proxy Vim (real architecture: middle class token, two
directions) fed a position ramp.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vmfx
from vmfx.annotations import annotation
from vmfx.errors import LayoutError
from vmfx.token_layout import TokenLayout, layout_of
from vmfx.ops import selective_scan
from vmfx.quant import FakeQuantize, MinMaxObserver, QuantSpec
from vmfx.quant.observers import AbsMaxObserver, LpObserver

STATIC_TOKEN = QuantSpec(8, False, "token")
DYNAMIC_TOKEN = QuantSpec(8, True, "token", dynamic=True)

# The scan orders of the cross-scan mixer: k -> (transpose H and W, reverse).
CROSS_ORDERS = {0: (False, False), 1: (True, False), 2: (False, True), 3: (True, True)}
DIRECTION_SETS = {1: [0], 2: [0, 2], 4: [0, 1, 2, 3]}


def expected_order(k: int, h: int, w: int) -> tuple[int, ...]:
    """Canonical (raster) index of the token at each position of scan order k, computed directly."""
    grid = torch.arange(h * w).view(h, w)
    transpose, reverse = CROSS_ORDERS[k]
    seq = (grid.t() if transpose else grid).flatten()
    return tuple((seq.flip(0) if reverse else seq).tolist())


class CrossScanMixer(nn.Module):
    """A (B, H, W, D) -> (B, H, W, D) Mamba mixer scanning its tokens in several orders, each with
    its own conv / x_proj / dt_proj, gated, each result put back in raster order and summed."""

    def __init__(self, d=8, n=4, directions=4, put_back=True):
        super().__init__()
        self.e, self.r, self.n = 2 * d, 1, n
        self.ks = DIRECTION_SETS[directions]
        self.put_back = put_back
        self.in_proj = nn.Linear(d, 2 * self.e, bias=False)
        self.convs = nn.ModuleList(nn.Conv1d(self.e, self.e, 3, groups=self.e, padding=2) for _ in self.ks)
        self.x_projs = nn.ModuleList(nn.Linear(self.e, self.r + 2 * n, bias=False) for _ in self.ks)
        self.dt_projs = nn.ModuleList(nn.Linear(self.r, self.e) for _ in self.ks)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1).float()).repeat(self.e, 1))
        self.D = nn.Parameter(torch.ones(self.e))
        self.out_proj = nn.Linear(self.e, d, bias=False)

    @staticmethod
    def to_sequence(x, k):
        transpose, reverse = CROSS_ORDERS[k]
        s = (x.transpose(1, 2) if transpose else x).flatten(1, 2)
        return s.flip(1) if reverse else s

    @staticmethod
    def to_grid(y, k, h, w):
        transpose, reverse = CROSS_ORDERS[k]
        if reverse:
            y = y.flip(1)
        return y.unflatten(1, (w, h)).transpose(1, 2) if transpose else y.unflatten(1, (h, w))

    def forward(self, hs):
        h, w = hs.shape[1], hs.shape[2]
        L = h * w
        xz = self.in_proj(hs)
        x, z = xz[..., : self.e], xz[..., self.e :]
        out = None
        for i, k in enumerate(self.ks):
            xs, zs = self.to_sequence(x, k), self.to_sequence(z, k)
            xc = F.silu(self.convs[i](xs.transpose(1, 2))[..., :L])
            dbl = self.x_projs[i](xc.transpose(1, 2))
            dt = self.dt_projs[i](dbl[..., : self.r])
            y = selective_scan(xc, dt.transpose(1, 2), -torch.exp(self.A_log),
                               dbl[..., self.r : self.r + self.n].transpose(1, 2),
                               dbl[..., self.r + self.n :].transpose(1, 2), self.D, delta_softplus=True)
            y = (y * F.silu(zs.transpose(1, 2))).transpose(1, 2)
            y = self.to_grid(y, k, h, w) if self.put_back else y.unflatten(1, (h, w))
            out = y if out is None else out + y
        return self.out_proj(out)


def _scans(gm):
    return [n for n in gm.graph.nodes if annotation(n) is not None and annotation(n).role == "scan"]


@pytest.mark.parametrize("directions", [1, 2, 4])
def test_n_direction_cross_scan_orders_are_permutations(directions):
    torch.manual_seed(0)
    h, w = 3, 4
    gm = vmfx.trace(CrossScanMixer(directions=directions).eval(), (torch.randn(2, h, w, 8),))
    assert gm.meta["vmfx_detect_failures"] == []
    (mixer,) = gm.meta["vmfx_mixers"]
    ks = DIRECTION_SETS[directions]
    labels = {0: "forward", 2: "backward"}
    assert sorted(mixer["directions"]) == sorted(labels.get(k, f"order{ks.index(k)}") for k in ks)
    scans = _scans(gm)
    assert len(scans) == directions
    for node, k in zip(scans, ks):  # graph order is the order of self.ks
        layout = annotation(node).layout
        assert layout is not None and layout.token_dims == (2,) and layout.channel_dim == 1
        assert layout.order == expected_order(k, h, w)
        assert annotation(node).direction == labels.get(k, f"order{ks.index(k)}")
    # every annotated node of the mixer has a layout; the merge is back in raster order
    for node in gm.graph.nodes:
        ann = annotation(node)
        if ann is not None and ann.role in ("in_proj", "conv1d", "conv_act", "x_proj", "dt_proj", "gate",
                                            "merge", "out_proj", "scan"):
            assert ann.layout is not None, node.name
    for role in ("merge", "out_proj", "in_proj"):
        for node in gm.graph.nodes:
            if annotation(node) is not None and annotation(node).role == role:
                assert annotation(node).layout.token_dims == (1, 2)
                assert annotation(node).layout.is_identity
    # the conv's padded output: 12 tokens then 2 padding positions
    conv = next(n for n in gm.graph.nodes if annotation(n) is not None and annotation(n).role == "conv1d")
    assert layout_of(conv).tokens == h * w + 2 and layout_of(conv).order[-2:] == (-1, -1)


def test_a_merge_of_directions_left_in_scan_order_has_no_layout():
    torch.manual_seed(0)
    gm = vmfx.trace(CrossScanMixer(directions=2, put_back=False).eval(), (torch.randn(2, 3, 4, 8),))
    merges = [n for n in gm.graph.nodes if annotation(n) is not None and annotation(n).role == "merge"]
    assert merges and all(annotation(n).layout is None for n in merges)
    why = dict(gm.meta["vmfx_layout_unknown"])
    assert "different orders" in why[merges[0].name]


def test_vim_like_directions_and_layouts(tiny_model, tiny_images):
    gm = vmfx.trace(tiny_model, (tiny_images[:2],))
    for node in _scans(gm):
        ann = annotation(node)
        assert ann.layout.order == tuple(range(16)) if ann.direction == "forward" else tuple(range(15, -1, -1))
    assert gm.meta["vmfx_layout_unknown"] == []


# -- VMamba-style 4-D tensors -----------------------------------------------------------------------


def test_per_token_statistics_of_a_4d_tensor_follow_its_layout():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 16, generator=g) * torch.arange(1, 13).float().view(1, 3, 4, 1)
    layout = TokenLayout.token_major(x.shape)
    assert layout.token_dims == (1, 2) and layout.channel_dim == 3 and layout.tokens == 12
    obs = MinMaxObserver(STATIC_TOKEN, layout=layout)
    obs(x)
    assert obs.min_val.shape == (1, 3, 4, 1)
    torch.testing.assert_close(obs.min_val, x.amin(dim=(0, 3), keepdim=True), rtol=0, atol=0)
    torch.testing.assert_close(obs.max_val, x.amax(dim=(0, 3), keepdim=True), rtol=0, atol=0)
    # dynamic: one scale per (sample, h, w)
    fq = FakeQuantize(DYNAMIC_TOKEN, layout=layout)
    qp = fq.qparams(x)
    assert qp.scale.shape == (2, 3, 4, 1)
    torch.testing.assert_close(qp.scale, x.abs().amax(-1, keepdim=True) / 127)
    # per-channel and smoothing statistics keep the layout's channel dim
    chan = QuantSpec(8, True, "channel")
    assert chan.kept_dims(4, layout=layout) == (3,)
    sq = AbsMaxObserver(chan, layout=layout)
    sq(x)
    torch.testing.assert_close(sq.channel_absmax, x.abs().amax(dim=(0, 1, 2)))


def test_channel_first_layout_keeps_the_right_dims():
    """A (B, E, L) edge (the conv's input after the transpose): tokens on dim 2, channels on 1."""
    layout = TokenLayout(3, (2,), 1, 5, tuple(range(5)))
    assert STATIC_TOKEN.kept_dims(3, layout=layout) == (2,)
    assert DYNAMIC_TOKEN.kept_dims(3, layout=layout) == (0, 2)
    assert QuantSpec(8, True, "channel").kept_dims(3, layout=layout) == (1,)
    x = torch.randn(2, 7, 5)
    obs = LpObserver(STATIC_TOKEN, candidates=4, layout=layout)
    obs(x)
    assert obs.min_val.shape == (1, 1, 5)


@pytest.mark.parametrize("shape", [(2, 3, 4, 16), (24, 16)])
def test_per_token_without_a_layout_is_an_error_not_a_guess(shape):
    obs = MinMaxObserver(STATIC_TOKEN)
    obs.name = "mixer_in_proj"
    with pytest.raises(LayoutError, match=rf"mixer_in_proj of shape \({shape[0]}, .*layout=annotation\(node\)"):
        obs(torch.randn(shape))
    with pytest.raises(LayoutError, match=f"rank-{len(shape)}"):
        FakeQuantize(DYNAMIC_TOKEN)(torch.randn(shape))


def test_3d_without_a_layout_is_an_error_too():
    # (B, L, C) and (B, E, L) are both 3-D: the rank says nothing about where the tokens are
    with pytest.raises(LayoutError, match="needs its token layout"):
        STATIC_TOKEN.kept_dims(3)
    with pytest.raises(LayoutError, match="needs its token layout"):
        DYNAMIC_TOKEN.kept_dims(3)


def test_a_tensor_that_does_not_fit_its_layout_is_refused():
    layout = TokenLayout.token_major((2, 3, 4, 16))
    obs = MinMaxObserver(STATIC_TOKEN, layout=layout)
    with pytest.raises(LayoutError, match="rank 3"):
        obs(torch.randn(2, 12, 16))
    with pytest.raises(LayoutError, match="recorded for 12 tokens"):
        obs(torch.randn(2, 3, 5, 16))


@pytest.mark.parametrize("kwargs,match", [
    (dict(ndim=3, token_dims=(2, 1), channel_dim=0, tokens=2, order=(0, 1)), "sorted"),
    (dict(ndim=3, token_dims=(1,), channel_dim=1, tokens=2, order=(0, 1)), "channel_dim"),
    (dict(ndim=3, token_dims=(1,), channel_dim=2, tokens=3, order=(0, 1)), "one canonical index per position"),
    (dict(ndim=3, token_dims=(1,), channel_dim=2, tokens=3, order=(0, 1, 1)), "distinct"),
])
def test_invalid_layouts_are_rejected(kwargs, match):
    with pytest.raises(LayoutError, match=match):
        TokenLayout(**kwargs)


# -- the (b l) d reshape ----------------------------------------------------------------------------


class MergedRowsMixer(nn.Module):
    """Upstream Mamba's x_proj on a ``(b l) d`` reshape: x_proj and dt_proj see (B*L, .) rows."""

    def __init__(self, d=8, n=4):
        super().__init__()
        self.e, self.r, self.n = 2 * d, 1, n
        self.in_proj = nn.Linear(d, 2 * self.e, bias=False)
        self.conv1d = nn.Conv1d(self.e, self.e, 4, groups=self.e, padding=3)
        self.x_proj = nn.Linear(self.e, self.r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(self.r, self.e)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1).float()).repeat(self.e, 1))
        self.out_proj = nn.Linear(self.e, d, bias=False)

    def forward(self, h):
        b, L = h.shape[0], h.shape[1]
        xz = self.in_proj(h).transpose(1, 2)
        x, z = xz[:, : self.e], xz[:, self.e :]
        x = F.silu(self.conv1d(x)[..., :L])
        dbl = self.x_proj(x.transpose(1, 2).reshape(b * L, self.e))  # (b l) d
        dt = self.dt_proj(dbl[:, : self.r]).view(b, L, self.e).transpose(1, 2)
        Bm = dbl[:, self.r : self.r + self.n].view(b, L, self.n).transpose(1, 2)
        Cm = dbl[:, self.r + self.n :].view(b, L, self.n).transpose(1, 2)
        y = selective_scan(x, dt, -torch.exp(self.A_log), Bm, Cm, z=z, delta_softplus=True)
        return self.out_proj(y.transpose(1, 2))


def test_merged_batch_rows_get_a_merged_layout_and_correct_dynamic_scales():
    torch.manual_seed(0)
    b, L, d = 3, 5, 8
    gm = vmfx.trace(MergedRowsMixer(d).eval(), (torch.randn(b, L, d),))
    assert gm.meta["vmfx_detect_failures"] == []
    x_proj = next(n for n in gm.graph.nodes if annotation(n) is not None and annotation(n).role == "x_proj")
    for node in (x_proj, x_proj.args[0]):  # its output and its input edge
        layout = layout_of(node)
        assert layout.merged_batch and layout.token_dims == (0,) and layout.tokens == L
        assert layout.channel_dim == 1 and layout.is_identity
    assert annotation(x_proj).layout == layout_of(x_proj)
    scan = _scans(gm)[0]
    assert layout_of(scan).token_dims == (2,) and not layout_of(scan).merged_batch

    rows = torch.randn(b * L, 16, generator=torch.Generator().manual_seed(1))
    rows = rows * torch.arange(1, b * L + 1).float().unsqueeze(1)
    merged = layout_of(x_proj.args[0])
    got = FakeQuantize(DYNAMIC_TOKEN, layout=merged)(rows)
    unmerged = rows.view(b, L, 16)
    want = FakeQuantize(DYNAMIC_TOKEN, layout=TokenLayout.token_major(unmerged.shape))(unmerged).view(b * L, 16)
    assert torch.equal(got, want)
    with pytest.raises(LayoutError, match=r"merges batch and 5 tokens .*\(b l\) d.*quantize the edge before"):
        MinMaxObserver(STATIC_TOKEN, layout=merged)(rows)


def test_merged_rows_traced_with_batch_one_are_caught_at_calibration():
    torch.manual_seed(0)
    gm = vmfx.trace(MergedRowsMixer().eval(), (torch.randn(1, 5, 8),))
    x_proj = next(n for n in gm.graph.nodes if annotation(n) is not None and annotation(n).role == "x_proj")
    layout = layout_of(x_proj.args[0])
    assert layout.token_dims == (0,) and not layout.merged_batch  # batch 1: the merge is invisible
    obs = MinMaxObserver(STATIC_TOKEN, layout=layout)
    with pytest.raises(LayoutError, match="trace with a batch of at least 2"):
        obs(torch.randn(4 * 5, 16))


# -- the backward scan's order, through the real (proxy) Vim graph -------------------------------------


def _ramp_proxy_model():
    """The trained proxy Vim, its first block made to carry a position ramp: every token enters
    block 0 as e0 + (i + 1) e1 (patch embedding and class token zeroed, the position embedding set),
    in_proj's x rows read e1 after the norm (a quantity that grows strictly with i), both direction
    convs pass their input through, and the backward x_proj / dt_proj copy the forward ones. The
    backward branch's linears then see at step t exactly what the forward ones see at canonical
    token L-1-t."""
    from vmfx.data.proxy import load_proxy_model

    model = load_proxy_model()
    mixer = model.layers[0].mixer
    E = mixer.d_inner
    with torch.no_grad():
        model.patch_embed.proj.weight.zero_()
        model.patch_embed.proj.bias.zero_()
        model.cls_token.zero_()
        L = model.pos_embed.shape[1]
        ramp = torch.zeros_like(model.pos_embed)
        ramp[0, :, 0] = 1.0
        ramp[0, :, 1] = torch.arange(1, L + 1).float()
        model.pos_embed.copy_(ramp)
        model.layers[0].norm.weight.fill_(1.0)
        mixer.in_proj.weight[:E].zero_()
        mixer.in_proj.weight[:E, 1] = 1.0
        for conv in (mixer.conv1d, mixer.conv1d_b):
            conv.weight.zero_()
            conv.weight[:, 0, -1] = 1.0
            conv.bias.zero_()
        mixer.x_proj_b.weight.copy_(mixer.x_proj.weight)
        mixer.dt_proj_b.weight.copy_(mixer.dt_proj.weight)
        mixer.dt_proj_b.bias.copy_(mixer.dt_proj.bias)
    return model.eval(), L


def _node_inputs(gm, nodes, x):
    """The value of each node's first input on ``x`` (an fx Interpreter run)."""
    wanted = {n.args[0]: n for n in nodes}
    seen = {}

    class Grab(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node in wanted:
                seen[wanted[node]] = out
            return out

    with torch.no_grad():
        Grab(gm).run(x)
    return seen


def test_backward_scan_statistics_at_step_t_are_those_of_token_L_minus_1_minus_t():
    model, L = _ramp_proxy_model()
    images = torch.randn(2, 1, 30, 30, generator=torch.Generator().manual_seed(0))
    gm = vmfx.trace(model, (images,))
    block0 = [n for n in gm.graph.nodes if annotation(n) is not None and annotation(n).block == 0]
    linears = {(annotation(n).role, annotation(n).direction): n for n in block0
               if annotation(n).role in ("x_proj", "dt_proj")}
    values = _node_inputs(gm, linears.values(), images)
    for role in ("x_proj", "dt_proj"):
        stats = {}
        for direction in ("forward", "backward"):
            node = linears[(role, direction)]
            layout = layout_of(node.args[0])  # the layout of the linear's input edge
            assert layout.is_identity == (direction == "forward")
            assert layout.order == (tuple(range(L)) if direction == "forward" else tuple(range(L - 1, -1, -1)))
            obs = MinMaxObserver(STATIC_TOKEN, layout=layout)
            obs(values[node])
            stats[direction] = (obs.max_val.flatten(), layout)
        fwd, bwd = stats["forward"][0], stats["backward"][0]
        # step t of the backward branch holds canonical token L-1-t ...
        assert torch.equal(bwd, fwd.flip(0))
        # ... which the layout says without knowing it is a reversal
        order = stats["backward"][1].order_tensor()
        canonical = torch.empty_like(bwd)
        canonical[order] = bwd
        assert torch.equal(canonical, fwd)
    # and the ramp makes this a real check: the statistics grow with the canonical position
    x_fwd = MinMaxObserver(STATIC_TOKEN, layout=layout_of(linears[("x_proj", "forward")].args[0]))
    x_fwd(values[linears[("x_proj", "forward")]])
    assert bool((x_fwd.max_val.flatten().diff() > 0).all())
    assert math.isfinite(float(x_fwd.max_val.max()))


def test_layouts_propagate_through_observers_and_marked_modules(tiny_model, tiny_images):
    """Detection re-run on a prepared graph (observers inserted) still finds every layout."""
    from vmfx.passes import DetectMambaMixersPass, PassManager

    prepared = vmfx.prepare(tiny_model, "pts-w8a8", tiny_images[:2])
    assert any(annotation(n) is not None and annotation(n).role == "observer" for n in prepared.graph.nodes)
    gm = PassManager([DetectMambaMixersPass()])(prepared).graph_module
    assert gm.meta["vmfx_layout_unknown"] == []
    backward = [n for n in _scans(gm) if annotation(n).direction == "backward"]
    assert backward and all(layout_of(n).is_reversed for n in backward)
