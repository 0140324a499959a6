"""Every method's preset still computes what it computed when the golden logits were stored.

For one preset per method (:data:`PRESETS`) the bundled proxy Vim is compiled with
:data:`CALIB_IMAGES` training digits, each method's searches cut short to keep the test fast
(:func:`short_config`: :data:`LEARNING_STEPS` steps of JLSS for PTQ4VM and OuroMamba,
:data:`CANDIDATES` candidates for the lp-norm scale search and k-scaled's similarity search, one
round on :data:`SEARCH_IMAGES` images for the latter), and run, as the simulated-quantization
graph, on :data:`TEST_IMAGES` test digits; the logits are compared with those stored in
``tests/data/artifacts/preset_golden_logits.pt`` (float32).

Tolerance: the largest difference must stay within ``RTOL`` (1e-5) of the largest golden logit.
Bitwise status: the file was written at commit 0a212f7 (whose runtime code is that of 5cc663c),
and on the machine that wrote it every preset matched it bitwise (relative difference 0) after the
Triton templates were rewritten (``benchmarks/preset_golden_mutations.py``, column ``none``); each
run prints ``bitwise=...`` per preset (``pytest -s``). ``ouromamba-w4a4``'s entry was rewritten when
fake quantization became one autograd node (``vmfx.ops.quantize.FakeQuantizeFunction``): its gradients
equal the composed form's up to float rounding, and that preset's learning carried the rounding to
0.0185 of the logits' scale (the same node computing its gradients with the composed form's
arithmetic stayed within 2.3e-7), while the seven others stayed within the tolerance. Bitwise equality is brittle across CPUs and
BLAS builds, hence the tolerance, which is far below what a change of a preset's quantization
moves. Measured with ``benchmarks/preset_golden_mutations.py`` (largest relative difference from
the golden logits; the smallest over the eight presets): the fake quantizers' ``round`` replaced by
``floor``: 0.077 (smoothquant-w8a8); one quantizer's scale times 1 + 2^-10: 0.020
(smoothquant-w8a8); every scale times 1 + 2^-12: 0.018 (pts-w4a8): each at least 1800 times the
tolerance.

Refresh, after a change that is meant to change a preset's outputs (say so in the commit)::

    VMFX_UPDATE_GOLDEN=1 OMP_NUM_THREADS=1 python -m pytest tests/test_preset_golden.py -q
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import pytest
import torch

import vmfx
from vmfx.config import resolve_config
from vmfx.data import load_digits, load_proxy_model

GOLDEN_PATH = os.path.join(os.path.dirname(__file__), "data", "artifacts", "preset_golden_logits.pt")
PRESETS = ("minmax-w8a8", "smoothquant-w8a8", "pts-w4a8", "pts-smooth-w4a4", "ptq4vm-w4a4", "kscaled-w8a8",
           "ouromamba-w4a4", "rotate-w4a4")
CALIB_IMAGES = 16
TEST_IMAGES = 32
LEARNING_STEPS = 2
CANDIDATES = 11
SEARCH_IMAGES = 4
RTOL = 1e-5
UPDATE = os.environ.get("VMFX_UPDATE_GOLDEN") == "1"


def short_config(name: str):
    """The preset ``name`` with its searches cut short: JLSS learning (PTQ4VM, OuroMamba) to
    :data:`LEARNING_STEPS` steps in batches of the whole calibration set, the lp-norm scale search
    to :data:`CANDIDATES` candidates, k-scaled's similarity search to one round of
    :data:`CANDIDATES` candidates on :data:`SEARCH_IMAGES` images."""
    cfg = resolve_config(name)
    cfg = dataclasses.replace(cfg, init=dataclasses.replace(cfg.init, candidates=CANDIDATES))
    if cfg.search is not None:
        cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, rounds=1, candidates=CANDIDATES,
                                                                  images=SEARCH_IMAGES))
    if cfg.jlss is not None:
        cfg = dataclasses.replace(cfg, jlss=dataclasses.replace(cfg.jlss, steps=LEARNING_STEPS,
                                                                batch_size=CALIB_IMAGES))
    return cfg


def preset_logits(name: str, model: torch.nn.Module, calib: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """The logits of the simulated-quantization graph of preset ``name`` on ``test`` (float32)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = vmfx.compile(model, calib, short_config(name))
    with torch.no_grad():
        return qmodel(test).float()


@pytest.fixture(scope="module")
def inputs():
    model = load_proxy_model()
    calib = load_digits("train")[0][:CALIB_IMAGES]
    test = load_digits("test")[0][:TEST_IMAGES]
    return model, calib, test


@pytest.fixture(scope="module")
def golden():
    if UPDATE:
        stored = torch.load(GOLDEN_PATH) if os.path.exists(GOLDEN_PATH) else {}
        yield stored
        torch.save(stored, GOLDEN_PATH)
        return
    if not os.path.exists(GOLDEN_PATH):
        pytest.fail(f"{GOLDEN_PATH} is missing: write it with VMFX_UPDATE_GOLDEN=1 (see this module's docstring)")
    yield torch.load(GOLDEN_PATH)


def compare(name: str, logits: torch.Tensor, expected: torch.Tensor) -> tuple[bool, float]:
    """``(bitwise equal, max |difference| / max |expected|)``; fails when the shapes differ."""
    assert logits.shape == expected.shape, f"{name}: logits {tuple(logits.shape)}, golden {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    return torch.equal(logits, expected), (logits - expected).abs().max().item() / scale


@pytest.mark.parametrize("name", PRESETS)
def test_preset_matches_golden_logits(name, inputs, golden):
    logits = preset_logits(name, *inputs)
    if UPDATE:
        golden[name] = logits.clone()
        return
    assert name in golden, f"no golden logits for {name}: refresh with VMFX_UPDATE_GOLDEN=1"
    bitwise, rel = compare(name, logits, golden[name])
    print(f"{name}: bitwise={bitwise} max relative difference {rel:.3g}")
    assert rel <= RTOL, (
        f"{name}: logits moved by {rel:.3g} of their scale (tolerance {RTOL}) since the golden file was "
        f"written. If the change is meant to change this preset's outputs, refresh with VMFX_UPDATE_GOLDEN=1 "
        f"(tests/test_preset_golden.py docstring) and say so in the commit; otherwise the change altered "
        f"the preset's quantization.")
