# vmfx generated kernel: template=qlinear_group
# provenance (FX nodes):
#   golden.qlinear_group.a4.tensor.packed
# parameters:
#   per_token = False
#   bias = False
#   act_bits = 4
#   packed = True
#   autotune = True
#   out_dtype = 'float32'
import triton
import triton.language as tl

@triton.autotune(
    configs=[
        triton.Config({'BLOCK_M': 128, 'BLOCK_N': 128, 'BLOCK_K': 64, 'GROUP_M': 8}, num_warps=8, num_stages=3),
        triton.Config({'BLOCK_M': 128, 'BLOCK_N': 64, 'BLOCK_K': 64, 'GROUP_M': 8}, num_warps=4, num_stages=4),
        triton.Config({'BLOCK_M': 64, 'BLOCK_N': 128, 'BLOCK_K': 64, 'GROUP_M': 8}, num_warps=4, num_stages=4),
        triton.Config({'BLOCK_M': 64, 'BLOCK_N': 64, 'BLOCK_K': 128, 'GROUP_M': 8}, num_warps=4, num_stages=3),
        triton.Config({'BLOCK_M': 32, 'BLOCK_N': 64, 'BLOCK_K': 64, 'GROUP_M': 8}, num_warps=4, num_stages=4),
        triton.Config({'BLOCK_M': 128, 'BLOCK_N': 256, 'BLOCK_K': 64, 'GROUP_M': 8}, num_warps=8, num_stages=3),
        triton.Config({'BLOCK_M': 256, 'BLOCK_N': 128, 'BLOCK_K': 64, 'GROUP_M': 8}, num_warps=8, num_stages=3),
        triton.Config({'BLOCK_M': 128, 'BLOCK_N': 128, 'BLOCK_K': 128, 'GROUP_M': 8}, num_warps=8, num_stages=3),
    ],
    key=['M', 'N', 'K'],
    cache_results=True,  # timings kept on disk (Triton's cache): a new process does not re-tune
)
@triton.jit
def vmfx_qlinear_group(
    # pointers: int8 codes (G, M, K); stacked per group: int8 weights (G, N, K or ceil(K/2)),
    # row sums (G, N) int32, scales (G, N), activation parameters (G, T), bias (G, N);
    # out (G, M, N)
    x_ptr, w_ptr, wsum_ptr, w_scale_ptr, sa_ptr, za_ptr, out_ptr,
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
    sa_ptr = sa_ptr + grp
    za_ptr = za_ptr + grp
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
    # activation zero point of each row's token (rows are (batch, token) pairs)
    za = tl.load(za_ptr)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    KH = (K + 1) // 2  # packed columns: low nibble column j, high nibble column j + KH
    for k0 in range(0, KH, BLOCK_K):
        offs_j = k0 + tl.arange(0, BLOCK_K)
        mask_j = offs_j < KH
        w_ptrs = w_ptr + offs_j[:, None] * stride_wk + offs_n[None, :] * stride_wn
        p = tl.load(w_ptrs, mask=mask_j[:, None] & mask_n[None, :], other=0)
        p32 = p.to(tl.int32)  # shifts in int32 (arithmetic >>: sign-extends the nibble)
        w_lo = ((p32 << 28) >> 28).to(tl.int8)  # low nibble: column j
        w_hi = ((p32 << 24) >> 28).to(tl.int8)  # high nibble: column j + KH
        offs_k = offs_j
        mask_k = mask_j & (offs_k < K)
        x_mask = mask_m[:, None] & mask_k[None, :]
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        a = tl.load(x_ptrs, mask=x_mask, other=0)  # int8 codes q - OFFSET
        acc = tl.dot(a, w_lo, acc, out_dtype=tl.int32)
        offs_k = offs_j + KH
        mask_k = mask_j & (offs_k < K)
        x_mask = mask_m[:, None] & mask_k[None, :]
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        a = tl.load(x_ptrs, mask=x_mask, other=0)  # int8 codes q - OFFSET
        acc = tl.dot(a, w_hi, acc, out_dtype=tl.int32)

    # zero point: acc += (8 - z_a) * wsum, giving sum_k (q - z_a) * Wq exactly
    wsum = tl.load(wsum_ptr + offs_n, mask=mask_n, other=0)
    acc += (8 - za.to(tl.int32)) * wsum[None, :]

    # dequantize: token x channel scales, then the bias
    sa = tl.load(sa_ptr)
    sw = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    y = acc.to(tl.float32) * (sa * sw)
    offs_out = offs_m[:, None] * N + offs_n[None, :]  # out[g] is contiguous (M, N)
    mask_out = mask_m[:, None] & mask_n[None, :]
    tl.store(out_ptr + offs_out, y, mask=mask_out)
