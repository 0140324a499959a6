"""The fidelity table in README.md is the one generated from the presets, and it follows them."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmfx import fidelity
from vmfx.config import PRESETS, ScanStateConfig

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("table", sorted(fidelity.MARKERS))
def test_the_readme_holds_the_generated_tables(table):
    start, end = fidelity.MARKERS[table]
    text = README.read_text(encoding="utf-8")
    inside = text.split(start)[1].split(end)[0]
    assert inside.strip() == fidelity.generated(table).strip(), \
        f"README.md's {table} fidelity table is stale: run python -m vmfx.fidelity README.md"


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


def _body(table: str) -> list[str]:
    return [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]


@pytest.mark.parametrize("bits", ["w4a4", "w4a8"])
def test_the_ouromamba_official_presets_quantize_every_official_tensor(bits):
    rows = _body(fidelity.ouromamba_table(bits))
    assert len(rows) == len(fidelity.OUROMAMBA_OFFICIAL)
    assert all(not line.rstrip(" |").endswith("float") for line in rows)
    official = PRESETS[f"ouromamba-official-{bits}"]
    outliers = "float outliers" if bits == "w4a8" else "int8 outliers"
    for row in fidelity.OUROMAMBA_OFFICIAL:
        cell = fidelity.vmfx_cell(official, row)
        assert outliers in cell or row.edge == "weight", (row.tensor, cell)
        assert ("learned" in cell) == (row.role in ("in_proj", "out_proj")), (row.tensor, cell)
        assert ("one per block" in cell) == row.edge.startswith("scan."), (row.tensor, cell)


def test_the_ouromamba_variant_leaves_the_scan_operands_float_and_quantizes_delta_at_dt_proj():
    variant = PRESETS["ouromamba-w4a4"]
    cells = {row.edge: fidelity.vmfx_cell(variant, row) for row in fidelity.OUROMAMBA_OFFICIAL if row.role == "scan"}
    assert all(cells[f"scan.{name}"] == "float" for name in "ABCD")
    assert cells["scan.delta"].startswith("uint4 asym per-token + int8 outliers (sample trigger)")
    assert "one per block" not in cells["scan.delta"]


def test_the_ouromamba_table_follows_the_presets(monkeypatch):
    official = PRESETS["ouromamba-official-w4a4"]
    monkeypatch.setitem(PRESETS, "ouromamba-official-w4a4", official.replace(jlss=None))
    row = next(r for r in fidelity.OUROMAMBA_OFFICIAL if (r.edge, r.role) == ("input", "in_proj"))
    assert fidelity.vmfx_cell(PRESETS["ouromamba-official-w4a4"], row).endswith("Lp 2.4 grid")
    assert "learned" not in _body(fidelity.ouromamba_table("w4a4"))[0].split("|")[-2]


def test_an_unknown_table_is_refused():
    with pytest.raises(ValueError, match="no fidelity table 'gptq'"):
        fidelity.generated("gptq")
