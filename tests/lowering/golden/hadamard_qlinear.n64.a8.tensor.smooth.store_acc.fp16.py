# vmfx generated kernel: template=hadamard_qlinear
# provenance (FX nodes):
#   golden.hadamard_qlinear.n64.a8.tensor.smooth.store_acc.fp16
# parameters:
#   n = 64
#   k = 6
#   m = 1
#   per_token = False
#   smooth = True
#   bias = True
#   act_bits = 8
#   packed = False
#   epilogue = ()
#   store_acc = True
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
def vmfx_hadamard_qlinear(
    # pointers: float input x (M, K), int8 weight (N, K) (or 4-bit packed, (N, K / 2)) and its
    # row sums (int32) and scales, activation parameters, bias, epilogue inputs
    x_ptr, w_ptr, wsum_ptr, w_scale_ptr, inv_s_ptr,
    inv_sa_ptr, sa_ptr, za_ptr,
    bias_ptr,
    out_ptr, acc_ptr,
    # dimensions (L: number of token positions of the activation parameters)
    M, N, K, L,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    P: tl.constexpr = 64  # 2^k: the Sylvester factor; the base factor m = 1 is unrolled
    DOT_K: tl.constexpr = 64  # K of each dot: one base-product column j of P channels
    # grouped ordering of the output tiles (tutorial 03): GROUP_M row tiles per column sweep
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # activation parameters of each row's token (rows are (batch, token) pairs)
    inv_sa = tl.load(inv_sa_ptr)
    za = tl.load(za_ptr)

    # prologue: channel a * 1 + b of the tile's rows, as 1 tiles x_b of shape (BLOCK_M, P)
    offs_a = tl.arange(0, P)
    mask = mask_m[:, None] & (offs_a < P)[None, :]
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    x0 = tl.load(x_rows + (offs_a[None, :] * 1 + 0) * stride_xk, mask=mask, other=0.0).to(tl.float32)

    # the int8 GEMM on the rotated codes, one base-product column j at a time: codes of channels
    # a * 1 + j times the weight rows of the same channels (the dot ignores K's order)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    offs_r = tl.arange(0, DOT_K)
    chan_r = (offs_r // 1) * 1 + offs_r % 1  # the weight column of row r, for base-product column 0
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
    codes = _vmfx_quantize(t, inv_sa, za, 0.0, 255.0, 128.0)
    w = tl.load(w_ptr + (chan_r + 0)[:, None] * stride_wk + offs_n[None, :] * stride_wn, mask=mask_n[None, :], other=0)
    acc = tl.dot(codes, w, acc, out_dtype=tl.int32)

    # zero point: acc += (128 - z_a) * wsum, giving sum_k (q - z_a) * Wq exactly
    wsum = tl.load(wsum_ptr + offs_n, mask=mask_n, other=0)
    acc += (128 - za.to(tl.int32)) * wsum[None, :]

    # dequantize: token x channel scales, then bias and the epilogue
    sa = tl.load(sa_ptr)
    sw = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    y = acc.to(tl.float32) * (sa * sw)
    y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    offs_out = offs_m[:, None] * N + offs_n[None, :]  # out is contiguous (M, N)
    mask_out = mask_m[:, None] & mask_n[None, :]
    tl.store(out_ptr + offs_out, y.to(tl.float16), mask=mask_out)
    tl.store(acc_ptr + offs_out, acc, mask=mask_out)
