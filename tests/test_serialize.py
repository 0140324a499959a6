"""vmfx.save / vmfx.load: safetensors + JSON, bit-for-bit round trips, clear errors on bad files."""

from __future__ import annotations

import json
import os

import pytest
import torch

import vmfx
from vmfx.config import InitConfig, JLSSConfig, QuantConfig, SmoothingConfig
from vmfx.models import VisionMamba
from vmfx.quant import QuantSpec


@pytest.fixture(scope="module")
def small_vim_q():
    torch.manual_seed(0)
    model = VisionMamba(img_size=16, patch_size=4, stride=4, embed_dim=32, depth=2, num_classes=5).eval()
    images = torch.randn(16, 3, 16, 16)
    cfg = QuantConfig(method="ptq4vm", weight=QuantSpec(4, True, "channel"), activation=QuantSpec(8, False, "token"),
                      init=InitConfig("lp", 2.4, 20), smoothing=SmoothingConfig(0.5),
                      jlss=JLSSConfig(steps=4, batch_size=8))
    return model, images, vmfx.compile(model, images, cfg)


def test_round_trip_is_bit_for_bit(small_vim_q, tmp_path):
    model, images, q = small_vim_q
    path = vmfx.save(q, str(tmp_path / "q.safetensors"))
    loaded = vmfx.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(images), q(images))
    assert loaded.meta["vmfx_config"] == q.meta["vmfx_config"]
    assert vmfx.inspect.rows(loaded) == vmfx.inspect.rows(q)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:  # plain safetensors: readable by any tool, no pickle
        assert "layers.0.mixer.in_proj.input_quantizer.scale" in f.keys()
        assert json.loads(f.metadata()["vmfx"])["format"] == "vmfx-quantized"


def test_custom_architectures_load_with_the_model_given(tiny_model, tiny_images, tmp_path):
    q = vmfx.compile(tiny_model, tiny_images, "pts-w6a6")
    path = vmfx.save(q, str(tmp_path / "tiny.safetensors"))
    with pytest.raises(vmfx.SerializationError, match="pass the float model"):
        vmfx.load(path)
    from tests.conftest import TinyVimLike

    loaded = vmfx.load(path, model=TinyVimLike())  # fresh random weights: all overwritten by the file
    with torch.no_grad():
        assert torch.equal(loaded(tiny_images), q(tiny_images))


def test_truncated_file(small_vim_q, tmp_path):
    path = vmfx.save(small_vim_q[2], str(tmp_path / "q.safetensors"))
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(vmfx.SerializationError, match="truncated or corrupted"):
        vmfx.load(path)


def test_tampered_tensor_bytes(small_vim_q, tmp_path):
    path = vmfx.save(small_vim_q[2], str(tmp_path / "q.safetensors"))
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x55  # flip bits inside the last tensor
    open(path, "wb").write(bytes(data))
    with pytest.raises(vmfx.SerializationError, match="does not match its recorded sha256"):
        vmfx.load(path)


def test_tampered_header(small_vim_q, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    path = vmfx.save(small_vim_q[2], str(tmp_path / "q.safetensors"))
    with safe_open(path, "pt") as f:
        meta = dict(f.metadata())
    header = json.loads(meta["vmfx"])
    header["modules"][0]["input_quantizer"]["spec"]["bits"] = 4  # a silent change of precision
    meta["vmfx"] = json.dumps(header, sort_keys=True)
    save_file(load_file(path), path, metadata=meta)
    with pytest.raises(vmfx.SerializationError, match="sha256"):
        vmfx.load(path)


def test_not_a_vmfx_file_and_missing_file(tmp_path):
    from safetensors.torch import save_file

    plain = str(tmp_path / "plain.safetensors")
    save_file({"w": torch.ones(2)}, plain)
    with pytest.raises(vmfx.SerializationError, match="not a vmfx quantized model"):
        vmfx.load(plain)
    with pytest.raises(vmfx.SerializationError, match="no saved model"):
        vmfx.load(str(tmp_path / "nothing.safetensors"))


def test_only_converted_models_can_be_saved(tiny_model, tiny_images, tmp_path):
    prepared = vmfx.prepare(tiny_model, "minmax-w8a8", tiny_images)
    with pytest.raises(vmfx.SerializationError, match="convert the model"):
        vmfx.save(prepared, str(tmp_path / "x.safetensors"))
    with pytest.raises(vmfx.SerializationError, match="returned by vmfx.compile"):
        vmfx.save(tiny_model, str(tmp_path / "x.safetensors"))
    assert not os.path.exists(tmp_path / "x.safetensors")
