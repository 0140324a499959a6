"""The official k-scaled ViM PTQ code's float Vim (Access-IC-Lab/PTQ_for_ViM), loaded with the proxy's
weights by ``benchmarks/kscaled_official.py``, computes vmfx's float logits: the side-by-side comparison
in ``benchmarks/results/kscaled_official.md`` quantizes the same model on both sides.

Skips without a local copy of the official repository (``$VMFX_KSCALED_SRC`` or the fetched mirror)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _harness():
    spec = importlib.util.spec_from_file_location("bench_kscaled_official",
                                                  os.path.join(ROOT, "benchmarks", "kscaled_official.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def official(tmp_path):
    pytest.importorskip("einops", reason="the official Vim code imports einops")
    harness = _harness()
    try:
        src_dir = harness.materialise(tmp_path)
    except harness.OfficialCodeMissing as exc:
        pytest.skip(str(exc))
    path = list(sys.path)
    try:
        yield harness, harness.import_official(src_dir)
    finally:
        harness._purge_official_modules()
        sys.path[:] = path


def test_official_float_vim_computes_vmfx_logits(official):
    harness, mods = official
    from vmfx.data import load_digits, load_proxy_model

    torch.manual_seed(0)
    model = load_proxy_model()
    images, labels = load_digits("test")
    images, labels = images[:3], labels[:3]
    theirs = harness.build_official(mods, model)
    got, _ = harness.official_logits(theirs, images, labels)
    with torch.no_grad():
        want = model(images)
    # the same float32 math in another order (their sequential scan vs vmfx's)
    assert torch.allclose(got, want, rtol=0, atol=1e-4 * want.abs().max().item())
    # and the harness leaves .cuda() alone outside the official calls
    assert torch.Tensor.cuda is not None and "lambda" not in repr(torch.Tensor.cuda)


def test_dt_rank_patch_is_the_only_edit(official, tmp_path):
    """The materialised net_wrap differs from the official one only in the hard-coded dt rank."""
    harness, _ = official
    patched = (tmp_path / "src" / "quant_utils" / "net_wrap.py").read_text()
    assert harness.DT_RANK_PATCH in patched and harness.DT_RANK_LINE not in patched
