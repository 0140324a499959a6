# vmfx generated kernel: template=hadamard_quantize
# provenance (FX nodes):
#   golden.hadamard_quantize.n192.a8.token
# parameters:
#   n = 192
#   k = 4
#   m = 12
#   per_token = True
#   smooth = False
#   act_bits = 8
#   autotune = False
import triton
import triton.language as tl

@triton.jit
def _vmfx_rint(v):
    """Round half to even (torch.round) of finite float32 v: f = floor(v), d = v - f (exact
    for |v| >= 1), f + 1 when d > 0.5 or (d == 0.5 and f odd)."""
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)

@triton.jit
def _vmfx_quantize(v, inv_sa, za, QMIN, QMAX, OFFSET):
    """Shifted int8 codes clamp(rint(v * inv_sa) + za, QMIN, QMAX) - OFFSET of an (already
    smoothed) float tile v. v is clamped to [QMIN - za, QMAX - za] before rounding (same
    result for integer za): rint's argument stays small, and the min/max separates the
    multiply from the rounding arithmetic, so no FMA can be formed across them."""
    v = v * inv_sa
    v = tl.minimum(tl.maximum(v, QMIN - za), QMAX - za)
    return (_vmfx_rint(v) + za - OFFSET).to(tl.int8)

@triton.jit
def _vmfx_butterfly(t, BLOCK_M: tl.constexpr, P: tl.constexpr, HALF: tl.constexpr):
    """One Walsh-Hadamard stage over the last axis (P) of a (BLOCK_M, P) tile: entries a and
    a + HALF (bit log2(HALF) of a clear / set) become their sum and difference."""
    t = tl.reshape(t, (BLOCK_M, P // (2 * HALF), 2, HALF))
    lo, hi = tl.split(tl.permute(t, (0, 1, 3, 2)))
    t = tl.permute(tl.join(lo + hi, lo - hi), (0, 1, 3, 2))
    return tl.reshape(t, (BLOCK_M, P))

@triton.jit
def vmfx_hadamard_quantize(
    # pointers: float input (M, n), parameters, int8 codes (M, n) contiguous
    x_ptr, inv_sa_ptr, za_ptr, codes_ptr,
    # dimensions and strides
    M, L, stride_xm, stride_xk,
    # meta-parameters
    BLOCK_M: tl.constexpr,
):
    P: tl.constexpr = 16  # 2^k: the Sylvester factor; the base factor m = 12 is unrolled
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_a = tl.arange(0, P)
    mask = (offs_m < M)[:, None] & (offs_a < P)[None, :]
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    # channel a * 12 + b of every row, as 12 tiles x_b of shape (BLOCK_M, P)
    x0 = tl.load(x_rows + (offs_a[None, :] * 12 + 0) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_rows + (offs_a[None, :] * 12 + 1) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_rows + (offs_a[None, :] * 12 + 2) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x3 = tl.load(x_rows + (offs_a[None, :] * 12 + 3) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x4 = tl.load(x_rows + (offs_a[None, :] * 12 + 4) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x5 = tl.load(x_rows + (offs_a[None, :] * 12 + 5) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x6 = tl.load(x_rows + (offs_a[None, :] * 12 + 6) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x7 = tl.load(x_rows + (offs_a[None, :] * 12 + 7) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x8 = tl.load(x_rows + (offs_a[None, :] * 12 + 8) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x9 = tl.load(x_rows + (offs_a[None, :] * 12 + 9) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x10 = tl.load(x_rows + (offs_a[None, :] * 12 + 10) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x11 = tl.load(x_rows + (offs_a[None, :] * 12 + 11) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    tok = offs_m % L  # rows are (batch, token) pairs
    inv_sa = tl.load(inv_sa_ptr + tok, mask=offs_m < M, other=1.0)[:, None]
    za = tl.load(za_ptr + tok, mask=offs_m < M, other=0.0)[:, None]
    # column 0 of the base product, the butterflies, 1 / sqrt(192), quantize
    t = x0 - x1 - x2 - x3 - x4 - x5 - x6 - x7 - x8 - x9 - x10 - x11
    t = _vmfx_butterfly(t, BLOCK_M, P, 1)
    t = _vmfx_butterfly(t, BLOCK_M, P, 2)
    t = _vmfx_butterfly(t, BLOCK_M, P, 4)
    t = _vmfx_butterfly(t, BLOCK_M, P, 8)
    t = t * 0.07216878235340118
    chan = offs_a * 12 + 0
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 192 + chan[None, :], codes, mask=mask)
    # column 1 of the base product, the butterflies, 1 / sqrt(192), quantize
    t = x0 + x1 - x2 + x3 - x4 - x5 - x6 + x7 + x8 + x9 - x10 + x11
    t = _vmfx_butterfly(t, BLOCK_M, P, 1)
    t = _vmfx_butterfly(t, BLOCK_M, P, 2)
    t = _vmfx_butterfly(t, BLOCK_M, P, 4)
    t = _vmfx_butterfly(t, BLOCK_M, P, 8)
    t = t * 0.07216878235340118
    chan = offs_a * 12 + 1
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 192 + chan[None, :], codes, mask=mask)
    # column 2 of the base product, the butterflies, 1 / sqrt(192), quantize
    t = x0 + x1 + x2 - x3 + x4 - x5 - x6 - x7 + x8 + x9 + x10 - x11
    t = _vmfx_butterfly(t, BLOCK_M, P, 1)
    t = _vmfx_butterfly(t, BLOCK_M, P, 2)
    t = _vmfx_butterfly(t, BLOCK_M, P, 4)
    t = _vmfx_butterfly(t, BLOCK_M, P, 8)
    t = t * 0.07216878235340118
    chan = offs_a * 12 + 2
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 192 + chan[None, :], codes, mask=mask)
    # column 3 of the base product, the butterflies, 1 / sqrt(192), quantize
    t = x0 - x1 + x2 + x3 - x4 + x5 - x6 - x7 - x8 + x9 + x10 + x11
    t = _vmfx_butterfly(t, BLOCK_M, P, 1)
    t = _vmfx_butterfly(t, BLOCK_M, P, 2)
    t = _vmfx_butterfly(t, BLOCK_M, P, 4)
    t = _vmfx_butterfly(t, BLOCK_M, P, 8)
    t = t * 0.07216878235340118
    chan = offs_a * 12 + 3
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 192 + chan[None, :], codes, mask=mask)
    # column 4 of the base product, the butterflies, 1 / sqrt(192), quantize
    t = x0 + x1 - x2 + x3 + x4 - x5 + x6 - x7 - x8 - x9 + x10 + x11
    t = _vmfx_butterfly(t, BLOCK_M, P, 1)
    t = _vmfx_butterfly(t, BLOCK_M, P, 2)
    t = _vmfx_butterfly(t, BLOCK_M, P, 4)
    t = _vmfx_butterfly(t, BLOCK_M, P, 8)
    t = t * 0.07216878235340118
    chan = offs_a * 12 + 4
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 192 + chan[None, :], codes, mask=mask)
    # column 5 of the base product, the butterflies, 1 / sqrt(192), quantize
    t = x0 + x1 + x2 - x3 + x4 + x5 - x6 + x7 - x8 - x9 - x10 + x11
    t = _vmfx_butterfly(t, BLOCK_M, P, 1)
    t = _vmfx_butterfly(t, BLOCK_M, P, 2)
    t = _vmfx_butterfly(t, BLOCK_M, P, 4)
    t = _vmfx_butterfly(t, BLOCK_M, P, 8)
    t = t * 0.07216878235340118
    chan = offs_a * 12 + 5
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 192 + chan[None, :], codes, mask=mask)
    # column 6 of the base product, the butterflies, 1 / sqrt(192), quantize
    t = x0 + x1 + x2 + x3 - x4 + x5 + x6 - x7 + x8 - x9 - x10 - x11
    t = _vmfx_butterfly(t, BLOCK_M, P, 1)
    t = _vmfx_butterfly(t, BLOCK_M, P, 2)
    t = _vmfx_butterfly(t, BLOCK_M, P, 4)
    t = _vmfx_butterfly(t, BLOCK_M, P, 8)
    t = t * 0.07216878235340118
    chan = offs_a * 12 + 6
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 192 + chan[None, :], codes, mask=mask)
    # column 7 of the base product, the butterflies, 1 / sqrt(192), quantize
    t = x0 - x1 + x2 + x3 + x4 - x5 + x6 + x7 - x8 + x9 - x10 - x11
    t = _vmfx_butterfly(t, BLOCK_M, P, 1)
    t = _vmfx_butterfly(t, BLOCK_M, P, 2)
    t = _vmfx_butterfly(t, BLOCK_M, P, 4)
    t = _vmfx_butterfly(t, BLOCK_M, P, 8)
    t = t * 0.07216878235340118
    chan = offs_a * 12 + 7
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 192 + chan[None, :], codes, mask=mask)
    # column 8 of the base product, the butterflies, 1 / sqrt(192), quantize
    t = x0 - x1 - x2 + x3 + x4 + x5 - x6 + x7 + x8 - x9 + x10 - x11
    t = _vmfx_butterfly(t, BLOCK_M, P, 1)
    t = _vmfx_butterfly(t, BLOCK_M, P, 2)
    t = _vmfx_butterfly(t, BLOCK_M, P, 4)
    t = _vmfx_butterfly(t, BLOCK_M, P, 8)
    t = t * 0.07216878235340118
    chan = offs_a * 12 + 8
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 192 + chan[None, :], codes, mask=mask)
    # column 9 of the base product, the butterflies, 1 / sqrt(192), quantize
    t = x0 - x1 - x2 - x3 + x4 + x5 + x6 - x7 + x8 + x9 - x10 + x11
    t = _vmfx_butterfly(t, BLOCK_M, P, 1)
    t = _vmfx_butterfly(t, BLOCK_M, P, 2)
    t = _vmfx_butterfly(t, BLOCK_M, P, 4)
    t = _vmfx_butterfly(t, BLOCK_M, P, 8)
    t = t * 0.07216878235340118
    chan = offs_a * 12 + 9
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 192 + chan[None, :], codes, mask=mask)
    # column 10 of the base product, the butterflies, 1 / sqrt(192), quantize
    t = x0 + x1 - x2 - x3 - x4 + x5 + x6 + x7 - x8 + x9 + x10 - x11
    t = _vmfx_butterfly(t, BLOCK_M, P, 1)
    t = _vmfx_butterfly(t, BLOCK_M, P, 2)
    t = _vmfx_butterfly(t, BLOCK_M, P, 4)
    t = _vmfx_butterfly(t, BLOCK_M, P, 8)
    t = t * 0.07216878235340118
    chan = offs_a * 12 + 10
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 192 + chan[None, :], codes, mask=mask)
    # column 11 of the base product, the butterflies, 1 / sqrt(192), quantize
    t = x0 - x1 + x2 - x3 - x4 - x5 + x6 + x7 + x8 - x9 + x10 + x11
    t = _vmfx_butterfly(t, BLOCK_M, P, 1)
    t = _vmfx_butterfly(t, BLOCK_M, P, 2)
    t = _vmfx_butterfly(t, BLOCK_M, P, 4)
    t = _vmfx_butterfly(t, BLOCK_M, P, 8)
    t = t * 0.07216878235340118
    chan = offs_a * 12 + 11
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 192 + chan[None, :], codes, mask=mask)
