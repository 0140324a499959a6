"""Import the official LocalMamba code (hunto/LocalMamba) on a CPU, for equality tests (tests only).

The official ``local_vim.py`` and its ``mamba/`` package are read from a local copy of the
repository: ``$VMFX_LOCALMAMBA_SRC`` (a checkout or a bare git directory). Nothing is downloaded.
Without a copy the comparisons run on the recorded fixtures (``official_fixtures.py``), which
:func:`local_vim_reference` / :func:`local_vssm_reference` compute and ``make_official_fixtures.py``
writes.

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
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest
import torch

REPOSITORY = "hunto/LocalMamba"
ENV = "VMFX_LOCALMAMBA_SRC"
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


def _materialise(dest: Path, src: Optional[str]) -> None:
    src = src or os.environ.get(ENV)
    if not src or not os.path.exists(src):
        pytest.skip(f"no copy of {REPOSITORY} at {src!r} (set {ENV} to a checkout)")
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


def import_official_local_vim(tmp_path: Path, monkeypatch, src: Optional[str] = None) -> types.ModuleType:
    """The official ``local_vim`` module from ``src`` (default ``$VMFX_LOCALMAMBA_SRC``), runnable on a
    CPU (see the module docstring), or skip."""
    try:
        from vmfx.frontends import enable_mamba_ssm_on_cpu
        enable_mamba_ssm_on_cpu()
        import einops  # noqa: F401
        import timm.models.registry as timm_registry
    except ImportError as exc:
        pytest.skip(f"the official LocalMamba code needs mamba_ssm, einops and timm: {exc}")
    _materialise(tmp_path, src)
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


def import_official_local_vmamba(tmp_path: Path, monkeypatch, src: Optional[str] = None) -> types.ModuleType:
    """The official ``local_vmamba`` module from ``src`` (default ``$VMFX_LOCALMAMBA_SRC``), runnable on
    a CPU (see the module docstring), or skip."""
    import_official_local_vim(tmp_path, monkeypatch, src)  # the shared stand-ins and the materialised files
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


# -- the compared cases and the references they are compared with -----------------------------------

# LocalVim (local_vim.py): 40x40 images in 8x8 patches, a 5x5 grid: w2 and w7 windows are zero-padded
# (to 6x6 and 7x7)
VIM_DIRS = [("h", "v_flip", "w2", "w7_flip"), ("h_flip", "v", "w2_flip", "w7")]
VIM_SMALL = dict(img_size=40, patch_size=8, depth=2, embed_dim=32, num_classes=10, rms_norm=True,
                 residual_in_fp32=True, fused_add_norm=True, final_pool_type="mean", if_abs_pos_embed=True,
                 bimamba_type="v2")
VIM_CASES = {
    "rope+padding": dict(VIM_SMALL, directions=VIM_DIRS, if_rope=True, if_rope_residual=True),
    "middle-cls+padding": dict(VIM_SMALL, directions=VIM_DIRS, if_cls_token=True, use_middle_cls_token=True),
    "search-supernet": dict(VIM_SMALL, directions=None, depth=1, if_rope=True, if_rope_residual=True),
}
#: torch.manual_seed before each official VisionMamba is built and its parameters moved; the images' seed.
VIM_MODEL_SEED, VIM_IMAGE_SEED = 0, 5
#: The published configurations whose official state dict keys and shapes are recorded.
VIM_PUBLISHED = ("local_vim_tiny", "local_vim_tiny_middle_cls_token", "local_vim_tiny_search")


def vim_images(n: int = 2, seed: int = VIM_IMAGE_SEED) -> torch.Tensor:
    size = VIM_SMALL["img_size"]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def vim_published_args() -> Dict[str, dict]:
    """vmfx's arguments of the published configurations (the official model is built with them)."""
    from vmfx.models import LOCAL_VIM_VARIANTS

    return {name: dict(LOCAL_VIM_VARIANTS[name][0]) for name in VIM_PUBLISHED}


def local_vim_reference(official: types.ModuleType) -> Tuple[Dict[str, torch.Tensor], dict]:
    """What vmfx's LocalVim is compared with, computed by the official ``local_vim``: per case
    ``"<case>/state/<key>"`` (the official VisionMamba's parameters, each moved by 0.1 N(0, 1) from
    its init) and ``"<case>/logits"`` on ``"input"``; and the official state dict keys and shapes of
    the published configurations built with vmfx's arguments (metadata ``"shapes"``)."""
    x = vim_images()
    tensors = {"input": x}
    for case, args in VIM_CASES.items():
        torch.manual_seed(VIM_MODEL_SEED)
        theirs = official.VisionMamba(**args).eval()
        with torch.no_grad():  # move every parameter away from its init (their A_log_k share one tensor)
            for p in theirs.parameters():
                p.add_(0.1 * torch.randn_like(p))
            tensors[f"{case}/logits"] = theirs(x)
        tensors.update({f"{case}/state/{k}": v.clone() for k, v in theirs.state_dict().items()})
    shapes = {}
    published = vim_published_args()
    for name, args in published.items():
        theirs = official.VisionMamba(**args)  # (its init calls .item(): not on the meta device)
        shapes[name] = [[k, list(v.shape)] for k, v in theirs.state_dict().items()]
    meta = {"cases": VIM_CASES, "model_seed": VIM_MODEL_SEED, "image_seed": VIM_IMAGE_SEED, "images": 2,
            "published_args": published, "shapes": shapes}
    return tensors, json.loads(json.dumps(meta))


# LocalVSSM (local_vmamba.py): 28x28 images: 7x7, 4x4, 2x2 grids; w2 pads the 7x7 grid to 8x8 (64
# positions), w7 pads 4x4 and 2x2 to 7x7
VSSM_DIRS = [("h", "v_flip", "w2", "w2_flip"), ("h_flip", "v", "w7", "w7_flip"), ("w2", "w7_flip", "v_flip", "h"),
             ("h_flip", "w2_flip", "v", "w7")]
VSSM_SMALL = dict(depths=[1, 2, 1], dims=8, num_classes=5, ssm_d_state=4, drop_path_rate=0.0)
VSSM_CASES = {
    "searched-directions": dict(VSSM_SMALL, directions=[list(d) for d in VSSM_DIRS]),
    "search-supernet": dict(VSSM_SMALL, directions=None, depths=[1, 1]),
}
#: 32: grids 8, 4, 2 (another size than the scan orders were built for; vmfx's model is built for 28)
VSSM_SIZES = (28, 32)
VSSM_MODEL_SEED, VSSM_STATE_SEED, VSSM_IMAGE_SEED = 0, 1, 2
VSSM_ENTRY_POINTS = ("local_vssm_tiny", "local_vssm_small", "local_vssm_tiny_search", "local_vssm_small_search")


def vssm_images(n: int, seed: int, size: int = 28) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def vssm_randomize(state: dict, seed: int) -> dict:
    """Fresh random values (norms near 1, A_logs / Ds / dt biases in their usual ranges, search weights
    of order 1) so that every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        r = torch.randn(v.shape, generator=g)
        if k.endswith("A_logs"):
            r = torch.log(torch.rand(v.shape, generator=g) * 8 + 1)
        elif k.endswith("dt_projs_bias"):
            r = torch.log(torch.expm1(torch.rand(v.shape, generator=g) * 0.1 + 0.01))
        elif k.endswith("Ds") or k.endswith("norm.weight"):
            r = 1 + 0.2 * r
        elif v.dim() >= 2 and not k.endswith("multi_scan.weights"):
            r = r / math.sqrt(v[0].numel())
        else:
            r = 0.1 * r
        out[k] = r.to(v.dtype)
    return out


def local_vssm_reference(official: types.ModuleType) -> Tuple[Dict[str, torch.Tensor], dict]:
    """What vmfx's LocalVSSM is compared with, computed by the official ``local_vmamba``: per case
    ``"<case>/state/<key>"`` (the official VSSM's state dict after :func:`vssm_randomize`) and
    ``"<case>/logits/<size>"`` on ``"input/<size>"``; and the arguments the official entry points
    pass to VSSM (metadata ``"entry_points"``)."""
    tensors = {f"input/{size}": vssm_images(2, VSSM_IMAGE_SEED, size) for size in VSSM_SIZES}
    for case, args in VSSM_CASES.items():
        torch.manual_seed(VSSM_MODEL_SEED)
        theirs = official.VSSM(**args).eval()
        state = vssm_randomize(theirs.state_dict(), VSSM_STATE_SEED)
        theirs.load_state_dict(state)
        tensors.update({f"{case}/state/{k}": v for k, v in state.items()})
        with torch.no_grad():
            for size in VSSM_SIZES:
                tensors[f"{case}/logits/{size}"] = theirs(tensors[f"input/{size}"])
    saved = official.VSSM
    official.VSSM = lambda **kw: kw  # the entry points' arguments, no model built
    try:
        entry_points = {name: getattr(official, name)() for name in VSSM_ENTRY_POINTS}
    finally:
        official.VSSM = saved
    meta = {"cases": VSSM_CASES, "sizes": VSSM_SIZES, "model_seed": VSSM_MODEL_SEED, "state_seed": VSSM_STATE_SEED,
            "image_seed": VSSM_IMAGE_SEED, "images": 2, "entry_points": entry_points}
    return tensors, json.loads(json.dumps(meta))
