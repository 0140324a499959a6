"""Import the optional upstream mamba-ssm on a CPU machine (tests and benchmarks only).

mamba-ssm imports its CUDA extension unguarded; registering an empty ``selective_scan_cuda``
module first lets the pure-Python parts (``Mamba``, ``selective_scan_ref``) import. Its
``Mamba`` block then runs on the CPU with ``use_fast_path=False`` once its ``selective_scan_fn``
is pointed at ``selective_scan_ref``.
"""

from __future__ import annotations

import sys
import types

import pytest


def import_mamba_ssm():
    """The ``mamba_ssm`` package, or skip the test saying what is missing."""
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    try:
        import mamba_ssm  # noqa: F401
        import mamba_ssm.modules.mamba_simple as mamba_simple
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref
    except Exception as exc:  # ImportError, or its triton / transformers imports failing
        pytest.skip(
            f"upstream mamba-ssm is not importable ({type(exc).__name__}: {exc}); it is installed by "
            "`make test` (MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE pip install --no-build-isolation "
            "--no-deps mamba-ssm==2.3.2.post1)"
        )
    mamba_simple.selective_scan_fn = selective_scan_ref  # the CPU path of the upstream block
    return mamba_simple, selective_scan_ref
