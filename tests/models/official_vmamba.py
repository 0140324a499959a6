"""Import the official VMamba code (MzeroMiko/VMamba) on a CPU, for equality tests (tests only).

The official ``classification/models/vmamba.py`` and its helpers ``csm_triton.py`` (cross-scan /
cross-merge) and ``csms6s.py`` (selective scan) are read from a local copy of the repository:
``$VMFX_VMAMBA_SRC`` (a checkout or a bare git directory), else the fetched mirror
``/work/.mirror/MzeroMiko+VMamba/repo``. They are written into a temporary package ``vm_official``
and imported from there; nothing is downloaded, and without a copy the tests skip.

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
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest

_MIRROR = "/work/.mirror/MzeroMiko+VMamba/repo"
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


def _materialise(dest: Path) -> None:
    src = os.environ.get("VMFX_VMAMBA_SRC", _MIRROR)
    if not os.path.exists(src):
        pytest.skip(f"no copy of MzeroMiko/VMamba at {src} (set VMFX_VMAMBA_SRC to a checkout)")
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


def import_official_vmamba(tmp_path: Path, monkeypatch) -> types.ModuleType:
    """The official ``vmamba`` module, runnable on a CPU (see the module docstring), or skip.

    ``monkeypatch`` owns every change to ``sys.modules`` and timm; undo it when done.
    """
    try:
        import einops  # noqa: F401  (csm_triton / the official mamba2 helpers)
        import timm.layers
    except ImportError as exc:
        pytest.skip(f"the official VMamba code needs timm and einops: {exc}")
    _materialise(tmp_path)

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
