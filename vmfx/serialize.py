"""Saving and loading quantized models without pickle: safetensors plus a JSON header.

``save(qmodel, path)`` writes one ``.safetensors`` file: every tensor of the quantized graph
module (quantized weights as integer codes, float tensors left unquantized, step sizes, zero
points, smoothing factors) and, in the file's metadata, a JSON record of how to rebuild the graph
(since format 4 its ``edits``, ``modules`` and ``annotations`` are one zlib-compressed, base64
field, ``graph_zlib_base64``: see :func:`encode_header` / :func:`decode_header`):

* ``model``: the float architecture, as a known class name and its constructor arguments
  (``model.init_kwargs``); architectures vmfx cannot rebuild are passed to :func:`load` instead;
* ``input_shapes``: the example input shape used to trace;
* ``config``, ``calibration``, ``facts``: the :class:`~vmfx.config.QuantConfig`, the calibration
  record and the pass facts that hold;
* ``edits``: the graph edits the quantization passes made to the traced float graph, in order
  (:mod:`vmfx.passes.graph_utils`): linears made functional, nodes inserted on edges, nodes removed;
* ``modules``: how to build each inserted module (a quantizer's spec and parameter shapes, a
  smoothing node's channel count);
* ``annotations``: every node's vmfx annotation (roles, specs, the edge an inserted node sits on);
* ``lowered``: for a lowered model, its backend and ``"state": "lowered"``: the tensors are the
  lowered model's own state (:mod:`vmfx.lowering.runtime`): integer weight codes, 4-bit ones packed
  two per byte (``"weight_packing"``, see :func:`vmfx.lowering.reference.pack_int4`), scales, zero
  points, and the float tensors of the nodes left unlowered; the float weights of lowered linears
  are not in the file. :func:`load` rebuilds the graph from the edit log, lowers it (structure
  only) and loads that state strictly, so the packed bytes round-trip bit for bit;
* ``weights``: how the quantized weights are stored (format 4). ``"storage": "codes"`` (the
  default): every weight whose only use is its quantizer (through smoothing) is stored as its
  integer codes, 4-bit ones packed two per byte (:mod:`vmfx.quant.stored_weights`), under the key
  ``codes:<parameter>``, and its float values are not in the file; ``"codes"`` lists them with the
  quantizer and smoothing modules that turn them back into the weight the graph reads. ``"float"``
  (``save(..., float_weights=True)``): the float weights are kept, for re-calibration. A lowered
  model is always its lowered state (``"storage": "lowered"``);
* ``compressed``: the tensors stored losslessly compressed (format 4, where it saves at least 5 %:
  float tensors' exponent bytes, skewed weight codes), as ``zlib:<name>`` byte tensors: their
  dtypes and shapes (see :func:`_compress`);
* ``sha256``: a digest of the header and every tensor's bytes (as stored in the file).

``load(path)`` re-traces the float architecture from trusted code, replays the recorded edits,
restores the annotations and loads the tensors (strictly): nothing in the file is executed. Files
of format version 1 (quantization inside ``QuantLinear`` modules) are migrated on load; lowered
models of format version 2 (which held the quantized model's float tensors, lowered again on load)
still load that way. A
truncated file, a file that is not a vmfx save, a digest mismatch (tampering or corruption), a
header with missing or mistyped fields, non-finite quantization parameters, or tensors that do not
fit the recorded structure raise :class:`~vmfx.errors.SerializationError`; so do quantization
parameters that do not fit their spec (a non-positive scale, a zero point outside the integer range
or not 0 for a symmetric spec, stored codes whose count or values do not fit the bit width): an
edited header with its digest recomputed is caught that way. The digest detects accidents and naive
edits; it is not a signature (anyone can recompute it).

Invariant: ``load(save(q))`` computes exactly what ``q`` computes (bit for bit on the same machine).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import tempfile
import zlib
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .annotations import VMFX_META, NodeAnnotation, annotate, annotation
from .errors import SerializationError, VmfxError
from .passes.base import FACTS_META
from .passes.detect import DetectMambaMixersPass
from .passes.graph_utils import EDITS_META, functionalize_linear, insert_module_on_edge, replay_edits
from .passes.insert_observers import QUANT_PREFIX
from .passes.manager import PassManager
from .passes.patterns import module_of
from .passes.pipeline import trace_for_quantization
from .quant.modules import FakeQuantize, Smooth
from .quant import mixed, state_quantizer  # noqa: F401  (register their module kinds)
from .quant.observers import Observer
from .quant.registry import build_module, describe_module, module_kinds
from .quant.spec import QuantSpec
from .quant import stored_weights
from .lowering.runtime import lost_metadata_hint

__all__ = ["save", "load", "FORMAT", "FORMAT_VERSION"]

FORMAT = "vmfx-quantized"
#: 4: as 3, quantized weights stored as integer codes (``weights``), tensors compressed where that
#: pays (``compressed``), the graph fields compressed; 3: as 2, and a lowered model is saved as its
#: lowered state (integer codes, 4-bit weights packed two per byte); 2: quantizers and smoothing are graph nodes (an edit log), a lowered model saved as
#: the quantized model it came from; 1: ``QuantLinear`` modules (read, migrated on load).
FORMAT_VERSION = 4
#: How a version-3 lowered file stores 4-bit weight codes (``LoweredQLinear.w_packed``).
WEIGHT_PACKING = "int4-two-per-byte: byte (n, j) = column j (low nibble) | column j + ceil(K/2) (high nibble)"
#: Header meta kept on a lowered model loaded from its lowered state (it has no float model to
#: take the structure from when it is saved again).
STRUCTURE_META = "vmfx_saved_structure"


def _known_builders() -> dict[str, Any]:
    """The float architectures :func:`load` can rebuild from their recorded constructor arguments."""
    from .models.local_vmamba import LocalVSSM
    from .models.localmamba import LocalVim
    from .models.vim import VisionMamba
    from .models.vmamba import VSSM

    return {f"{cls.__module__}.{cls.__qualname__}": cls for cls in (VisionMamba, LocalVim, VSSM, LocalVSSM)}


# -- modules and annotations as JSON --------------------------------------------------------------


def _describe_module(m: nn.Module, path: str) -> dict:
    """The header entry of an inserted module: its kind and structure (:mod:`vmfx.quant.registry`)."""
    if isinstance(m, Observer):
        raise SerializationError(
            f"'{path}' is still an observer: convert the model (vmfx.convert) before saving"
        )
    entry = describe_module(m)
    if entry is None:
        raise SerializationError(f"cannot save the inserted module '{path}' of type {type(m).__name__}: register its "
                                 "kind with vmfx.quant.registry.register_module_kind (to_dict / from_dict)")
    return _encode(entry)


def _build_module(entry: dict) -> nn.Module:
    """The module a header entry describes, with placeholder tensors (the file's are loaded next)."""
    kind = entry.get("kind") if isinstance(entry, dict) else None
    if kind not in module_kinds():
        raise SerializationError(f"unknown module kind {kind!r} in the saved model (a plug-in's kind? load the plug-in "
                                 "that registers it first)")
    try:
        return build_module(_decode(entry))
    except (KeyError, TypeError, ValueError, VmfxError) as exc:
        raise SerializationError(f"the saved {kind} module is malformed: {type(exc).__name__}: {exc}") from exc


def _layout_class():
    try:
        from .token_layout import TokenLayout
    except ImportError:  # a vmfx without token layouts
        return None
    return TokenLayout


def _encode(value: Any) -> Any:
    if isinstance(value, QuantSpec):
        return {"__spec__": value.to_dict()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__dataclass__": type(value).__name__,
                "fields": {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "__spec__" in value:
            return QuantSpec.from_dict(value["__spec__"])
        if "__dataclass__" in value:
            cls = _layout_class()
            if cls is None or value["__dataclass__"] != cls.__name__:
                raise SerializationError(f"unknown annotation value type {value['__dataclass__']!r}")
            fields = {k: _decode(v) for k, v in value["fields"].items()}
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _annotations(gm: fx.GraphModule) -> dict[str, dict]:
    out = {}
    for node in gm.graph.nodes:
        ann = annotation(node)
        if ann is not None:
            out[node.name] = {f.name: _encode(getattr(ann, f.name)) for f in dataclasses.fields(ann)}
    return out


def _restore_annotations(gm: fx.GraphModule, saved: dict[str, dict]) -> None:
    known = {f.name for f in dataclasses.fields(NodeAnnotation)}
    for node in gm.graph.nodes:
        node.meta.pop(VMFX_META, None)
        entry = saved.get(node.name)
        if entry is None:
            continue
        facts = {k: _decode(v) for k, v in entry.items() if k != "role"}
        extra_fields = {k: facts.pop(k) for k in list(facts) if k not in known}
        ann = annotate(node, entry["role"], **facts)
        for k, v in extra_fields.items():  # fields of a newer annotation (e.g. layout)
            setattr(ann, k, v)


# -- digest ---------------------------------------------------------------------------------------


def _digest(header_json: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(header_json.encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(list(t.shape)).encode())
        # reshape(-1): a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# -- save -----------------------------------------------------------------------------------------


def _structure(qmodel: fx.GraphModule) -> dict:
    """The header fields that describe how to rebuild a quantized (unlowered) graph."""
    if not qmodel.meta.get("vmfx_input_shapes"):
        raise SerializationError("the model has no recorded input shape (it was traced without an example input)")
    edits = list(qmodel.meta.get(EDITS_META) or [])
    modules = {}
    for record in edits:
        if record.get("op") in ("insert", "insert_after", "scan_state", "replace") and record["path"] not in modules:
            try:
                m = qmodel.get_submodule(record["path"])
            except AttributeError:
                continue  # inserted, then removed again
            modules[record["path"]] = _describe_module(m, record["path"])
    for node in qmodel.graph.nodes:
        if isinstance(module_of(node), Observer):
            raise SerializationError(
                f"node '{node.name}' is still an observer: convert the model (vmfx.convert) before saving"
            )
    return {
        "model": qmodel.meta.get("vmfx_model_spec"),
        "source_type": qmodel.meta["vmfx_source_type"],
        "input_shapes": qmodel.meta["vmfx_input_shapes"],
        "config": qmodel.meta.get("vmfx_config"),
        "calibration": qmodel.meta.get("vmfx_calibration"),
        "facts": sorted(qmodel.meta.get(FACTS_META) or []),
        "edits": edits,
        "modules": modules,
        "annotations": _annotations(qmodel),
    }


def save(qmodel: fx.GraphModule, path: str, *, float_weights: bool = False) -> str:
    """Write ``qmodel`` (from :func:`vmfx.compile`, lowered or not) to ``path`` (``.safetensors``).

    The file is written to a temporary name and moved into place, so an interrupted save never
    leaves a half-written file at ``path``.

    Args:
        qmodel: the quantized model.
        path: the file to write.
        float_weights: keep the float weights of quantized layers (for re-calibrating the loaded
            model); by default they are stored as their integer codes, which is all the quantized
            model computes with (a W8 file holds about a quarter of the float weights' bytes, a
            W4 file an eighth). Ignored for a lowered model, whose state is always its codes.

    Returns:
        ``path``.
    """
    from safetensors.torch import save_file

    from .version import __version__

    if not isinstance(qmodel, fx.GraphModule) or "vmfx_source_type" not in qmodel.meta:
        raise SerializationError("vmfx.save expects a quantized model returned by vmfx.compile / vmfx.convert"
                                 + lost_metadata_hint(qmodel))
    lowered = qmodel.meta.get("vmfx_lowered")
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise SerializationError(f"vmfx.save needs a file path, got {path!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise SerializationError(f"{path!r} is a directory: give a file name, e.g. {os.path.join(path, 'model.safetensors')!r}")
    if lowered:
        source = qmodel.meta.get("vmfx_unlowered")
        if isinstance(source, fx.GraphModule):
            structure = _structure(source)
        elif isinstance(qmodel.meta.get(STRUCTURE_META), dict):
            structure = qmodel.meta[STRUCTURE_META]
        else:
            raise SerializationError(
                "this lowered model keeps neither the quantized model it was lowered from nor a loaded file's "
                "structure: save the model vmfx.compile returns without a backend, and lower it after vmfx.load"
            )
        state = qmodel
    else:
        structure, state = _structure(qmodel), qmodel
    if not isinstance(float_weights, bool):
        raise SerializationError(f"vmfx.save(..., float_weights=) takes True or False, got {float_weights!r}")
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state.state_dict().items()}
    if lowered:
        weights = {"storage": "lowered"}
    elif float_weights:
        weights = {"storage": "float"}
    else:
        weights = _store_codes(qmodel, tensors)
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "vmfx_version": __version__,
        **structure,
        "lowered": {"backend": lowered["backend"], "state": "lowered", "weight_packing": WEIGHT_PACKING,
                    "optimized": bool(lowered.get("optimized", False))}
        if lowered else None,
        "weights": weights,
    }
    tensors, header["compressed"] = _compress(tensors)
    header_json = encode_header(header)
    metadata = {"vmfx": header_json, "vmfx_sha256": _digest(header_json, tensors)}
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    except OSError as exc:
        raise SerializationError(f"cannot write to {path!r}: {exc.strerror or exc}") from exc
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except OSError as exc:
        raise SerializationError(f"cannot write {path!r}: {exc.strerror or exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


#: The header fields that rebuild the graph, stored compressed (format 4): node-by-node records
#: (token orders of every annotated node) that are most of an uncompressed header.
GRAPH_FIELDS = ("edits", "modules", "annotations", "compressed")


def encode_header(header: dict) -> str:
    """The header as the file's ``vmfx`` metadata: JSON, with the graph fields (:data:`GRAPH_FIELDS`)
    as one ``graph_zlib_base64`` string (their JSON, zlib-compressed, base64-encoded); the other
    fields (format, model, config, calibration, weights) stay readable by any JSON tool."""
    header = dict(header)
    graph = {k: header.pop(k) for k in GRAPH_FIELDS if k in header}
    header["graph_zlib_base64"] = base64.b64encode(zlib.compress(json.dumps(graph, sort_keys=True).encode(), 9)).decode()
    return json.dumps(header, sort_keys=True)


def decode_header(text: str, path: str = "the file") -> dict:
    """The header of :func:`encode_header` (or of a format 1-3 file, whose JSON is plain)."""
    try:
        header = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SerializationError(f"{path!r} has a damaged vmfx header: {exc}") from exc
    if not isinstance(header, dict):
        raise SerializationError(f"{path!r} has a damaged vmfx header: not a JSON object")
    packed = header.pop("graph_zlib_base64", None)
    if packed is not None:
        try:
            graph = json.loads(zlib.decompress(base64.b64decode(packed, validate=True)))
        except (ValueError, TypeError, zlib.error) as exc:
            raise SerializationError(f"{path!r} has a damaged vmfx header: its graph record does not decode ({exc})") from exc
        if not isinstance(graph, dict):
            raise SerializationError(f"{path!r} has a damaged vmfx header: its graph record is not a JSON object")
        header.update(graph)
    return header


#: Key prefix of a tensor stored compressed (format 4, :func:`_compress`).
COMPRESSED_PREFIX = "zlib:"
#: Tensors smaller than this many bytes, or that compress by less than this fraction, stay plain.
_COMPRESS_MIN_BYTES, _COMPRESS_MIN_GAIN = 256, 0.05


def _compress(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Store tensors losslessly compressed where that pays: the tensor's bytes split into byte
    planes (byte ``i`` of every element, then byte ``i + 1``: the sign-and-exponent bytes of
    floats, or the skewed distribution of weight codes, then compress well), zlib-compressed,
    as a ``uint8`` tensor named ``zlib:<name>``. Returns the tensors and the record
    ``{name: [dtype, shape]}`` that :func:`_decompress` needs."""
    out, record = {}, {}
    for name, t in tensors.items():
        raw = t.numel() * t.element_size()
        if raw >= _COMPRESS_MIN_BYTES and t.dtype != torch.bool:
            planes = t.reshape(-1).view(torch.uint8).reshape(-1, t.element_size()).t().contiguous().numpy().tobytes()
            packed = zlib.compress(planes, 6)
            if len(packed) <= (1 - _COMPRESS_MIN_GAIN) * raw:
                out[COMPRESSED_PREFIX + name] = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
                record[name] = [str(t.dtype).replace("torch.", ""), list(t.shape)]
                continue
        out[name] = t
    return out, record


def _decompress(tensors: dict[str, torch.Tensor], record: Any, path: str) -> dict[str, torch.Tensor]:
    """Undo :func:`_compress` (a damaged record or payload is a :class:`SerializationError`)."""
    if not isinstance(record, dict):
        raise SerializationError(f"{path!r} has a damaged vmfx header: bad 'compressed' record")
    out = {k: v for k, v in tensors.items() if not k.startswith(COMPRESSED_PREFIX)}
    stored = {k[len(COMPRESSED_PREFIX):]: v for k, v in tensors.items() if k.startswith(COMPRESSED_PREFIX)}
    if set(stored) != set(record):
        raise SerializationError(f"{path!r}: its compressed tensors ({len(stored)}) do not match its header's record "
                                 f"({len(record)}): the file is damaged; quantize the model again")
    for name, data in stored.items():
        try:
            dtype, shape = getattr(torch, record[name][0]), tuple(int(d) for d in record[name][1])
            planes = zlib.decompress(data.numpy().tobytes())
            size = torch.empty((), dtype=dtype).element_size()
            flat = torch.frombuffer(bytearray(planes), dtype=torch.uint8).reshape(size, -1).t().contiguous()
            out[name] = flat.view(dtype).reshape(shape).clone()
        except (AttributeError, TypeError, ValueError, IndexError, RuntimeError, zlib.error) as exc:
            raise SerializationError(f"{path!r}: the compressed tensor '{name}' does not decode ({exc}): the file is "
                                     "damaged; quantize the model again") from exc
    return out


#: Key prefix of a weight's packed codes in a file that stores codes.
CODES_PREFIX = "codes:"


def _store_codes(qmodel: fx.GraphModule, tensors: dict[str, torch.Tensor]) -> dict:
    """Replace, in ``tensors``, every weight that can be stored as codes by its packed codes;
    returns the header's ``weights`` record."""
    plan = stored_weights.weight_code_plan(qmodel)
    packed, kept = stored_weights.encode(qmodel, plan)
    codes = {}
    for entry in kept:
        weight = tensors.pop(entry.param)
        tensors[CODES_PREFIX + entry.param] = packed[entry.param]
        codes[entry.param] = {**entry.to_dict(), "shape": list(weight.shape), "dtype": str(weight.dtype).replace("torch.", "")}
    return {"storage": "codes", "packing": stored_weights.CODE_PACKING, "codes": codes}


# -- load -----------------------------------------------------------------------------------------


def _read(path: str) -> tuple[dict, str, dict[str, torch.Tensor], str]:
    from safetensors import safe_open

    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise SerializationError(f"no saved model at {path!r}")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise SerializationError(
            f"{path!r} is not a readable safetensors file (truncated or corrupted?): {exc}"
        ) from exc
    if "vmfx" not in metadata or "vmfx_sha256" not in metadata:
        raise SerializationError(f"{path!r} is a safetensors file but not a vmfx quantized model (no vmfx header)")
    header = decode_header(metadata["vmfx"], path)
    return header, metadata["vmfx"], tensors, metadata["vmfx_sha256"]


_REQUIRED = {1: {"format": str, "version": int, "input_shapes": list, "modules": list, "source_type": str},
             2: {"format": str, "version": int, "input_shapes": list, "modules": dict, "source_type": str,
                 "edits": list, "annotations": dict}}
_REQUIRED[3] = _REQUIRED[2]
_REQUIRED[4] = {**_REQUIRED[3], "weights": dict}


def _check_header(header: dict, path: str) -> None:
    if header.get("format") != FORMAT:
        raise SerializationError(f"{path!r} is not a vmfx quantized model (format {header.get('format')!r})")
    version = header.get("version")
    if version not in _REQUIRED:
        raise SerializationError(
            f"{path!r} has format version {version!r}; this vmfx reads versions "
            f"{', '.join(map(str, sorted(_REQUIRED)))} (a newer vmfx wrote it?)"
        )
    for field, kind in _REQUIRED[version].items():
        if field not in header:
            raise SerializationError(f"{path!r} has a damaged vmfx header: the field {field!r} is missing")
        if not isinstance(header[field], kind):
            raise SerializationError(
                f"{path!r} has a damaged vmfx header: {field!r} is a {type(header[field]).__name__}, "
                f"expected a {kind.__name__}"
            )
    shapes = header["input_shapes"]
    if not shapes or not all(isinstance(s, list) and all(isinstance(d, int) and d > 0 for d in s) for s in shapes):
        raise SerializationError(f"{path!r} has a damaged vmfx header: bad input_shapes {shapes!r}")


def load(path: str, model: nn.Module | None = None) -> fx.GraphModule:
    """Rebuild a quantized model saved with :func:`save`.

    Args:
        path: the ``.safetensors`` file.
        model: the float architecture to trace, for models vmfx cannot rebuild from the recorded
            constructor arguments (its weights are overwritten by the file's).

    Returns:
        The quantized model; lowered with the recorded backend if a lowered model was saved.

    Raises:
        SerializationError: missing, truncated, tampered or incompatible file, or a ``model`` of
            another architecture (the message says which).
    """
    header, header_json, tensors, digest = _read(path)
    _check_header(header, path)
    if _digest(header_json, tensors) != digest:
        raise SerializationError(
            f"{path!r} does not match its recorded sha256 digest: the file was modified or corrupted after "
            "it was saved; quantize the model again"
        )
    if header["version"] >= 4:
        tensors = _decompress(tensors, header.get("compressed", {}), path)
    given = model is not None
    if model is None:
        spec = header.get("model")
        builder = _known_builders().get((spec or {}).get("class")) if isinstance(spec, dict) else None
        if builder is None:
            raise SerializationError(
                f"vmfx cannot rebuild a {header.get('source_type')} by itself: pass the float model "
                "architecture as vmfx.load(path, model=...)"
            )
        try:
            model = builder(**spec["kwargs"])
        except (TypeError, ValueError, KeyError) as exc:
            raise SerializationError(f"{path!r} records constructor arguments vmfx cannot use: {exc}") from exc
    elif not isinstance(model, nn.Module):
        raise SerializationError(f"vmfx.load(path, model=...) takes the float nn.Module, got {type(model).__name__}")
    saved_type = header.get("source_type") or ""
    if given and saved_type and type(model).__name__ != saved_type.rsplit(".", 1)[-1]:
        raise SerializationError(
            f"{path!r} holds a quantized {saved_type.rsplit('.', 1)[-1]}, but the model given to vmfx.load is a "
            f"{type(model).__name__}: pass the float architecture that was quantized"
        )
    lowered = _lowered_entry(header, path)
    try:
        gm, tensors = _rebuild(model, header, tensors)
        tensors = _restore_weights(gm, header, tensors, path)
        if lowered is not None and lowered.get("state") == "lowered":
            gm = _lower_structure(gm, lowered["backend"], header, bool(lowered.get("optimized", False)))
            tensors = _drop_unfused_rotation_state(gm, tensors)
        gm.load_state_dict(tensors, strict=True)
    except SerializationError:
        raise
    except (VmfxError, RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        what = "the model given to vmfx.load" if given else "the model rebuilt from the file's constructor arguments"
        raise SerializationError(
            f"{path!r} does not fit {what} (another architecture or size?): {type(exc).__name__}: {exc}"
        ) from exc
    _check_finite(gm, path)
    _check_quantizers(gm, path)
    gm.recompile()
    gm.eval()
    if lowered is not None and lowered.get("state") != "lowered":  # format 2: lower the quantized model again
        from .lowering import lower

        return lower(gm, lowered["backend"])
    return gm


def _drop_unfused_rotation_state(gm: fx.GraphModule, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A lowered file written while the online Hadamard before a linear ran as a launch of its own
    (partition kind ``hadamard``) holds that partition's activation parameters, which are the
    linear's input parameters. Where the rebuilt graph runs the rotation in the linear's GEMM
    (:class:`~vmfx.lowering.runtime.LoweredHadamardQLinear`, which holds the same parameters),
    those entries are dropped when they equal the linear's; anything else is left to the strict load."""
    from .lowering.runtime import LOWERED_PREFIX

    out = dict(tensors)
    for name, module in gm.named_modules():
        if getattr(module, "kind", None) != "hadamard_qlinear":
            continue
        prefix = f"{LOWERED_PREFIX}.{module.rotation_partition}."
        old = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        own = {k: tensors.get(f"{name}.{k}") for k in old}
        if old and all(v is not None and torch.equal(v, old[k]) for k, v in own.items()):
            for k in old:
                del out[prefix + k]
    return out


def _restore_weights(gm: fx.GraphModule, header: dict, tensors: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """For a file that stores codes, put back in ``tensors`` each coded weight's stand-in float
    weight (:func:`vmfx.quant.stored_weights.decode`), after checking that the codes fit the
    rebuilt quantizer's spec (their count and range follow from its bit width)."""
    record = header.get("weights")
    if header["version"] < 4 or record.get("storage") != "codes":
        if header["version"] >= 4 and record.get("storage") not in ("float", "lowered"):
            raise SerializationError(f"{path!r} has a damaged vmfx header: unknown weight storage {record.get('storage')!r}")
        return tensors
    if record.get("packing") != stored_weights.CODE_PACKING or not isinstance(record.get("codes"), dict):
        raise SerializationError(f"{path!r} stores its weights' codes as {record.get('packing')!r}, which this vmfx "
                                 "does not read (a newer vmfx wrote it?)")
    tensors = dict(tensors)
    for param, entry in record["codes"].items():
        try:
            fq = gm.get_submodule(entry["quantizer"])
            smooths = [gm.get_submodule(p) for p in entry["smooths"]]
            current = gm.get_parameter(param)
            shape, dtype = tuple(int(d) for d in entry["shape"]), getattr(torch, entry["dtype"])
            data = tensors.pop(CODES_PREFIX + param)
            scale, zero_point = tensors[f"{entry['quantizer']}.scale"], tensors[f"{entry['quantizer']}.zero_point"]
            factors = [tensors[f"{p}.factors"] for p in entry["smooths"]]
        except (KeyError, TypeError, AttributeError) as exc:
            raise SerializationError(f"{path!r} stores the weight '{param}' as codes, but the file lacks what "
                                     f"rebuilds it ({type(exc).__name__}: {exc})") from exc
        if (not isinstance(fq, FakeQuantize) or not fq.is_weight or fq.spec.dynamic
                or not all(isinstance(m, Smooth) for m in smooths)):
            raise SerializationError(f"{path!r} stores the weight '{param}' as codes of '{entry['quantizer']}', "
                                     "which is not a static weight quantizer in the rebuilt model")
        if tuple(current.shape) != shape:
            raise ValueError(f"the file stores the weight '{param}' with shape {shape}, the model's is {tuple(current.shape)}")
        problem = stored_weights.check_codes(data, current.numel(), fq.qmin, fq.qmax)
        if problem is not None:
            raise SerializationError(f"{path!r}: the weight '{param}' ({fq.spec.describe()}) cannot be rebuilt: {problem}; "
                                     "the header's quantization spec and the stored codes disagree (an edited "
                                     "header?): quantize the model again")
        tensors[param] = stored_weights.decode(data, shape, fq.qmin, fq.qmax, scale, zero_point, factors, dtype)
    return tensors


def _check_quantizers(gm: fx.GraphModule, path: str) -> None:
    """Every static quantizer's parameters fit its spec: positive scales, integer zero points in
    ``[qmin, qmax]`` (0 for a symmetric spec)."""
    for name, m in gm.named_modules():
        if not isinstance(m, FakeQuantize) or m.spec.dynamic or m.scale is None:
            continue
        what = f"{path!r}: the quantizer '{name}' ({m.spec.describe()})"
        if m.scale.numel() and not bool((m.scale > 0).all()):
            raise SerializationError(f"{what} has a step size <= 0: the file is damaged; quantize the model again")
        zp = m.zero_point
        if zp is None or not zp.numel():
            continue
        if not bool((zp == zp.round()).all()):
            raise SerializationError(f"{what} has a zero point that is not an integer: the file is damaged")
        if m.spec.symmetric and bool((zp != 0).any()):
            raise SerializationError(f"{what} is symmetric but has a nonzero zero point: the header's spec and the "
                                     "stored parameters disagree (an edited header?): quantize the model again")
        if bool(((zp < m.qmin) | (zp > m.qmax)).any()):
            raise SerializationError(f"{what} has zero points outside its integer range [{m.qmin}, {m.qmax}]: the "
                                     "header's spec and the stored parameters disagree (an edited header?): quantize "
                                     "the model again")


def _lowered_entry(header: dict, path: str) -> dict | None:
    """The header's ``lowered`` record, checked (None for a model saved unlowered)."""
    lowered = header.get("lowered")
    if not lowered:
        return None
    if not isinstance(lowered, dict) or not isinstance(lowered.get("backend"), str):
        raise SerializationError(f"{path!r} has a damaged vmfx header: bad 'lowered' record {lowered!r}")
    state = lowered.get("state")
    if state not in (None, "lowered") or (state == "lowered" and header["version"] < 3):
        raise SerializationError(f"{path!r} has a damaged vmfx header: unknown lowered state {state!r} "
                                 f"for format version {header['version']}")
    if state == "lowered" and lowered.get("weight_packing", WEIGHT_PACKING) != WEIGHT_PACKING:
        raise SerializationError(f"{path!r} packs its 4-bit weights as {lowered.get('weight_packing')!r}, which this "
                                 "vmfx does not read (a newer vmfx wrote it?)")
    return lowered


def _lower_structure(gm: fx.GraphModule, backend: str, header: dict, optimized: bool) -> fx.GraphModule:
    """Lower a rebuilt graph whose tensors are not loaded yet (placeholder weights and unit
    quantization parameters): only the structure of the result counts, its state is then loaded
    from the file. ``optimized``: the file was written by a lowering that ran the graph rewrites
    (folded constants, absorbed flips; files written before them record none and are lowered
    without). The placeholder quantized model is not kept (``vmfx_unlowered`` is None); the
    header's structure fields are, so that the loaded model can be saved again."""
    from .lowering import lower

    lowered = lower(gm, backend, optimize=optimized)
    lowered.meta["vmfx_unlowered"] = None
    lowered.meta[STRUCTURE_META] = {k: header.get(k) for k in (
        "model", "source_type", "input_shapes", "config", "calibration", "facts", "edits", "modules", "annotations")}
    return lowered


def _rebuild(model: nn.Module, header: dict, tensors: dict[str, torch.Tensor]):
    example = tuple(torch.zeros(shape) for shape in header["input_shapes"])
    gm, _ = trace_for_quantization(model, example_inputs=example)
    gm = PassManager([DetectMambaMixersPass()])(gm).graph_module
    if header["version"] == 1:
        tensors = _migrate_v1(gm, header["modules"], tensors)
        gm.meta[FACTS_META] = ["mixers_detected", "quantizers_calibrated"]
    else:
        modules = header["modules"]

        def make(record: dict) -> nn.Module:
            entry = modules.get(record["path"])
            if entry is None:  # removed before saving: any module of the right kind will do
                raise SerializationError(f"the saved model lacks the description of module '{record['path']}'")
            return _build_module(entry)

        gm.meta[EDITS_META] = []
        replay_edits(gm, _live_edits(header["edits"], modules), make)
        _restore_annotations(gm, header["annotations"])
        gm.meta[FACTS_META] = list(header.get("facts") or [])
    gm.meta["vmfx_config"] = header.get("config")
    gm.meta["vmfx_calibration"] = header.get("calibration")
    gm.meta["vmfx_example_inputs"] = example
    return gm, tensors


def _live_edits(edits: list[dict], modules: dict) -> list[dict]:
    """The edit log without the insertions of modules that were removed before saving (and
    their removals): those left nothing behind."""
    dead = {r["node"] for r in edits if r.get("op") in ("insert", "insert_after", "scan_state", "replace") and r["path"] not in modules}
    return [r for r in edits if r.get("node") not in dead]


def _check_finite(gm: fx.GraphModule, path: str) -> None:
    for name, t in gm.state_dict().items():
        if torch.is_floating_point(t) and not bool(torch.isfinite(t).all()):
            raise SerializationError(
                f"{path!r} holds non-finite values in '{name}' (NaN or Inf): the file or the model it was "
                "made from is damaged; quantize the model again"
            )


def _migrate_v1(gm: fx.GraphModule, entries: list[dict], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rebuild a format-1 model (quantization inside ``QuantLinear`` modules) as nodes on edges,
    and rename its tensors accordingly."""
    tensors = dict(tensors)
    by_target = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    nodes = {n.name: n for n in gm.graph.nodes}

    def rename(old: str, new: str) -> None:
        for suffix in ("scale", "zero_point", "factors"):
            if f"{old}.{suffix}" in tensors:
                tensors[f"{new}.{suffix}"] = tensors.pop(f"{old}.{suffix}")

    for e in entries:
        if e.get("kind") == "QuantLinear":
            node = by_target.get(e["path"])
            if node is None:
                raise SerializationError(f"the saved model quantizes '{e['path']}', which the rebuilt model lacks")
            ann = annotation(node)
            common = {} if ann is None else {"block": ann.block, "direction": ann.direction, "tokens": ann.tokens,
                                              "mixer": ann.mixer}
            role = ann.role if ann is not None else "head"
            iq = _build_module({"kind": "FakeQuantize", **e["input_quantizer"]}) if e.get("input_quantizer") else None
            wq = _build_module({"kind": "FakeQuantize", **e["weight_quantizer"]}) if e.get("weight_quantizer") else None
            linear = functionalize_linear(gm, node)
            annotate(linear, role, **common, act_spec=None if iq is None else iq.spec,
                     weight_spec=None if wq is None else wq.spec)
            weight_attr = linear.args[1]
            if e.get("smooth"):
                smooth = Smooth(torch.ones(int(e["in_features"])))
                path = f"{QUANT_PREFIX}.{linear.name}__smooth"
                if e.get("smooth_input", True):
                    a = insert_module_on_edge(gm, linear, linear.args[0], smooth, path)
                    annotate(a, "smooth", **common, extra={"quantizes": linear.name, "edge": "input"})
                else:
                    smooth.folded_into = "norm (format 1)"
                w = insert_module_on_edge(gm, linear, weight_attr, smooth, path, {"weight": True})
                annotate(w, "smooth", **common, extra={"quantizes": linear.name, "edge": "weight"})
                tensors[f"{path}.factors"] = tensors.pop(f"{e['path']}.smooth")
            for edge, fq in (("input", iq), ("weight", wq)):
                if fq is None:
                    continue
                source = linear.args[0] if edge == "input" else linear.args[1]
                path = f"{QUANT_PREFIX}.{linear.name}__{edge}"
                q = insert_module_on_edge(gm, linear, source, fq, path)
                annotate(q, "quantizer", **common, extra={"quantizes": linear.name, "edge": edge})
                rename(f"{e['path']}.{edge}_quantizer", path)
        elif e.get("kind") == "FakeQuantize":
            if e["input"] not in nodes or e["user"] not in nodes:
                raise SerializationError(f"the saved quantizer '{e['path']}' sits on an edge the rebuilt graph lacks")
            q = insert_module_on_edge(gm, nodes[e["user"]], nodes[e["input"]],
                                      _build_module({"kind": "FakeQuantize", **e["quantizer"]}), e["path"])
            annotate(q, "quantizer")
        else:
            raise SerializationError(f"unknown module kind {e.get('kind')!r} in the saved model")
    return tensors
