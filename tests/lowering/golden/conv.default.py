# vmfx generated kernel: template=conv
# provenance (FX nodes):
#   golden.conv.default
# parameters:
#   width = 4
#   bias = True
#   flip = False
#   emit_codes = False
#   autotune = False
import triton
import triton.language as tl

@triton.jit
def _vmfx_silu(x):
    """x * sigmoid(x), as x / (1 + exp(-x))."""
    return x / (1.0 + tl.exp(-x))

@triton.jit
def vmfx_conv(
    # pointers: x (B, E, L) any strides, weight (E, W), bias (E,), out (B, E, L)
    x_ptr, w_ptr, b_ptr, out_ptr,
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
        pos = src
        m = mask_e[:, None] & (mask_l & (src >= 0))[None, :]
        xv = tl.load(x_base + pos[None, :] * stride_xl, mask=m, other=0.0).to(tl.float32)
        wj = tl.load(w_ptr + offs_e * WIDTH + j, mask=mask_e, other=0.0)
        acc = acc + xv * wj[:, None]
    acc = acc + tl.load(b_ptr + offs_e, mask=mask_e, other=0.0)[:, None]
    out = _vmfx_silu(acc)
    mask = mask_e[:, None] & mask_l[None, :]
    tl.store(out_ptr + pid_b * E * L + offs_e[:, None] * L + offs_l[None, :], out, mask=mask)
