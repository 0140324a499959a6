"""The generated Triton source of every kernel variant matches its golden snapshot.

The variants are listed in ``tests/lowering/golden_variants.py`` (every render call the proxy's
lowering makes under the eight methods' presets, plus the options and templates the kernel tests
use); their snapshots are ``tests/lowering/golden/<template>.<variant>.py``. A change to a code
generator that changes any kernel's source fails here, with a unified diff.

Refresh the snapshots, after a change that is meant to change the generated source (review the
diff of ``tests/lowering/golden/`` before committing)::

    VMFX_UPDATE_GOLDEN=1 OMP_NUM_THREADS=1 python -m pytest tests/lowering/test_golden_sources.py -q

A snapshot whose variant no longer exists is reported (``test_no_stale_snapshots``); the refresh
deletes it.
"""

from __future__ import annotations

import difflib
import os

import pytest

from .golden_variants import VARIANTS, render_variant

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")
UPDATE = os.environ.get("VMFX_UPDATE_GOLDEN") == "1"
REFRESH = "VMFX_UPDATE_GOLDEN=1 python -m pytest tests/lowering/test_golden_sources.py"


def _path(name: str) -> str:
    return os.path.join(GOLDEN_DIR, f"{name}.py")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_source_matches_snapshot(name):
    source = render_variant(name)
    compile(source, _path(name), "exec")  # the generated module is valid Python
    if UPDATE:
        os.makedirs(GOLDEN_DIR, exist_ok=True)
        with open(_path(name), "w", encoding="utf-8") as f:
            f.write(source)
        return
    if not os.path.exists(_path(name)):
        pytest.fail(f"no golden snapshot for {name} ({_path(name)}); write it with {REFRESH}")
    with open(_path(name), encoding="utf-8") as f:
        golden = f.read()
    if source != golden:
        diff = "".join(difflib.unified_diff(golden.splitlines(True), source.splitlines(True),
                                            f"golden/{name}.py", "generated", n=2))
        pytest.fail(f"the generated source of {name} differs from its golden snapshot:\n{diff}\n"
                    f"If the change is intended, refresh the snapshots with {REFRESH} and review the diff.")


def test_no_stale_snapshots():
    stale = sorted(f for f in os.listdir(GOLDEN_DIR) if f.endswith(".py") and f[:-3] not in VARIANTS)
    if UPDATE:
        for f in stale:
            os.remove(os.path.join(GOLDEN_DIR, f))
        return
    assert not stale, f"snapshots of variants no longer listed in golden_variants.py: {stale}; {REFRESH} deletes them"


def test_every_template_has_a_snapshot():
    renderers = {renderer for renderer, _ in VARIANTS.values()}
    from vmfx.lowering import kernels

    expected = {name for name in kernels.__all__ if name.startswith("render_")}
    assert renderers == expected, f"templates without a golden variant: {sorted(expected - renderers)}"
