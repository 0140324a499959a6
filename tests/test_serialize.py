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
from vmfx.serialize import decode_header, encode_header


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
        assert "vmfx_q.layers_0_mixer_in_proj__input.scale" in f.keys()
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
    header = decode_header(meta["vmfx"])
    entry = header["modules"]["vmfx_q.layers_0_mixer_in_proj__input"]
    entry["spec"]["bits"] = 4  # a silent change of precision
    meta["vmfx"] = encode_header(header)
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


def _resave(path, edit_header=None, edit_tensors=None):
    """Rewrite a saved file with an edited header or tensors and a recomputed digest (what a
    careless tool, or a deliberate edit, could produce)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from vmfx.serialize import _digest

    with safe_open(path, "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(path)
    header = decode_header(meta["vmfx"])
    if edit_header:
        edit_header(header)
    if edit_tensors:
        edit_tensors(tensors)
    meta["vmfx"] = encode_header(header)
    meta["vmfx_sha256"] = _digest(meta["vmfx"], tensors)
    save_file(tensors, path, metadata=meta)


def _as_format(path, version, edit_header=None):
    """Rewrite a file saved by this vmfx (with float_weights=True) as an older format would have
    written it: plain tensors, no ``weights`` or ``compressed`` records, the header as plain JSON."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from vmfx.serialize import _decompress, _digest

    with safe_open(path, "pt") as f:
        meta = dict(f.metadata())
    header = decode_header(meta["vmfx"])
    assert header["weights"]["storage"] in ("float", "lowered"), "save with float_weights=True first"
    tensors = _decompress(load_file(path), header.pop("compressed"), path)
    del header["weights"]
    header["version"] = version
    if edit_header:
        edit_header(header)
    meta["vmfx"] = json.dumps(header, sort_keys=True)
    meta["vmfx_sha256"] = _digest(meta["vmfx"], tensors)
    save_file(tensors, path, metadata=meta)


def test_format_3_files_still_load(small_vim_q, tmp_path):
    _, images, q = small_vim_q
    path = vmfx.save(q, str(tmp_path / "v3.safetensors"), float_weights=True)
    _as_format(path, 3)
    with torch.no_grad():
        assert torch.equal(vmfx.load(path)(images), q(images))


def test_format_1_artifact_is_migrated_and_computes_the_same():
    """A file saved by the QuantLinear-based vmfx (format 1, tests/data/artifacts/make_v1.py)."""
    from safetensors.torch import load_file

    here = os.path.join(os.path.dirname(__file__), "data", "artifacts")
    io = load_file(os.path.join(here, "v1_ptq4vm_w4a8_vim16.io.safetensors"))
    loaded = vmfx.load(os.path.join(here, "v1_ptq4vm_w4a8_vim16.safetensors"))
    with torch.no_grad():
        out = loaded(io["images"])
    torch.testing.assert_close(out, io["logits"], rtol=0, atol=1e-6)
    rows = {r["node"]: r for r in vmfx.inspect.rows(loaded)}
    assert rows["layers_0_mixer_in_proj"]["spec"] == "A uint8 asym per-token | W int4 sym per-channel +smooth"
    # and it saves again in the current format
    assert loaded.meta["vmfx_config"]["method"] == "ptq4vm"


def test_lowered_model_round_trips(small_vim_q, tmp_path):
    _, images, q = small_vim_q
    lowered = vmfx.lowering.lower(q, "reference")
    path = vmfx.save(lowered, str(tmp_path / "lowered.safetensors"))
    loaded = vmfx.load(path)
    assert loaded.meta["vmfx_lowered"]["backend"] == "reference"
    with torch.no_grad():
        assert torch.equal(loaded(images), lowered(images))


def test_lowered_files_keep_their_lowering_form(small_vim_q, tmp_path):
    """An optimized lowering (folded constants, both directions in one launch) is saved as such;
    a file from before the rewrites (its header records no "optimized") is rebuilt without them."""
    _, images, q = small_vim_q
    kinds = lambda m: sorted(p.kind for p in vmfx.lowering.lowered_partitions(m))  # noqa: E731
    optimized, plain = vmfx.lowering.lower(q, "reference"), vmfx.lowering.lower(q, "reference", optimize=False)
    for lowered in (optimized, plain):
        path = vmfx.save(lowered, str(tmp_path / "lowered.safetensors"))
        loaded = vmfx.load(path)
        assert kinds(loaded) == kinds(lowered)
        with torch.no_grad():
            assert torch.equal(loaded(images), lowered(images))
    assert "scan_merge" in kinds(optimized) and "scan" in kinds(plain)
    _resave(path, edit_header=lambda h: h["lowered"].pop("optimized"))  # the plain file, as an older vmfx wrote it
    loaded = vmfx.load(path)
    assert kinds(loaded) == kinds(plain) and not loaded.meta["vmfx_lowered"]["optimized"]
    with torch.no_grad():
        assert torch.equal(loaded(images), plain(images))


def test_nan_quantization_parameters_are_refused(small_vim_q, tmp_path):
    path = vmfx.save(small_vim_q[2], str(tmp_path / "q.safetensors"))

    def poison(tensors):
        tensors["vmfx_q.layers_0_mixer_in_proj__input.scale"][0, 3, 0] = float("nan")

    _resave(path, edit_tensors=poison)
    with pytest.raises(vmfx.SerializationError, match="non-finite values in 'vmfx_q.layers_0_mixer_in_proj__input.scale'"):
        vmfx.load(path)


@pytest.mark.parametrize("field, value, message", [
    ("input_shapes", None, "'input_shapes' is missing"),
    ("edits", "nope", "'edits' is a str, expected a list"),
    ("modules", [], "'modules' is a list, expected a dict"),
    ("version", 7, "format version 7"),
])
def test_damaged_header_fields_are_clear_errors(small_vim_q, tmp_path, field, value, message):
    path = vmfx.save(small_vim_q[2], str(tmp_path / "q.safetensors"))

    def damage(header):
        if value is None:
            del header[field]
        else:
            header[field] = value

    _resave(path, edit_header=damage)
    with pytest.raises(vmfx.SerializationError, match=message):
        vmfx.load(path)


def test_load_with_a_model_of_another_architecture(tiny_model, tiny_images, small_vim_q, tmp_path):
    path = vmfx.save(small_vim_q[2], str(tmp_path / "q.safetensors"))
    with pytest.raises(vmfx.SerializationError, match="holds a quantized VisionMamba, but the model given to vmfx.load is a TinyVimLike"):
        vmfx.load(path, model=tiny_model)
    bigger = VisionMamba(img_size=16, patch_size=4, stride=4, embed_dim=48, depth=2, num_classes=5)
    with pytest.raises(vmfx.SerializationError, match="does not fit the model given to vmfx.load"):
        vmfx.load(path, model=bigger)


def test_save_to_a_directory_or_an_unwritable_path(small_vim_q, tmp_path):
    with pytest.raises(vmfx.SerializationError, match="is a directory"):
        vmfx.save(small_vim_q[2], str(tmp_path))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(vmfx.SerializationError, match="cannot write"):
        vmfx.save(small_vim_q[2], str(blocker / "q.safetensors"))


def _pickled(q, tmp_path):
    """``torch.save`` / ``torch.load`` of the whole module (pickle; fx re-traces the generated code)."""
    path = tmp_path / "q.pt"
    torch.save(q, str(path))
    return torch.load(str(path), weights_only=False)


@pytest.mark.parametrize("variant", ["simulated", "lowered"])
def test_torch_save_of_a_quantized_model_loads_and_computes_the_same(small_vim_q, tmp_path, variant):
    """A user's first way of keeping a model: pickling re-traces the code, which used to call the
    input check with an fx Proxy and fail with "got Proxy"."""
    _, images, q = small_vim_q
    if variant == "lowered":
        q = vmfx.lowering.lower(q, "reference")
    loaded = _pickled(q, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(images), q(images))
    with pytest.raises(vmfx.InputError, match="traced \\(and quantized\\) for inputs of shape"):
        loaded(images[:, :, :8])  # the input check is still the graph's first op
    # fx pickles only the code: vmfx's metadata is gone, and the functions that need it say so
    with pytest.raises(vmfx.SerializationError, match="torch.save / pickle .* vmfx.save"):
        vmfx.save(loaded, str(tmp_path / "again.safetensors"))
    if variant == "simulated":
        with pytest.raises(vmfx.ConfigError, match="torch.save / pickle"):
            vmfx.lowering.lower(loaded, "reference")
    with pytest.warns(UserWarning, match="no roles, blocks or layouts.*vmfx.load"):
        vmfx.inspect.table(loaded)


def test_torch_save_of_the_scan_state_and_outlier_methods(tiny_model, tiny_images, tmp_path):
    from vmfx.config import ScanStateConfig

    configs = [vmfx.preset("kscaled-w8a8").replace(scan_state=ScanStateConfig(bits=8, search_samples=4)),
               vmfx.preset("ouromamba-w4a4").replace(jlss=JLSSConfig(steps=1))]
    for cfg in configs:
        q = vmfx.compile(tiny_model, tiny_images, cfg)
        loaded = _pickled(q, tmp_path)
        with torch.no_grad():
            assert torch.equal(loaded(tiny_images), q(tiny_images)), cfg.method


# -- weights stored as integer codes (format 4) ----------------------------------------------------


def _file_tensors(path):
    from safetensors.torch import load_file

    return load_file(path)


def test_quantized_weights_are_stored_as_codes(small_vim_q, tmp_path):
    """The file holds the W4 weights' packed codes, not their floats, and reloads bit for bit."""
    from vmfx.serialize import CODES_PREFIX

    model, images, q = small_vim_q
    path = vmfx.save(q, str(tmp_path / "q.safetensors"))
    tensors = _file_tensors(path)
    coded = [k[len(CODES_PREFIX):] for k in tensors if k.startswith(CODES_PREFIX)]
    assert "layers.0.mixer.in_proj.weight" in coded and "layers.1.mixer.out_proj.weight" in coded
    for param in coded:
        assert param not in tensors
        weight = q.get_parameter(param)
        assert tensors[CODES_PREFIX + param].dtype == torch.uint8
        assert tensors[CODES_PREFIX + param].numel() == (weight.numel() + 1) // 2  # 4 bits per code
    loaded = vmfx.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(images), q(images))
    # lowering the reloaded model gives the same integer model
    from vmfx.lowering import lower

    with torch.no_grad():
        assert torch.equal(lower(loaded, "reference")(images), lower(q, "reference")(images))
    # and saving it again gives the same codes
    again = _file_tensors(vmfx.save(loaded, str(tmp_path / "again.safetensors")))
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_float_weights_on_request(small_vim_q, tmp_path):
    model, images, q = small_vim_q
    codes = vmfx.save(q, str(tmp_path / "codes.safetensors"))
    floats = vmfx.save(q, str(tmp_path / "floats.safetensors"), float_weights=True)
    assert os.path.getsize(codes) < 0.6 * os.path.getsize(floats)
    loaded = vmfx.load(floats)
    assert torch.equal(loaded.get_parameter("layers.0.mixer.in_proj.weight"), q.get_parameter("layers.0.mixer.in_proj.weight"))
    with torch.no_grad():
        assert torch.equal(loaded(images), q(images))
    from safetensors import safe_open

    for path, storage in ((codes, "codes"), (floats, "float")):
        with safe_open(path, "pt") as f:
            assert json.loads(f.metadata()["vmfx"])["weights"]["storage"] == storage
    with pytest.raises(vmfx.SerializationError, match="float_weights"):
        vmfx.save(q, str(tmp_path / "x.safetensors"), float_weights="yes")


def test_proxy_artifacts_are_smaller_than_the_float_checkpoint(tmp_path):
    """Issue 23's figures: the proxy's W8A8 file is at most 0.45x the float checkpoint, its W4A8
    file at most 0.7x the W8A8 one, each reloading bit for bit."""
    from vmfx.data import load_digits, load_proxy_model
    from vmfx.data.proxy import PROXY_WEIGHTS

    model = load_proxy_model()
    images = load_digits("train")[0][:16]
    sizes = {}
    for preset in ("minmax-w8a8", "minmax-w4a8"):
        q = vmfx.compile(model, images, preset)
        path = vmfx.save(q, str(tmp_path / f"{preset}.safetensors"))
        sizes[preset] = os.path.getsize(path)
        with torch.no_grad():
            assert torch.equal(vmfx.load(path)(images[:4]), q(images[:4]))
    float_size = os.path.getsize(PROXY_WEIGHTS)
    assert sizes["minmax-w8a8"] <= 0.45 * float_size, (sizes, float_size)
    assert sizes["minmax-w4a8"] <= 0.7 * sizes["minmax-w8a8"], sizes


def test_edited_bit_widths_are_refused(small_vim_q, tmp_path):
    """A header edited to other bit widths, digest recomputed, no longer fits the stored codes."""
    path = vmfx.save(small_vim_q[2], str(tmp_path / "q.safetensors"))

    def to_8_bits(header):
        header["modules"]["vmfx_q.layers_0_mixer_in_proj__weight"]["spec"]["bits"] = 8

    _resave(path, edit_header=to_8_bits)
    with pytest.raises(vmfx.SerializationError, match=r"layers.0.mixer.in_proj.weight.*take .* bytes"):
        vmfx.load(path)


def test_edited_activation_spec_is_refused(small_vim_q, tmp_path):
    """An asymmetric activation quantizer edited to symmetric: its zero points no longer fit."""
    path = vmfx.save(small_vim_q[2], str(tmp_path / "q.safetensors"))

    def to_symmetric(header):
        header["modules"]["vmfx_q.layers_0_mixer_in_proj__input"]["spec"]["symmetric"] = True

    _resave(path, edit_header=to_symmetric)
    with pytest.raises(vmfx.SerializationError, match="symmetric but has a nonzero zero point"):
        vmfx.load(path)


def test_missing_codes_are_a_clear_error(small_vim_q, tmp_path):
    path = vmfx.save(small_vim_q[2], str(tmp_path / "q.safetensors"))
    _resave(path, edit_tensors=lambda t: t.pop("codes:layers.0.mixer.in_proj.weight"))
    with pytest.raises(vmfx.SerializationError, match="stores the weight 'layers.0.mixer.in_proj.weight' as codes, but the file lacks"):
        vmfx.load(path)


def test_a_weight_read_twice_stays_float():
    """Only weights whose every use goes through their quantizer are stored as codes."""
    import torch.fx as fx

    from vmfx.quant import FakeQuantize
    from vmfx.quant.observers import QParams
    from vmfx.quant.stored_weights import weight_code_plan

    class TwoUses(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 4))
            self.v = torch.nn.Parameter(torch.randn(4, 4))
            spec = QuantSpec(8, True, "tensor")
            self.qw = FakeQuantize(spec, QParams(torch.tensor(0.1), torch.tensor(0.0), spec.qmin, spec.qmax), is_weight=True)
            self.qv = FakeQuantize(spec, QParams(torch.tensor(0.1), torch.tensor(0.0), spec.qmin, spec.qmax), is_weight=True)

        def forward(self, x):
            return x @ self.qw(self.w) + x @ self.w + x @ self.qv(self.v)

    from vmfx.frontends.tracer import VmfxTracer

    module = TwoUses()
    gm = fx.GraphModule(module, VmfxTracer().trace(module))
    assert [e.param for e in weight_code_plan(gm)] == ["v"]
