"""Import the official VMamba code (MzeroMiko/VMamba) on a CPU, for equality tests (tests only).

The official ``classification/models/vmamba.py`` and its helpers ``csm_triton.py`` (cross-scan /
cross-merge) and ``csms6s.py`` (selective scan) are read from a local copy of the repository:
``$VMFX_VMAMBA_SRC`` (a checkout or a bare git directory). They are written into a temporary package
``vm_official`` and imported from there; nothing is downloaded. Without a copy the comparisons run on
the recorded fixture (``official_fixtures.py``), which :func:`vmamba_reference` computes and
``make_official_fixtures.py`` writes.

Every stand-in below routes to a pure-torch path the official code provides itself:

* the selective scan: ``csms6s`` guards its imports of the CUDA extensions
  (``selective_scan_cuda_oflex``, ``selective_scan_cuda_core``, ``selective_scan_cuda``); they are
  made unimportable while it is imported, so ``selective_scan_fn`` runs the official
  ``selective_scan_torch`` (fp32, a loop over the sequence, grouped B / C) for every backend;
* cross-scan / cross-merge: ``csm_triton.cross_scan_fn`` / ``cross_merge_fn`` pick the pure-torch
  ``CrossScanF`` / ``CrossMergeF`` for CPU tensors, but first enter ``torch.cuda.device(x.device)``,
  which raises for a CPU device (the repository's root ``vmamba.py`` guards it with ``x.is_cuda``);
  ``vmamba``'s two names are rebound to wrappers that apply ``CrossScanF`` / ``CrossMergeF``
  directly, with the same arguments;
* ``fvcore.nn`` (FLOP counting only; the forward never calls it) -> empty names;
* ``mamba2.ssd_minimal.selective_scan_chunk_fn`` (Mamba-2 SSD, used only by the ``m0*`` forward
  types, which vmfx does not build) -> a function that raises;
* timm's ``DropPath.__repr__``, which the official module overwrites at import, is restored after;
  the import's warnings (no CUDA scan, deprecated timm / torch.amp names) are silenced.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest
import torch

REPOSITORY = "MzeroMiko/VMamba"
ENV = "VMFX_VMAMBA_SRC"
_FILES = {
    "vm_official/vmamba.py": "classification/models/vmamba.py",
    "vm_official/csm_triton.py": "classification/models/csm_triton.py",
    "vm_official/csms6s.py": "classification/models/csms6s.py",
}
_CUDA_SCANS = ("selective_scan_cuda_oflex", "selective_scan_cuda_core", "selective_scan_cuda")


def _read(src: str, path: str) -> str:
    if os.path.isdir(os.path.join(src, "classification")):
        return Path(src, path).read_text()
    return subprocess.run(["git", "--git-dir", src, "show", f"HEAD:{path}"], check=True, capture_output=True,
                          text=True).stdout


def _materialise(dest: Path, src: Optional[str]) -> None:
    src = src or os.environ.get(ENV)
    if not src or not os.path.exists(src):
        pytest.skip(f"no copy of {REPOSITORY} at {src!r} (set {ENV} to a checkout)")
    try:
        texts = {rel: _read(src, path) for rel, path in _FILES.items()}
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot read the official VMamba files from {src}: {exc}")
    for rel, text in texts.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(text)
    (dest / "vm_official/__init__.py").write_text("")  # not the official __init__ (it builds from yacs configs)


def _module(monkeypatch, name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def import_official_vmamba(tmp_path: Path, monkeypatch, src: Optional[str] = None) -> types.ModuleType:
    """The official ``vmamba`` module from ``src`` (default ``$VMFX_VMAMBA_SRC``), runnable on a CPU
    (see the module docstring), or skip.

    ``monkeypatch`` owns every change to ``sys.modules`` and timm; undo it when done.
    """
    try:
        import einops  # noqa: F401  (csm_triton / the official mamba2 helpers)
        import timm.layers
    except ImportError as exc:
        pytest.skip(f"the official VMamba code needs timm and einops: {exc}")
    _materialise(tmp_path, src)

    fvcore_nn = _module(monkeypatch, "fvcore.nn", **dict.fromkeys(
        ("FlopCountAnalysis", "flop_count_str", "flop_count", "parameter_count")))
    _module(monkeypatch, "fvcore", nn=fvcore_nn)

    def selective_scan_chunk_fn(*args, **kwargs):
        raise NotImplementedError("the official Mamba-2 SSD scan (forward types m0*) is not available here")

    ssd = _module(monkeypatch, "vm_official.mamba2.ssd_minimal", selective_scan_chunk_fn=selective_scan_chunk_fn)
    _module(monkeypatch, "vm_official.mamba2", ssd_minimal=ssd)
    for name in _CUDA_SCANS:  # None in sys.modules: ``import name`` raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(timm.layers.DropPath, "__repr__", timm.layers.DropPath.__repr__)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [n for n in sys.modules if n == "vm_official" or n.startswith("vm_official.")]:
        if not name.startswith("vm_official.mamba2"):
            monkeypatch.delitem(sys.modules, name)
    with warnings.catch_warnings():  # the official import's notices: no CUDA scan, timm / torch.amp deprecations
        warnings.simplefilter("ignore")
        vmamba = importlib.import_module("vm_official.vmamba")
    csms6s = sys.modules["vm_official.csms6s"]
    if csms6s.WITH_SELECTIVESCAN_OFLEX or csms6s.WITH_SELECTIVESCAN_CORE or csms6s.WITH_SELECTIVESCAN_MAMBA:
        raise RuntimeError("the official csms6s found a CUDA selective scan; expected its torch fallback")
    csm = sys.modules["vm_official.csm_triton"]

    def cross_scan_fn(x, in_channel_first=True, out_channel_first=True, one_by_one=False, scans=0,
                      force_torch=False):
        return csm.CrossScanF.apply(x, in_channel_first, out_channel_first, one_by_one, scans)

    def cross_merge_fn(y, in_channel_first=True, out_channel_first=True, one_by_one=False, scans=0,
                       force_torch=False):
        return csm.CrossMergeF.apply(y, in_channel_first, out_channel_first, one_by_one, scans)

    vmamba.cross_scan_fn = cross_scan_fn
    vmamba.cross_merge_fn = cross_merge_fn
    return vmamba


# -- the compared cases and the reference they are compared with ----------------------------------

# The generations vmfx builds, as in the official entry points (vmamba.py: vanilla_vmamba_*,
# vmamba_*_s2l*, vmamba_*_s1l*), written out here rather than taken from vmfx's table:
V0 = dict(ssm_d_state=16, ssm_ratio=2.0, ssm_conv_bias=True, forward_type="v0", mlp_ratio=0.0,
          norm_layer="ln", downsample_version="v1", patchembed_version="v1")
V2 = dict(ssm_d_state=1, ssm_ratio=2.0, ssm_conv_bias=False, forward_type="v05_noz", mlp_ratio=4.0,
          norm_layer="ln2d", downsample_version="v3", patchembed_version="v2")
GENERATIONS = {
    "v0": V0,  # Vanilla-VMamba: z gate, d_state 16, PatchMerging2D, channel-last
    "v2": V2,  # s2lX: ssm_ratio 2, v05_noz (grouped conv1d projections), ln2d
    "v2v": dict(V2, ssm_ratio=1.0),  # s1lX (vmamba_tiny_s1l8, PTQ4VM's model): ssm_ratio 1
    "v2v-ln": dict(V2, ssm_ratio=1.0, norm_layer="ln"),  # the entry points' channel_first=False
    "v2-v3_noz": dict(V2, forward_type="v3_noz"),  # the configs' twin: einsum projections, "oflex" scan
}
TINY = dict(depths=[1, 2, 1], dims=8, num_classes=7, drop_path_rate=0.0)
# non-square, odd grids: v1 36x52 -> 9x13 -> 5x7 -> 3x4 (PatchMerging pads); v2 -> 9x13 -> 5x7 -> 3x4
SIZES = ((36, 52), (32, 32))
#: torch.manual_seed before the official VSSM is built; randomize's seed; images(2, seed, SIZES[i]).
MODEL_SEED, STATE_SEED, IMAGE_SEEDS = 0, 1, (10, 11)


def images(n: int, seed: int, size) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def randomize(state: dict, seed: int) -> dict:
    """Fresh random values so that every parameter matters: norms, Ds near 1; A_logs in Mamba's range;
    dt biases for steps of 0.05 to 1 (wider than the init's 0.001 to 0.1, so that the recurrence, not
    only the D skip, shapes the scan's output); weights of fan-in scale (the official init leaves the
    mixers' out_proj and the head at 0.02 and every bias at 0)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        r = torch.randn(v.shape, generator=g)
        if k.endswith("A_logs"):
            r = torch.log(torch.rand(v.shape, generator=g) * 8 + 1)
        elif k.endswith("dt_projs_bias"):  # softplus(bias) log-uniform in [0.05, 1]
            r = torch.log(torch.expm1(0.05 * 20 ** torch.rand(v.shape, generator=g)))
        elif k.endswith("Ds") or k.endswith("norm.weight") or k.endswith("norm2.weight"):
            r = 1 + 0.2 * r
        elif k.endswith(("x_proj_weight", "dt_projs_weight")):  # (K, out, in): K stacked linears
            r = r / math.sqrt(v.shape[-1])
        elif v.dim() >= 2:  # linears (out, in), convs (out, in / groups, kh, kw)
            r = r / math.sqrt(v[0].numel())
        else:
            r = 0.1 * r
        out[k] = r.to(v.dtype)
    return out


def official_entry_points(official: types.ModuleType) -> dict:
    """{entry point name: the arguments it passes to VSSM} for the official ``vanilla_vmamba_*`` /
    ``vmamba_*`` functions (called with VSSM replaced; no model is built)."""
    saved = official.VSSM
    official.VSSM = lambda **kw: kw
    try:
        return {name: fn() for name, fn in sorted(vars(official).items())
                if name.startswith(("vanilla_vmamba_", "vmamba_")) and inspect.isfunction(fn)}
    finally:
        official.VSSM = saved


def vmamba_reference(official: types.ModuleType) -> Tuple[Dict[str, torch.Tensor], dict]:
    """What vmfx is compared with, computed by the official code: per generation
    ``"<generation>/state/<key>"`` (the official VSSM's state dict after :func:`randomize`) and
    ``"<generation>/logits/<i>"`` (its logits on ``"input/<i>"``), and the metadata
    (configurations, seeds, the entry points' arguments)."""
    tensors = {f"input/{i}": images(2, seed, size) for i, (seed, size) in enumerate(zip(IMAGE_SEEDS, SIZES))}
    for generation, config in GENERATIONS.items():
        torch.manual_seed(MODEL_SEED)
        theirs = official.VSSM(**config, **TINY).eval()
        state = randomize(theirs.state_dict(), STATE_SEED)
        theirs.load_state_dict(state)
        tensors.update({f"{generation}/state/{k}": v for k, v in state.items()})
        with torch.no_grad():
            for i in range(len(SIZES)):
                tensors[f"{generation}/logits/{i}"] = theirs(tensors[f"input/{i}"])
    meta = {"generations": GENERATIONS, "tiny": TINY, "sizes": SIZES, "model_seed": MODEL_SEED,
            "state_seed": STATE_SEED, "image_seeds": IMAGE_SEEDS, "images_per_size": 2,
            "entry_points": official_entry_points(official)}
    return tensors, json.loads(json.dumps(meta))  # tuples as lists, as read back from the file
