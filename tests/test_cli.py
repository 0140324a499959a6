"""The `vmfx` command on the bundled proxy and on a tiny ImageFolder the test writes."""

from __future__ import annotations

import json
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


def test_quantize_keeps_float_weights_on_request(tmp_path, capsys):
    from safetensors import safe_open

    from vmfx.serialize import decode_header

    paths = {}
    for name, extra in (("codes", []), ("float", ["--keep-float-weights"])):
        paths[name] = str(tmp_path / f"{name}.safetensors")
        assert main(["quantize", "--config", "minmax-w8a8", "--calib-n", "16", "--output", paths[name], "--no-progress",
                     *extra]) == 0
        with safe_open(paths[name], "pt") as f:
            assert decode_header(f.metadata()["vmfx"])["weights"]["storage"] == name
    assert os.path.getsize(paths["codes"]) < 0.6 * os.path.getsize(paths["float"])


def test_a_plugin_method_runs_from_the_cli(tmp_path, capsys):
    plugin = os.path.join(os.path.dirname(__file__), "plugins", "clip_method.py")
    assert main(["eval", "--plugin", plugin, "--config", "clip-w8a8", "--limit", "64", "--calib-n", "16",
                 "--no-progress", "--speed-runs", "1", "--json", str(tmp_path / "r.json")]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [r["method"] for r in rows] == ["fp32", "clip-w8a8"] and rows[1]["agree"] > 90


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
    monkeypatch.setattr(vmfx.data, "collect_logits", refuse)


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
    (["quantize", "--config", "minmax-w8a8", "--output", "{tmp}/q.safetensors", "--keep-float-weights",
      "--backend", "reference"], "--keep-float-weights keeps the float weights of an unlowered model"),
    (["eval", "--plugin", "{tmp}/missing.py", "--config", "clip-w8a8"], "no plug-in file at '.*missing.py'"),
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

    monkeypatch.setattr(vmfx.data, "collect_logits", lambda *a, **k: pytest.fail("evaluated before refusing --calib-n"))
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


# -- issue 23: what a compiled model buys; every model family through every command ---------------


def _rgb_folders(root, classes=("n01", "n02"), per_class=1, size=(240, 230)):
    """Random RGB ImageNet-layout folders ``root/val`` and ``root/train``."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("val", "train"):
        for c in classes:
            os.makedirs(root / split / c)
            for i in range(per_class):
                pixels = (torch.rand(size[0], size[1], 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels, mode="RGB").save(root / split / c / f"{i}.jpg")
    return str(root / "val"), str(root / "train")


def test_eval_reports_agreement_kl_size_and_speed(tmp_path, capsys):
    import json

    path = tmp_path / "results.json"
    argv = ["eval", "--limit", "16", "--batch-size", "16", "--calib-n", "16", "--config", "minmax-w8a8",
            "--speed-batch", "2", "--speed-runs", "1", "--threads", "1", "--json", str(path), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"method\s+top-1\s+top-5\s+drop\s+agree\s+KL\s+size MB\s+ms/img", out), out
    record = json.loads(path.read_text())
    timing = dict(record["timing"])
    assert len(timing.pop("load_average")) == 3
    assert timing == {"backend": "reference", "device": "cpu", "threads": 1, "batch": 2, "runs": 1, "warmup": 1,
                      "statistic": "median", "order": "models in turn"}
    fp, q = record["results"]
    assert fp["agree"] == 100.0 and fp["kl"] == 0.0 and fp["timed"] == "float model"
    assert 0.0 <= q["agree"] <= 100.0 and q["kl"] >= 0.0 and q["timed"] == "lowered (reference)"
    from vmfx.data.proxy import PROXY_WEIGHTS

    assert fp["size_mb"] == os.path.getsize(PROXY_WEIGHTS) / 1e6
    # the quantized size is the file vmfx.save writes for that model: the same as `vmfx quantize` saves
    saved = tmp_path / "q.safetensors"
    assert main(["quantize", "--config", "minmax-w8a8", "--calib-n", "16", "--batch-size", "16",
                 "--output", str(saved), "--no-progress"]) == 0
    assert q["size_mb"] == os.path.getsize(saved) / 1e6
    for row in (fp, q):  # speed is measured and printed, never compared
        assert isinstance(row["ms_per_image"], float) and row["ms_per_image"] > 0


def _family_models():
    import importlib.util

    models = [
        ("vim", "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"),
        ("vmamba", "vmamba_tiny_s1l8"),
        ("vanilla-vmamba", "vanilla_vmamba_tiny"),
        ("localvim", "local_vim_tiny"),
        ("localvssm", "local_vssm_tiny"),
    ]
    marks = [] if importlib.util.find_spec("mambavision") else [pytest.mark.skip(
        reason="the optional mambavision package is not installed (`make setup` installs it)")]
    return [pytest.param(name, id=family) for family, name in models] + [
        pytest.param("mamba_vision_T", id="mambavision", marks=marks)]


@pytest.mark.parametrize("name", _family_models())
def test_every_model_family_runs_through_every_command(name, tmp_path, capsys):
    """eval (float + quantized), quantize, inspect of the float and of the saved model, and the
    activation plots of the float model beside the saved one, on two random 224x224 images."""
    val, train = _rgb_folders(tmp_path)
    common = ["--model", name, "--num-classes", "2", "--batch-size", "2", "--no-progress"]
    assert main(["eval", *common, "--data", val, "--calib-dir", train, "--calib-n", "2", "--config", "minmax-w8a8",
                 "--speed-batch", "1", "--speed-runs", "1"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "(2 images)" in out and re.search(r"^minmax-w8a8 .* s on 2 images", out, re.M)
    saved = str(tmp_path / "q.safetensors")
    assert main(["quantize", *common, "--calib-dir", train, "--calib-n", "2", "--config", "minmax-w8a8",
                 "--output", saved]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["inspect", *common, "--data", val, "--coverage"]) == 0, capsys.readouterr().err
    assert "mixers," in capsys.readouterr().out
    # the saved model alone where vmfx rebuilds its architecture itself, else loaded into --model's
    rebuilds = not name.startswith("mamba_vision")
    argv = ["inspect", "--quantized", saved, "--no-progress"] + ([] if rebuilds else common)
    assert main(argv) == 0, capsys.readouterr().err
    assert "quantized linears" in capsys.readouterr().out
    if not rebuilds:
        line = _one_line_error(capsys, main(["inspect", "--quantized", saved, "--no-progress"]))
        assert "vmfx cannot rebuild its architecture by itself; give the model it was quantized from with --model" in line
    # --plot with a saved model draws the float model it was made from, never the bundled proxy
    line = _one_line_error(capsys, main(["inspect", "--quantized", saved, "--plot", str(tmp_path / "p"),
                                         "--no-progress", "--limit", "2"]))
    if rebuilds:
        assert "give the float model the file was quantized from with --model" in line and "the default" in line
    else:
        assert "give the model it was quantized from with --model" in line


def test_plot_of_a_saved_vmamba_draws_that_vmamba(tmp_path, capsys):
    val, train = _rgb_folders(tmp_path)
    name = "vanilla_vmamba_tiny"
    common = ["--model", name, "--num-classes", "2", "--batch-size", "2", "--no-progress"]
    saved = str(tmp_path / "q.safetensors")
    assert main(["quantize", *common, "--calib-dir", train, "--calib-n", "2", "--config", "minmax-w8a8",
                 "--output", saved]) == 0, capsys.readouterr().err
    capsys.readouterr()
    plots = tmp_path / "plots"
    assert main(["inspect", "--quantized", saved, "--plot", str(plots), *common, "--data", val, "--limit", "2",
                 "--plot-images", "2"]) == 0, capsys.readouterr().err
    assert sorted(os.listdir(plots)) == ["channel_max.png", "long_tail.png", "token_variance.png"]
    # another architecture than the file's is refused, with the way out
    capsys.readouterr()
    line = _error_after_warnings(capsys, main(["inspect", "--quantized", saved, "--plot", str(plots), "--model",
                                               "vmamba_tiny_s1l8", "--num-classes", "2", "--data", val,
                                               "--no-progress"]))
    assert "holds a quantized VSSM" in line and "--model" in line


def _error_after_warnings(capsys, code: int) -> str:
    """The one error line of a refused command, after its warnings (e.g. random weights)."""
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err, captured
    lines = captured.err.strip().splitlines()
    assert all(line.startswith("warning: ") for line in lines[:-1]), lines
    return lines[-1]


def _two_class_digit_folder(root):
    """Digits 0 and 1 only (labels 0 and 1 under ImageFolder's sorted numbering)."""
    full = write_digit_folder(str(root / "all"), per_class=2, split="test")
    two = root / "two"
    for c in ("0", "1"):
        shutil.copytree(os.path.join(full, c), two / c)
    return str(two)


def test_a_folder_with_more_classes_than_the_model_is_refused_before_evaluation(tmp_path, capsys, monkeypatch):
    import vmfx.data

    monkeypatch.setattr(vmfx.data, "collect_logits", lambda *a, **k: pytest.fail("evaluated"))
    val, _ = _rgb_folders(tmp_path)
    name = "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
    line = _error_after_warnings(capsys, main(["eval", "--model", name, "--num-classes", "1", "--data", val,
                                               "--no-progress"]))
    assert line.startswith("vmfx eval: error: --data has 2 class folders but") and "--num-classes 2" in line
    assert "outputs 1 classes, so label 1 could never be predicted" in line


def test_a_folder_with_fewer_classes_than_the_model_warns(tmp_path, capsys):
    val = _two_class_digit_folder(tmp_path)
    assert main(["eval", "--data", val, "--no-progress", "--speed-batch", "1", "--speed-runs", "1"]) == 0
    captured = capsys.readouterr()
    assert "warning: --data has 2 class folders (0, 1) but vim-proxy-digits outputs 10 classes" in captured.err
    assert "(4 images)" in captured.out


@pytest.mark.parametrize("layout,message", [
    ("empty", "has no class sub-folders"),
    ("empty-class", "the class folder(s) 'b' hold no image"),
])
def test_an_image_folder_without_images_is_refused_before_any_work(layout, message, tmp_path, capsys, nothing_runs):
    root = tmp_path / "val"
    root.mkdir()
    if layout == "empty-class":
        write_digit_folder(str(root / "a"), per_class=1)
        (root / "b").mkdir()
    line = _one_line_error(capsys, main(["eval", "--data", str(root), "--no-progress"]))
    assert message in line, line


def test_a_model_vmfx_cannot_quantize_is_refused_before_evaluation(tmp_path, capsys, monkeypatch):
    import vmfx.data

    monkeypatch.setattr(vmfx.data, "collect_logits", lambda *a, **k: pytest.fail("evaluated before refusing"))
    val, train = _rgb_folders(tmp_path)
    line = _error_after_warnings(capsys, main(["eval", "--model", "resnet18", "--num-classes", "2", "--data", val,
                                         "--calib-dir", train, "--calib-n", "2", "--config", "minmax-w8a8",
                                         "--no-progress"]))
    assert "resnet18 has no Mamba mixer vmfx can quantize" in line


MORE_BAD_ARGUMENTS = [
    (["quantize", "--config", "minmax-w8a8", "--output", "{tmp}/q.safetensors", "--limit", "5"],
     "--limit sets how many images are evaluated, and quantize evaluates none"),
    (["eval", "--config", "minmax-w8a8", "--calib", "synthetic", "--save-synthetic", "{tmp}/file"],
     "--save-synthetic '.*file' is a file; give a folder to write the synthetic images"),
    (["eval", "--model", "vanilla_vmamba_tiny"], "--data is required for vanilla_vmamba_tiny"),
    (["quantize", "--model", "vmamba_tiny_s1l8", "--config", "minmax-w8a8", "--output", "{tmp}/q.safetensors"],
     "quantizing vmamba_tiny_s1l8 needs calibration images: give --calib-dir"),
    (["eval", "--backend", "cuda"], "argument --backend: invalid choice"),
]


@pytest.mark.parametrize("argv,message", MORE_BAD_ARGUMENTS, ids=[" ".join(a[:3]) for a, _ in MORE_BAD_ARGUMENTS])
def test_more_bad_arguments_are_one_line_before_any_work(argv, message, tmp_path, capsys, nothing_runs):
    (tmp_path / "file").write_text("not a model")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    line = _one_line_error(capsys, main(argv + ["--no-progress"]))
    assert re.search(message, line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_messages_name_paths_as_the_user_wrote_them(tmp_path, capsys, monkeypatch, nothing_runs):
    monkeypatch.chdir(tmp_path)
    line = _one_line_error(capsys, main(["eval", "--json", "missing/results.json", "--no-progress"]))
    assert line == "vmfx eval: error: --json 'missing/results.json': the folder 'missing' does not exist"


def test_a_corrupt_checkpoint_is_one_vmfx_line_without_unsafe_advice(tmp_path, capsys):
    bad = tmp_path / "model.pth"
    bad.write_bytes(b"not a checkpoint" * 8)
    line = _one_line_error(capsys, main(["eval", "--checkpoint", str(bad), "--limit", "4", "--no-progress"]))
    assert "the file is damaged, truncated or not written by torch.save" in line and "weights_only=False" not in line
    assert "weights_only` set to `False`" not in line


def test_version(capsys):
    import vmfx

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"vmfx {vmfx.__version__} (torch ")


def test_python_dash_m_vmfx_runs_this_checkout():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", "vmfx", "--version"], capture_output=True, text=True, cwd=root,
                            check=True)
    assert result.stdout.startswith("vmfx ")


def test_progress_in_a_log_is_sparse_lines(capsys):
    """stderr captured (not a terminal): each bar writes plain lines, not one carriage return per update."""
    assert main(["eval", "--limit", "20", "--batch-size", "5", "--speed-batch", "1", "--speed-runs", "1"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "evaluating fp32" in err
    bar = [line for line in err.splitlines() if line.startswith("eval fp32:")]
    assert 1 <= len(bar) <= 3 and "4/4" in bar[-1], err  # start, final (and at most one in between)


def test_progress_on_a_terminal_is_tqdm_unchanged(capsys, monkeypatch):
    import tqdm.auto

    import vmfx.cli

    original = tqdm.auto.tqdm
    monkeypatch.setattr(vmfx.cli, "_stderr_is_tty", lambda: True)
    assert main(["eval", "--limit", "20", "--batch-size", "5", "--speed-batch", "1", "--speed-runs", "1"]) == 0
    assert "\r" in capsys.readouterr().err and tqdm.auto.tqdm is original


def test_backend_triton_with_the_interpreter_off_is_refused_before_any_work(capsys, monkeypatch, nothing_runs):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    line = _one_line_error(capsys, main(["eval", "--config", "minmax-w8a8", "--backend", "triton", "--no-progress"]))
    assert "TRITON_INTERPRET='0' keeps Triton's CPU interpreter off" in line and "--backend reference" in line


def test_backend_triton_after_triton_was_imported_is_refused_before_any_work(capsys, monkeypatch, nothing_runs):
    import vmfx.cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(vmfx.cli, "_triton_imported_for_gpu", lambda: True)
    line = _one_line_error(capsys, main(["quantize", "--config", "minmax-w8a8", "--output", "q.safetensors",
                                         "--backend", "triton", "--no-progress"]))
    assert "run with TRITON_INTERPRET=1 set in the environment, or use --backend reference" in line


def test_backend_triton_on_a_fresh_cpu_process_switches_the_interpreter_on():
    import importlib.util

    if importlib.util.find_spec("triton") is None or torch.cuda.is_available():
        pytest.skip("needs the triton package and no CUDA device")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import os; from vmfx.cli import _check_backend; _check_backend('triton'); print(os.environ['TRITON_INTERPRET'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env, check=True)
    assert result.stdout.strip() == "1" and "Triton's CPU interpreter, which is slow" in result.stderr


def test_forced_redraws_in_a_log_are_held_back(capsys):
    """JLSS refreshes its bar at every step (set_postfix): in a log that is still one line per interval."""
    from vmfx.cli import _progress_output

    with _progress_output(True):
        from tqdm.auto import tqdm

        bar = tqdm(total=200, desc="steps")
        for i in range(200):
            bar.set_postfix(loss=i)
            bar.update(1)
        bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("steps:   0%") and "200/200" in lines[1] and "loss=199" in lines[1]
