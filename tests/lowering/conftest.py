"""Kernel tests run on a CUDA GPU when there is one, else in Triton's interpreter.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is defined, so it is set here,
at collection time, before the test module imports a kernel. Generated sources go to a temporary
kernel cache for the session.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session", autouse=True)
def _kernel_cache_dir(tmp_path_factory):
    old = os.environ.get("VMFX_CACHE_DIR")
    os.environ["VMFX_CACHE_DIR"] = str(tmp_path_factory.mktemp("vmfx_kernels"))
    yield
    if old is None:
        os.environ.pop("VMFX_CACHE_DIR", None)
    else:
        os.environ["VMFX_CACHE_DIR"] = old


@pytest.fixture
def device() -> torch.device:
    return DEVICE
