# vmfx generated kernel: template=mixed_qlinear
# provenance (FX nodes):
#   golden.mixed_qlinear.bias.wide
# parameters:
#   bias = True
#   wide_outliers = True
#   store_acc = False
import triton
import triton.language as tl

@triton.jit
def vmfx_mixed_qlinear(
    qi_ptr, qo_ptr, si_ptr, so_ptr, cols_ptr, counts_ptr,
    w_ptr, w_scale_ptr,
    bias_ptr,
    out_ptr,
    M, N, K, L, J,
    stride_wn, stride_wk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
):
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # inliers: the int8 GEMM over every column (codes are 0 at outlier positions)
    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(qi_ptr + offs_m[:, None] * K + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0)
        w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc_i = tl.dot(a, w, acc_i, out_dtype=tl.int32)

    # outliers: the tile's index list of outlier columns, gathered, a second int8 product
    count = tl.load(counts_ptr + pid_m)
    acc_o = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for j0 in range(0, J, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < count
        c = tl.load(cols_ptr + pid_m * J + offs_j, mask=mask_j, other=0)
        wg = tl.load(w_ptr + c[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                     mask=mask_j[:, None] & mask_n[None, :], other=0)
        qo = tl.load(qo_ptr + offs_m[:, None] * K + c[None, :],
                     mask=mask_m[:, None] & mask_j[None, :], other=0)
        # 16-bit codes as two int8 planes: q = 256 hi + lo + 128
        q32 = qo.to(tl.int32)
        hi = (q32 >> 8).to(tl.int8)
        lo = ((q32 & 255) - 128).to(tl.int8)
        part = tl.dot(hi, wg, out_dtype=tl.int32) * 256 + tl.dot(lo, wg, out_dtype=tl.int32)
        acc_o += part + 128 * tl.sum(wg.to(tl.int32), axis=0)[None, :]
    # epilogue: inliers with the static per-token scale, outliers with their per-row scale
    si = tl.load(si_ptr + offs_m % L, mask=mask_m, other=0.0)[:, None]
    so = tl.load(so_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    sw = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    y = acc_i.to(tl.float32) * (si * sw)
    y = y + acc_o.to(tl.float32) * (so * sw)
    y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    offs_out = offs_m[:, None] * N + offs_n[None, :]
    mask_out = mask_m[:, None] & mask_n[None, :]
    tl.store(out_ptr + offs_out, y, mask=mask_out)
