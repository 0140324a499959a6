"""Write the recorded outputs of the official code that the tests compare vmfx with
(``tests/models/fixtures/official/``; see ``official_fixtures.py``).

    OMP_NUM_THREADS=1 python -m tests.models.make_official_fixtures \\
        --vmamba PATH --localmamba PATH --kscaled PATH [--only vmamba,local_vim,local_vssm,kscaled]

Each PATH is a checkout (or a bare git directory) of the official repository: MzeroMiko/VMamba,
hunto/LocalMamba, Access-IC-Lab/PTQ_for_ViM; by default the environment variables the tests read
(``VMFX_VMAMBA_SRC``, ``VMFX_LOCALMAMBA_SRC``, ``VMFX_KSCALED_SRC``). Run from the repository root.

The official code is imported on the CPU with the tests' stand-ins for its CUDA kernels
(``official_vmamba.py``, ``official_localmamba.py``, ``benchmarks/kscaled_official.py``), and the
references are the ones the tests compute when the official code is at hand:
``vmamba_reference``, ``local_vim_reference``, ``local_vssm_reference``, ``kscaled_reference``. Each
fixture's JSON names the repository and commit, the configurations and seeds, the torch version and
this command (with the paths left out).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from .official_fixtures import FIXTURES, git_commit, save

FIXTURE_REPOSITORIES = {
    "vmamba": ("MzeroMiko/VMamba", "VMFX_VMAMBA_SRC", "vmamba"),
    "local_vim": ("hunto/LocalMamba", "VMFX_LOCALMAMBA_SRC", "localmamba"),
    "local_vssm": ("hunto/LocalMamba", "VMFX_LOCALMAMBA_SRC", "localmamba"),
    "kscaled": ("Access-IC-Lab/PTQ_for_ViM", "VMFX_KSCALED_SRC", "kscaled"),
}


def _reference(name: str, src: str, tmp: Path):
    """(tensors, metadata) computed by the official code at ``src`` (the tests' functions)."""
    mp = pytest.MonkeyPatch()
    try:
        if name == "vmamba":
            from .official_vmamba import import_official_vmamba, vmamba_reference
            return vmamba_reference(import_official_vmamba(tmp, mp, src))
        if name == "local_vim":
            from .official_localmamba import import_official_local_vim, local_vim_reference
            return local_vim_reference(import_official_local_vim(tmp, mp, src))
        if name == "local_vssm":
            from .official_localmamba import import_official_local_vmamba, local_vssm_reference
            return local_vssm_reference(import_official_local_vmamba(tmp, mp, src))
        from .test_kscaled_official import kscaled_reference
        return kscaled_reference(src, tmp)
    finally:
        mp.undo()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vmamba", default=os.environ.get("VMFX_VMAMBA_SRC"), help="MzeroMiko/VMamba checkout")
    p.add_argument("--localmamba", default=os.environ.get("VMFX_LOCALMAMBA_SRC"), help="hunto/LocalMamba checkout")
    p.add_argument("--kscaled", default=os.environ.get("VMFX_KSCALED_SRC"), help="Access-IC-Lab/PTQ_for_ViM checkout")
    p.add_argument("--only", default=",".join(FIXTURE_REPOSITORIES), help="comma-separated fixtures to write")
    p.add_argument("--out", default=str(FIXTURES), help="folder of the fixtures (default: the tests')")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for name in args.only.split(","):
        repository, env, option = FIXTURE_REPOSITORIES[name]
        src = getattr(args, option)
        if not src or not os.path.exists(src):
            p.error(f"{name}: no copy of {repository} (pass --{option} PATH or set {env})")
        commit = git_commit(src)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"official-{name}-") as tmp:
            tensors, meta = _reference(name, src, Path(tmp))
        command = ("OMP_NUM_THREADS=1 python -m tests.models.make_official_fixtures "
                   f"--{option} <checkout of {repository}@{commit}> --only {name}")
        provenance = {"repository": repository, "commit": commit, "source": f"{repository}@{commit}",
                      "made_by": "tests/models/make_official_fixtures.py", "command": command,
                      "torch": torch.__version__, "python": platform.python_version(),
                      "machine": platform.machine(), "threads": torch.get_num_threads(), "dtype": "float32",
                      "device": "cpu"}
        tensor_path, meta_path = save(name, tensors, {**provenance, **meta}, Path(args.out))
        print(f"{name}: {repository}@{commit}: {tensor_path.stat().st_size / 1e3:.0f} kB + "
              f"{meta_path.stat().st_size / 1e3:.0f} kB ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
