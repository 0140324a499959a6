"""Saving and loading quantized models without pickle: safetensors plus a JSON header.

``save(qmodel, path)`` writes one ``.safetensors`` file: every tensor of the quantized graph
module (float weights, step sizes, zero points, smoothing factors) and, in the file's metadata,
a JSON record of how to rebuild the graph:

* ``model``: the float architecture, as a known class name and its constructor arguments
  (``model.init_kwargs``); architectures vmfx cannot rebuild are passed to :func:`load` instead;
* ``input_shapes``: the example input shape used to trace;
* ``config``: the :class:`~vmfx.config.QuantConfig`;
* ``modules``: the quantized modules to put back (``QuantLinear`` with its quantizers' specs and
  scale shapes, standalone ``FakeQuantize`` nodes with the edge they sit on);
* ``sha256``: a digest of the header and every tensor's bytes.

``load(path)`` re-traces the float architecture from trusted code, replays the recorded module
edits and loads the tensors (strictly): nothing in the file is executed. A truncated file, a file
that is not a vmfx save, a digest mismatch (tampering or corruption) or tensors that do not fit the
recorded structure raise :class:`~vmfx.errors.SerializationError`. The digest detects accidents
and naive edits; it is not a signature (anyone can recompute it).

Invariant: ``load(save(q))`` computes exactly what ``q`` computes (bit for bit on the same machine).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import SerializationError
from .passes.detect import DetectMambaMixersPass
from .passes.graph_utils import insert_module_before, replace_submodule
from .passes.manager import PassManager
from .passes.patterns import module_of
from .passes.pipeline import trace_for_quantization
from .quant.modules import FakeQuantize, QuantLinear
from .quant.observers import Observer, QParams
from .quant.spec import QuantSpec

__all__ = ["save", "load", "FORMAT", "FORMAT_VERSION"]

FORMAT = "vmfx-quantized"
FORMAT_VERSION = 1


def _known_builders() -> dict[str, Any]:
    from .models.vim import VisionMamba

    return {f"{VisionMamba.__module__}.{VisionMamba.__qualname__}": VisionMamba}


# -- describing the quantized modules -------------------------------------------------------------


def _fq_entry(fq: FakeQuantize | None) -> dict | None:
    if fq is None:
        return None
    return {
        "spec": fq.spec.to_dict(),
        "is_weight": fq.is_weight,
        "scale_shape": None if fq.scale is None else list(fq.scale.shape),
        "enabled": fq.enabled,
    }


def _fq_from_entry(entry: dict | None) -> FakeQuantize | None:
    if entry is None:
        return None
    spec = QuantSpec.from_dict(entry["spec"])
    if spec.dynamic:
        fq = FakeQuantize(spec, None, is_weight=entry["is_weight"])
    else:
        shape = tuple(entry["scale_shape"])
        fq = FakeQuantize(spec, QParams(torch.ones(shape), torch.zeros(shape), spec.qmin, spec.qmax), entry["is_weight"])
    fq.enabled = bool(entry.get("enabled", True))
    return fq


def _describe_modules(gm: fx.GraphModule) -> list[dict]:
    entries = []
    for node in gm.graph.nodes:
        m = module_of(node)
        if isinstance(m, Observer):
            raise SerializationError(
                f"node '{node.name}' is still an observer: convert the model (vmfx.convert) before saving"
            )
        if isinstance(m, QuantLinear):
            entries.append(
                {
                    "kind": "QuantLinear",
                    "path": node.target,
                    "in_features": m.in_features,
                    "out_features": m.out_features,
                    "bias": m.bias is not None,
                    "input_quantizer": _fq_entry(m.input_quantizer),
                    "weight_quantizer": _fq_entry(m.weight_quantizer),
                    "smooth": m.smooth is not None,
                    "smooth_input": m.smooth_input,
                }
            )
        elif isinstance(m, FakeQuantize):
            users = list(node.users)
            if len(users) != 1 or not isinstance(node.args[0], fx.Node):
                raise SerializationError(f"standalone quantizer '{node.name}' must sit on one edge to be saved")
            entries.append(
                {"kind": "FakeQuantize", "path": node.target, "input": node.args[0].name, "user": users[0].name,
                 "quantizer": _fq_entry(m)}
            )
    return entries


# -- digest ---------------------------------------------------------------------------------------


def _digest(header_json: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(header_json.encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(list(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# -- save / load ----------------------------------------------------------------------------------


def save(qmodel: fx.GraphModule, path: str) -> str:
    """Write ``qmodel`` (from :func:`vmfx.compile`) to ``path`` (a ``.safetensors`` file).

    The file is written to a temporary name and moved into place, so an interrupted save never
    leaves a half-written file at ``path``.

    Returns:
        ``path``.
    """
    from safetensors.torch import save_file

    from . import __version__

    if not isinstance(qmodel, fx.GraphModule) or "vmfx_source_type" not in qmodel.meta:
        raise SerializationError("vmfx.save expects a quantized model returned by vmfx.compile / vmfx.convert")
    if not qmodel.meta.get("vmfx_input_shapes"):
        raise SerializationError("the model has no recorded input shape (it was traced without an example input)")
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "vmfx_version": __version__,
        "model": qmodel.meta.get("vmfx_model_spec"),
        "source_type": qmodel.meta["vmfx_source_type"],
        "input_shapes": qmodel.meta["vmfx_input_shapes"],
        "config": qmodel.meta.get("vmfx_config"),
        "calibration": qmodel.meta.get("vmfx_calibration"),
        "modules": _describe_modules(qmodel),
    }
    header_json = json.dumps(header, sort_keys=True)
    tensors = {k: v.detach().clone().contiguous() for k, v in qmodel.state_dict().items()}
    metadata = {"vmfx": header_json, "vmfx_sha256": _digest(header_json, tensors)}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _read(path: str) -> tuple[dict, str, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise SerializationError(f"no saved model at {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise SerializationError(
            f"{path!r} is not a readable safetensors file (truncated or corrupted?): {exc}"
        ) from exc
    if "vmfx" not in metadata or "vmfx_sha256" not in metadata:
        raise SerializationError(f"{path!r} is a safetensors file but not a vmfx quantized model (no vmfx header)")
    try:
        header = json.loads(metadata["vmfx"])
    except json.JSONDecodeError as exc:
        raise SerializationError(f"{path!r} has a damaged vmfx header: {exc}") from exc
    return header, metadata["vmfx"], tensors | {"__digest__": metadata["vmfx_sha256"]}


def load(path: str, model: nn.Module | None = None) -> fx.GraphModule:
    """Rebuild a quantized model saved with :func:`save`.

    Args:
        path: the ``.safetensors`` file.
        model: the float architecture to trace, for models vmfx cannot rebuild from the recorded
            constructor arguments (its weights are overwritten by the file's).

    Raises:
        SerializationError: missing, truncated, tampered or incompatible file (the message says which).
    """
    header, header_json, tensors = _read(path)
    digest = tensors.pop("__digest__")
    if header.get("format") != FORMAT:
        raise SerializationError(f"{path!r} is not a vmfx quantized model (format {header.get('format')!r})")
    if header.get("version") != FORMAT_VERSION:
        raise SerializationError(
            f"{path!r} has format version {header.get('version')}; this vmfx reads version {FORMAT_VERSION}"
        )
    if _digest(header_json, tensors) != digest:
        raise SerializationError(
            f"{path!r} does not match its recorded sha256 digest: the file was modified or corrupted after "
            "it was saved; quantize the model again"
        )
    if model is None:
        spec = header.get("model")
        builder = _known_builders().get((spec or {}).get("class"))
        if builder is None:
            raise SerializationError(
                f"vmfx cannot rebuild a {header.get('source_type')} by itself: pass the float model "
                "architecture as vmfx.load(path, model=...)"
            )
        model = builder(**spec["kwargs"])
    example = tuple(torch.zeros(shape) for shape in header["input_shapes"])
    gm, _ = trace_for_quantization(model, example_inputs=example)
    gm = PassManager([DetectMambaMixersPass()])(gm).graph_module
    _replay(gm, header["modules"])
    try:
        gm.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise SerializationError(f"the tensors in {path!r} do not fit the rebuilt model: {exc}") from exc
    gm.meta["vmfx_config"] = header.get("config")
    gm.meta["vmfx_calibration"] = header.get("calibration")
    gm.meta["vmfx_example_inputs"] = example
    gm.recompile()
    return gm.eval()


def _replay(gm: fx.GraphModule, entries: list[dict]) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    for e in entries:
        if e["kind"] == "QuantLinear":
            try:
                gm.get_submodule(e["path"])
            except AttributeError:
                raise SerializationError(f"the saved model quantizes '{e['path']}', which the rebuilt model lacks") from None
            q = QuantLinear(
                torch.zeros(e["out_features"], e["in_features"]),
                torch.zeros(e["out_features"]) if e["bias"] else None,
                input_quantizer=_fq_from_entry(e["input_quantizer"]),
                weight_quantizer=_fq_from_entry(e["weight_quantizer"]),
                smooth=torch.ones(e["in_features"]) if e["smooth"] else None,
                smooth_input=e["smooth_input"],
            )
            replace_submodule(gm, e["path"], q)
        elif e["kind"] == "FakeQuantize":
            if e["input"] not in nodes or e["user"] not in nodes:
                raise SerializationError(f"the saved quantizer '{e['path']}' sits on an edge the rebuilt graph lacks")
            insert_module_before(gm, nodes[e["user"]], nodes[e["input"]], _fq_from_entry(e["quantizer"]), e["path"])
        else:
            raise SerializationError(f"unknown module kind {e['kind']!r} in the saved model")
