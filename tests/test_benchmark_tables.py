"""The accuracy benchmark's bookkeeping: records merge by key and the tables are computed from them."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def accuracy(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_accuracy", os.path.join(ROOT, "benchmarks", "accuracy.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "JSON_PATH", str(tmp_path / "accuracy.json"))
    monkeypatch.setattr(module, "MD_PATH", str(tmp_path / "accuracy.md"))
    return module


def record(method, bits, top1, calib="real"):
    return {"model": "m", "method": method, "bits": bits, "calib": calib, "calib_images": 8,
            "top1": top1, "drop": round(90.0 - top1, 2), "calib_seconds": 1.0}


def test_merge_replaces_same_key_and_keeps_others(accuracy):
    old = [record("minmax", "w8a8", 80.0), record("minmax", "w4a4", 10.0)]
    new = [record("minmax", "w4a4", 12.5), record("ptq4vm", "w4a4", 70.0)]
    merged = {(r["method"], r["bits"]): r["top1"] for r in accuracy.merge(old, new)}
    assert merged == {("minmax", "w8a8"): 80.0, ("minmax", "w4a4"): 12.5, ("ptq4vm", "w4a4"): 70.0}


def test_comparison_is_computed_from_the_records(accuracy):
    rows = [record("fp", "fp32", 90.0, calib="none"), record("minmax", "w6a6", 61.3),
            record("ptq4vm", "w6a6", 88.5), record("smoothquant", "w6a6", 60.0)]
    text = "\n".join(accuracy.comparison_lines(rows))
    line = next(l for l in text.splitlines() if l.startswith("| m | w6a6 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    header = next(l for l in text.splitlines() if l.startswith("| model | bits |"))
    names = [c.strip() for c in header.strip("|").split("|")]
    by_method = dict(zip(names[2:], cells[2:]))
    assert by_method["ptq4vm"] == "+27.2"   # 88.5 - 61.3
    assert by_method["smoothquant"] == "-1.3"
    assert "w8a8" not in text  # no min-max row at w8a8, so no comparison row


def test_table_only_rewrites_markdown_from_json(accuracy):
    rows = [record("fp", "fp32", 90.0, calib="none"), record("minmax", "w4a4", 40.0), record("ptq4vm", "w4a4", 85.0)]
    with open(accuracy.JSON_PATH, "w") as f:
        json.dump(rows, f)
    assert accuracy.main(["--table-only"]) == 0
    md = open(accuracy.MD_PATH).read()
    assert "| m | ptq4vm | w4a4 | real | 8 | 85.00 | 5.00 | 1.0 |" in md
    assert "+45.0" in md


def test_unknown_method_is_refused(accuracy):
    with pytest.raises(SystemExit, match="unknown methods"):
        accuracy.main(["--methods", "minmax,nosuch"])
