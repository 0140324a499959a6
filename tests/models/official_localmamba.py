"""Import the official LocalMamba code (hunto/LocalMamba) on a CPU, for equality tests (tests only).

The official ``local_vim.py`` and its ``mamba/`` package are read from a local copy of the
repository: ``$VMFX_LOCALMAMBA_SRC`` (a checkout or a bare git directory), else the fetched mirror
``/work/.mirror/hunto+LocalMamba/repo``. Nothing is downloaded; without a copy the tests skip.

The official model needs CUDA in three places, each replaced by the reference the official
repository bundles itself (its ``mamba-1p1p1`` and ``causal-conv1d`` copies), loaded under private
module names so that the installed ``mamba_ssm`` is left alone:

* ``mamba_inner_fn_no_out_proj`` (CUDA kernels) -> the bundled ``mamba_inner_ref`` with an identity
  ``out_proj`` (x @ I is exact), transposed back to (B, D, L); its ``selective_scan_fn`` and
  ``causal_conv1d_fn`` -> the bundled ``selective_scan_ref`` and ``causal_conv1d_ref``;
* ``rms_norm_fn`` / ``layer_norm_fn`` (Triton) -> the bundled ``rms_norm_ref`` / ``layer_norm_ref``
  (``upcast=True``: fp32 math, as the kernels do);
* ``register_model`` is made a no-op while importing, so timm's registry keeps vmfx's entry points.

``local_vmamba.py`` (:func:`import_official_local_vmamba`) needs two more stand-ins: its CUDA scan
``selective_scan_cuda_core.fwd`` -> the bundled ``selective_scan_ref`` (grouped B / C as the kernel
takes them), and ``fvcore.nn`` (FLOP counting only; the forward never calls it) -> empty names.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

_MIRROR = "/work/.mirror/hunto+LocalMamba/repo"
_FILES = {
    "lm_official/local_vim.py": "classification/lib/models/local_vim.py",
    "lm_official/local_vmamba.py": "classification/lib/models/local_vmamba.py",
    "lm_official/mamba/__init__.py": "classification/lib/models/mamba/__init__.py",
    "lm_official/mamba/multi_mamba.py": "classification/lib/models/mamba/multi_mamba.py",
    "lm_official/mamba/local_scan.py": "classification/lib/models/mamba/local_scan.py",
    "lm_official/mamba/rope.py": "classification/lib/models/mamba/rope.py",
    "lm_bundled/selective_scan_interface.py": "mamba-1p1p1/mamba_ssm/ops/selective_scan_interface.py",
    "lm_bundled/layernorm.py": "mamba-1p1p1/mamba_ssm/ops/triton/layernorm.py",
    "lm_bundled/causal_conv1d_interface.py": "causal-conv1d/causal_conv1d/causal_conv1d_interface.py",
}


def _read(src: str, path: str) -> str:
    if os.path.isdir(os.path.join(src, "classification")):
        return Path(src, path).read_text()
    return subprocess.run(["git", "--git-dir", src, "show", f"HEAD:{path}"], check=True, capture_output=True,
                          text=True).stdout


def _materialise(dest: Path) -> None:
    src = os.environ.get("VMFX_LOCALMAMBA_SRC", _MIRROR)
    if not os.path.exists(src):
        pytest.skip(f"no copy of hunto/LocalMamba at {src} (set VMFX_LOCALMAMBA_SRC to a checkout)")
    try:
        texts = {rel: _read(src, path) for rel, path in _FILES.items()}
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot read the official LocalMamba files from {src}: {exc}")
    for rel, text in texts.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(text)
    (dest / "lm_official/__init__.py").write_text("")


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def import_official_local_vim(tmp_path: Path, monkeypatch) -> types.ModuleType:
    """The official ``local_vim`` module, runnable on a CPU (see the module docstring), or skip."""
    try:
        from vmfx.frontends import enable_mamba_ssm_on_cpu
        enable_mamba_ssm_on_cpu()
        import einops  # noqa: F401
        import timm.models.registry as timm_registry
    except ImportError as exc:
        pytest.skip(f"the official LocalMamba code needs mamba_ssm, einops and timm: {exc}")
    _materialise(tmp_path)
    stub = types.ModuleType("causal_conv1d_cuda")
    monkeypatch.setitem(sys.modules, "causal_conv1d_cuda", stub)
    if "selective_scan_cuda" not in sys.modules:
        monkeypatch.setitem(sys.modules, "selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    causal = _load("lm_bundled_causal_conv1d", tmp_path / "lm_bundled/causal_conv1d_interface.py")
    causal_pkg = types.ModuleType("causal_conv1d")
    causal_pkg.causal_conv1d_fn = causal.causal_conv1d_ref
    monkeypatch.setitem(sys.modules, "causal_conv1d", causal_pkg)
    ssi = _load("lm_bundled_selective_scan_interface", tmp_path / "lm_bundled/selective_scan_interface.py")
    ssi.selective_scan_fn = ssi.selective_scan_ref
    ssi.causal_conv1d_fn = causal.causal_conv1d_ref
    norms = _load("lm_bundled_layernorm", tmp_path / "lm_bundled/layernorm.py")
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.triton.layernorm", norms)
    monkeypatch.setattr(timm_registry, "register_model", lambda fn: fn)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [n for n in sys.modules if n == "lm_official" or n.startswith("lm_official.")]:
        monkeypatch.delitem(sys.modules, name)
    local_vim = importlib.import_module("lm_official.local_vim")
    multi_mamba = importlib.import_module("lm_official.mamba.multi_mamba")

    def mamba_inner_fn_no_out_proj(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A,
                                   B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None,
                                   delta_softplus=True):
        eye = torch.eye(xz.shape[1] // 2, dtype=xz.dtype, device=xz.device)
        out = ssi.mamba_inner_ref(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, eye, None, A,
                                  B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus)
        return out.transpose(1, 2)

    def fused(ref):
        def fn(x, weight, bias, residual=None, prenorm=False, residual_in_fp32=False, eps=1e-6):
            return ref(x, weight, bias, residual=residual, eps=eps, prenorm=prenorm, upcast=True)
        return fn

    multi_mamba.mamba_inner_fn_no_out_proj = mamba_inner_fn_no_out_proj
    local_vim.rms_norm_fn = fused(norms.rms_norm_ref)
    local_vim.layer_norm_fn = fused(norms.layer_norm_ref)
    return local_vim


def import_official_local_vmamba(tmp_path: Path, monkeypatch) -> types.ModuleType:
    """The official ``local_vmamba`` module, runnable on a CPU (see the module docstring), or skip."""
    import_official_local_vim(tmp_path, monkeypatch)  # the shared stand-ins and the materialised files
    ssi = sys.modules["lm_bundled_selective_scan_interface"]

    def fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, nrows):
        out = ssi.selective_scan_ref(u, delta, A, B, C, D, None, delta_bias, delta_softplus)
        return out, None

    core = types.ModuleType("selective_scan_cuda_core")
    core.fwd = fwd
    monkeypatch.setitem(sys.modules, "selective_scan_cuda_core", core)
    fvcore, fvcore_nn = types.ModuleType("fvcore"), types.ModuleType("fvcore.nn")
    for name in ("FlopCountAnalysis", "flop_count_str", "flop_count", "parameter_count"):
        setattr(fvcore_nn, name, None)
    fvcore.nn = fvcore_nn
    monkeypatch.setitem(sys.modules, "fvcore", fvcore)
    monkeypatch.setitem(sys.modules, "fvcore.nn", fvcore_nn)
    return importlib.import_module("lm_official.local_vmamba")
