# vmfx generated kernel: template=quantize
# provenance (FX nodes):
#   golden.quantize.a4.tensor.smooth.autotune
# parameters:
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

@triton.autotune(
    configs=[
        triton.Config({'BLOCK_M': 16, 'BLOCK_K': 256}, num_warps=4),
        triton.Config({'BLOCK_M': 32, 'BLOCK_K': 128}, num_warps=4),
        triton.Config({'BLOCK_M': 64, 'BLOCK_K': 128}, num_warps=8),
        triton.Config({'BLOCK_M': 8, 'BLOCK_K': 512}, num_warps=4),
    ],
    key=['M', 'K'],
    cache_results=True,  # timings kept on disk (Triton's cache): a new process does not re-tune
)
@triton.jit
def vmfx_quantize(
    # pointers: float input, parameters, int8 codes (M, K) contiguous
    x_ptr, inv_s_ptr, inv_sa_ptr, za_ptr, codes_ptr,
    # dimensions and strides
    M, K, L, stride_xm, stride_xk,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    mask = mask_m[:, None] & mask_k[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=mask, other=0.0).to(tl.float32)
    x = x * tl.load(inv_s_ptr + offs_k, mask=mask_k, other=1.0)[None, :]
    inv_sa = tl.load(inv_sa_ptr)
    za = tl.load(za_ptr)
    codes = _vmfx_quantize(x, inv_sa, za, 0.0, 15.0, 8.0)
    tl.store(codes_ptr + offs_m[:, None] * K + offs_k[None, :], codes, mask=mask)
