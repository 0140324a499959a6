"""Make the upstream ``mamba_ssm`` package importable and runnable on a CPU.

vmfx never needs ``mamba_ssm`` (its adapters are registered by class name, see
:mod:`vmfx.frontends.adapters`), but a user whose model is built from upstream ``Mamba`` blocks
must import the package to build the model at all. ``mamba_ssm`` imports its CUDA extension
``selective_scan_cuda`` unguarded, so on a machine without that extension (a CPU machine, or a
build made with ``MAMBA_SKIP_CUDA_BUILD=TRUE``) ``import mamba_ssm`` fails with
``No module named 'selective_scan_cuda'``. :func:`enable_mamba_ssm_on_cpu` is the supported way
around it::

    import vmfx.frontends
    vmfx.frontends.enable_mamba_ssm_on_cpu()
    from mamba_ssm.modules.mamba_simple import Mamba
    block = Mamba(d_model=192, d_state=16, use_fast_path=False)   # runs on the CPU
    qmodel = vmfx.compile(model_built_from_such_blocks, calib_images)

What it changes, and only when the real extension cannot be imported: ``sys.modules`` gains an
empty module named ``selective_scan_cuda`` (marked ``__vmfx_stub__ = True``; an empty one already
there is kept), and
``mamba_ssm.modules.mamba_simple.selective_scan_fn`` (the scan the block's slow path calls) is
pointed at ``mamba_ssm``'s own pure-PyTorch ``selective_scan_ref``. Upstream's fused fast path
and its Triton/CUDA-only parts (``Mamba2``, ``Mamba.step``) stay unavailable: build blocks with
``use_fast_path=False``. With the real extension present nothing is changed. Calling it again is
harmless.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

__all__ = ["enable_mamba_ssm_on_cpu", "MAMBA_SSM_INSTALL"]

#: How the project installs upstream mamba-ssm without CUDA (see the Makefile).
MAMBA_SSM_INSTALL = (
    "MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE pip install --no-build-isolation --no-deps "
    "mamba-ssm==2.3.2.post1 (after torch, einops, packaging, wheel and transformers)"
)


def _has_real_extension() -> bool:
    """True if ``selective_scan_cuda`` is the compiled extension (it has ``fwd``), not a stand-in."""
    module = sys.modules.get("selective_scan_cuda")
    if module is not None:
        return hasattr(module, "fwd")
    try:
        return importlib.util.find_spec("selective_scan_cuda") is not None
    except (ImportError, ValueError):
        return False


def enable_mamba_ssm_on_cpu() -> types.ModuleType:
    """Make ``import mamba_ssm`` work without its CUDA extension, and its ``Mamba`` block's slow
    path (``use_fast_path=False``) run on the CPU. See the module docstring for what it changes.

    Returns:
        The imported ``mamba_ssm`` package.

    Raises:
        ImportError: ``mamba_ssm`` is not installed, or one of its own imports fails (the message
            names the failure and how the project installs the package).
    """
    stubbed = not _has_real_extension()
    if stubbed and "selective_scan_cuda" not in sys.modules:
        stub = types.ModuleType("selective_scan_cuda")
        stub.__vmfx_stub__ = True
        stub.__doc__ = "Empty stand-in registered by vmfx.frontends.enable_mamba_ssm_on_cpu()."
        sys.modules["selective_scan_cuda"] = stub
    try:
        package = importlib.import_module("mamba_ssm")
        mamba_simple = importlib.import_module("mamba_ssm.modules.mamba_simple")
        interface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    except Exception as exc:  # ImportError, or its own imports (einops, triton, transformers) failing
        raise ImportError(
            f"upstream mamba_ssm cannot be imported ({type(exc).__name__}: {exc}); install it without CUDA "
            f"with: {MAMBA_SSM_INSTALL}"
        ) from exc
    if stubbed:
        mamba_simple.selective_scan_fn = interface.selective_scan_ref
    return package
