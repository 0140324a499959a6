"""Packed 4-bit weights in lowered models and in ``vmfx.save`` (issue 13, part 2).

A lowered model stores 4-bit weight codes two per byte (``LoweredQLinear.w_packed``) from lowering
time on, and ``vmfx.save`` writes that lowered state (format 3). Checked on a tiny Vim:

* the packed bytes are :func:`pack_int4` of the codes the quantized graph computes, and nothing
  else of a lowered linear's weight (no unpacked codes, no float weight) is in the model or the file;
* save -> load gives every tensor back bit for bit and the same outputs, and saving the loaded
  model again writes the same header and tensors;
* the weight buffers of a lowered W4 model take exactly half the bytes of W8's (same model,
  even K everywhere);
* lowered files of format 2 (the quantized model, lowered again on load) still load; damaged
  ``lowered`` records are clear errors.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import vmfx
from vmfx.lowering import lower, lowered_partitions
from vmfx.lowering import reference as R
from vmfx.lowering.partition import find_partitions
from vmfx.lowering.runtime import LoweredQLinear
from vmfx.models import VisionMamba


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = VisionMamba(img_size=16, patch_size=4, stride=4, embed_dim=32, depth=2, num_classes=5).eval()
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return model, images


@pytest.fixture(scope="module")
def w4(tiny):
    model, images = tiny
    return vmfx.compile(model, images, "pts-w4a8")


def _lowered_linears(lowered):
    """The lowered GEMMs: qlinear partitions and the members of grouped ones."""
    for p in lowered_partitions(lowered):
        if p.kind == "qlinear":
            yield p
        elif p.kind == "qlinear_group":
            yield from p.groups


def _weight_buffers(lowered) -> dict[str, torch.Tensor]:
    """Every lowered GEMM's weight buffer, by its state_dict key."""
    out = {}
    for path, p in lowered.named_modules():
        if isinstance(p, LoweredQLinear):
            for name in ("w_codes", "w_packed"):
                t = getattr(p, name)
                if t is not None:
                    out[f"{path}.{name}"] = t
    return out


def test_lowered_w4_weights_are_stored_packed(w4):
    lowered = lower(w4, "reference")
    linears = {p.name: p.info.module for p in find_partitions(w4) if p.kind == "qlinear"}
    parts = list(_lowered_linears(lowered))
    # dt_proj runs inside the scan, from its 4-bit codes kept unpacked (E x dt_rank bytes)
    fused = [p for p in lowered_partitions(lowered) if p.kind == "scan_merge" and p.fused_dt_proj]
    dt_names = {n for n in linears if "dt_proj" in n}
    assert fused and len(dt_names) == 2 * len(fused)
    for p in fused:
        for d in "fb":
            assert getattr(p, f"dt_{d}_w_codes").dtype == torch.int8 and getattr(p, f"dt_{d}_w_bits") == 4
    assert parts and {p.partition_name for p in parts} == set(linears) - dt_names
    for p in parts:
        lin = linears[p.partition_name]
        codes = R.QWeight.from_float(lin.weight, lin.weight_quantizer.scale, 4, smooth=lin.smoothing()).codes
        assert p.w_codes is None and p.w_packed.dtype == torch.int8
        assert p.w_packed.shape == (codes.shape[0], (codes.shape[1] + 1) // 2)
        assert torch.equal(p.w_packed, R.pack_int4(codes))
        assert torch.equal(p._weight().unpacked(), codes)


def test_packed_weights_round_trip_bit_for_bit(w4, tiny, tmp_path):
    _, images = tiny
    lowered = lower(w4, "reference")
    path = vmfx.save(lowered, str(tmp_path / "w4.safetensors"))
    stored = load_file(path)
    packed = {k: v for k, v in stored.items() if k.endswith(".w_packed")}
    assert packed and not any(k.endswith(".w_codes") for k in stored)
    for name, t in _weight_buffers(lowered).items():  # the file holds the packed bytes themselves
        key = name
        assert stored[key].dtype == torch.int8 and torch.equal(stored[key], t)
    # the float weights of lowered linears are not in the file
    assert not any(k.endswith(("in_proj.weight", "x_proj.weight", "out_proj.weight")) for k in stored)

    loaded = vmfx.load(path)
    assert loaded.meta["vmfx_lowered"]["backend"] == "reference"
    a, b = lowered.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(loaded(images), lowered(images))
    # saved again: the same header and digest, the same tensors (the byte order of safetensors'
    # metadata map is not fixed, so files are compared by content)
    again = vmfx.save(loaded, str(tmp_path / "again.safetensors"))
    with safe_open(path, "pt") as f1, safe_open(again, "pt") as f2:
        assert f1.metadata() == f2.metadata()
    stored_again = load_file(again)
    assert stored.keys() == stored_again.keys() and all(torch.equal(stored[k], stored_again[k]) for k in stored)


def test_w4_weight_buffers_are_half_of_w8(tiny, w4):
    model, images = tiny
    w8 = vmfx.compile(model, images, "pts-w8a8")
    bytes4 = {k: t.numel() * t.element_size() for k, t in _weight_buffers(lower(w4, "reference")).items()}
    bytes8 = {k: t.numel() * t.element_size() for k, t in _weight_buffers(lower(w8, "reference")).items()}
    assert {k.rsplit(".", 1)[0] for k in bytes4} == {k.rsplit(".", 1)[0] for k in bytes8}
    assert all(k.endswith("w_packed") for k in bytes4) and all(k.endswith("w_codes") for k in bytes8)
    assert 2 * sum(bytes4.values()) == sum(bytes8.values())


def test_format_2_lowered_file_still_loads(w4, tiny, tmp_path):
    """A lowered model saved by format 2 held the quantized model; it is lowered again on load."""
    from tests.test_serialize import _as_format

    _, images = tiny
    path = vmfx.save(w4, str(tmp_path / "v2.safetensors"), float_weights=True)
    _as_format(path, 2, edit_header=lambda header: header.update(lowered={"backend": "reference"}))
    loaded = vmfx.load(path)
    assert loaded.meta["vmfx_lowered"]["backend"] == "reference"
    with torch.no_grad():
        assert torch.equal(loaded(images), lower(w4, "reference")(images))
    assert all(p.w_codes is None for p in lowered_partitions(loaded) if p.kind == "qlinear")


@pytest.mark.parametrize("lowered, message", [
    ({"backend": "reference", "state": "other"}, "unknown lowered state"),
    ({"backend": "reference", "state": "lowered", "weight_packing": "int4-interleaved"}, "does not read"),
    ({"state": "lowered"}, "bad 'lowered' record"),
])
def test_damaged_lowered_record_is_a_clear_error(w4, tmp_path, lowered, message):
    from tests.test_serialize import _resave

    path = vmfx.save(lower(w4, "reference"), str(tmp_path / "x.safetensors"))
    _resave(path, edit_header=lambda h: h.update(lowered=lowered))
    with pytest.raises(vmfx.SerializationError, match=message):
        vmfx.load(path)


def test_lowered_state_needs_format_3(w4, tmp_path):
    from tests.test_serialize import _resave

    path = vmfx.save(lower(w4, "reference"), str(tmp_path / "x.safetensors"))
    _resave(path, edit_header=lambda h: h.update(version=2))
    with pytest.raises(vmfx.SerializationError, match="format version 2"):
        vmfx.load(path)
    with safe_open(path, "pt") as f:
        header = json.loads(f.metadata()["vmfx"])
    assert header["lowered"]["state"] == "lowered"
