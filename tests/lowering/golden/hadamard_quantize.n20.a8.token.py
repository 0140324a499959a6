# vmfx generated kernel: template=hadamard_quantize
# provenance (FX nodes):
#   golden.hadamard_quantize.n20.a8.token
# parameters:
#   n = 20
#   k = 0
#   m = 20
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
def vmfx_hadamard_quantize(
    # pointers: float input (M, n), parameters, int8 codes (M, n) contiguous
    x_ptr, inv_sa_ptr, za_ptr, codes_ptr,
    # dimensions and strides
    M, L, stride_xm, stride_xk,
    # meta-parameters
    BLOCK_M: tl.constexpr,
):
    P: tl.constexpr = 1  # 2^k: the Sylvester factor; the base factor m = 20 is unrolled
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_a = tl.arange(0, P)
    mask = (offs_m < M)[:, None] & (offs_a < P)[None, :]
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    # channel a * 20 + b of every row, as 20 tiles x_b of shape (BLOCK_M, P)
    x0 = tl.load(x_rows + (offs_a[None, :] * 20 + 0) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_rows + (offs_a[None, :] * 20 + 1) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_rows + (offs_a[None, :] * 20 + 2) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x3 = tl.load(x_rows + (offs_a[None, :] * 20 + 3) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x4 = tl.load(x_rows + (offs_a[None, :] * 20 + 4) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x5 = tl.load(x_rows + (offs_a[None, :] * 20 + 5) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x6 = tl.load(x_rows + (offs_a[None, :] * 20 + 6) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x7 = tl.load(x_rows + (offs_a[None, :] * 20 + 7) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x8 = tl.load(x_rows + (offs_a[None, :] * 20 + 8) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x9 = tl.load(x_rows + (offs_a[None, :] * 20 + 9) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x10 = tl.load(x_rows + (offs_a[None, :] * 20 + 10) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x11 = tl.load(x_rows + (offs_a[None, :] * 20 + 11) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x12 = tl.load(x_rows + (offs_a[None, :] * 20 + 12) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x13 = tl.load(x_rows + (offs_a[None, :] * 20 + 13) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x14 = tl.load(x_rows + (offs_a[None, :] * 20 + 14) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x15 = tl.load(x_rows + (offs_a[None, :] * 20 + 15) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x16 = tl.load(x_rows + (offs_a[None, :] * 20 + 16) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x17 = tl.load(x_rows + (offs_a[None, :] * 20 + 17) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x18 = tl.load(x_rows + (offs_a[None, :] * 20 + 18) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    x19 = tl.load(x_rows + (offs_a[None, :] * 20 + 19) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    tok = offs_m % L  # rows are (batch, token) pairs
    inv_sa = tl.load(inv_sa_ptr + tok, mask=offs_m < M, other=1.0)[:, None]
    za = tl.load(za_ptr + tok, mask=offs_m < M, other=0.0)[:, None]
    # column 0 of the base product, the butterflies, 1 / sqrt(20), quantize
    t = x0 - x1 - x2 - x3 - x4 - x5 - x6 - x7 - x8 - x9 - x10 - x11 - x12 - x13 - x14 - x15 - x16 - x17 - x18 - x19
    t = t * 0.22360679507255554
    chan = offs_a * 20 + 0
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 20 + chan[None, :], codes, mask=mask)
    # column 1 of the base product, the butterflies, 1 / sqrt(20), quantize
    t = x0 + x1 - x2 + x3 + x4 - x5 - x6 - x7 - x8 + x9 - x10 + x11 - x12 + x13 + x14 + x15 + x16 - x17 - x18 + x19
    t = t * 0.22360679507255554
    chan = offs_a * 20 + 1
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 20 + chan[None, :], codes, mask=mask)
    # column 2 of the base product, the butterflies, 1 / sqrt(20), quantize
    t = x0 + x1 + x2 - x3 + x4 + x5 - x6 - x7 - x8 - x9 + x10 - x11 + x12 - x13 + x14 + x15 + x16 + x17 - x18 - x19
    t = t * 0.22360679507255554
    chan = offs_a * 20 + 2
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 20 + chan[None, :], codes, mask=mask)
    # column 3 of the base product, the butterflies, 1 / sqrt(20), quantize
    t = x0 - x1 + x2 + x3 - x4 + x5 + x6 - x7 - x8 - x9 - x10 + x11 - x12 + x13 - x14 + x15 + x16 + x17 + x18 - x19
    t = t * 0.22360679507255554
    chan = offs_a * 20 + 3
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 20 + chan[None, :], codes, mask=mask)
    # column 4 of the base product, the butterflies, 1 / sqrt(20), quantize
    t = x0 - x1 - x2 + x3 + x4 - x5 + x6 + x7 - x8 - x9 - x10 - x11 + x12 - x13 + x14 - x15 + x16 + x17 + x18 + x19
    t = t * 0.22360679507255554
    chan = offs_a * 20 + 4
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 20 + chan[None, :], codes, mask=mask)
    # column 5 of the base product, the butterflies, 1 / sqrt(20), quantize
    t = x0 + x1 - x2 - x3 + x4 + x5 - x6 + x7 + x8 - x9 - x10 - x11 - x12 + x13 - x14 + x15 - x16 + x17 + x18 + x19
    t = t * 0.22360679507255554
    chan = offs_a * 20 + 5
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 20 + chan[None, :], codes, mask=mask)
    # column 6 of the base product, the butterflies, 1 / sqrt(20), quantize
    t = x0 + x1 + x2 - x3 - x4 + x5 + x6 - x7 + x8 + x9 - x10 - x11 - x12 - x13 + x14 - x15 + x16 - x17 + x18 + x19
    t = t * 0.22360679507255554
    chan = offs_a * 20 + 6
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 20 + chan[None, :], codes, mask=mask)
    # column 7 of the base product, the butterflies, 1 / sqrt(20), quantize
    t = x0 + x1 + x2 + x3 - x4 - x5 + x6 + x7 - x8 + x9 + x10 - x11 - x12 - x13 - x14 + x15 - x16 + x17 - x18 + x19
    t = t * 0.22360679507255554
    chan = offs_a * 20 + 7
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 20 + chan[None, :], codes, mask=mask)
    # column 8 of the base product, the butterflies, 1 / sqrt(20), quantize
    t = x0 + x1 + x2 + x3 + x4 - x5 - x6 + x7 + x8 - x9 + x10 + x11 - x12 - x13 - x14 - x15 + x16 - x17 + x18 - x19
    t = t * 0.22360679507255554
    chan = offs_a * 20 + 8
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 20 + chan[None, :], codes, mask=mask)
    # column 9 of the base product, the butterflies, 1 / sqrt(20), quantize
    t = x0 - x1 + x2 + x3 + x4 + x5 - x6 - x7 + x8 + x9 - x10 + x11 + x12 - x13 - x14 - x15 - x16 + x17 - x18 + x19
    t = t * 0.22360679507255554
    chan = offs_a * 20 + 9
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 20 + chan[None, :], codes, mask=mask)
    # column 10 of the base product, the butterflies, 1 / sqrt(20), quantize
    t = x0 + x1 - x2 + x3 + x4 + x5 + x6 - x7 - x8 + x9 + x10 - x11 + x12 + x13 - x14 - x15 - x16 - x17 + x18 - x19
    t = t * 0.22360679507255554
    chan = offs_a * 20 + 10
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 20 + chan[None, :], codes, mask=mask)
    # column 11 of the base product, the butterflies, 1 / sqrt(20), quantize
    t = x0 - x1 + x2 - x3 + x4 + x5 + x6 + x7 - x8 - x9 + x10 + x11 - x12 + x13 + x14 - x15 - x16 - x17 - x18 + x19
    t = t * 0.22360679507255554
    chan = offs_a * 20 + 11
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 20 + chan[None, :], codes, mask=mask)
    # column 12 of the base product, the butterflies, 1 / sqrt(20), quantize
    t = x0 + x1 - x2 + x3 - x4 + x5 + x6 + x7 + x8 - x9 - x10 + x11 + x12 - x13 + x14 + x15 - x16 - x17 - x18 - x19
    t = t * 0.22360679507255554
    chan = offs_a * 20 + 12
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 20 + chan[None, :], codes, mask=mask)
    # column 13 of the base product, the butterflies, 1 / sqrt(20), quantize
    t = x0 - x1 + x2 - x3 + x4 - x5 + x6 + x7 + x8 + x9 - x10 - x11 + x12 + x13 - x14 + x15 + x16 - x17 - x18 - x19
    t = t * 0.22360679507255554
    chan = offs_a * 20 + 13
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 20 + chan[None, :], codes, mask=mask)
    # column 14 of the base product, the butterflies, 1 / sqrt(20), quantize
    t = x0 - x1 - x2 + x3 - x4 + x5 - x6 + x7 + x8 + x9 + x10 - x11 - x12 + x13 + x14 - x15 + x16 + x17 - x18 - x19
    t = t * 0.22360679507255554
    chan = offs_a * 20 + 14
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 20 + chan[None, :], codes, mask=mask)
    # column 15 of the base product, the butterflies, 1 / sqrt(20), quantize
    t = x0 - x1 - x2 - x3 + x4 - x5 + x6 - x7 + x8 + x9 + x10 + x11 - x12 - x13 + x14 + x15 - x16 + x17 + x18 - x19
    t = t * 0.22360679507255554
    chan = offs_a * 20 + 15
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 20 + chan[None, :], codes, mask=mask)
    # column 16 of the base product, the butterflies, 1 / sqrt(20), quantize
    t = x0 - x1 - x2 - x3 - x4 + x5 - x6 + x7 - x8 + x9 + x10 + x11 + x12 - x13 - x14 + x15 + x16 - x17 + x18 + x19
    t = t * 0.22360679507255554
    chan = offs_a * 20 + 16
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 20 + chan[None, :], codes, mask=mask)
    # column 17 of the base product, the butterflies, 1 / sqrt(20), quantize
    t = x0 + x1 - x2 - x3 - x4 - x5 + x6 - x7 + x8 - x9 + x10 + x11 + x12 + x13 - x14 - x15 + x16 + x17 - x18 + x19
    t = t * 0.22360679507255554
    chan = offs_a * 20 + 17
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 20 + chan[None, :], codes, mask=mask)
    # column 18 of the base product, the butterflies, 1 / sqrt(20), quantize
    t = x0 + x1 + x2 - x3 - x4 - x5 - x6 + x7 - x8 + x9 - x10 + x11 + x12 + x13 + x14 - x15 - x16 + x17 + x18 - x19
    t = t * 0.22360679507255554
    chan = offs_a * 20 + 18
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 20 + chan[None, :], codes, mask=mask)
    # column 19 of the base product, the butterflies, 1 / sqrt(20), quantize
    t = x0 - x1 + x2 + x3 - x4 - x5 - x6 - x7 + x8 - x9 + x10 - x11 + x12 + x13 + x14 + x15 - x16 - x17 + x18 + x19
    t = t * 0.22360679507255554
    chan = offs_a * 20 + 19
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    tl.store(codes_ptr + offs_m[:, None] * 20 + chan[None, :], codes, mask=mask)
