# vmfx generated kernel: template=qlinear
# provenance (FX nodes):
#   golden.qlinear.a8.token.codes.add
# parameters:
#   per_token = True
#   smooth = False
#   bias = False
#   prequantized = True
#   act_bits = 8
#   epilogue = (('add', 'extra0'),)
#   store_acc = False
#   autotune = True
#   out_dtype = 'float32'
#   packed = False
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
def vmfx_qlinear(
    # pointers: activation (float x or int8 codes), int8 weight (N, K) and its
    # row sums (int32) and scales, activation parameters, bias, epilogue inputs
    x_ptr, w_ptr, wsum_ptr, w_scale_ptr,
    sa_ptr, za_ptr,
    ep_extra0_ptr,
    out_ptr,
    # dimensions (L: number of token positions of the activation parameters)
    M, N, K, L,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
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
    tok = offs_m % L
    za = tl.load(za_ptr + tok, mask=mask_m, other=0.0)[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x_mask = mask_m[:, None] & mask_k[None, :]
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        a = tl.load(x_ptrs, mask=x_mask, other=0)  # int8 codes q - OFFSET
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)

    # zero point: acc += (128 - z_a) * wsum, giving sum_k (q - z_a) * Wq exactly
    wsum = tl.load(wsum_ptr + offs_n, mask=mask_n, other=0)
    acc += (128 - za.to(tl.int32)) * wsum[None, :]

    # dequantize: token x channel scales, then bias and the epilogue
    sa = tl.load(sa_ptr + tok, mask=mask_m, other=0.0)[:, None]
    sw = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    y = acc.to(tl.float32) * (sa * sw)
    offs_out = offs_m[:, None] * N + offs_n[None, :]  # out is contiguous (M, N)
    mask_out = mask_m[:, None] & mask_n[None, :]
    ep_extra0 = tl.load(ep_extra0_ptr + offs_out, mask=mask_out, other=0.0).to(tl.float32)
    y = y + ep_extra0  # epilogue: 'add' 'extra0'
    tl.store(out_ptr + offs_out, y, mask=mask_out)
