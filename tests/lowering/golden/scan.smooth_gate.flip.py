# vmfx generated kernel: template=scan
# provenance (FX nodes):
#   golden.scan.smooth_gate.flip
# parameters:
#   has_D = True
#   has_z = True
#   delta_bias = False
#   delta_softplus = True
#   flip_z = True
#   autotune = False
#   step_scale = False
#   out_scale = False
#   quant_state = False
#   state_bits = 8
#   smooth_gate = True
import triton
import triton.language as tl

@triton.jit
def _vmfx_softplus(x):
    """torch's softplus (threshold 20): log1p(exp(x)) with log1p(e) = log(1 + e) * e /
    ((1 + e) - 1) (Goldberg), e itself when 1 + e rounds to 1; x above 20."""
    e = tl.exp(tl.minimum(x, 20.0))
    w = e + 1.0
    m = w - 1.0
    r = tl.where(m == 0.0, e, tl.log(w) * (e / tl.where(m == 0.0, 1.0, m)))
    return tl.where(x > 20.0, x, r)

@triton.jit
def _vmfx_smooth_silu(x, s):
    """MambaQuant's Smooth-SiLU x * sigmoid(s x), as x / (1 + exp(-(s x)))."""
    return x / (1.0 + tl.exp(-(s * x)))

@triton.jit
def vmfx_scan(
    # pointers: u, delta, z (B, E, L); A (E, N); B, C (B, N, L); D, delta_bias (E,)
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, zs_ptr,
    out_ptr,
    # dimensions
    E, N, L,
    # strides (batch, channel-or-state, time)
    stride_ub, stride_ue, stride_ul, stride_db, stride_de, stride_dl,
    stride_zb, stride_ze, stride_zl,
    stride_Bb, stride_Bn, stride_Bl, stride_Cb, stride_Cn, stride_Cl,
    # meta-parameters (BLOCK_N >= N: the whole state of a channel in registers)
    BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    mask_e = offs_e < E
    mask_n = offs_n < N
    # A * log2(e): exp(dt A) = exp2(dt A log2 e); padded states have A = 0, B = 0: h stays 0
    A2 = tl.load(A_ptr + offs_e[:, None] * N + offs_n[None, :],
                 mask=mask_e[:, None] & mask_n[None, :], other=0.0) * 1.4426950408889634
    D = tl.load(D_ptr + offs_e, mask=mask_e, other=0.0)
    zs = tl.load(zs_ptr + offs_e, mask=mask_e, other=1.0)
    u_base = u_ptr + pid_b * stride_ub + offs_e * stride_ue
    d_base = delta_ptr + pid_b * stride_db + offs_e * stride_de
    B_base = B_ptr + pid_b * stride_Bb + offs_n * stride_Bn
    C_base = C_ptr + pid_b * stride_Cb + offs_n * stride_Cn
    out_base = out_ptr + pid_b * E * L + offs_e * L
    h = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
    z_base = z_ptr + pid_b * stride_zb + offs_e * stride_ze
    for t in range(0, L):
        u = tl.load(u_base + t * stride_ul, mask=mask_e, other=0.0).to(tl.float32)
        dt = tl.load(d_base + t * stride_dl, mask=mask_e, other=0.0).to(tl.float32)
        dt = _vmfx_softplus(dt)
        Bt = tl.load(B_base + t * stride_Bl, mask=mask_n, other=0.0).to(tl.float32)
        Ct = tl.load(C_base + t * stride_Cl, mask=mask_n, other=0.0).to(tl.float32)
        dA = tl.exp2(dt[:, None] * A2)
        h = dA * h + (dt * u)[:, None] * Bt[None, :]
        y = tl.sum(h * Ct[None, :], axis=1)
        y = y + D * u
        z = tl.load(z_base + (L - 1 - t) * stride_zl, mask=mask_e, other=0.0).to(tl.float32)
        y = y * _vmfx_smooth_silu(z, zs)
        tl.store(out_base + t, y, mask=mask_e)
