"""Quantized weights stored as their integer codes, for files (``vmfx.save``) that hold codes.

In a quantized (not lowered) graph a quantized weight reads::

    get_attr(W) -> smooth(., weight=True)* -> FakeQuantize(is_weight=True) -> linear / conv

The quantizer's output is ``(code - zero_point) * scale`` with ``code = clamp(round(W' / scale) +
zero_point, qmin, qmax)`` and ``W'`` the smoothed weight: it depends on ``W`` only through the codes.
So a file needs the codes (4-bit ones packed two per byte), not ``W``: :func:`weight_code_plan`
finds the weights whose every use is such a chain, :func:`encode` packs their codes, and
:func:`decode` rebuilds a stand-in float weight (the dequantized codes divided by the smoothing
factors) whose codes are the stored ones. The graph, the lowering and the inspector then work on
the stand-in unchanged.

Invariant (checked when encoding, per weight): the stand-in's codes equal the stored codes, so a
model rebuilt from the codes computes bit for bit what the saved model computes. A weight for
which that check fails (a pathological scale) is kept as floats instead, and the header says so.

Storage of one weight's codes: ``u = code - qmin`` (``0 <= u < 2**bits_per_code``), flattened in
row-major order; ``bits_per_code`` 4 packs two per byte (element ``2i`` in the low nibble of byte
``i``, ``2i + 1`` in its high nibble; an odd count pads a zero nibble), 8 stores one ``uint8`` per
code. Ranges wider than 8 bits are not stored as codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..ops.quantize import dequantize, quantize
from .modules import FakeQuantize, Smooth

__all__ = ["StoredWeight", "weight_code_plan", "encode", "decode", "check_codes", "bits_per_code", "CODE_PACKING"]

#: How the codes are laid out in the file (recorded in the header; a reader checks it).
CODE_PACKING = ("u = code - qmin, row-major; bits_per_code 4: element 2i low nibble, 2i+1 high nibble of byte i; "
                "bits_per_code 8: one uint8 per code")


@dataclass(frozen=True)
class StoredWeight:
    """One weight parameter stored as codes.

    Attributes:
        param: the parameter's path in the graph module (e.g. ``layers.0.mixer.in_proj.weight``).
        quantizer: the path of the weight's ``FakeQuantize`` module.
        smooths: paths of the ``Smooth`` modules on the way from the parameter to the quantizer,
            nearest the parameter first.
    """

    param: str
    quantizer: str
    smooths: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"quantizer": self.quantizer, "smooths": list(self.smooths)}


def bits_per_code(qmin: int, qmax: int) -> int | None:
    """4 or 8: the storage width of codes in ``[qmin, qmax]``; None if they need more than 8 bits."""
    span = qmax - qmin
    if span < 16:
        return 4
    if span < 256:
        return 8
    return None


def _storable(fq: FakeQuantize) -> bool:
    return (type(fq) is FakeQuantize and fq.is_weight and fq.enabled and not fq.spec.dynamic
            and bits_per_code(fq.qmin, fq.qmax) is not None)


def weight_code_plan(gm: fx.GraphModule) -> list[StoredWeight]:
    """The weights of ``gm`` that a file can hold as codes.

    A parameter qualifies when exactly one ``get_attr`` node reads it, that node's only use is a
    chain of weight-edge ``Smooth`` calls ending in one enabled, static, at most 8-bit weight
    ``FakeQuantize``, and no node in between has another use. Anything else (a weight read twice,
    a quantizer behind a reshape, a dynamic or 16-bit weight quantizer) stays float.
    """
    readers: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers.setdefault(str(node.target), []).append(node)
    params = dict(gm.named_parameters())
    plan = []
    for target, nodes in readers.items():
        if len(nodes) != 1 or target not in params:
            continue
        node, smooths = nodes[0], []
        while len(node.users) == 1:
            (user,) = node.users
            if user.op != "call_module" or user.args[:1] != (node,):
                break
            module = gm.get_submodule(str(user.target))
            if isinstance(module, Smooth) and user.kwargs.get("weight") is True and len(user.args) == 1:
                smooths.append(str(user.target))
                node = user
                continue
            if isinstance(module, FakeQuantize) and _storable(module) and len(user.args) == 1 and not user.kwargs:
                plan.append(StoredWeight(target, str(user.target), tuple(smooths)))
            break
    return plan


def _codes_of(weight: torch.Tensor, fq: FakeQuantize, factors: list[torch.Tensor]) -> torch.Tensor:
    """The integer codes the graph computes for ``weight`` (smoothing as ``Smooth.forward`` does)."""
    w = weight
    for f in factors:
        w = w * f.to(w.dtype)
    qp = fq.qparams()
    return quantize(w.to(qp.scale.dtype) if w.dtype != qp.scale.dtype else w, qp.scale, qp.zero_point, qp.qmin,
                    qp.qmax, dtype=torch.int32)


def stand_in(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, factors: list[torch.Tensor],
             dtype: torch.dtype) -> torch.Tensor:
    """A float weight whose codes are ``codes``: dequantized, divided by the smoothing factors."""
    w = dequantize(codes, scale.float(), zero_point.float())
    for f in reversed(factors):
        w = w / f.float()
    return w.to(dtype)


def _pack(u: torch.Tensor, bits: int) -> torch.Tensor:
    flat = u.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.contiguous()
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).contiguous()


def _unpack(data: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    if bits == 8:
        return data.to(torch.int32)
    b = data.to(torch.int32)
    return torch.stack([b & 0xF, b >> 4], dim=1).reshape(-1)[:numel]


def packed_numel(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes take at ``bits`` per code."""
    return numel if bits == 8 else (numel + 1) // 2


def encode(gm: fx.GraphModule, plan: list[StoredWeight]) -> tuple[dict[str, torch.Tensor], list[StoredWeight]]:
    """Pack the codes of every weight in ``plan``.

    Returns:
        ``{param path: uint8 bytes}`` and the entries that were encoded: an entry whose stand-in
        would not reproduce its codes exactly is left out (its float weight is saved instead).
    """
    packed, kept = {}, []
    for entry in plan:
        weight = gm.get_parameter(entry.param).detach()
        fq = gm.get_submodule(entry.quantizer)
        factors = [gm.get_submodule(p).factors.detach() for p in entry.smooths]
        codes = _codes_of(weight, fq, factors)
        qp = fq.qparams()
        rebuilt = stand_in(codes, qp.scale.detach(), qp.zero_point, factors, weight.dtype)
        if not torch.equal(_codes_of(rebuilt, fq, factors), codes):
            continue
        bits = bits_per_code(fq.qmin, fq.qmax)
        packed[entry.param] = _pack(codes - fq.qmin, bits).cpu()
        kept.append(entry)
    return packed, kept


def check_codes(data: torch.Tensor, numel: int, qmin: int, qmax: int) -> str | None:
    """Why ``data`` cannot be the stored codes of ``numel`` values in ``[qmin, qmax]`` (None if it can)."""
    bits = bits_per_code(qmin, qmax)
    if bits is None:
        return f"its quantizer's range [{qmin}, {qmax}] is wider than 8 bits, which is never stored as codes"
    if data.dtype != torch.uint8 or data.dim() != 1:
        return f"its codes are a {data.dtype} tensor of shape {tuple(data.shape)}, not a flat uint8 tensor"
    if data.numel() != packed_numel(numel, bits):
        return (f"its codes take {data.numel()} bytes, but {numel} codes in [{qmin}, {qmax}] take "
                f"{packed_numel(numel, bits)} at {bits} bits per code")
    u = _unpack(data, bits, numel)
    if u.numel() and int(u.max()) > qmax - qmin:
        return f"its codes go up to {int(u.max()) + qmin}, outside the quantizer's range [{qmin}, {qmax}]"
    return None


def decode(data: torch.Tensor, shape: tuple[int, ...], qmin: int, qmax: int, scale: torch.Tensor,
           zero_point: torch.Tensor, factors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The stand-in weight of stored codes (call :func:`check_codes` first)."""
    numel = 1
    for d in shape:
        numel *= d
    codes = (_unpack(data, bits_per_code(qmin, qmax), numel) + qmin).reshape(shape)
    return stand_in(codes, scale, zero_point, factors, dtype)
