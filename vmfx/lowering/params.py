"""The parameters of lowered kernels, prepared once at lowering time and read by both the Triton
templates (:mod:`vmfx.lowering.kernels`) and the exact reference (:mod:`vmfx.lowering.reference`):
an activation quantizer (:class:`ActQuant`), a quantized weight (:class:`QWeight`) and the packing
of 4-bit weight codes two per byte (:func:`pack_int4`). The numerics they encode are the contract
in :mod:`vmfx.lowering.reference`'s docstring."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["ActQuant", "QWeight", "make_act_quant", "pack_int4", "unpack_int4"]


@dataclass(frozen=True, eq=False)
class ActQuant:
    """Static asymmetric activation quantization of a (M, K) operand, prepared for the kernels.

    Rows are (batch, token) pairs; row ``r`` uses token ``r % tokens``. Build with
    :func:`make_act_quant`.

    Attributes:
        scale: ``s_a``, (T,) float32, T = 1 (per-tensor) or L (per-token static).
        inv_scale: ``1 / s_a`` in float32, (T,).
        zero_point: ``z_a``, (T,) float32 holding integers in ``[qmin, qmax]``.
        bits: activation bit width, 2..8 (codes ``[0, 2^b - 1]``).
        inv_smooth: ``1 / s`` in float32, (K,), or None (no smoothing).
    """

    scale: torch.Tensor
    inv_scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    inv_smooth: torch.Tensor | None = None

    @property
    def qmin(self) -> int:
        return 0

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def offset(self) -> int:
        """``2^(b-1)``: stored codes are ``q - offset`` (int8)."""
        return 2 ** (self.bits - 1)

    @property
    def tokens(self) -> int:
        """T: 1 for per-tensor, L for per-token parameters."""
        return self.scale.numel()

    @property
    def per_token(self) -> bool:
        return self.tokens > 1

    @property
    def device(self) -> torch.device:
        return self.scale.device

    def to(self, device) -> "ActQuant":
        """A copy with every tensor on ``device``."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ActQuant(mv(self.scale), mv(self.inv_scale), mv(self.zero_point), self.bits,
                        mv(self.inv_smooth))


def make_act_quant(scale, zero_point, bits: int = 8, smooth: torch.Tensor | None = None) -> ActQuant:
    """Prepare static activation quantization parameters for the kernels.

    Args:
        scale: ``s_a``: a number, or a tensor with one element (per-tensor) or L elements
            (per-token, any shape such as ``(1, L, 1)`` or ``(L,)``).
        zero_point: ``z_a``, integer-valued, broadcastable to ``scale`` (e.g. a scalar).
        bits: activation bit width, 2..8.
        smooth: optional per-input-channel smoothing factors ``s`` (K,), positive.

    Returns:
        An :class:`ActQuant` (float32 tensors on ``scale``'s device).

    Raises:
        ValueError: non-positive or non-finite scales or smoothing factors, non-integer or
            out-of-range zero points, bits outside 2..8.
    """
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be an integer in 2..8, got {bits!r}")
    s = torch.as_tensor(scale, dtype=torch.float32).detach().reshape(-1).clone()
    z = torch.as_tensor(zero_point, dtype=torch.float32, device=s.device).detach()
    z = torch.broadcast_to(z.reshape(-1) if z.numel() == s.numel() else z, s.shape).clone()
    if s.numel() == 0 or not bool(torch.isfinite(s).all() and (s > 0).all()):
        raise ValueError("activation scales must be finite and positive")
    if not bool((z == torch.round(z)).all()) or bool(((z < 0) | (z > 2**bits - 1)).any()):
        raise ValueError(f"zero points must be integers in [0, {2**bits - 1}]")
    inv_s = None
    if smooth is not None:
        sm = torch.as_tensor(smooth, dtype=torch.float32, device=s.device).detach()
        if sm.dim() != 1 or not bool(torch.isfinite(sm).all() and (sm > 0).all()):
            raise ValueError("smoothing factors must be a (K,) tensor of finite positive values")
        inv_s = (1.0 / sm).contiguous()
    return ActQuant(s.contiguous(), (1.0 / s).contiguous(), z.contiguous(), bits, inv_s)


@dataclass(frozen=True, eq=False)
class QWeight:
    """A quantized weight prepared for the integer GEMM.

    Attributes:
        codes: (N, K) int8, symmetric codes in ``[-(2^(b-1)-1), 2^(b-1)-1]``; None for a weight
            stored packed only (:meth:`pack` with ``keep_codes=False``, the lowered model's form
            of 4-bit weights: the reference unpacks them, :meth:`unpacked`).
        scale: ``s_w``, (N,) float32.
        wsum: ``sum_k codes[n, k]``, (N,) int32 (for the zero-point correction).
        bits: weight bit width (8 or 4 in practice).
        packed: for 4-bit (or narrower) codes, optionally the same codes packed two per byte,
            (N, ceil(K / 2)) int8 (see :func:`pack_int4`); the Triton GEMM reads this when present
            (half the weight bytes).
        in_features: K; needed (and checked) when ``codes`` is None, since an odd K cannot be
            read off the packed bytes.

    Invariant: ``codes`` or ``packed`` is set; when both are, they hold the same codes.
    """

    codes: torch.Tensor | None
    scale: torch.Tensor
    wsum: torch.Tensor
    bits: int
    packed: torch.Tensor | None = None
    in_features: int | None = None

    def __post_init__(self):
        if self.codes is None:
            if self.packed is None or self.in_features is None:
                raise ValueError("a QWeight without unpacked codes needs its packed codes and in_features (K)")
            if self.packed.dim() != 2 or self.packed.shape[1] != (self.in_features + 1) // 2:
                raise ValueError(f"packed codes {tuple(self.packed.shape)} do not hold K={self.in_features} columns")

    def pack(self, keep_codes: bool = True) -> "QWeight":
        """A copy whose codes are packed two per byte (:func:`pack_int4`), also kept unpacked
        unless ``keep_codes=False`` (then the reference unpacks them when it needs them).

        Raises:
            ValueError: codes wider than 4 bits.
        """
        if self.bits > 4:
            raise ValueError(f"only codes of at most 4 bits can be packed two per byte; these have {self.bits}")
        packed = self.packed if self.packed is not None else pack_int4(self.codes)
        return QWeight(self.codes if keep_codes else None, self.scale, self.wsum, self.bits, packed, self.shape[1])

    @classmethod
    def from_packed(cls, packed: torch.Tensor, k: int, scale: torch.Tensor, bits: int = 4,
                    keep_codes: bool = True) -> "QWeight":
        """Rebuild a packed weight of K columns from its packed bytes (codes unpacked and
        checked; kept unless ``keep_codes=False``)."""
        w = cls.from_codes(unpack_int4(packed, k), scale, bits)
        return QWeight(w.codes if keep_codes else None, w.scale, w.wsum, w.bits, packed.contiguous(), k)

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K)."""
        if self.codes is not None:
            return tuple(self.codes.shape)
        return (self.packed.shape[0], self.in_features)

    @property
    def store(self) -> torch.Tensor:
        """The tensor the weight is stored in: the packed bytes when there are no unpacked codes."""
        return self.codes if self.codes is not None else self.packed

    def unpacked(self) -> torch.Tensor:
        """The (N, K) int8 codes (unpacked from ``packed`` when only those are stored)."""
        return self.codes if self.codes is not None else unpack_int4(self.packed, self.in_features)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, bits: int = 8) -> "QWeight":
        """Wrap integer codes (N, K) and per-channel steps (N,) or (N, 1); computes ``wsum``.

        Raises:
            ValueError: codes out of the symmetric range, or shapes that do not fit.
        """
        q = 2 ** (bits - 1) - 1
        c = codes.detach()
        if c.dim() != 2:
            raise ValueError(f"weight codes must be (N, K), got {tuple(c.shape)}")
        if c.is_floating_point() and not bool((c == torch.round(c)).all()):
            raise ValueError("weight codes must be integers")
        if bool(((c < -q) | (c > q)).any()):
            raise ValueError(f"{bits}-bit weight codes must lie in [-{q}, {q}]")
        c = c.to(torch.int8).contiguous()
        s = torch.as_tensor(scale, dtype=torch.float32).detach().reshape(-1).to(c.device).contiguous()
        if s.numel() != c.shape[0]:
            raise ValueError(f"weight scale must have N={c.shape[0]} elements, got {s.numel()}")
        return cls(c, s, c.sum(1, dtype=torch.int32), bits)

    @classmethod
    def from_float(cls, weight: torch.Tensor, scale: torch.Tensor, bits: int = 8,
                   smooth: torch.Tensor | None = None) -> "QWeight":
        """Quantize a float weight as the graph's ``fq_w(W * s)`` does:
        ``clamp(round((W * s) / s_w), -qmax, qmax)`` (round half to even).

        Args:
            weight: (N, K) float.
            scale: ``s_w``, (N,) or (N, 1).
            bits: weight bit width.
            smooth: optional ``s`` (K,), multiplied into the weight first.
        """
        q = 2 ** (bits - 1) - 1
        w = weight.detach().float()
        if smooth is not None:
            w = w * smooth.detach().float()
        s = torch.as_tensor(scale, dtype=torch.float32, device=w.device).reshape(-1, 1)
        codes = torch.clamp(torch.round(w / s), -q, q)
        return cls.from_codes(codes, s, bits)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack signed 4-bit codes (N, K) in [-8, 7] two per byte: (N, Kh) int8, ``Kh = ceil(K / 2)``.

    Byte ``(n, j)`` holds column ``j`` in its low nibble and column ``j + Kh`` in its high nibble
    (two's complement nibbles; an odd K pads the last high nibble with 0). This "two halves"
    layout lets a GEMM unpack a (BLOCK_K, BLOCK_N) tile into two tiles of contiguous columns.

    Raises:
        ValueError: codes outside [-8, 7] or not 2-D.
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be (N, K), got {tuple(codes.shape)}")
    c = codes.to(torch.int16)
    if c.numel() and bool(((c < -8) | (c > 7)).any()):
        raise ValueError("only codes in [-8, 7] fit in 4 bits")
    n, k = c.shape
    kh = (k + 1) // 2
    c = F.pad(c, (0, 2 * kh - k))
    lo, hi = c[:, :kh] & 0xF, c[:, kh:] & 0xF
    return ((hi << 4) | lo).to(torch.uint8).view(torch.int8).contiguous()


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The (N, K) int8 codes of :func:`pack_int4`'s bytes (sign-extended nibbles)."""
    p = packed.to(torch.int16) & 0xFF
    lo, hi = p & 0xF, p >> 4
    c = torch.cat([lo, hi], dim=1)[:, :k]
    return torch.where(c >= 8, c - 16, c).to(torch.int8).contiguous()
