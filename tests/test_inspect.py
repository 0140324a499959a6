"""Inspection: tables, drawings and per-layer error."""

from __future__ import annotations

import math
import os

import pytest
import torch

import vmfx
from vmfx.inspect import compare, rows, summary, table, to_dot, to_networkx


def test_table_lists_roles_specs_and_scale_shapes(tiny_model, tiny_images):
    q = vmfx.compile(tiny_model, tiny_images, "minmax-w4a8")
    text = table(q)
    header = text.splitlines()[0].split()
    assert header == ["node", "op", "target", "role", "block", "dir", "tokens", "shape", "spec", "scale"]
    by_node = {r["node"]: r for r in rows(q)}
    r = by_node["mixers_0_x_proj_b"]
    assert (r["role"], r["block"], r["dir"], r["tokens"]) == ("x_proj", 0, "bwd", 16)
    assert r["spec"] == "A uint8 asym per-tensor | W int4 sym per-channel"
    assert r["scale"] == "A 1x1x1 | W 18x1"  # x_proj: dt_rank 2 + 2 x d_state 8 rows
    # its two quantizers are rows of their own, on its input and weight edges
    assert by_node["vmfx_q_mixers_0_x_proj_b__input"]["spec"] == "uint8 asym per-tensor"
    assert by_node["vmfx_q_mixers_0_x_proj_b__weight"]["scale"] == "18x1"
    assert by_node["vmfx_q_mixers_0_x_proj_b__weight"]["role"] == "quantizer"
    assert len(rows(q, all_nodes=True)) == len(q.graph.nodes) > len(rows(q))


def test_summary_counts(tiny_model, tiny_images):
    s = summary(vmfx.compile(tiny_model, tiny_images, "minmax-w8a8"))
    assert s["mixers"] == 2 and s["scans"] == 4 and s["quantized_linears"] == 12 and s["observers"] == 0
    assert s["roles"]["scan"] == 4 and s["calibration"]["images"] == 12


def test_networkx_and_dot(tiny_model, tiny_images):
    gm = vmfx.trace(tiny_model, (tiny_images[:1],))
    g = to_networkx(gm)
    assert g.number_of_nodes() == len(gm.graph.nodes)
    assert g.nodes["mixers_1_in_proj"]["role"] == "in_proj"
    assert g.has_edge("mixers_1_in_proj", "getitem_8") or any(g.successors("mixers_1_in_proj"))
    dot = to_dot(gm)
    assert dot.startswith('digraph "vmfx"') and dot.rstrip().endswith("}")
    assert dot.count("->") == g.number_of_edges()
    assert "in_proj [1]" in dot


def test_compare_reports_error_that_grows_as_bits_shrink(tiny_model, tiny_images):
    r8 = compare(tiny_model, vmfx.compile(tiny_model, tiny_images, "minmax-w8a8"), tiny_images)
    r4 = compare(tiny_model, vmfx.compile(tiny_model, tiny_images, "minmax-w4a4"), tiny_images)
    assert r8.images == 12
    assert r8["patch"].sqnr_db == math.inf  # not quantized
    assert r8.output.cosine > 0.99 and r8.output.sqnr_db > r4.output.sqnr_db
    assert r8["mixers_0_in_proj"].sqnr_db > r4["mixers_0_in_proj"].sqnr_db
    assert r8.worst(1)[0].sqnr_db == min(l.sqnr_db for l in r8.layers)
    assert "SQNR dB" in str(r8)


def test_compare_matches_direct_computation(tiny_model, tiny_images):
    q = vmfx.compile(tiny_model, tiny_images, "minmax-w4a4")
    report = compare(tiny_model, q, tiny_images, batch_size=5)
    with torch.no_grad():
        a, b = tiny_model(tiny_images).double(), q(tiny_images).double()
    sqnr = 10 * torch.log10((a**2).sum() / ((a - b) ** 2).sum())
    cos = (a * b).sum() / (a.norm() * b.norm())
    assert abs(report.output.sqnr_db - float(sqnr)) < 1e-6
    assert abs(report.output.cosine - float(cos)) < 1e-9


def test_table_of_a_float_module_traces_it(tiny_model, tiny_images):
    by_node = {r["node"]: r for r in rows(tiny_model)}
    assert by_node["mixers_1_in_proj"]["role"] == "in_proj" and by_node["mixers_1_in_proj"]["shape"] == ""
    with_shapes = {r["node"]: r for r in rows(tiny_model, example_inputs=tiny_images[:1])}
    assert with_shapes["mixers_0_x_proj_b"]["tokens"] == 16 and with_shapes["mixers_0_x_proj_b"]["shape"] == "1x16x18"
    assert table(tiny_model).splitlines()[0].split()[:4] == ["node", "op", "target", "role"]
    assert not any(isinstance(m, (vmfx.quant.FakeQuantize, vmfx.quant.Smooth)) for m in tiny_model.modules())  # not modified


def test_table_of_something_else_says_what_to_pass():
    with pytest.raises(vmfx.ConfigError, match="expected a vmfx graph .* or a float nn.Module, got str"):
        table("model.pth")


def test_activation_stats_of_a_missing_block_is_a_config_error(tiny_model, tiny_images):
    from vmfx.inspect import activation_stats

    with pytest.raises(vmfx.ConfigError, match=r"block 99; the graph has blocks \[0, 1\]"):
        activation_stats(tiny_model, tiny_images, 99)


def test_long_tail_plot_has_a_panel_per_linear_on_its_own_range(tiny_model, tiny_images, tmp_path, monkeypatch):
    import vmfx.inspect as vinspect

    panels = {}
    save = vinspect._save

    def keep(fig, path):
        panels[os.path.basename(path)] = [(ax.get_title(), ax.get_xlim()) for ax in fig.axes]
        return save(fig, path)

    monkeypatch.setattr(vinspect, "_save", keep)
    vinspect.plot_distributions(tiny_model, tiny_images, str(tmp_path), block=1)
    stats = vinspect.activation_stats(tiny_model, tiny_images, 1)
    assert len(panels["long_tail.png"]) == len(stats) >= 4
    for (title, xlim), s in zip(panels["long_tail.png"], stats):
        assert title.startswith(s.name)
        assert xlim == pytest.approx((float(s.hist_edges[0]), float(s.hist_edges[-1])))
    assert len({xlim for _, xlim in panels["long_tail.png"]}) > 1


def test_a_lowered_model_shows_what_each_kernel_quantizes(tiny_model, tiny_images, tmp_path):
    """summary / table / coverage of a lowered model report its kernels' linears and specs, both
    with its quantized source at hand and loaded from a file (no source: the kernels' records)."""
    q = vmfx.compile(tiny_model, tiny_images, "minmax-w8a8")
    lowered = vmfx.lowering.lower(q, "reference")
    loaded = vmfx.load(vmfx.save(lowered, str(tmp_path / "lowered.safetensors")), model=tiny_model)
    for model in (lowered, loaded):
        s = summary(model)
        assert s["quantized_linears"] == summary(q)["quantized_linears"] == 12 and s["kernels"] > 0
        kernels = [r for r in rows(model) if r["role"] == "kernel"]
        in_proj = next(r for r in kernels if r["node"].endswith("mixers_0_in_proj"))
        assert in_proj["spec"] == "A uint8 asym per-tensor | W int8 sym per-channel"
        assert any(r["spec"].startswith("x_proj fwd: A uint8") and "x_proj bwd: A uint8" in r["spec"] for r in kernels)
        assert vmfx.inspect.coverage(model).summary_line().endswith("12/13 linears quantized, 0/4 scans quantized")
