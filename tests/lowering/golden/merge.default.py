# vmfx generated kernel: template=merge_quantize
# provenance (FX nodes):
#   golden.merge.default
# parameters:
#   backward = True
#   write_float = True
#   emit_codes = False
#   autotune = False
import triton
import triton.language as tl

@triton.jit
def vmfx_merge(
    # pointers: scan outputs (B, E, L), merged output (B, L, E), codes (B*L, E)
    yf_ptr, yb_ptr, out_ptr,
    # the merge factor c, dimensions and strides
    c, E, L, stride_fb, stride_fe, stride_fl, stride_bb, stride_be, stride_bl,
    # meta-parameters
    BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_e = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_l = offs_l < L
    mask_e = offs_e < E
    mask = mask_l[:, None] & mask_e[None, :]
    y = tl.load(yf_ptr + pid_b * stride_fb + offs_e[None, :] * stride_fe + offs_l[:, None] * stride_fl,
                mask=mask, other=0.0).to(tl.float32)
    rev = L - 1 - offs_l  # the backward direction, flipped back along L
    y = y + tl.load(yb_ptr + pid_b * stride_bb + offs_e[None, :] * stride_be + rev[:, None] * stride_bl,
                    mask=mask, other=0.0).to(tl.float32)
    m = y * c
    rows = pid_b * L + offs_l  # token-major (B*L, E)
    tl.store(out_ptr + rows[:, None] * E + offs_e[None, :], m, mask=mask)
