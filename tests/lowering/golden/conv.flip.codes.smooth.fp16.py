# vmfx generated kernel: template=conv
# provenance (FX nodes):
#   golden.conv.flip.codes.smooth.fp16
# parameters:
#   width = 3
#   bias = True
#   flip = True
#   emit_codes = True
#   per_token = True
#   smooth = True
#   act_bits = 4
#   autotune = False
#   out_dtype = 'float16'
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
def _vmfx_silu(x):
    """x * sigmoid(x), as x / (1 + exp(-x))."""
    return x / (1.0 + tl.exp(-x))

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
def vmfx_conv(
    # pointers: x (B, E, L) any strides, weight (E, W), bias (E,), out (B, E, L)
    x_ptr, w_ptr, b_ptr, out_ptr,
    # the next linear's activation parameters and its int8 codes (B*L, E)
    inv_s_ptr, inv_sa_ptr, za_ptr, codes_ptr,
    # dimensions and strides
    E, L, stride_xb, stride_xe, stride_xl,
    # meta-parameters
    WIDTH: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_l = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_e = offs_e < E
    mask_l = offs_l < L
    x_base = x_ptr + pid_b * stride_xb + offs_e[:, None] * stride_xe
    acc = tl.zeros((BLOCK_E, BLOCK_L), dtype=tl.float32)
    for j in tl.static_range(WIDTH):
        src = offs_l - (WIDTH - 1) + j  # causal: position l sees l - W + 1 .. l
        pos = L - 1 - src  # read x reversed along L
        m = mask_e[:, None] & (mask_l & (src >= 0))[None, :]
        xv = tl.load(x_base + pos[None, :] * stride_xl, mask=m, other=0.0).to(tl.float32)
        wj = tl.load(w_ptr + offs_e * WIDTH + j, mask=mask_e, other=0.0)
        acc = acc + xv * wj[:, None]
    acc = acc + tl.load(b_ptr + offs_e, mask=mask_e, other=0.0)[:, None]
    out = _vmfx_silu(acc)
    mask = mask_e[:, None] & mask_l[None, :]
    tl.store(out_ptr + pid_b * E * L + offs_e[:, None] * L + offs_l[None, :], out.to(tl.float16), mask=mask)
    # next linear's quantize of out^T: row b*L + l (token l), channel e
    out = out * tl.load(inv_s_ptr + offs_e, mask=mask_e, other=1.0)[:, None]
    inv_sa = tl.load(inv_sa_ptr + offs_l, mask=mask_l, other=1.0)[None, :]
    za = tl.load(za_ptr + offs_l, mask=mask_l, other=0.0)[None, :]
    codes = _vmfx_quantize(out, inv_sa, za, 0.0, 15.0, 8.0)
    rows = pid_b * L + offs_l
    tl.store(codes_ptr + rows[None, :] * E + offs_e[:, None], codes, mask=mask)
