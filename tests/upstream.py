"""Import the optional upstream mamba-ssm on a CPU machine, or skip (tests only).

The work is :func:`vmfx.frontends.enable_mamba_ssm_on_cpu`, the supported way for users too.
"""

from __future__ import annotations

import pytest

from vmfx.frontends import enable_mamba_ssm_on_cpu


def import_mamba_ssm():
    """``(mamba_simple, selective_scan_ref)`` from upstream mamba-ssm, or skip the test saying what
    is missing. The upstream block's slow path then runs on the CPU (``use_fast_path=False``)."""
    try:
        enable_mamba_ssm_on_cpu()
    except ImportError as exc:
        pytest.skip(f"{exc} (`make test` installs it)")
    import mamba_ssm.modules.mamba_simple as mamba_simple
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    return mamba_simple, selective_scan_ref
