"""The fidelity table in README.md is the one generated from the presets, and it follows them."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmfx import fidelity
from vmfx.config import PRESETS, ScanStateConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_holds_the_generated_kscaled_table():
    start, end = fidelity.MARKERS["kscaled"]
    text = README.read_text(encoding="utf-8")
    inside = text.split(start)[1].split(end)[0]
    assert inside.strip() == fidelity.generated("kscaled").strip(), \
        "README.md's k-scaled fidelity table is stale: run python -m vmfx.fidelity README.md"


def test_the_table_is_generated_from_the_presets(monkeypatch):
    row = next(r for r in fidelity.KSCALED_OFFICIAL if r.edge == "state")
    assert fidelity.vmfx_cell(PRESETS["kscaled-w4a8"], row) == "float"
    monkeypatch.setitem(PRESETS, "kscaled-w4a8", PRESETS["kscaled-w4a8"].replace(scan_state=ScanStateConfig(bits=6)))
    assert "int6 per-step +reparam, searched (coarse to fine)" in fidelity.kscaled_table("w4a8")
    head = next(r for r in fidelity.KSCALED_OFFICIAL if (r.edge, r.role) == ("weight", "head"))
    assert fidelity.vmfx_cell(PRESETS["kscaled-official-w4a4"], head) == \
        "int4 sym per-tensor full-range, searched; bias corrected"


def test_every_official_row_is_quantized_by_the_official_presets():
    table = fidelity.kscaled_table("w8a8")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(fidelity.KSCALED_OFFICIAL)
    assert all(not line.rstrip(" |").endswith("float") for line in rows)


def test_writing_needs_both_markers(tmp_path):
    path = tmp_path / "x.md"
    path.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        fidelity.write_readme(str(path))
    start, end = fidelity.MARKERS["kscaled"]
    path.write_text(f"a\n{start}\nold\n{end}\nb\n")
    assert fidelity.write_readme(str(path)) and not fidelity.write_readme(str(path))
    assert path.read_text().startswith(f"a\n{start}\nOfficial:") and path.read_text().endswith(f"{end}\nb\n")
