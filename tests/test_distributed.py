"""Calibration and evaluation across processes (vmfx.distributed): two gloo processes on the CPU
give the figures of one process.

One ``torch.multiprocessing.spawn`` of two processes runs every scenario (the spawn is the slow
part); each process saves what it computed and the tests compare that with the same computation
in this process. Min-max and the Lp grid search are compared bit for bit (quantization
parameters, logits), JLSS up to float rounding. The command line is run under
``python -m torch.distributed.run`` (torchrun). Every process runs one thread, as this one does
in the comparisons, so that the kernels compute the same bits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vmfx
from vmfx import distributed
from vmfx.config import InitConfig, JLSSConfig, QuantConfig, SmoothingConfig
from vmfx.data import evaluate, load_digits, load_proxy_model
from vmfx.data.evaluate import collect_logits, compare_logits
from vmfx.quant import QuantSpec
from vmfx.quant.observers import LpObserver

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend (this torch build has no gloo), "
           "on which two CPU processes are started",
)

REPO = Path(vmfx.__file__).resolve().parent.parent
WORLD = 2


# -- the scenarios, each run in one process and in two --------------------------------------------


def _proxy_data():
    train, _ = load_digits("train")
    test, labels = load_digits("test")
    # 10 calibration images in batches of 2: 5 batches, 3 on rank 0 and 2 on rank 1;
    # 12 evaluation images in batches of 5: 5 + 5 + 2
    return train[:10], (test[:12], labels[:12])


def _minmax() -> QuantConfig:
    return vmfx.preset("minmax-w8a8").replace(calib_batch_size=2)


def _lp() -> QuantConfig:
    """pts-w8a8 (per-token static scales by the Lp grid search) with 8 candidates instead of 100:
    the same code, 12 times faster."""
    return vmfx.preset("pts-w8a8").replace(calib_batch_size=2, init=InitConfig("lp", 2.4, 8))


def _tiny_model():
    from tests.conftest import TinyVimLike

    torch.manual_seed(0)
    return TinyVimLike().eval()


def _tiny_images() -> torch.Tensor:
    images = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return torch.cat([images, images.flip(-1)])  # 24 images


def _jlss() -> QuantConfig:
    """PTQ4VM (smoothing, Lp grid, JLSS) at W4A4: 3 steps of 10 images (split 5 / 5 over the
    processes), the last batch 4 images."""
    return QuantConfig(method="ptq4vm", weight=QuantSpec(4, True, "channel"), activation=QuantSpec(4, False, "token"),
                       init=InitConfig("lp", 2.4, 10), smoothing=SmoothingConfig(0.5), calib_batch_size=6,
                       jlss=JLSSConfig(steps=3, batch_size=10))


def _loader(images: torch.Tensor, batch_size: int):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(images, torch.zeros(images.shape[0], dtype=torch.long)), batch_size=batch_size)


def _state(qmodel) -> dict:
    return {k: v.detach().clone() for k, v in qmodel.state_dict().items()}


def _scenarios() -> dict:
    """Everything the processes compute (and this process computes alone, for comparison)."""
    calib, evalset = _proxy_data()
    out = {}
    minmax = vmfx.compile(load_proxy_model(), calib, config=_minmax())
    # the stages of vmfx.compile, to look at the observers' statistics before they are converted
    lp = vmfx.calibrate(vmfx.prepare(load_proxy_model(), _lp(), calib), calib)
    out["lp_observers"] = {f"{name}.{k}": getattr(m, k).clone() for name, m in lp.named_modules()
                           if isinstance(m, LpObserver) for k in ("min_val", "max_val", "losses")}
    lp = vmfx.convert(lp)
    out["minmax"], out["lp"] = _state(minmax), _state(lp)
    out["calibration"] = {k: lp.meta["vmfx_calibration"][k] for k in ("images", "batches")}
    out["evaluate"] = evaluate(lp, evalset, batch_size=5)
    out["logits"] = collect_logits(lp, evalset, batch_size=5)
    out["fp_logits"] = collect_logits(load_proxy_model(), evalset, batch_size=5)
    # a DataLoader (the --calib-dir case): 7 batches of 3 images and one of 2 (23 images)
    lp_tiny = vmfx.preset("pts-w8a8").replace(init=InitConfig("lp", 2.4, 8))
    out["loader"] = _state(vmfx.compile(_tiny_model(), _loader(_tiny_images()[:23], 3), config=lp_tiny))
    # SmoothQuant's per-channel |x| maxima; k-scaled's clusters of min-max ranges, then its
    # similarity search (run on the whole data in every process); batches of 5: 5 of them
    for name in ("smoothquant-w8a8", "kscaled-w8a8"):
        config = vmfx.preset(name).replace(calib_batch_size=5)
        out[name] = _state(vmfx.compile(_tiny_model(), _tiny_images(), config=config))
    # the KLT-enhanced rotation: the second moment of the normalised residual stream (batches of 2: 5)
    rotated = vmfx.compile(load_proxy_model(), calib, config=vmfx.preset("rotate-w8a8").replace(
        calib_batch_size=2, init=InitConfig("lp", 2.4, 8)))
    out["rotate"], out["rotate_meta"] = _state(rotated), rotated.meta["vmfx_rotation"]
    jlss = vmfx.compile(_tiny_model(), _tiny_images(), config=_jlss())
    out["jlss"], out["jlss_meta"] = _state(jlss), jlss.meta["vmfx_jlss"]
    try:  # one calibration batch for two processes
        vmfx.compile(load_proxy_model(), calib[:2], config=_minmax())
        out["too_few"] = None
    except vmfx.CalibrationDataError as exc:
        out["too_few"] = str(exc)
    return out


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        out = _scenarios()
        out["context"] = distributed.current()
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(what each of the two processes computed, what this process computes alone)."""
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(WORLD, str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _scenarios()
    finally:
        torch.set_num_threads(threads)
    return ranks, single


def _assert_same_bits(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    differ = [k for k in want if not (got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]))]
    assert not differ, f"{len(differ)} of {len(want)} tensors differ, e.g. {differ[:3]}"


# -- tests ----------------------------------------------------------------------------------------


def test_every_process_knows_its_place(runs):
    ranks, _ = runs
    assert [r["context"] for r in ranks] == [distributed.Context(2, 0, 0, "gloo"), distributed.Context(2, 1, 1, "gloo")]
    assert ranks[0]["context"].is_main and not ranks[1]["context"].is_main
    assert distributed.current() == distributed.SINGLE  # this process has no group


@pytest.mark.parametrize("preset", ["minmax", "lp"])
def test_minmax_and_lp_calibration_are_bit_for_bit_those_of_one_process(runs, preset):
    ranks, single = runs
    for r in ranks:
        _assert_same_bits(r[preset], single[preset])
    # the grid search's ranges and error sums themselves (float64), not only the chosen candidates
    assert len(single["lp_observers"]) > 0 and single["lp_observers"].keys() == ranks[0]["lp_observers"].keys()
    for r in ranks:
        _assert_same_bits(r["lp_observers"], single["lp_observers"])
    # the counts are of the whole data: 10 images in 5 batches
    assert [r["calibration"] for r in ranks] == [single["calibration"]] * 2 == [{"images": 10, "batches": 5}] * 2


@pytest.mark.parametrize("preset", ["smoothquant-w8a8", "kscaled-w8a8"])
def test_smoothing_statistics_and_kscaled_clusters_are_those_of_one_process(runs, preset):
    ranks, single = runs
    for r in ranks:
        _assert_same_bits(r[preset], single[preset])


def test_the_klt_rotation_is_that_of_one_process(runs):
    """Every process folds the same KLT-enhanced rotation into the weights, bit for bit the one a
    single process computes from the whole calibration data (its statistics count every token)."""
    ranks, single = runs
    for r in ranks:
        _assert_same_bits(r["rotate"], single["rotate"])
        assert r["rotate_meta"] == single["rotate_meta"]


def test_a_dataloader_is_sharded_by_its_own_batches(runs):
    ranks, single = runs
    for r in ranks:
        _assert_same_bits(r["loader"], single["loader"])


def test_evaluation_gives_the_figures_and_logits_of_one_process(runs):
    ranks, single = runs
    for r in ranks:
        got, want = r["evaluate"], single["evaluate"]
        assert (got.top1, got.top5, got.images) == (want.top1, want.top5, want.images) == (got.top1, got.top5, 12)
        for got_t, want_t in zip(r["logits"] + r["fp_logits"], single["logits"] + single["fp_logits"]):
            assert torch.equal(got_t, want_t)  # in the order of the data, every image once
        cmp = compare_logits(r["fp_logits"][0], r["logits"][0], r["logits"][1])
        ref = compare_logits(single["fp_logits"][0], single["logits"][0], single["logits"][1])
        assert (cmp.top1, cmp.agree, cmp.kl) == (ref.top1, ref.agree, ref.kl)


def test_jlss_averages_gradients_and_matches_one_process_up_to_rounding(runs):
    """Not bit for bit: each process backpropagates its half of every step's batch and the
    gradients are summed, so the rounding differs; the processes agree exactly with each other."""
    ranks, single = runs
    _assert_same_bits(ranks[1]["jlss"], ranks[0]["jlss"])
    assert ranks[0]["jlss"].keys() == single["jlss"].keys()
    for k, want in single["jlss"].items():
        torch.testing.assert_close(ranks[0]["jlss"][k], want, rtol=1e-4, atol=1e-6, msg=k)
    for got, want in zip(ranks[0]["jlss_meta"]["blocks"], single["jlss_meta"]["blocks"]):
        assert got["steps"] == want["steps"] == 3
        assert got["train_losses"] == pytest.approx(want["train_losses"], rel=1e-4, abs=1e-6)
        assert got["final_loss"] == pytest.approx(want["final_loss"], rel=1e-4, abs=1e-6)
    assert ranks[0]["jlss_meta"]["images"] == single["jlss_meta"]["images"] == 24


def test_more_processes_than_calibration_batches_is_an_error_in_every_process(runs):
    ranks, single = runs
    assert single["too_few"] is None  # one process, one batch: fine
    for r in ranks:
        assert "holds 1 batch, fewer than the 2 processes (rank 1 got none)" in r["too_few"]
        assert "use at most 1 process," in r["too_few"]


def test_shard_keeps_the_batches_of_the_whole_data():
    """Batch j goes to rank j % world, uncut, whatever the form of the data."""
    images = torch.arange(11.0).view(11, 1)
    ranks = [distributed.Context(3, r, r, "gloo") for r in range(3)]
    tensors = [distributed.shard(images, 2, c) for c in ranks]
    assert [[b[:, 0].tolist() for b in t] for t in tensors] == [
        [[0, 1], [6, 7]], [[2, 3], [8, 9]], [[4, 5], [10]]]
    pairs = distributed.shard((images, images[:, 0].long()), 2, ranks[2], pairs=True)
    assert [(x[:, 0].tolist(), y.tolist()) for x, y in pairs] == [([4, 5], [4, 5]), ([10], [10])]
    loader = distributed.shard(_loader(images, 2), 2, ranks[1])
    assert [x[:, 0].tolist() for x, _ in loader] == [[2, 3], [8, 9]]
    dataset = distributed.shard(_loader(images, 2).dataset, 4, ranks[0], pairs=True)
    assert [x[:, 0].tolist() for x, _ in dataset] == [[0, 1, 2, 3]]
    generic = distributed.shard(iter(images.split(2)), 2, ranks[0])
    assert [b[:, 0].tolist() for b in generic] == [[0, 1], [6, 7]]
    assert [distributed.owned_count(6, c) for c in ranks] == [2, 2, 2]
    assert [distributed.global_index(1, c) for c in ranks] == [3, 4, 5]


def test_without_torchrun_nothing_changes(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init() == distributed.SINGLE
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(vmfx.ConfigError, match=r"WORLD_SIZE=2 and RANK=2 do not describe a process"):
        distributed.init()


# -- the command line under torchrun ----------------------------------------------------------------


def _torchrun(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", VMFX_DIST_BACKEND="gloo")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           "-m", "vmfx", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """ImageNet-layout folders of proxy digits: 10 to evaluate on, 20 to calibrate from."""
    from tests.data.test_folders import write_digit_folder

    root = tmp_path_factory.mktemp("digits")
    return write_digit_folder(str(root / "val"), per_class=1), write_digit_folder(str(root / "train"), 2, "train")


def test_cli_eval_and_quantize_under_torchrun_match_one_process(folders, tmp_path):
    """``vmfx eval`` and ``vmfx quantize`` on folders (a Dataset to evaluate, a DataLoader to
    calibrate from; batches of 4, 4 and 2 images in both): only rank 0 prints and writes, and the
    figures and the saved model are those of one process."""
    from vmfx.cli import main

    val, train = folders
    args = ["--config", "minmax-w8a8", "--data", val, "--calib-dir", train, "--calib-n", "10", "--batch-size", "4",
            "--no-progress"]
    done = _torchrun(["eval", *args, "--json", "two.json"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("model: vim-proxy-digits") == 1  # only rank 0 prints
    done = _torchrun(["quantize", *args, "-o", "two.safetensors"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("saved to two.safetensors") == 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["eval", *args, "--json", str(tmp_path / "one.json")]) == 0
        assert main(["quantize", *args, "-o", str(tmp_path / "one.safetensors")]) == 0
    finally:
        torch.set_num_threads(threads)
    two, one = (json.loads((tmp_path / name).read_text()) for name in ("two.json", "one.json"))
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert [r["method"] for r in two["results"]] == ["fp32", "minmax-w8a8"]
    for a, b in zip(two["results"], one["results"], strict=True):
        for timed in ("calib_seconds", "ms_per_image"):  # wall-clock figures differ from run to run
            a.pop(timed), b.pop(timed)
        assert a == b
    _assert_same_bits(_state(vmfx.load(str(tmp_path / "two.safetensors"))),
                      _state(vmfx.load(str(tmp_path / "one.safetensors"))))
