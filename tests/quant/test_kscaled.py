"""k-scaled quantization primitives: k-means, cluster scales, power-of-two ratios, the "cluster"
spec, and the observer -> quantizer path of a cluster spec."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vmfx.errors import ConfigError
from vmfx.token_layout import TokenLayout
from vmfx.quant import QuantSpec
from vmfx.quant.kscaled import cluster_scales, expand, kmeans, round_pow2_ratios
from vmfx.quant.modules import FakeQuantize
from vmfx.quant.observers import LpObserver, MinMaxObserver, QParams

values_1d = st.lists(st.floats(0.0, 1e3, allow_nan=False, width=32), min_size=1, max_size=40)


def _sse(points: torch.Tensor, labels: torch.Tensor) -> float:
    total = 0.0
    for j in labels.unique():
        p = points[labels == j]
        total += float(((p - p.mean()) ** 2).sum())
    return total


@settings(max_examples=60, deadline=None)
@given(values_1d, st.integers(1, 6), st.integers(0, 3))
def test_kmeans_partitions_deterministically_and_orders_by_centroid(vals, k, seed):
    x = torch.tensor(vals, dtype=torch.float64)
    labels, centres = kmeans(x, k, seed=seed)
    again, _ = kmeans(x, k, seed=seed)
    assert torch.equal(labels, again)  # deterministic for a seed
    m = centres.shape[0]
    assert m <= min(k, len(set(vals)))
    assert labels.shape == x.shape and int(labels.min()) == 0 and int(labels.max()) == m - 1
    assert set(labels.tolist()) == set(range(m))  # every cluster is used: a partition into m parts
    assert bool((centres[1:, 0] >= centres[:-1, 0]).all())  # numbered by ascending centroid
    for j in range(m):  # centroids are the means of their members
        assert float(centres[j, 0]) == pytest.approx(float(x[labels == j].mean()), rel=1e-9, abs=1e-9)
    # Lloyd's fixed point: every point is nearest to its own centroid
    d = (x[:, None] - centres[None, :, 0]).abs()
    assert bool((d.gather(1, labels[:, None]).squeeze(1) <= d.min(1).values + 1e-9).all())


def test_kmeans_separates_clear_groups_optimally():
    g = torch.Generator().manual_seed(0)
    groups = [0.1, 1.0, 10.0, 100.0]
    x = torch.cat([c + 0.01 * c * torch.rand(25, generator=g) for c in groups]).double()
    labels, _ = kmeans(x, 4, seed=0)
    for i, c in enumerate(groups):  # sorted labels: group i is cluster i
        assert set(labels[25 * i: 25 * (i + 1)].tolist()) == {i}
    # brute force over every assignment of a small case: k-means finds the optimum here
    small = torch.tensor([0.0, 0.1, 5.0, 5.2, 9.0, 9.5], dtype=torch.float64)
    best = min(_sse(small, torch.tensor(a)) for a in itertools.product(range(3), repeat=6) if len(set(a)) == 3)
    labels, _ = kmeans(small, 3, seed=1)
    assert _sse(small, labels) == pytest.approx(best)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0009765625, 1024.0, allow_nan=False, width=32), min_size=1, max_size=30),
       st.integers(1, 5), st.sampled_from([8, 4, 2]), st.booleans())
def test_cluster_scales_bound_every_member(vals, k, bits, pow2):
    absmax = torch.tensor(vals)
    spec = QuantSpec(bits, True, "cluster", clusters=k, pow2=pow2)
    ids, scales = cluster_scales(absmax, k, spec.qmax, pow2=pow2)
    assert ids.shape == absmax.shape and scales.numel() == int(ids.max()) + 1 <= k
    per_pos = expand(scales, ids)
    if not pow2:
        # max-based: every member fits (|x| <= qmax * s) and the cluster's largest hits the bound
        assert bool((absmax <= spec.qmax * per_pos * (1 + 1e-6)).all())
        for j in range(scales.numel()):
            assert float(absmax[ids == j].max()) / spec.qmax == pytest.approx(float(scales[j]), rel=1e-6)
    else:
        ratios = torch.log2(scales / scales[0])
        assert torch.allclose(ratios, torch.round(ratios), atol=1e-5)  # s_j = s_0 * 2^integer
        unrounded = torch.zeros(scales.numel()).scatter_reduce_(0, ids.reshape(-1), absmax, "amax",
                                                                include_self=False) / spec.qmax
        # rounding the ratio moves a scale by at most a factor sqrt(2)
        assert bool((scales <= unrounded * 2 ** 0.5 * (1 + 1e-5)).all())
        assert bool((scales >= unrounded / 2 ** 0.5 * (1 - 1e-5)).all())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.0001220703125, 8192.0, allow_nan=False, width=32), min_size=1, max_size=8))
def test_pow2_rounding_keeps_the_first_scale_and_is_idempotent(vals):
    s = torch.tensor(vals)
    r = round_pow2_ratios(s)
    assert float(r[0]) == float(s[0])
    assert torch.allclose(round_pow2_ratios(r), r, rtol=1e-6)
    e = torch.log2(r / r[0])
    assert torch.allclose(e, torch.round(e), atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["token", "channel"]), st.sampled_from([8, 4]), st.booleans())
def test_observer_to_quantizer_round_trip_within_half_a_step(seed, axis, bits, pow2):
    g = torch.Generator().manual_seed(seed)
    B, L, C = 3, 11, 6
    x = torch.randn(B, L, C, generator=g) * torch.logspace(-2, 2, L)[None, :, None] * torch.rand(1, 1, C, generator=g)
    layout = TokenLayout.token_major(x.shape)
    spec = QuantSpec(bits, True, "cluster", cluster_axis=axis, clusters=3, pow2=pow2)
    obs = MinMaxObserver(spec, layout=layout)
    obs(x)
    fq = FakeQuantize(spec, obs.calculate_qparams(), layout=layout, cluster_ids=obs.cluster_ids)
    expect_shape = (1, L, 1) if axis == "token" else (1, 1, C)
    assert tuple(fq.scale.shape) == expect_shape and fq.cluster_ids.shape == fq.scale.shape
    assert 1 <= fq.num_clusters <= 3 and fq.scale.unique().numel() <= fq.num_clusters
    # the scale is the cluster scale at every member
    assert torch.equal(fq.scale.reshape(-1), fq.cluster_scales()[fq.cluster_ids.reshape(-1)])
    err = (fq(x) - x).abs().double()
    step = fq.scale.detach().double().expand_as(x)
    inside = x.abs().double() <= spec.qmax * step * (1 + 1e-6)
    assert bool((err[inside] <= step[inside] / 2 + 1e-6 * step[inside]).all())
    if not pow2:  # max-based scales clip nothing
        assert bool(inside.all())
    # integer codes and dequantize agree with the fake-quant forward
    assert torch.equal(fq.dequantize(fq.quantize(x)), fq(x))
    fq.set_cluster_scales(fq.cluster_scales() * 2)
    assert torch.equal(fq.scale.reshape(-1), fq.cluster_scales()[fq.cluster_ids.reshape(-1)])


def test_cluster_spec_validation_and_round_trip():
    spec = QuantSpec(8, True, "cluster", cluster_axis="channel", clusters=4, pow2=True)
    assert spec.describe() == "int8 sym per-cluster(channel,k=4,pow2)"
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert "clusters" not in QuantSpec(8).to_dict()  # other granularities serialize as before
    assert spec.expanded() == QuantSpec(8, True, "channel")
    layout = TokenLayout(3, (2,), 1, 5, tuple(range(5)))  # (B, D, L)
    assert spec.kept_dims(3, layout=layout) == (1,)
    assert QuantSpec(8, True, "cluster").kept_dims(3, layout=layout) == (2,)
    with pytest.raises(ConfigError, match="static and symmetric"):
        QuantSpec(8, False, "cluster")
    with pytest.raises(ConfigError, match="static and symmetric"):
        QuantSpec(8, True, "cluster", dynamic=True)
    with pytest.raises(ConfigError, match="only apply to granularity 'cluster'"):
        QuantSpec(8, True, "tensor", clusters=3)
    with pytest.raises(ConfigError, match="cluster_axis"):
        QuantSpec(8, True, "cluster", cluster_axis="state")
    with pytest.raises(ConfigError, match="clusters"):
        QuantSpec(8, True, "cluster", clusters=0)
    with pytest.raises(ConfigError, match="needs the cluster of every position"):
        FakeQuantize(spec, QParams(torch.ones(1, 1, 4), torch.zeros(1, 1, 4), spec.qmin, spec.qmax))
    with pytest.raises(ConfigError, match="does not calibrate"):
        LpObserver(spec)
    from vmfx.config import QuantRule

    with pytest.raises(ConfigError, match="cluster"):
        QuantRule("weight", spec)


def test_token_clusters_follow_the_layout_not_a_guessed_axis():
    """(B, D, L) with tokens on dim 2 (a scan output): token clusters are per position of dim 2,
    channel clusters per dim 1; the loud positions land in the last (largest) cluster."""
    from vmfx.errors import LayoutError

    g = torch.Generator().manual_seed(0)
    B, D, L = 2, 5, 9
    x = torch.randn(B, D, L, generator=g)
    x[:, :, [1, 4]] *= 100.0
    layout = TokenLayout(3, (2,), 1, L, tuple(reversed(range(L))))  # a backward scan's positions
    obs = MinMaxObserver(QuantSpec(8, True, "cluster", cluster_axis="token", clusters=2), layout=layout)
    obs(x)
    qp = obs.calculate_qparams()
    assert tuple(qp.scale.shape) == (1, 1, L)
    ids = obs.cluster_ids.reshape(-1)
    assert set(torch.nonzero(ids == 1).flatten().tolist()) == {1, 4}
    obs_c = MinMaxObserver(QuantSpec(8, True, "cluster", cluster_axis="channel"), layout=layout)
    obs_c(x)
    assert tuple(obs_c.calculate_qparams().scale.shape) == (1, D, 1)
    with pytest.raises(LayoutError, match="token layout"):
        MinMaxObserver(QuantSpec(8, True, "cluster"))(x)


def test_jlss_refuses_cluster_input_specs():
    from vmfx.config import JLSSConfig, QuantConfig, QuantRule

    cluster = QuantSpec(8, True, "cluster")
    with pytest.raises(ConfigError, match="JLSS cannot learn 'cluster'"):
        QuantConfig(rules=(QuantRule("input", cluster, role="out_proj"),), jlss=JLSSConfig())
    QuantConfig(rules=(QuantRule("output", cluster, role="scan"),), jlss=JLSSConfig())  # outputs: fine
