"""The `vmfx` command on the bundled proxy and on a tiny ImageFolder the test writes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from tests.data.test_folders import write_digit_folder
from vmfx.cli import main


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    val = write_digit_folder(str(root / "val"), per_class=4, split="test")
    train = write_digit_folder(str(root / "train"), per_class=4, split="train")
    return val, train


def _accuracy(out: str, method: str) -> float:
    match = re.search(rf"^{re.escape(method)}\s+([\d.]+)%", out, re.M)
    assert match, out
    return float(match.group(1))


def test_eval_on_an_image_folder(folders, capsys):
    val, train = folders
    code = main(["eval", "--data", val, "--calib-dir", train, "--calib-n", "32", "--config", "minmax-w8a8",
                 "--no-progress", "--batch-size", "16"])
    out = capsys.readouterr().out
    assert code == 0
    assert "(40 images)" in out
    fp, q = _accuracy(out, "fp32"), _accuracy(out, "minmax-w8a8")
    assert fp >= 90.0 and q >= 85.0
    assert re.search(r"minmax-w8a8 .* s on 32 images", out)


def test_eval_requires_a_calibration_folder_with_data(folders, capsys):
    val, _ = folders
    assert main(["eval", "--data", val, "--config", "minmax-w8a8", "--no-progress"]) == 2
    assert "--calib-dir is required" in capsys.readouterr().err


def test_eval_on_the_bundled_proxy(capsys):
    assert main(["eval", "--limit", "100", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "bundled proxy digits, test split (100 images)" in out and _accuracy(out, "fp32") > 90


def test_quantize_then_inspect(tmp_path, capsys):
    path = str(tmp_path / "proxy-w8a8.safetensors")
    assert main(["quantize", "--config", "minmax-w8a8", "--calib-n", "32", "--output", path, "--no-progress"]) == 0
    assert os.path.getsize(path) > 0
    capsys.readouterr()
    assert main(["inspect", "--quantized", path]) == 0
    out = capsys.readouterr().out
    assert "in_proj" in out and "A uint8 asym per-tensor | W int8 sym per-channel" in out


def test_inspect_plots(tmp_path, capsys):
    out_dir = str(tmp_path / "plots")
    assert main(["inspect", "--plot", out_dir, "--block", "1", "--plot-images", "64", "--limit", "64"]) == 0
    out = capsys.readouterr().out
    assert "mixers," in out and "long_tail.png" in out and "in_proj" not in out  # no table before the plots
    for name in ("token_variance.png", "channel_max.png", "long_tail.png"):
        with open(os.path.join(out_dir, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_unknown_model_is_a_one_line_error(capsys):
    assert main(["eval", "--model", "no_such_model", "--data", "."]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err


def test_installed_entry_point():
    exe = shutil.which("vmfx", path=os.path.dirname(sys.executable)) or shutil.which("vmfx")
    if exe is None:
        pytest.skip("the `vmfx` console script is not installed in this environment (pip install -e . installs it)")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    assert "eval" in result.stdout and "quantize" in result.stdout and "inspect" in result.stdout


def test_eval_a_timm_vim_on_an_rgb_folder(tmp_path, capsys):
    """The ImageNet path: a timm Vim name, a 224x224 RGB ImageFolder, calibration from another folder."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("val", "train"):
        for c in ("n01", "n02"):
            os.makedirs(tmp_path / split / c)
            for i in range(2):
                pixels = (torch.rand(300, 260, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels, mode="RGB").save(tmp_path / split / c / f"{i}.jpg")
    name = "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
    code = main(["eval", "--model", name, "--num-classes", "2", "--data", str(tmp_path / "val"),
                 "--calib-dir", str(tmp_path / "train"), "--calib-n", "4", "--config", "minmax-w8a8",
                 "--no-progress", "--batch-size", "4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "random weights" in captured.err  # no --checkpoint: said, not hidden
    assert "(4 images)" in captured.out and re.search(r"minmax-w8a8 .* s on 4 images", captured.out)


# -- every user error: one line on stderr, exit status 2, nothing evaluated first ----------------


def _one_line_error(capsys, code: int) -> str:
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test if the command got as far as building its workload (model, data) or evaluating."""
    import vmfx.cli
    import vmfx.data

    def refuse(*args, **kwargs):
        raise AssertionError("an argument error was caught only after the work started")

    monkeypatch.setattr(vmfx.cli, "_workload", refuse)
    monkeypatch.setattr(vmfx.data, "evaluate", refuse)


BAD_ARGUMENTS = [
    (["eval", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["eval", "--batch-size", "ten"], "argument --batch-size: expected a whole number, got 'ten'"),
    (["eval", "--crop-pct", "0"], r"argument --crop-pct: must be in \(0, 1\]"),
    (["eval", "--crop-pct", "nan"], r"argument --crop-pct: must be in \(0, 1\]"),
    (["eval", "--calib-n", "-5", "--config", "minmax-w8a8"], "argument --calib-n: must be at least 1, got -5"),
    (["eval", "--limit", "0"], "argument --limit: must be at least 1, got 0"),
    (["eval", "--limit", "-5"], "argument --limit: must be at least 1, got -5"),
    (["eval", "--num-classes", "0"], "argument --num-classes: must be at least 1"),
    (["eval", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["eval", "--config", "minmax-w8a8", "--config", "minmax-w3a3"], "unknown preset 'minmax-w3a3'; known presets"),
    (["quantize", "--config", "ptq4vm-w4a3", "--output", "x.safetensors"], "unknown preset 'ptq4vm-w4a3'"),
    (["inspect", "--config", "minmax_w8a8"], "unknown preset 'minmax_w8a8'"),
    (["eval", "--checkpoint", "{tmp}/missing.pth"], "--checkpoint '.*missing.pth' does not exist"),
    (["eval", "--data", "{tmp}/missing"], "--data '.*missing' does not exist"),
    (["eval", "--data", "{tmp}/file", "--calib-dir", "{tmp}"], "--data '.*file' is a file, not a folder"),
    (["eval", "--json", "{tmp}"], "--json '.*' is a directory; give a file path such as '.*results.json'"),
    (["eval", "--json", "{tmp}/missing/results.json"], "--json '.*results.json': the folder '.*missing' does not exist"),
    (["eval", "--json", "{tmp}/file/results.json"], "the folder '.*file' does not exist"),
    (["eval", "--json", "/proc/version"], "--json '/proc/version' cannot be written"),
    (["quantize", "--config", "minmax-w8a8", "--output", "{tmp}"], "--output '.*' is a directory; give a file path"),
    (["inspect", "--plot", "{tmp}/file"], "--plot '.*file' is a file; give a folder"),
    (["inspect", "--block", "-1"], "argument --block: must be 0 or more, got -1"),
    (["inspect", "--plot-images", "0"], "argument --plot-images: must be at least 1"),
    (["inspect", "--quantized", "{tmp}/missing.safetensors"], "--quantized '.*missing.safetensors' does not exist"),
    (["inspect", "--quantized", "{tmp}/file", "--config", "minmax-w8a8"], "--quantized .* or --config .*, not both"),
]


@pytest.mark.parametrize("argv,message", BAD_ARGUMENTS, ids=[" ".join(a[:3]) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_one_line_before_any_work(argv, message, tmp_path, capsys, nothing_runs):
    (tmp_path / "file").write_text("not a folder")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    line = _one_line_error(capsys, main(argv + ["--no-progress"]))
    assert re.search(message, line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the write checks leave nothing behind


def test_help_still_exits_cleanly(capsys):
    assert main(["eval", "--help"]) == 0
    assert "--calib-n" in capsys.readouterr().out


def test_more_calibration_images_than_there_are_is_refused_before_evaluation(monkeypatch, capsys):
    import vmfx.data

    monkeypatch.setattr(vmfx.data, "evaluate", lambda *a, **k: pytest.fail("evaluated before refusing --calib-n"))
    line = _one_line_error(capsys, main(["eval", "--calib-n", "100000", "--config", "minmax-w8a8", "--no-progress"]))
    assert line == "vmfx eval: error: --calib-n 100000: the bundled training split holds only 4000 images"


def test_more_calibration_images_than_the_folder_holds(folders, capsys):
    val, train = folders
    line = _one_line_error(capsys, main(["eval", "--data", val, "--calib-dir", train, "--calib-n", "41",
                                         "--config", "minmax-w8a8", "--no-progress"]))
    assert re.search(r"--calib-n 41: the calibration folder '.*train' holds only 40 images", line)


def test_plot_of_a_block_the_model_lacks_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import vmfx.inspect

    monkeypatch.setattr(vmfx.inspect, "plot_distributions", lambda *a, **k: pytest.fail("plotted"))
    line = _one_line_error(capsys, main(["inspect", "--plot", str(tmp_path / "plots"), "--block", "99",
                                         "--limit", "8", "--no-progress"]))
    assert line == "vmfx inspect: error: --block 99: vim-proxy-digits has 6 blocks (0 to 5)"


def _folders_with_a_corrupt_image(tmp_path):
    from tests.data.test_folders import write_corrupt_image

    val = write_digit_folder(str(tmp_path / "val"), per_class=1, split="test")
    train = write_digit_folder(str(tmp_path / "train"), per_class=1, split="train")
    return val, train, write_corrupt_image


def test_a_corrupt_image_in_data_is_one_line(tmp_path, capsys):
    val, _, write_corrupt_image = _folders_with_a_corrupt_image(tmp_path)
    bad = write_corrupt_image(val)
    line = _one_line_error(capsys, main(["eval", "--data", val, "--no-progress", "--batch-size", "16"]))
    assert line.startswith(f"vmfx eval: error: cannot read the image '{bad}'") and "remove or replace" in line


def test_a_corrupt_image_in_calib_dir_is_one_line(tmp_path, capsys):
    val, train, write_corrupt_image = _folders_with_a_corrupt_image(tmp_path)
    bad = write_corrupt_image(train)
    line = _one_line_error(capsys, main(["eval", "--data", val, "--calib-dir", train, "--calib-n", "11",
                                         "--config", "minmax-w8a8", "--no-progress", "--batch-size", "16"]))
    assert line.startswith(f"vmfx eval: error: cannot read the image '{bad}'")


def test_internal_errors_keep_their_traceback(monkeypatch):
    import vmfx.cli

    def broken(args):
        raise RuntimeError("a bug in vmfx")

    monkeypatch.setattr(vmfx.cli, "_workload", lambda *a, **k: broken(None))
    with pytest.raises(RuntimeError, match="a bug in vmfx"):
        main(["eval", "--no-progress"])


def test_json_is_written_after_the_check(tmp_path, capsys):
    path = tmp_path / "results.json"
    assert main(["eval", "--limit", "20", "--no-progress", "--json", str(path)]) == 0
    import json

    assert json.loads(path.read_text())["results"][0]["method"] == "fp32"


def test_progress_shows_totals_the_preset_and_each_stage(capsys):
    assert main(["eval", "--limit", "20", "--batch-size", "10", "--calib-n", "24", "--config", "minmax-w8a8"]) == 0
    err = capsys.readouterr().err
    assert "evaluating fp32" in err and "quantizing vim-proxy-digits with minmax-w8a8 (calibration on 24 images)" in err
    assert "calibrating minmax w8a8: 1 batch, 24 images" in err and "evaluating minmax-w8a8" in err
    assert re.search(r"eval fp32: 100%\|.*\| 2/2 ", err), err  # a total, hence a percentage and an ETA
    assert re.search(r"calibrate minmax w8a8: 100%\|.*\| 1/1 ", err), err


def test_inspect_draws_without_dumping_the_table_unless_asked(tmp_path, capsys):
    dot = str(tmp_path / "graph.dot")
    assert main(["inspect", "--dot", dot, "--limit", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "mixers," in out and f"wrote {dot}" in out and "in_proj" not in out
    assert main(["inspect", "--dot", dot, "--table", "--limit", "8", "--no-progress"]) == 0
    assert "in_proj" in capsys.readouterr().out
