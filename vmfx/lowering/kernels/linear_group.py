"""``qlinear_group``: G quantized linears on int8 codes (one per group) in one launch.

What it computes: for codes (G, M, K) int8 (``codes[g]`` the shifted activation codes
``q - 2^(b-1)`` of group g's input, e.g. both directions' ``x_proj`` inputs as written by
:func:`~vmfx.lowering.kernels.causal_conv1d_silu_bidir`) and per group a weight ``Wq_g`` (N, K), its
row sums ``wsum_g`` and scales ``s_w,g`` (N,), activation parameters ``s_a,g`` / ``z_a,g`` (T,) and an
optional bias ``b_g`` (N,), for the rows ``r`` of group g (``t = r % T``; T = 1 per-tensor, T = L
per-token)::

    acc[g,r,n] = sum_k a[g,r,k] * Wq_g[n,k]  +  (2^(b-1) - z_a,g[t]) * wsum_g[n]          int32
    out[g,r,n] = float(acc[g,r,n]) * (s_a,g[t] * s_w,g[n]) + b_g[n]

i.e. exactly the pre-quantized :mod:`vmfx.lowering.kernels.linear` (``qlinear`` on int8 codes) once
per group, stacked: ``out[g]`` is bit for bit what ``qlinear(codes[g], weights[g], acts[g],
biases[g])`` returns (its (M, N) rows). The oracle is :func:`vmfx.lowering.reference.qlinear_group`.
The groups share the static choices of the one kernel: the weight shape (N, K) and layout (int8
codes, or 4-bit codes packed two per byte, unpacked in registers as in ``qlinear``), per-token vs
per-tensor activation parameters and their bit width. No smoothing (the codes are already smoothed
and quantized) and no epilogue.

Program layout: grid ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), G)``; ``program_id(1)`` is the group,
which offsets the base pointers of the codes, the output and the group's stacked parameters (weight
codes (G, N, K) or packed (G, N, ceil(K/2)), ``wsum`` / ``s_w`` / bias (G, N), ``s_a`` / ``z_a``
(G, T)); ``program_id(0)`` walks the group's (BLOCK_M, BLOCK_N) output tiles in ``qlinear``'s
grouped order (GROUP_M row tiles per column of weight tiles, for L2 reuse), with the same K loop
(``tl.dot`` of int8 tiles into int32) and the same rank-1 zero-point correction, dequantize and bias.
All tiles of group 0 are launched before those of group 1, so each group's weight stays hot in L2.

Stacking once: the launcher needs the G groups' parameters as (G, ...) tensors.
:class:`GroupedQWeight` holds them; build it once (at lowering time) with
:meth:`GroupedQWeight.build` and pass it as ``weights`` (then ``acts`` is None), or pass the
sequences and let :meth:`GroupedQWeight.cached` stack them on the first call and find the stacked
copy again on later calls (an identity cache keyed on the parameter tensors and their versions).
Per call, the host then only checks the codes and allocates the output.

Memory traffic: reads G M K bytes of codes once per column of output tiles (mostly from L2),
G N K (G N K / 2 packed) bytes of weights once per row of tiles, O(G (N + T)) parameters; writes
s G M N bytes (s = 4 for float32, 2 for half precision). One launch instead of G.

Dtypes: codes int8 (any strides); weights int8 (codes or packed nibbles), ``wsum`` int32, scales,
zero points and biases float32; accumulation in int32, dequantize in float32; ``out`` written in
``out_dtype`` (float32 default, or float16 / bfloat16: the float32 result rounded once at the store).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..codegen import (
    check_tensor,
    interpreting,
    kernel_cache,
    launch_options,
    render_preamble,
    store_value,
)
from ..params import ActQuant, QWeight
from ..template import KernelTemplate, lines
from .linear import AUTOTUNE_CONFIGS, OUT_DTYPES, TILE_ORDER, _default_blocks, dequantize_source, int_gemm_source

__all__ = ["KERNEL_NAME", "AUTOTUNE_CONFIGS", "TEMPLATE", "GroupedQWeight", "render_qlinear_group", "qlinear_group"]

KERNEL_NAME = "vmfx_qlinear_group"


# ------------------------------------------------------------------------------ stacked parameters


@dataclass(frozen=True, eq=False)
class GroupedQWeight:
    """The G groups' GEMM parameters stacked for :func:`qlinear_group` (made once, reused).

    Attributes:
        store: the weights' codes, (G, N, K) int8, or with ``packed`` their 4-bit codes packed two
            per byte, (G, N, ceil(K / 2)) int8 (:func:`~vmfx.lowering.reference.pack_int4`'s layout).
        wsum: (G, N) int32 row sums of the codes (zero-point correction).
        w_scale: (G, N) float32 ``s_w``.
        act_scale: (G, T) float32 ``s_a``; T = L (per-token) or 1 (per-tensor).
        act_zero_point: (G, T) float32 ``z_a``.
        bias: (G, N) float32, or None (no group has a bias; a group without one gets zeros when
            another has one).
        in_features: K.
        weight_bits: the weights' bit width (the same for every group).
        act_bits: the activation bit width b (codes stored as ``q - 2^(b-1)``).
        packed: ``store`` holds packed 4-bit codes.
    """

    store: torch.Tensor
    wsum: torch.Tensor
    w_scale: torch.Tensor
    act_scale: torch.Tensor
    act_zero_point: torch.Tensor
    bias: torch.Tensor | None
    in_features: int
    weight_bits: int
    act_bits: int
    packed: bool

    @property
    def groups(self) -> int:
        """G."""
        return self.store.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of every group's weight."""
        return (self.store.shape[1], self.in_features)

    @property
    def tokens(self) -> int:
        """T: L for per-token activation parameters, 1 for per-tensor."""
        return self.act_scale.shape[1]

    @property
    def per_token(self) -> bool:
        return self.tokens > 1

    @property
    def device(self) -> torch.device:
        return self.store.device

    @classmethod
    def build(cls, weights: Sequence[QWeight], acts: Sequence[ActQuant],
              biases: Sequence[torch.Tensor | None] | None = None) -> "GroupedQWeight":
        """Check the G groups' parameters and stack them (new tensors, on the weights' device).

        Args:
            weights: G :class:`QWeight` of the same shape (N, K) and bit width; packed 4-bit
                weights are stacked packed when every group has its packed codes, else unpacked.
            acts: G :class:`ActQuant` agreeing on per-token vs per-tensor, on T and on the bit width
                (their smoothing is ignored: the codes are already smoothed).
            biases: None, or G entries, each a (N,) float tensor or None.

        Raises:
            ValueError: G differs between the sequences (or is 0), shapes, bit widths or activation
                kinds differ between groups, tensors of the wrong dtype, shape or device.
        """
        weights, acts = list(weights), list(acts)
        g = len(weights)
        if g == 0:
            raise ValueError("qlinear_group needs at least one group (weights is empty)")
        if len(acts) != g:
            raise ValueError(f"groups: {g} weights but {len(acts)} activation quantizers (acts)")
        if biases is not None:
            biases = list(biases)
            if len(biases) != g:
                raise ValueError(f"groups: {g} weights but {len(biases)} biases")
        for i, w in enumerate(weights):
            if not isinstance(w, QWeight):
                raise ValueError(f"weights[{i}] must be a QWeight, got {type(w).__name__}")
        for i, a in enumerate(acts):
            if not isinstance(a, ActQuant):
                raise ValueError(f"acts[{i}] must be an ActQuant, got {type(a).__name__}")
        n, k = weights[0].shape
        bits, dev = weights[0].bits, weights[0].scale.device
        for i, w in enumerate(weights[1:], 1):
            if w.shape != (n, k):
                raise ValueError(f"every group's weight must have the same shape: weights[0] is {(n, k)}, "
                                 f"weights[{i}] is {w.shape}")
            if w.bits != bits:
                raise ValueError(f"every group's weight must have the same bits: weights[0] has {bits}, "
                                 f"weights[{i}] has {w.bits}")
        per_token, a_bits, t = acts[0].per_token, acts[0].bits, acts[0].tokens
        for i, a in enumerate(acts[1:], 1):
            if a.per_token != per_token:
                raise ValueError("every group's activation quantizer must be per-token or every one per-tensor: "
                                 f"acts[0] is {'per-token' if per_token else 'per-tensor'}, acts[{i}] is "
                                 f"{'per-token' if a.per_token else 'per-tensor'}")
            if a.bits != a_bits:
                raise ValueError(f"every group's activation quantizer must have the same bits: acts[0] has "
                                 f"{a_bits}, acts[{i}] has {a.bits}")
            if a.tokens != t:
                raise ValueError(f"per-token activation parameters must have the same number of tokens: "
                                 f"acts[0] has {t}, acts[{i}] has {a.tokens}")
        packed = all(w.packed is not None and w.bits <= 4 for w in weights)
        kh = (k + 1) // 2
        stores = []
        for i, w in enumerate(weights):
            if packed:
                stores.append(check_tensor(w.packed, f"weights[{i}].packed", torch.int8, (n, kh), dev))
            else:
                stores.append(check_tensor(w.unpacked(), f"weights[{i}].codes", torch.int8, (n, k), dev))
            check_tensor(w.wsum, f"weights[{i}].wsum", torch.int32, (n,), dev)
            check_tensor(w.scale, f"weights[{i}].scale", torch.float32, (n,), dev)
        for i, a in enumerate(acts):
            for name in ("scale", "zero_point"):
                check_tensor(getattr(a, name), f"acts[{i}].{name}", torch.float32, (t,), dev)
        bias = None
        if biases is not None and any(b is not None for b in biases):
            rows = []
            for i, b in enumerate(biases):
                if b is None:
                    rows.append(torch.zeros(n, dtype=torch.float32, device=dev))
                else:
                    check_tensor(b, f"biases[{i}]", torch.float32, (n,), dev)
                    rows.append(b)
            bias = torch.stack(rows).contiguous()
        stack = lambda ts: torch.stack(list(ts)).contiguous()  # noqa: E731  (copies: never aliases)
        return cls(
            store=stack(stores),
            wsum=stack(w.wsum for w in weights),
            w_scale=stack(w.scale for w in weights),
            act_scale=stack(a.scale for a in acts),
            act_zero_point=stack(a.zero_point for a in acts),
            bias=bias,
            in_features=k,
            weight_bits=bits,
            act_bits=a_bits,
            packed=packed,
        )

    @classmethod
    def cached(cls, weights: Sequence[QWeight], acts: Sequence[ActQuant],
               biases: Sequence[torch.Tensor | None] | None = None) -> "GroupedQWeight":
        """:meth:`build`, memoized: the same parameter objects give the same stacked copy, made once.

        The cache is keyed on the first weight's stored codes (held weakly: the entry goes with
        them) and on the identity and version (``_version``) of every tensor stacked, so a tensor
        modified in place, or a new one, is stacked again. The entry holds the source tensors,
        so their ids cannot be reused while it lives.
        """
        weights, acts = list(weights), list(acts)
        biases = None if biases is None else list(biases)
        if not weights or not isinstance(weights[0], QWeight):
            return cls.build(weights, acts, biases)  # raises the right error
        sources = _sources(weights, acts, biases)
        key = tuple((id(t), t._version) if t is not None else None for t in sources)
        anchor = weights[0].store
        per_anchor = _GROUPED.get(anchor)
        if per_anchor is None:
            per_anchor = _GROUPED[anchor] = {}
        hit = per_anchor.get(key)
        if hit is None:
            grouped = cls.build(weights, acts, biases)
            keep = tuple(t for t in sources if t is not None and t is not anchor)
            per_anchor[key] = hit = (keep, grouped)
        return hit[1]


#: First weight's stored codes -> {key of all source tensors: (kept sources, GroupedQWeight)}.
_GROUPED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _sources(weights, acts, biases) -> tuple:
    """Every tensor :meth:`GroupedQWeight.build` reads, in a fixed order (None where absent)."""
    out = []
    for w in weights:
        out += [w.codes, w.packed, w.scale, w.wsum] if isinstance(w, QWeight) else [None] * 4
    for a in acts:
        out += [a.scale, a.zero_point] if isinstance(a, ActQuant) else [None] * 2
    out += [None] * len(weights) if biases is None else list(biases)
    return tuple(t if isinstance(t, torch.Tensor) else None for t in out)


# ------------------------------------------------------------------------------ template


#: The ``qlinear_group`` kernel: ``qlinear``'s GEMM on codes (:func:`~.linear.int_gemm_source`)
#: after moving the base pointers to the group of ``tl.program_id(1)``; slots: the bias argument,
#: the parameters' group offsets, the tile order, the zero point, the GEMM, the dequantize, the store.
TEMPLATE = KernelTemplate("""
    @triton.jit
    def $kernel_name(
        # pointers: int8 codes (G, M, K); stacked per group: int8 weights (G, N, K or ceil(K/2)),
        # row sums (G, N) int32, scales (G, N), activation parameters (G, T), bias (G, N);
        # out (G, M, N)
        x_ptr, w_ptr, wsum_ptr, w_scale_ptr, sa_ptr, za_ptr,$bias_arg out_ptr,
        # dimensions (L: number of token positions of the activation parameters)
        M, N, K, L,
        # strides
        stride_xg, stride_xm, stride_xk, stride_wg, stride_wn, stride_wk,
        # meta-parameters
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # the group: offsets the base pointers of its codes, parameters and output (int64)
        grp = tl.program_id(1).to(tl.int64)
        x_ptr = x_ptr + grp * stride_xg
        w_ptr = w_ptr + grp * stride_wg
        wsum_ptr = wsum_ptr + grp * N
        w_scale_ptr = w_scale_ptr + grp * N
        out_ptr = out_ptr + grp * M * N
        $param_offsets
        $tile_order
        # activation zero point of each row's token (rows are (batch, token) pairs)
        $zero_point

        $int_gemm

        # dequantize: token x channel scales, then the bias
        $dequantize
        offs_out = offs_m[:, None] * N + offs_n[None, :]  # out[g] is contiguous (M, N)
        mask_out = mask_m[:, None] & mask_n[None, :]
        tl.store(out_ptr + offs_out, $stored, mask=mask_out)
""")


def render_qlinear_group(
    *,
    per_token: bool = True,
    bias: bool = True,
    act_bits: int = 8,
    packed: bool = False,
    autotune: bool = False,
    provenance: Sequence[str] = (),
    out_dtype: str = "float32",
) -> str:
    """Render the source of one ``qlinear_group`` kernel.

    Args:
        per_token: per-token (T = L) activation parameters, else one scalar per group (per-tensor).
        bias: add each group's (N,) bias (a (G, N) stack).
        act_bits: activation bit width b (codes ``q - 2^(b-1)``), every group.
        packed: the weights are 4-bit codes packed two per byte (loop over ``ceil(K / 2)``, both
            nibbles unpacked in registers, two dots per step), as ``render_qlinear(packed=True)``.
        autotune: wrap in ``@triton.autotune`` over :data:`AUTOTUNE_CONFIGS` (``qlinear``'s); otherwise
            the block sizes are ``tl.constexpr`` arguments.
        provenance: the FX nodes this kernel implements (written in the header).
        out_dtype: "float32", "float16" or "bfloat16" (the float32 result rounded once at the store).

    Returns:
        The module source; the kernel is called :data:`KERNEL_NAME`.
    """
    if out_dtype not in OUT_DTYPES.values():
        raise ValueError(f"out_dtype must be one of {sorted(OUT_DTYPES.values())}, got {out_dtype!r}")
    if not 2 <= act_bits <= 8:
        raise ValueError(f"act_bits must be in 2..8, got {act_bits}")
    qmax, off = 2**act_bits - 1, 2 ** (act_bits - 1)
    params = dict(per_token=per_token, bias=bias, act_bits=act_bits, packed=packed, autotune=autotune,
                  out_dtype=out_dtype)
    preamble = render_preamble("qlinear_group", provenance, params, (),
                               (AUTOTUNE_CONFIGS, ["M", "N", "K"]) if autotune else None)
    per_group = "grp * L" if per_token else "grp"
    return preamble + TEMPLATE.fill(
        kernel_name=KERNEL_NAME,
        bias_arg=" bias_ptr," if bias else "",
        param_offsets=lines(f"sa_ptr = sa_ptr + {per_group}", f"za_ptr = za_ptr + {per_group}",
                            "bias_ptr = bias_ptr + grp * N" if bias else None),
        tile_order=lines(TILE_ORDER),
        zero_point=lines("tok = offs_m % L", "za = tl.load(za_ptr + tok, mask=mask_m, other=0.0)[:, None]")
        if per_token else "za = tl.load(za_ptr)",
        int_gemm=int_gemm_source(packed, True, False, qmax, off),
        dequantize=dequantize_source(per_token, bias),
        stored=store_value("y", out_dtype),
    )


_kernel = kernel_cache(render_qlinear_group, KERNEL_NAME)


# ------------------------------------------------------------------------------ launcher


def qlinear_group(
    codes: torch.Tensor,
    weights: Sequence[QWeight] | GroupedQWeight,
    acts: Sequence[ActQuant] | None,
    biases: Sequence[torch.Tensor | None] | None = None,
    *,
    token_shape: Sequence[int],
    block: Mapping[str, int] | None = None,
    provenance: Sequence[str] = (),
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Launch G quantized linears on int8 codes at once:
    ``out[g] = qlinear(codes[g], weights[g], acts[g], biases[g])``.

    Args:
        codes: (G, M, K) int8, ``codes[g]`` group g's shifted activation codes ``q - 2^(b-1)``, rows
            token-major ((batch, token) pairs, M = B L); any strides.
        weights: G :class:`QWeight` (same (N, K), same bits; 8-bit codes or 4-bit, packed or not),
            stacked once by :meth:`GroupedQWeight.cached`; or a :class:`GroupedQWeight` built
            beforehand (at lowering time) by :meth:`GroupedQWeight.build`, which already holds the
            activation parameters and biases (then ``acts`` and ``biases`` must be None).
        acts: G :class:`ActQuant`, all per-token (L,) or all per-tensor, same bits (smoothing ignored).
        biases: None, or G entries: (N,) float32 or None.
        token_shape: the (…, L) token layout of the M rows, e.g. (B, L): its product must be M, and
            per-token parameters must have L tokens.
        block: fixed ``BLOCK_M`` / ``BLOCK_N`` / ``BLOCK_K`` (optional ``GROUP_M``, ``num_warps``,
            ``num_stages``); default: autotuned on the GPU (``qlinear``'s configs), one large-tile
            config under the interpreter.
        provenance: FX node names, for the generated source's header.
        out_dtype: float32 (default), float16 or bfloat16.

    Returns:
        ``out`` (G, M, N) in ``out_dtype``, contiguous.

    Raises:
        ValueError: non-int8 or non-3-D codes; G differing between codes, weights, acts and biases;
            activation quantizers mixing per-token and per-tensor or bit widths; weights of
            different shapes or bits; K or token layout not matching; wrong dtypes or devices.
    """
    check_tensor(codes, "codes", torch.int8)
    if codes.dim() != 3:
        raise ValueError(f"codes must be (G, M, K) int8, got shape {tuple(codes.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {list(OUT_DTYPES)}, got {out_dtype}")
    if isinstance(weights, GroupedQWeight):
        if acts is not None or biases is not None:
            raise ValueError("a GroupedQWeight already holds the activation parameters and biases: "
                             "pass acts=None and biases=None")
        grouped = weights
    else:
        if acts is None:
            raise ValueError("acts must be given (G ActQuant) unless weights is a GroupedQWeight")
        grouped = GroupedQWeight.cached(weights, acts, biases)
    g, m, k = codes.shape
    n, kw = grouped.shape
    if g != grouped.groups:
        raise ValueError(f"groups: codes has G={g} but there are {grouped.groups} weights / quantizers")
    if k != kw:
        raise ValueError(f"codes have K={k} channels but the weights are {(n, kw)}")
    if codes.device != grouped.device:
        raise ValueError(f"codes are on {codes.device} but the weights on {grouped.device}")
    token_shape = tuple(int(s) for s in token_shape)
    if not token_shape or math.prod(token_shape) != m:
        raise ValueError(f"token_shape {token_shape} does not lay out the M={m} rows of the codes")
    t = grouped.tokens
    if t > 1 and token_shape[-1] != t:
        raise ValueError(f"token_shape has L={token_shape[-1]} tokens but the per-token parameters have {t}")

    out = torch.empty((g, m, n), dtype=out_dtype, device=codes.device)
    if g == 0 or m == 0 or n == 0:
        return out
    kernel = _kernel(per_token=t > 1, bias=grouped.bias is not None, act_bits=grouped.act_bits,
                     packed=grouped.packed, autotune=block is None and not interpreting(),
                     provenance=tuple(str(p) for p in provenance), out_dtype=OUT_DTYPES[out_dtype])
    w = grouped.store
    args = dict(x_ptr=codes, w_ptr=w, wsum_ptr=grouped.wsum, w_scale_ptr=grouped.w_scale,
                sa_ptr=grouped.act_scale, za_ptr=grouped.act_zero_point, out_ptr=out,
                M=m, N=n, K=k, L=t,
                stride_xg=codes.stride(0), stride_xm=codes.stride(1), stride_xk=codes.stride(2),
                stride_wg=w.stride(0), stride_wn=w.stride(1), stride_wk=w.stride(2))
    if grouped.bias is not None:
        args["bias_ptr"] = grouped.bias
    if block is None and not interpreting():
        grid = lambda meta: (_cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]), g)  # noqa: E731
        kernel[grid](**args, **launch_options())
    else:
        blk = {**_default_blocks(m, n, k), **dict(block or {})}
        opts = launch_options(blk.pop("num_warps", 4), blk.pop("num_stages", 3))
        grid = (_cdiv(m, blk["BLOCK_M"]) * _cdiv(n, blk["BLOCK_N"]), g)
        kernel[grid](**args, **blk, **opts)
    return out


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
