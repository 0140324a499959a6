# vmfx generated kernel: template=hadamard_quantize
# provenance (FX nodes):
#   golden.hadamard_quantize.n64.a4.tensor.smooth.autotune
# parameters:
#   n = 64
#   k = 6
#   m = 1
#   per_token = False
#   smooth = True
#   act_bits = 4
#   autotune = True
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

@triton.autotune(
    configs=[
        triton.Config({'BLOCK_M': 4}, num_warps=4),
        triton.Config({'BLOCK_M': 8}, num_warps=4),
        triton.Config({'BLOCK_M': 16}, num_warps=8),
        triton.Config({'BLOCK_M': 32}, num_warps=8),
    ],
    key=['M'],
    cache_results=True,  # timings kept on disk (Triton's cache): a new process does not re-tune
)
@triton.jit
def vmfx_hadamard_quantize(
    # pointers: float input (M, n), parameters, int8 codes (M, n) contiguous
    x_ptr, inv_s_ptr, inv_sa_ptr, za_ptr, codes_ptr,
    # dimensions and strides
    M, L, stride_xm, stride_xk,
    # meta-parameters
    BLOCK_M: tl.constexpr,
):
    P: tl.constexpr = 64  # 2^k: the Sylvester factor; the base factor m = 1 is unrolled
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_a = tl.arange(0, P)
    mask = (offs_m < M)[:, None] & (offs_a < P)[None, :]
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    # channel a * 1 + b of every row, as 1 tiles x_b of shape (BLOCK_M, P)
    x0 = tl.load(x_rows + (offs_a[None, :] * 1 + 0) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    inv_sa = tl.load(inv_sa_ptr)
    za = tl.load(za_ptr)
    # column 0 of the base product, the butterflies, 1 / sqrt(64), quantize
    t = x0
    t = _vmfx_butterfly(t, BLOCK_M, P, 1)
    t = _vmfx_butterfly(t, BLOCK_M, P, 2)
    t = _vmfx_butterfly(t, BLOCK_M, P, 4)
    t = _vmfx_butterfly(t, BLOCK_M, P, 8)
    t = _vmfx_butterfly(t, BLOCK_M, P, 16)
    t = _vmfx_butterfly(t, BLOCK_M, P, 32)
    t = t * 0.125
    chan = offs_a * 1 + 0
    t = t * tl.load(inv_s_ptr + chan)[None, :]
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 15.0, 8.0)
    tl.store(codes_ptr + offs_m[:, None] * 64 + chan[None, :], codes, mask=mask)
