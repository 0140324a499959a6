"""vmfx.frontends.enable_mamba_ssm_on_cpu: the supported way to import upstream mamba-ssm on a CPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from vmfx.frontends import enable_mamba_ssm_on_cpu
from vmfx.frontends.upstream import MAMBA_SSM_INSTALL

from tests.upstream import import_mamba_ssm


def _run(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (nothing registered in sys.modules yet)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", **__import__("os").environ})


def test_import_fails_without_the_helper_and_works_with_it():
    import_mamba_ssm()  # skips, saying why, where mamba-ssm is not installed
    bare = _run("import mamba_ssm")
    if bare.returncode == 0:
        pytest.skip("mamba_ssm imports without help here (its CUDA extension is built): nothing to enable")
    assert "selective_scan_cuda" in bare.stderr
    helped = _run("""
        import torch, vmfx.frontends
        package = vmfx.frontends.enable_mamba_ssm_on_cpu()
        from mamba_ssm.modules.mamba_simple import Mamba
        block = Mamba(d_model=16, d_state=4, use_fast_path=False).eval()
        with torch.no_grad():
            y = block(torch.randn(2, 5, 16))
        print(package.__name__, tuple(y.shape), bool(torch.isfinite(y).all()))
    """)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.split("\n")[-2] == "mamba_ssm (2, 5, 16) True"


def test_the_block_runs_the_reference_scan_and_the_helper_is_idempotent():
    mamba_simple, selective_scan_ref = import_mamba_ssm()
    stub = sys.modules["selective_scan_cuda"]
    if hasattr(stub, "fwd"):
        pytest.skip("the real selective_scan_cuda extension is installed: the helper changes nothing")
    assert mamba_simple.selective_scan_fn is selective_scan_ref
    assert enable_mamba_ssm_on_cpu() is sys.modules["mamba_ssm"] and sys.modules["selective_scan_cuda"] is stub
    torch.manual_seed(0)
    block = mamba_simple.Mamba(d_model=8, d_state=4, use_fast_path=False).eval()
    x = torch.randn(1, 6, 8)
    with torch.no_grad():
        assert torch.isfinite(block(x)).all()


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # what an absent package looks like to import
    with pytest.raises(ImportError, match="upstream mamba_ssm cannot be imported .*MAMBA_SKIP_CUDA_BUILD=TRUE"):
        enable_mamba_ssm_on_cpu()
    assert "mamba-ssm==2.3.2.post1" in MAMBA_SSM_INSTALL
