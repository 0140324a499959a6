"""The accuracy benchmark's bookkeeping on synthetic records (no model runs): records merge by key,
every stated difference is computed with the right interval, old records still render, and notes
only say what their records support."""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import types

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 1000


@pytest.fixture
def bench(tmp_path, monkeypatch):
    """The accuracy benchmark's modules (``cli`` is ``benchmarks/accuracy.py``), its default output
    paths pointed into ``tmp_path``."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    modules = {name: importlib.import_module(module) for name, module in (
        ("cli", "accuracy"), ("records", "accuracy_records"), ("stats", "accuracy_stats"),
        ("report", "accuracy_report"), ("run", "accuracy_run"))}
    monkeypatch.setattr(modules["cli"], "JSON_PATH", str(tmp_path / "accuracy.json"))
    monkeypatch.setattr(modules["cli"], "MD_PATH", str(tmp_path / "accuracy.md"))
    return types.SimpleNamespace(**modules)


def old_record(method, bits, top1, calib="real"):
    """A record as written before seed / agree / kl existed."""
    return {"model": "m", "method": method, "bits": bits, "calib": calib, "calib_images": 8,
            "top1": top1, "drop": round(90.0 - top1, 2), "calib_seconds": 1.0}


def new_record(method, bits, wrong, disagree=(), kl_images=None, seed=0, calib="real"):
    """A record with per-image data over N test images; top-1 / agree / kl follow from the lists."""
    kl_images = list(kl_images) if kl_images is not None else [0.0] * N
    return {"model": "m", "method": method, "bits": bits, "calib": calib, "seed": None if calib == "none" else seed,
            "calib_images": 8, "test_images": N, "top1": 100.0 * (N - len(wrong)) / N,
            "drop": 0.0, "agree": 100.0 * (N - len(disagree)) / N, "kl": sum(kl_images) / N,
            "calib_seconds": 1.0, "machine": "test", "measured": "2026-11-29",
            "wrong": sorted(wrong), "disagree": sorted(disagree), "kl_images": kl_images}


def table_cells(lines, prefix, header_prefix="| model | bits | seed |"):
    """The cells of the first row starting with ``prefix``, keyed by the header's column names."""
    text = "\n".join(lines).splitlines()
    header = next(line for line in text if line.startswith(header_prefix))
    row = next(line for line in text if line.startswith(prefix))
    split = lambda s: [c.strip() for c in s.strip().strip("|").split("|")]  # noqa: E731
    return dict(zip(split(header), split(row)))


# ---------------------------------------------------------------------------------------- merging


def test_merge_replaces_same_key_and_keeps_other_seeds(bench):
    old = [old_record("fp", "fp32", 90.0, calib="none"), old_record("minmax", "w8a8", 80.0),
           old_record("minmax", "w4a4", 10.0)]
    new = [new_record("fp", "fp32", [], calib="none"), new_record("minmax", "w4a4", range(875)),
           new_record("minmax", "w4a4", range(870), seed=1), new_record("ptq4vm", "w4a4", range(300))]
    merged = {(r["method"], r["bits"], bench.records.record_seed(r)): r["top1"] for r in bench.records.merge(old, new)}
    # the old record (seed assumed 0) is replaced by the new seed-0 one; seed 1 is a separate record
    assert merged == {("fp", "fp32", None): 100.0, ("minmax", "w8a8", 0): 80.0, ("minmax", "w4a4", 0): 12.5,
                      ("minmax", "w4a4", 1): 13.0, ("ptq4vm", "w4a4", 0): 70.0}


def test_records_round_trip_through_the_json_writer(bench):
    rows = [old_record("minmax", "w8a8", 80.0), new_record("minmax", "w4a4", [3, 1, 2], [5], [0.25] * N)]
    assert json.loads(bench.records.dumps_records(rows)) == rows


# ------------------------------------------------------------------------------------- statistics


def test_paired_interval_matches_a_hand_computation(bench):
    # a gets images 0..29 wrong, b gets 20..79 wrong: 50 images only b misses, 20 only a misses.
    d = bench.stats.paired_proportion_difference(range(30), range(20, 80), N)
    assert d.estimate == pytest.approx(3.0)  # (50 - 20) / 1000, in points
    # Agresti-Min by hand: cells + 0.5 -> 50.5 and 20.5 of 1002;
    # d' = 30 / 1002 = 0.0299401; var = (71 - 30**2 / 1002) / 1002**2 = 70.1018 / 1004004 = 6.98222e-5;
    # se = 0.00835597; 1.96 * se = 0.0163774 -> [0.0135627, 0.0463175]
    assert (d.low, d.high) == pytest.approx((1.35627, 4.63175), abs=1e-4)
    assert d.kind == "paired" and d.significant
    # exchanging a and b mirrors the interval
    r = bench.stats.paired_proportion_difference(range(20, 80), range(30), N)
    assert (r.estimate, r.low, r.high) == pytest.approx((-3.0, -4.63175, -1.35627), abs=1e-4)


def test_paired_interval_follows_the_discordant_images_not_the_accuracies(bench):
    # same accuracies (95 % each), but a and b miss the same 50 images: no evidence of a difference,
    # and a narrow interval around 0 (+-0.2); disjoint misses give a wide one (+-2)
    same = bench.stats.paired_proportion_difference(range(50), range(50), N)
    disjoint = bench.stats.paired_proportion_difference(range(50), range(50, 100), N)
    assert same.estimate == 0 and disjoint.estimate == 0
    assert not same.significant and not disjoint.significant
    assert (same.high - same.low) < 0.5 < 3.0 < (disjoint.high - disjoint.low)
    # few discordant images: 4 vs 0 is not significant (exact McNemar p = 0.125), 6 vs 0 is (p = 0.031)
    assert not bench.stats.paired_proportion_difference([], range(4), N).significant
    assert bench.stats.paired_proportion_difference([], range(6), N).significant


def test_paired_interval_covers_the_true_difference_about_95_percent_of_the_time(bench):
    # simulate pairs of models on 1000 images: only-b-wrong with prob 0.02, only-a-wrong 0.01
    # (true difference +1 point); the interval must contain +1 in about 95 % of 2000 trials
    g = torch.Generator().manual_seed(1)
    cells = torch.multinomial(torch.tensor([0.02, 0.01, 0.03, 0.94]), N * 2000, replacement=True, generator=g)
    cells = cells.view(2000, N)
    hits = 0
    for row in cells:
        only_b = torch.nonzero(row == 0).flatten().tolist()
        only_a = torch.nonzero(row == 1).flatten().tolist()
        both = torch.nonzero(row == 2).flatten().tolist()
        d = bench.stats.paired_proportion_difference(only_a + both, only_b + both, N)
        hits += d.low <= 1.0 <= d.high
    assert 0.93 <= hits / 2000 <= 0.97, hits / 2000


def test_unpaired_interval_matches_a_hand_computation(bench):
    d = bench.stats.unpaired_proportion_difference(90.0, N, 85.0, N)
    assert d.estimate == pytest.approx(5.0)
    # Agresti-Caffo by hand: pa = 901/1002 = 0.899202, pb = 851/1002 = 0.849301, d' = 0.0499002;
    # se = sqrt(pa(1-pa)/1002 + pb(1-pb)/1002) = 0.0147645; +- 1.96 se -> [0.0209491, 0.0788513]
    assert (d.low, d.high) == pytest.approx((2.09491, 7.88513), abs=1e-4)
    assert d.kind == "unpaired"


def test_paired_mean_difference_matches_a_hand_computation(bench):
    d = bench.stats.paired_mean_difference([1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 1.0, 2.0])
    # differences 1, 2, 2, 4: mean 2.25, sample sd sqrt(((-1.25)^2 + 2 * 0.25^2 + 1.75^2) / 3) = 1.258306
    se = 1.258306 / 2
    assert d.estimate == pytest.approx(2.25)
    assert (d.low, d.high) == pytest.approx((2.25 - 1.959964 * se, 2.25 + 1.959964 * se), abs=1e-5)


# ----------------------------------------------------------------------------------------- tables


def test_comparison_is_computed_from_per_image_records(bench):
    kl_mm = [0.5] * N
    kl_pt = [0.5 - 0.4 * (i % 2) for i in range(N)]  # mean 0.3: KL lower by 0.2 on average
    rows = [new_record("fp", "fp32", [], calib="none"),
            new_record("minmax", "w4a4", range(20, 80), range(10, 70), kl_mm),
            new_record("ptq4vm", "w4a4", range(30), range(5), kl_pt),
            new_record("smoothquant", "w4a4", range(20, 80), range(10, 70), kl_mm)]
    lines = bench.report.comparison_lines(rows)
    cells = table_cells(lines, "| m | w4a4 | 0 | ptq4vm |")
    assert cells["Δ top-1"] == "+3.0 [+1.4, +4.6]*"  # the hand-computed interval above
    assert cells["Δ agree"].startswith("+5.5 [") and cells["Δ agree"].endswith("]*")
    assert cells["Δ KL"].startswith("-2.00e-01 [") and cells["Δ KL"].endswith("]*")
    same = table_cells(lines, "| m | w4a4 | 0 | smoothquant |")
    assert same["Δ top-1"] == "+0.0 [-0.2, +0.2]" and "*" not in same["Δ agree"] + same["Δ KL"]
    assert "| m | w4a4 | 0 | ptq4vm − pts-smooth |" not in "\n".join(lines)  # no pts-smooth record


def test_no_comparison_across_seeds_or_test_sets(bench):
    other = new_record("minmax", "w4a4", range(5), seed=1)
    short = dict(new_record("minmax", "w8a8", range(5)), test_images=200)
    rows = [new_record("ptq4vm", "w4a4", range(5)), other, short, new_record("ptq4vm", "w8a8", range(5))]
    lines = bench.report.comparison_lines(rows)
    assert "| m | w4a4 | 0 | ptq4vm |" not in "\n".join(lines)  # the only minmax w4a4 has seed 1
    cells = table_cells(lines, "| m | w8a8 | 0 | ptq4vm |")
    assert cells["Δ top-1"] == cells["Δ agree"] == cells["Δ KL"] == ""  # 200 vs 1000 test images
    fewer = [new_record("ptq4vm", "w6a6", range(5)), dict(new_record("minmax", "w6a6", range(9)), calib_images=16)]
    assert "| m | w6a6 |" not in "\n".join(bench.report.comparison_lines(fewer))  # 8 vs 16 calibration images


def test_old_records_render_with_blank_cells_and_assumed_seed(bench):
    rows = [old_record("fp", "fp32", 90.0, calib="none"), old_record("minmax", "w6a6", 61.3),
            old_record("ptq4vm", "w6a6", 88.5), old_record("smoothquant", "w6a6", 60.0)]
    record_cells = table_cells(bench.report.record_lines(rows), "| m | ptq4vm | w6a6 |", "| model | method |")
    assert record_cells["seed"] == "0†" and record_cells["agree"] == "" and record_cells["KL"] == ""
    assert record_cells["top-1"] == "88.50" and record_cells["drop [95% CI]"].startswith("+1.50 [")
    assert record_cells["drop [95% CI]"].endswith("] u")
    lines = bench.report.comparison_lines(rows)
    cells = table_cells(lines, "| m | w6a6 | 0† | ptq4vm |")
    assert cells["Δ top-1"].startswith("+27.2 [") and cells["Δ top-1"].endswith("]* u")  # 88.5 - 61.3, unpaired
    assert cells["Δ agree"] == "" and cells["Δ KL"] == ""
    assert table_cells(lines, "| m | w6a6 | 0† | smoothquant |")["Δ top-1"].startswith("-1.3 [")
    assert "w8a8" not in "\n".join(lines)  # no min-max row at w8a8, so no comparison row


def test_seed_summary_shows_mean_and_spread(bench):
    rows = [new_record("minmax", "w4a4", range(100), seed=0), new_record("minmax", "w4a4", range(120), seed=1),
            new_record("minmax", "w4a4", range(110), seed=2), new_record("minmax", "w8a8", range(10))]
    lines = bench.report.seed_summary_lines(rows)
    cells = table_cells(lines, "| m | minmax | w4a4 |", "| model | method |")
    assert cells["seeds"] == "0,1,2"
    assert cells["top-1"] == "89.00 ± 1.00 (88.00..90.00)"  # 90, 88, 89
    assert "| m | minmax | w8a8 |" not in "\n".join(lines)  # one seed: no spread row
    single = bench.report.seed_summary_lines(rows[-1:])
    assert "one seed so far" in "\n".join(single)


def test_seed_comparison_counts_significant_seeds(bench):
    rows = []
    for seed, (mm, pt) in enumerate([(range(60), range(10)), (range(60), range(10)), (range(12), range(10))]):
        rows += [new_record("minmax", "w4a4", mm, seed=seed), new_record("ptq4vm", "w4a4", pt, seed=seed)]
    lines = bench.report.comparison_lines(rows)
    cells = table_cells(lines, "| m | w4a4 | ptq4vm − minmax |", "| model | bits | a − b |")
    assert cells["seeds"] == "3"
    # +5.0, +5.0, +0.2: mean 3.40, sd 2.77; two seeds significant, one not
    assert cells["Δ top-1"] == "+3.40 ± 2.77 (2+ 0− of 3)"


# ------------------------------------------------------------------------------------------ notes


def test_notes_name_their_records_and_skip_missing_ones(bench):
    rows = [new_record("fp", "fp32", range(31), calib="none"), new_record("minmax", "w4a8", range(35))]
    text = "\n".join(bench.report.notes_lines(rows, today="2026-11-30"))
    assert "## Notes (computed 2026-11-30" in text
    assert "**noise**" in text and "96.9 %" in text and "0.55 points" in text  # sqrt(.969 * .031 / 1000)
    assert "**w4a8**" in text and "[reads: fp fp32, minmax w4a8 seed 0]" in text
    assert "at W4A8: m, seed 0: minmax's drop" in text  # each group names its model
    assert "w4a4 ordering" not in text and "smoothquant vs pts" not in text  # their records are absent


def test_the_smoothquant_reading_is_printed_only_when_every_seed_supports_it(bench):
    def rows(pts_wrong_seed1):
        return [new_record("smoothquant", "w4a4", range(30), seed=0), new_record("pts", "w4a4", range(80), seed=0),
                new_record("smoothquant", "w4a4", range(30), seed=1), new_record("pts", "w4a4", pts_wrong_seed1, seed=1)]
    supported = "\n".join(bench.report.notes_lines(rows(range(80))))
    assert "channel outliers" in supported and "ahead in every seed measured" in supported
    assert "reading dated" not in supported
    unsupported = "\n".join(bench.report.notes_lines(rows(range(31))))  # seed 1: +0.1, not significant
    assert "smoothquant − pts at W4A4: top-1 +0.1 [" in unsupported and "channel outliers" not in unsupported
    unpaired = [old_record("smoothquant", "w4a4", 97.0), old_record("pts", "w4a4", 92.0)]
    assert "channel outliers" not in "\n".join(bench.report.notes_lines(unpaired))


def test_ouromamba_note_separates_data_and_quantizer(bench):
    rows = [new_record("ouromamba", "w4a4", range(40), calib="synthetic"),
            new_record("ptq4vm", "w4a4", range(70)),  # data-driven, real images
            new_record("ptq4vm", "w4a4", range(90), calib="synthetic")]
    text = "\n".join(bench.report.notes_lines(rows))
    line = next(t for t in text.splitlines() if t.startswith("- **ouromamba vs ptq4vm**"))
    assert "ouromamba synthetic − ptq4vm real (data-free vs data-driven): top-1 +3.0 [" in line
    assert "ouromamba synthetic − ptq4vm synthetic (the quantizer, same images): top-1 +5.0 [" in line
    assert "ouromamba synthetic − ouromamba real" not in line  # that record is absent
    assert "[reads: ouromamba w4a4 seed 0, ptq4vm w4a4 seed 0" in line
    without = [new_record("ptq4vm", "w4a4", range(70)), new_record("ptq4vm", "w4a4", range(90), calib="synthetic")]
    assert "ouromamba vs ptq4vm" not in "\n".join(bench.report.notes_lines(without))


def ouromamba_line(bench, rows):
    return next(t for t in bench.report.notes_lines(rows) if t.startswith("- **ouromamba vs ptq4vm**"))


def test_ouromamba_verdict_on_the_papers_claim_follows_the_records(bench):
    fp = new_record("fp", "fp32", range(20), calib="none")
    ahead = [fp, new_record("ouromamba", "w4a4", range(40), calib="synthetic"), new_record("ptq4vm", "w4a4", range(70))]
    line = ouromamba_line(bench, ahead)  # 30 images only ptq4vm misses, none the other way
    assert "seed 0: confirmed on the proxy: top-1 higher" in line
    assert "In short: ouromamba synthetic − ptq4vm real (data-free vs data-driven): top-1 higher at w4a4 (+3.0)" in line
    assert "ptq4vm w4a4 seed 0 − fp: top-1 -5.0 [" in line and "against the paper's gap of 6.33 points" in line
    assert line.endswith("fp fp32]")  # the float record is read too
    tied = [fp, new_record("ouromamba", "w4a4", range(42), calib="synthetic"), new_record("ptq4vm", "w4a4", range(40))]
    line = ouromamba_line(bench, tied)
    assert "seed 0: not confirmed on the proxy: top-1 tied" in line and "top-1 tied at w4a4" in line
    behind = [new_record("ouromamba", "w4a4", range(90), calib="synthetic"), new_record("ptq4vm", "w4a4", range(40))]
    line = ouromamba_line(bench, behind)
    assert "seed 0: contradicted on the proxy: top-1 lower" in line and "top-1 lower at w4a4 (-5.0)" in line
    assert "− fp" not in line  # no float record to read


def kscaled_line(bench, rows):
    return next(t for t in bench.report.notes_lines(rows) if t.startswith("- **kscaled vs paper**"))


def test_kscaled_readings_against_the_paper_follow_the_records(bench):
    base = [new_record("fp", "fp32", range(30), calib="none"), new_record("minmax", "w8a8", range(32)),
            new_record("kscaled-ssm", "w8a8", range(34))]
    line = kscaled_line(bench, base + [new_record("kscaled", "w8a8", range(31))])
    assert "the Table I gap (k-scaled 13.3 points above MinMax) does not appear at W8A8 seed 0: kscaled − minmax top-1 +0.1 [" in line
    assert "kscaled-ssm's W8A8 drop (seed 0) is 0.40 points, below the paper's range" in line
    assert "kscaled − fp: top-1 tied at w8a8" in line and "minmax − fp: top-1 tied at w8a8" in line
    assert "reading dated" not in line
    line = kscaled_line(bench, [new_record("fp", "fp32", range(30), calib="none"), new_record("minmax", "w8a8", range(150)),
                                new_record("kscaled", "w8a8", range(31)), new_record("kscaled-ssm", "w8a8", range(40))])
    assert "the Table I gap (k-scaled 13.3 points above MinMax) appears at W8A8 seed 0: kscaled − minmax top-1 +11.9 [" in line
    assert "kscaled-ssm's W8A8 drop (seed 0) is 1.00 points, within the paper's range" in line
    assert "minmax − fp: top-1 lower at w8a8 (-12.0)" in line
    assert "kscaled − minmax over the settings: top-1 higher at w8a8 (+11.9)" in line


def test_outline_groups_settings_by_outcome(bench):
    Difference = bench.stats.Difference
    rows = [("w8a8", {"top1": Difference(0.1, -0.5, 0.7, "paired"), "kl": Difference(2e-3, 1e-3, 3e-3, "paired")}),
            ("w6a6", {"top1": Difference(-1.4, -2.4, -0.3, "paired"), "kl": None}),
            ("w4a4", {"top1": Difference(7.7, 5.8, 9.5, "paired"), "kl": Difference(1.0)})]  # no interval
    assert bench.report.outline(rows, ("top1", "kl")) == (
        "top-1 higher at w4a4 (+7.7), lower at w6a6 (-1.4), tied at w8a8; KL higher at w8a8 (+2.00e-03)")
    assert bench.report.outline(rows[1:2], ("kl",)) == "no interval to read"


def test_hidden_state_note_pairs_each_method_with_its_baseline(bench):
    rows = [new_record("kscaled", "w8a8", range(30)), new_record("kscaled-ssm", "w8a8", range(32)),
            new_record("ptq4vm", "w4a4", range(30)), new_record("ptq4vm-ssm", "w4a4", range(45))]
    line = next(t for t in bench.report.notes_lines(rows) if t.startswith("- **hidden state**"))
    assert "kscaled-ssm − kscaled (quantizing h, k-scaled): w8a8 seed 0: top-1 -0.2 [" in line
    assert "ptq4vm-ssm − ptq4vm (quantizing h, PTQ4VM with the reparameterization): w4a4 seed 0: top-1 -1.5 [" in line
    assert "kscaled-ssm-norep" not in line and "ptq4vm-ssm − kscaled-ssm" not in line  # no such pairs
    assert "In short: kscaled-ssm − kscaled: top-1 tied at w8a8; agree tied at w8a8; KL tied at w8a8; " in line
    assert "ptq4vm-ssm − ptq4vm: top-1 lower at w4a4 (-1.5); agree tied at w4a4" in line


# ------------------------------------------------------------------------------------ command line


def test_table_only_rewrites_markdown_from_json(bench, tmp_path):
    rows = [old_record("fp", "fp32", 90.0, calib="none"), old_record("minmax", "w4a4", 40.0),
            old_record("ptq4vm", "w4a4", 85.0)]
    with open(bench.cli.JSON_PATH, "w") as f:
        json.dump(rows, f)
    assert bench.cli.main(["--table-only"]) == 0
    md = open(bench.cli.MD_PATH).read()
    assert "| m | ptq4vm | w4a4 | real | 0† | 8 | 1000† | 85.00 | +5.00 [" in md
    assert "+45.0 [" in md and "seed 0 and the 1000-image test split assumed" in md
    out = tmp_path / "elsewhere"
    out.mkdir()
    (out / "accuracy.json").write_text(json.dumps(rows[:2]))
    assert bench.cli.main(["--table-only", "--out", str(out)]) == 0
    assert "| m | minmax | w4a4 |" in (out / "accuracy.md").read_text()


def test_bad_options_are_refused(bench):
    with pytest.raises(SystemExit, match="unknown methods"):
        bench.cli.main(["--methods", "minmax,nosuch"])
    with pytest.raises(SystemExit, match="unknown bit settings"):
        bench.cli.main(["--bits", "w3a3"])
    with pytest.raises(SystemExit, match="comma-separated integers"):
        bench.cli.main(["--seeds", "0,x"])
    with pytest.raises(SystemExit, match="pass --out"):
        bench.cli.main(["--test-n", "10"])



def test_the_calibration_seed_also_seeds_jlss_batch_order(bench, monkeypatch):
    seen = []

    class FakePipeline:
        def __init__(self, passes):
            seen.append(passes)

        def __call__(self, model, calib, config):
            return config

    monkeypatch.setattr(bench.run, "Pipeline", FakePipeline)
    cfg = bench.run.quantize(None, None, "ptq4vm-w4a4", 3)
    assert cfg.method == "ptq4vm"
    jlss = [p for p in seen[0] if isinstance(p, bench.run.JLSSPass)]
    assert len(jlss) == 1 and jlss[0].seed == 3
    # the rest of the pipeline is exactly the one vmfx.compile runs for the preset
    assert [type(p) for p in seen[0]] == [type(p) for p in bench.run.method_passes(bench.run.resolve_config("ptq4vm-w4a4"))]


def test_compare_with_an_earlier_run(bench, tmp_path):
    before = [old_record("fp", "fp32", 90.0, calib="none"), old_record("minmax", "w4a4", 40.0),
              old_record("ptq4vm", "w4a4", 85.0)]
    now = [new_record("fp", "fp32", range(100), calib="none"), new_record("minmax", "w4a4", range(590)),
           new_record("ptq4vm", "w4a4", range(140)), new_record("ptq4vm", "w4a4", range(150), seed=1)]
    lines = bench.report.baseline_lines(now, before, "before.json")
    text = "\n".join(lines)
    assert table_cells(lines, "| m | minmax | w4a4 | 0 |", "| model | method |")["Δ top-1"].startswith("+1.0 [")
    ptq = table_cells(lines, "| m | ptq4vm | w4a4 | 0 |", "| model | method |")["Δ top-1"]
    assert ptq.startswith("+1.0 [") and ptq.endswith("] u")  # the earlier record has no per-image data
    assert "| m | ptq4vm | w4a4 | 1 |" not in text  # no seed-1 record before
    assert "0 of 3 top-1 differences have an interval that excludes 0." in text
    (tmp_path / "before.json").write_text(json.dumps(before))
    with open(bench.cli.JSON_PATH, "w") as f:
        json.dump(now, f)
    assert bench.cli.main(["--table-only", "--compare-with", str(tmp_path / "before.json")]) == 0
    assert "## Against an earlier run (before.json)" in open(bench.cli.MD_PATH).read()


def test_ordering_note_reads_agree_and_kl_and_survives_mismatched_test_sets(bench):
    chain = {"minmax": 300, "smoothquant": 60, "pts": 70, "pts-smooth": 40, "ptq4vm": 35}
    rows = [new_record("fp", "fp32", range(30), calib="none")]
    rows += [new_record(m, "w4a4", range(k), range(k - 25), [k / 1000] * N) for m, k in chain.items()]
    text = "\n".join(bench.report.notes_lines(rows))
    line = next(l for l in text.splitlines() if "**w4a4 ordering**" in l)
    assert "drops from FP (points) minmax 27.0, smoothquant 3.0" in line
    assert "agree (%) minmax 72.5" in line and "KL minmax 0.3," in line
    assert "pts-smooth − minmax: top-1 +26.0 [" in line and "ptq4vm − pts-smooth: top-1 +0.5 [" in line
    rows[-1] = dict(rows[-1], test_images=200)  # ptq4vm measured on another test set
    line = next(l for l in "\n".join(bench.report.notes_lines(rows)).splitlines() if "**w4a4 ordering**" in l)
    assert "ptq4vm − pts-smooth: top-1 not comparable" in line


# ------------------------------------------------------------------------- no local paths recorded

#: An absolute path of some machine: a POSIX home / scratch / mount folder, or a Windows drive.
LOCAL_PATH = re.compile(r"(?<![\w.~-])/(?:work|tmp|home|Users|root|mnt|private|scratch|var/folders|data)/"
                        r"|(?<!\w)[A-Za-z]:\\{1,2}(?=\w)")
RECORDED = ("benchmarks/results", "vmfx/data/proxy", "tests/models/fixtures")


def recorded_text_files():
    """(relative path, text) of every committed-style text file under :data:`RECORDED` (binary files:
    only the header of a safetensors file, which is JSON)."""
    for folder in RECORDED:
        for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
            for name in sorted(names):
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    data = f.read()
                if name.endswith(".safetensors"):
                    data = data[8:8 + int.from_bytes(data[:8], "little")]
                try:
                    yield os.path.relpath(path, ROOT), data.decode("utf-8")
                except UnicodeDecodeError:  # a PNG
                    continue


def test_recorded_results_name_no_local_path():
    """Results, the bundled proxies' records and the official fixtures name their sources by
    repository (and commit) and by paths inside this repository, never by a local absolute path."""
    files = dict(recorded_text_files())
    assert "benchmarks/results/kscaled_official.json" in files and "vmfx/data/proxy/vim_proxy_digits.json" in files
    found = {path: [line.strip()[:120] for line in text.splitlines() if LOCAL_PATH.search(line)]
             for path, text in files.items()}
    assert {path: lines for path, lines in found.items() if lines} == {}


def test_the_check_sees_a_local_path():
    assert LOCAL_PATH.search('"official_source": "/work/.mirror/Access-IC-Lab+PTQ_for_ViM/repo"')
    assert LOCAL_PATH.search("--out /tmp/runs2/outliers") and LOCAL_PATH.search(r"C:\Users\me")
    assert LOCAL_PATH.search(r'"out": "C:\\Users\\me"')  # as JSON writes it
    assert not LOCAL_PATH.search('"value:\\nnext"')
    assert not LOCAL_PATH.search("Access-IC-Lab/PTQ_for_ViM@d6fc957 benchmarks/results/outliers vmfx/data/proxy")


def test_benchmark_commands_record_paths_relative_to_the_repository(tmp_path):
    sys.path.insert(0, ROOT)
    try:
        from benchmarks.provenance import portable_command, portable_path
    finally:
        sys.path.remove(ROOT)
    inside = os.path.join(ROOT, "benchmarks", "results", "outliers")
    command = portable_command("benchmarks/outliers.py", ["--images", "64", "--out", inside,
                                                          f"--baseline={tmp_path / 'scan.py'}", str(tmp_path)])
    assert command == (f"python benchmarks/outliers.py --images 64 --out benchmarks/results/outliers "
                       f"--baseline=<local>/scan.py <local>/{tmp_path.name}")
    assert not LOCAL_PATH.search(command) and str(tmp_path) not in command
    assert portable_path(os.path.join(ROOT, "vmfx", "data", "proxy", "x.json")) == "vmfx/data/proxy/x.json"


# ------------------------------------------------------------------ the official k-scaled side by side


def kscaled_harness(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    return importlib.import_module("kscaled_official")


def test_kscaled_side_by_side_pairs_official_rows_with_accuracy_records_of_the_same_images(monkeypatch, tmp_path):
    """The reading takes vmfx's figures from ``accuracy.json`` records calibrated on the same images
    (same seed, calibration and test sizes) and states paired intervals for top-1, agreement and KL."""
    ks = kscaled_harness(monkeypatch)
    gen = torch.Generator().manual_seed(24)
    kl_off = (torch.rand(N, generator=gen) * 0.02).tolist()
    official = dict(new_record("PTQ4ViM", "w8a8", wrong=range(30), disagree=range(10), kl_images=kl_off),
                    side="official")
    same = new_record("kscaled-official", "w8a8", wrong=range(31), disagree=range(11),
                      kl_images=[k + 1e-5 * ((-1) ** i) for i, k in enumerate(kl_off)])
    worse = new_record("kscaled", "w8a8", wrong=range(30), disagree=range(10), kl_images=[k + 0.01 for k in kl_off])
    other_seed = new_record("kscaled-ssm", "w8a8", wrong=range(90), seed=1)
    other_bits = new_record("kscaled-official", "w4a4", wrong=range(90))
    for r in (same, worse, other_seed, other_bits):
        r["model"], r["calib_images"] = "vim-proxy-digits", 256
    path = tmp_path / "accuracy.json"
    path.write_text(json.dumps([same, worse, other_seed, other_bits]))
    monkeypatch.setattr(ks, "RESULTS", str(tmp_path))
    result = {"seed": 0, "calib_images": 256, "test_images": N, "rows": [official]}

    assert [r["method"] for r in ks.accuracy_rows(result)] == ["kscaled-official", "kscaled"]
    lines = ks._reading(result)
    assert len(lines) == 2
    tie, far = lines
    assert "`kscaled-official`" in tie and "0 inside for top1, agree, kl" in tie
    assert "`kscaled`" in far and "0 inside for top1, agree)" in far and "KL +1.00e-02 [+1.00e-02, +1.00e-02]*" in far


class _ToyQuantModule(nn.Linear):
    """Stands in for an official quant module: its ``calibration_step2`` draws a k-means start from
    torch's RNG and corrects its bias, the two ways an official module's calibration reaches the
    modules calibrated after it."""

    def __init__(self):
        super().__init__(6, 6)
        self.mode = "raw"

    def calibration_step2(self, x):
        start = torch.randperm(6)[:2]
        self.scales = x.abs().amax(0)[start]
        with torch.no_grad():
            self.bias -= 0.1 * x.mean(0)
        return x


def _toy_calibration(model, todo, images):
    """What ``batching_quant_calib(sequential=False)`` does to each module in turn: feed the float model,
    keep the module's input, calibrate it, put it back in raw mode."""
    for module in todo.values():
        seen = []
        hook = module.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
        model(images)
        hook.remove()
        module.calibration_step2(seen[0])
        module.mode = "raw"


def _toy_model():
    torch.manual_seed(7)
    return nn.Sequential(*[_ToyQuantModule() for _ in range(5)])


def test_official_calibration_resumed_from_checkpoints_is_the_uninterrupted_one(monkeypatch, tmp_path):
    """Cut after two modules and resumed twice (once with nothing left to do), the calibration restores
    the biases and RNG state the cut-off run left, so every module ends as in one uninterrupted run."""
    ks = kscaled_harness(monkeypatch)
    images = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))
    whole = _toy_model()
    torch.manual_seed(1)
    _toy_calibration(whole, dict(whole.named_children()), images)

    class Cut(Exception):
        pass

    save = ks.CalibrationCheckpoints.save

    def save_then_cut(self, name, module):
        save(self, name, module)
        if len(self.modules) == 2:
            raise Cut

    monkeypatch.chdir(tmp_path)
    (tmp_path / "official_src").mkdir()
    for session, cut in enumerate((True, False, False), 1):
        model = _toy_model()
        torch.manual_seed(1)
        checkpoints = ks.CalibrationCheckpoints("w4a4", {"bits": "w4a4", "seed": 0})  # relative to the start
        checkpoints.begin_session()
        wrapped = dict(model.named_children())
        todo = checkpoints.restore(wrapped)
        assert list(todo) == ["0", "1", "2", "3", "4"][len(checkpoints.done()):]
        monkeypatch.setattr(ks.CalibrationCheckpoints, "save", save_then_cut if cut else save)
        with ks.in_dir(tmp_path / "official_src"), ks._checkpoint_each_module(todo, checkpoints):
            if cut:
                with pytest.raises(Cut):
                    _toy_calibration(model, todo, images)
            else:
                _toy_calibration(model, todo, images)
        checkpoints.end_session()
        assert _ToyQuantModule.calibration_step2.__name__ == "calibration_step2"  # the class is restored
        assert checkpoints.done() == (["0", "1"] if cut else ["0", "1", "2", "3", "4"])
    for mine, theirs in zip(model, whole):
        assert torch.equal(mine.bias, theirs.bias) and torch.equal(mine.scales, theirs.scales)
    totals = ks.CalibrationCheckpoints(tmp_path / "w4a4", {"bits": "w4a4", "seed": 0}).totals()
    assert totals["sessions"] == 2 and totals["cpu_s"] >= 0  # the third had nothing to calibrate
    assert [m["session"] for m in json.loads((tmp_path / "w4a4" / "run.json").read_text())["modules"]] == \
        [1, 1, 2, 2, 2]
    assert not list((tmp_path / "w4a4").glob("*.part"))


def test_official_checkpoints_of_other_settings_are_refused(monkeypatch, tmp_path):
    """A checkpoint folder of a run with other settings, or of another model's modules, is refused with
    the way out named; nothing of it is restored."""
    ks = kscaled_harness(monkeypatch)
    checkpoints = ks.CalibrationCheckpoints(tmp_path, {"bits": "w4a4", "seed": 0})
    checkpoints.begin_session()
    model = _toy_model()
    checkpoints.save("0", model[0])
    with pytest.raises(ks.CheckpointMismatch, match=r"other settings .*'seed': \(0, 1\).*another --checkpoints"):
        ks.CalibrationCheckpoints(tmp_path, {"bits": "w4a4", "seed": 1})
    other = {"layers.0": model[0], "layers.1": model[1]}
    with pytest.raises(ks.CheckpointMismatch, match="not the first modules"):
        ks.CalibrationCheckpoints(tmp_path, {"bits": "w4a4", "seed": 0}).restore(other)
    beside = ks.CalibrationCheckpoints(tmp_path, {"bits": "w4a4", "seed": 0})
    with pytest.raises(ks.CheckpointMismatch, match=rf"another run \(pid {os.getpid()}\) is calibrating"):
        beside.begin_session()  # the first one's lock is held while it lives
    checkpoints.end_session()
    beside.begin_session()
    assert beside.sessions == 2


def test_xproj_factor_files_come_back_from_their_cache_as_written(monkeypatch, tmp_path):
    """A resumed official run writes the x_proj r_D files from the cache its first session saved (texts
    as written, values as returned), without building or running the official model."""
    ks = kscaled_harness(monkeypatch)
    files = {"0_f.txt": {"text": "0.5000000000\n2.0000000000\n", "values": [0.5, 2.0]},
             "0_b.txt": {"text": "1.0000000000\n1.0000000000\n", "values": [1.0, 1.0]}}
    cache = tmp_path / "xproj_rd_0123.json"
    cache.write_text(json.dumps(files))
    src_dir = tmp_path / "src"
    (src_dir / "reparam_factors" / "tiny_factor" / "r_D").mkdir(parents=True)
    (src_dir / "reparam_factors" / "tiny_factor" / "r_D" / "5_f.txt").write_text("shipped Vim-T factors\n")
    got = ks.write_xproj_factors(None, None, None, src_dir, "calibrated", cache)
    assert got == {name: entry["values"] for name, entry in files.items()}
    out = src_dir / "reparam_factors" / "tiny_factor" / "r_D"
    assert sorted(p.name for p in out.iterdir()) == ["0_b.txt", "0_f.txt"]
    assert (out / "0_f.txt").read_text() == files["0_f.txt"]["text"]
