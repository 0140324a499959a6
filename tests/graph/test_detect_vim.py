"""Detection on the real Vim architecture (random weights): 24 blocks x 2 scan directions."""

from __future__ import annotations

import pytest
import torch

import vmfx
import vmfx.models  # noqa: F401  (registers the Vim models in timm)
from vmfx.annotations import annotation

VIM_T = "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"


@pytest.fixture(scope="module")
def vim_t_graph():
    import timm

    torch.manual_seed(0)
    model = timm.create_model(VIM_T).eval()
    return vmfx.trace(model, (torch.randn(1, 3, 224, 224),))


def test_vim_t_has_24_blocks_with_two_directions(vim_t_graph):
    mixers = vim_t_graph.meta["vmfx_mixers"]
    assert len(mixers) == 24
    assert [m["block"] for m in mixers] == list(range(24))
    assert all(list(m["directions"]) == ["forward", "backward"] for m in mixers)
    assert all(m["tokens"] == 197 for m in mixers)
    assert all(m["norm"] is not None for m in mixers)
    assert vim_t_graph.meta["vmfx_detect_failures"] == []


def test_vim_t_role_counts_and_names(vim_t_graph):
    counts: dict[tuple[str, str | None], int] = {}
    for node in vim_t_graph.graph.nodes:
        ann = annotation(node)
        if ann is not None:
            counts[(ann.role, ann.direction)] = counts.get((ann.role, ann.direction), 0) + 1
            if node.op == "call_module" and ann.role in ("in_proj", "x_proj", "dt_proj", "out_proj", "conv1d"):
                # structure decided; the official names agree
                leaf = node.target.rsplit(".", 1)[-1]
                assert leaf.startswith(ann.role) and leaf.endswith("_b") == (ann.direction == "backward")
                assert node.target.startswith(f"layers.{ann.block}.mixer.")
    for role in ("conv1d", "x_proj", "dt_proj", "scan"):
        assert counts[(role, "forward")] == counts[(role, "backward")] == 24
    assert counts[("in_proj", None)] == counts[("out_proj", None)] == 24
    assert counts[("norm", None)] == 25  # 24 pre-norms + norm_f
    assert counts[("patch_embed", None)] == 1 and counts[("head", None)] == 1
