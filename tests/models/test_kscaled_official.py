"""The official k-scaled ViM PTQ code's float Vim (Access-IC-Lab/PTQ_for_ViM), loaded with the proxy's
weights by ``benchmarks/kscaled_official.py``, computes vmfx's float logits: the side-by-side comparison
in ``benchmarks/results/kscaled_official.md`` quantizes the same model on both sides.

Each test runs on the recorded fixture (``fixtures/official/kscaled.*``: the official float model's
logits on the first test digits, the digest of its state dict and the line of ``net_wrap.py`` the
harness patches, at a named commit, written by ``make_official_fixtures.py``) and, when
``$VMFX_KSCALED_SRC`` names a copy of the repository, on the official code itself."""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from .official_fixtures import load, source_path, sources

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
ENV = "VMFX_KSCALED_SRC"
SOURCES = sources(ENV)
#: The first test digits the official float model is run on.
N_DIGITS = 3
NET_WRAP = "src/quant_utils/net_wrap.py"


def _harness():
    spec = importlib.util.spec_from_file_location("bench_kscaled_official",
                                                  os.path.join(ROOT, "benchmarks", "kscaled_official.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def state_digest(state: dict) -> str:
    """sha256 over a state dict's keys, dtypes, shapes and values (in key order)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def proxy_file_sha256() -> str:
    from vmfx.data.proxy import PROXY_WEIGHTS

    return hashlib.sha256(Path(PROXY_WEIGHTS).read_bytes()).hexdigest()


def kscaled_reference(src: str, tmp: Path):
    """What vmfx is compared with, computed by the official code at ``src`` through the benchmark's
    harness: ``"input"`` (the first test digits), ``"logits"`` (the official float VisionMamba holding
    the proxy's weights), and the metadata: the digests of the official model's state dict and of the
    proxy file, and the line(s) of ``net_wrap.py`` that hold the dt rank the harness patches."""
    pytest.importorskip("einops", reason="the official Vim code imports einops")
    from vmfx.data import load_digits, load_proxy_model

    harness = _harness()
    path = list(sys.path)
    try:
        src_dir = harness.materialise(tmp, src)
        mods = harness.import_official(src_dir)
        model = load_proxy_model()
        images, labels = load_digits("test")
        images, labels = images[:N_DIGITS], labels[:N_DIGITS]
        theirs = harness.build_official(mods, model)
        logits, _ = harness.official_logits(theirs, images, labels)
        digest = state_digest(theirs.state_dict())
    finally:
        harness._purge_official_modules()
        sys.path[:] = path
    original = harness.official_file(NET_WRAP, src)
    lines = [[i, line] for i, line in enumerate(original.splitlines(), 1) if harness.DT_RANK_LINE in line]
    meta = {"test_digits": N_DIGITS, "official_state_digest": digest, "proxy_sha256": proxy_file_sha256(),
            "net_wrap": {"path": NET_WRAP, "lines": len(original.splitlines()), "dt_rank_lines": lines,
                         "sha256": hashlib.sha256(original.encode()).hexdigest()}}
    return {"input": images, "labels": labels, "logits": logits}, meta


@pytest.fixture(scope="module", params=SOURCES)
def reference(request, tmp_path_factory):
    """(tensors, metadata) of :func:`kscaled_reference`: recorded, or computed by the official code."""
    if request.param == "recorded":
        return load("kscaled")
    return kscaled_reference(os.environ[ENV], tmp_path_factory.mktemp("kscaled"))


def test_the_reference_holds_these_cases(reference):
    """The fixture was made for this proxy and these digits (else: rerun make_official_fixtures.py);
    live, the recorded values are what the official code gives now."""
    from vmfx.data import load_digits

    tensors, meta = reference
    recorded_tensors, recorded = load("kscaled")
    assert meta["test_digits"] == recorded["test_digits"] == N_DIGITS
    assert meta["proxy_sha256"] == recorded["proxy_sha256"] == proxy_file_sha256(), \
        "the bundled proxy changed since the fixture was made: rerun make_official_fixtures.py --only kscaled"
    assert meta["official_state_digest"] == recorded["official_state_digest"]
    assert meta["net_wrap"] == recorded["net_wrap"]
    images, labels = load_digits("test")
    assert torch.equal(tensors["input"], images[:N_DIGITS]) and torch.equal(tensors["labels"], labels[:N_DIGITS])
    for key, value in tensors.items():  # the same math on another machine: not bit for bit
        torch.testing.assert_close(value, recorded_tensors[key], rtol=1e-5, atol=1e-6, msg=key)


def test_official_float_vim_computes_vmfx_logits(reference):
    from vmfx.data import load_proxy_model

    tensors, meta = reference
    torch.manual_seed(0)
    model = load_proxy_model()
    assert state_digest(model.state_dict()) == meta["official_state_digest"]  # the official model's weights
    got = tensors["logits"]
    with torch.no_grad():
        want = model(tensors["input"])
    # the same float32 math in another order (their sequential scan vs vmfx's)
    assert torch.allclose(got, want, rtol=0, atol=1e-4 * want.abs().max().item())
    # and the harness leaves .cuda() alone outside the official calls
    assert torch.Tensor.cuda is not None and "lambda" not in repr(torch.Tensor.cuda)


def _official_copy(reference, source: str, tmp: Path):
    """(path of a copy to materialise, the text of its net_wrap.py): the official copy, or, recorded,
    a stand-in checkout whose net_wrap.py holds the recorded dt-rank line at its recorded line number
    among lines of its own."""
    _, meta = reference
    if source == "live":
        return os.environ[ENV], _harness().official_file(NET_WRAP, os.environ[ENV])
    lines = [f"# line {i} of a stand-in for {NET_WRAP}" for i in range(1, meta["net_wrap"]["lines"] + 1)]
    for number, text in meta["net_wrap"]["dt_rank_lines"]:
        lines[number - 1] = text
    text = "\n".join(lines) + "\n"
    fake = tmp / "PTQ_for_ViM"
    (fake / "src" / "quant_layers").mkdir(parents=True)
    (fake / NET_WRAP).parent.mkdir(parents=True)
    (fake / NET_WRAP).write_text(text)
    return str(fake), text


def test_dt_rank_patch_is_the_only_edit(reference, request, tmp_path):
    """The materialised net_wrap differs from the official one only in the hard-coded dt rank (its
    one line, as recorded, or as the official copy has it)."""
    harness = _harness()
    _, meta = reference
    assert len(meta["net_wrap"]["dt_rank_lines"]) == 1
    src, original = _official_copy(reference, request.node.callspec.params["reference"], tmp_path)
    dest = tmp_path / "materialised"
    dest.mkdir()
    patched = (harness.materialise(dest, src) / "quant_utils" / "net_wrap.py").read_text()
    changed = [d for d in difflib.ndiff(original.splitlines(), patched.splitlines()) if d[:1] in "+-"]
    (number, line), = meta["net_wrap"]["dt_rank_lines"]
    assert changed == ["- " + line, "+ " + line.replace(harness.DT_RANK_LINE, harness.DT_RANK_PATCH)]
    assert harness.DT_RANK_PATCH in patched and harness.DT_RANK_LINE not in patched


def test_the_harness_refuses_a_net_wrap_it_cannot_patch(reference, tmp_path):
    """A net_wrap.py that holds the dt-rank line twice (or not at all) stops the harness."""
    harness = _harness()
    src, original = _official_copy(reference, "recorded", tmp_path)
    (number, line), = reference[1]["net_wrap"]["dt_rank_lines"]
    for text in (original + line + "\n", original.replace(line, "")):
        Path(src, NET_WRAP).write_text(text)
        dest = tmp_path / f"materialised{len(text)}"
        dest.mkdir()
        with pytest.raises(harness.OfficialCodeMissing, match="exactly one"):
            harness.materialise(dest, src)


@pytest.mark.skipif(source_path(ENV) is None,
                    reason=f"needs ${ENV}: a copy of Access-IC-Lab/PTQ_for_ViM, whose calibration this resumes")
def test_a_resumed_official_calibration_gives_the_uninterrupted_model(tmp_path, monkeypatch):
    """The official W4A4 calibration on two images, cut after 20 and after 50 of its 99 modules and
    resumed from its checkpoints (``--checkpoints``), gives the uninterrupted calibration's logits bit
    for bit: restored bias corrections and RNG states (k-means starts) are all a module passes on."""
    pytest.importorskip("einops", reason="the official Vim code imports einops")
    from vmfx.data import load_digits, load_proxy_model

    harness = _harness()
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    path = list(sys.path)
    try:
        from accuracy_run import calibration_images

        src_dir = harness.materialise(tmp_path, os.environ[ENV])
        mods = harness.import_official(src_dir)
        model, calib = load_proxy_model(), calibration_images(2, 0)
        images, labels = load_digits("test")
        images, labels = images[:20], labels[:20]
        harness.write_xproj_factors(mods, model, calib, src_dir, "calibrated")
        whole = harness.official_logits(harness.quantize_official(mods, model, calib, src_dir, 0, 4, 4), images,
                                        labels)[0]

        class Cut(Exception):
            pass

        save = harness.CalibrationCheckpoints.save
        for cut in (20, 50, None):
            def save_then_cut(self, name, module, cut=cut):
                save(self, name, module)
                if len(self.modules) == cut:
                    raise Cut
            monkeypatch.setattr(harness.CalibrationCheckpoints, "save", save_then_cut)
            checkpoints = harness.CalibrationCheckpoints(tmp_path / "checkpoints", {"bits": "w4a4"})
            try:
                resumed = harness.quantize_official(mods, model, calib, src_dir, 0, 4, 4, checkpoints)
            except Cut:
                assert len(checkpoints.done()) == cut
        assert len(checkpoints.done()) == 99 and checkpoints.totals()["sessions"] == 3
        got = harness.official_logits(resumed, images, labels)[0]
    finally:
        harness._purge_official_modules()
        sys.path[:] = path
    assert torch.equal(got, whole)
