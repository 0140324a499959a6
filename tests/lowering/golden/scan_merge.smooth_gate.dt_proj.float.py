# vmfx generated kernel: template=scan_merge
# provenance (FX nodes):
#   golden.scan_merge.smooth_gate.dt_proj.float
# parameters:
#   has_D_f = True
#   has_D_b = True
#   has_z = True
#   delta_softplus = True
#   write_float = True
#   emit_codes = False
#   workspace_is_out = False
#   autotune = True
#   dt_proj_f = DtProj(per_token=True, smooth=False, act_bits=8, bias=True)
#   dt_proj_b = DtProj(per_token=True, smooth=False, act_bits=8, bias=True)
#   smooth_gate = True
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
        triton.Config({'BLOCK_E': 16}, num_warps=2),
        triton.Config({'BLOCK_E': 32}, num_warps=4),
        triton.Config({'BLOCK_E': 64}, num_warps=4),
        triton.Config({'BLOCK_E': 128}, num_warps=8),
    ],
    key=['E', 'N', 'L'],
    cache_results=True,  # timings kept on disk (Triton's cache): a new process does not re-tune
)
@triton.jit
def vmfx_scan_merge(
    # pointers, per direction: u (B, E, L); A (E, N); B, C (B, N, L); D (E,); dt_proj's
    # input (B, L, R), int8 weight codes (E, R), int32 row sums and scales (E,), activation
    # smoothing (R,), 1 / s_a, s_a, z_a (L or 1), bias (E,)
    uf_ptr, Af_ptr, Bf_ptr, Cf_ptr, Df_ptr,
    dtxf_ptr, dtwf_ptr, dtwsumf_ptr, dtswf_ptr, dtinv_saf_ptr, dtsaf_ptr, dtzaf_ptr, dtbiasf_ptr,
    ub_ptr, Ab_ptr, Bb_ptr, Cb_ptr, Db_ptr,
    dtxb_ptr, dtwb_ptr, dtwsumb_ptr, dtswb_ptr, dtinv_sab_ptr, dtsab_ptr, dtzab_ptr, dtbiasb_ptr,
    # gate z (B, E, L), forward time order; workspace, merged output (B, L, E); codes (B*L, E)
    z_ptr, zs_ptr, ws_ptr, out_ptr,
    # the merge factor c, dimensions (R: each direction's dt rank)
    c, E, N, L, Rf, Rb,
    # strides (batch, channel-or-state, time); dt_proj input (batch, time, rank), weight (channel, rank)
    stride_ufb, stride_ufe, stride_ufl,
    stride_Bfb, stride_Bfn, stride_Bfl, stride_Cfb, stride_Cfn, stride_Cfl,
    stride_dtxfb, stride_dtxfl, stride_dtxfr, stride_dtwfe, stride_dtwfr,
    stride_ubb, stride_ube, stride_ubl,
    stride_Bbb, stride_Bbn, stride_Bbl, stride_Cbb, stride_Cbn, stride_Cbl,
    stride_dtxbb, stride_dtxbl, stride_dtxbr, stride_dtwbe, stride_dtwbr,
    stride_zb, stride_ze, stride_zl,
    # meta-parameters (BLOCK_N >= N: the whole state of a channel in registers; BLOCK_R >= Rf, Rb)
    BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    mask_e = offs_e < E
    mask_n = offs_n < N
    # padded states have A = 0, B = 0: h stays 0
    mask_en = mask_e[:, None] & mask_n[None, :]
    offs_r = tl.arange(0, BLOCK_R)  # dt_proj's input channels (padded weight codes are 0)
    ws_base = ws_ptr + pid_b * L * E + offs_e  # token-major (B, L, E) float32
    out_base = out_ptr + pid_b * L * E + offs_e
    z_base = z_ptr + pid_b * stride_zb + offs_e * stride_ze
    zs = tl.load(zs_ptr + offs_e, mask=mask_e, other=1.0)
    # forward direction: token t at step t; y_f + D_f u_f (ungated) to the workspace
    A2f = tl.load(Af_ptr + offs_e[:, None] * N + offs_n[None, :], mask=mask_en, other=0.0) * 1.4426950408889634
    uf_base = uf_ptr + pid_b * stride_ufb + offs_e * stride_ufe
    Bf_base = Bf_ptr + pid_b * stride_Bfb + offs_n * stride_Bfn
    Cf_base = Cf_ptr + pid_b * stride_Cfb + offs_n * stride_Cfn
    # dt_proj: the (BLOCK_E, R) int8 weight codes in registers (int32; 0 in the padding)
    mask_rf = offs_r < Rf
    Wqf = tl.load(dtwf_ptr + offs_e[:, None] * stride_dtwfe + offs_r[None, :] * stride_dtwfr,
                  mask=mask_e[:, None] & mask_rf[None, :], other=0).to(tl.int32)
    wsumf = tl.load(dtwsumf_ptr + offs_e, mask=mask_e, other=0)
    swf = tl.load(dtswf_ptr + offs_e, mask=mask_e, other=0.0)
    dtxf_base = dtxf_ptr + pid_b * stride_dtxfb + offs_r * stride_dtxfr
    biasf = tl.load(dtbiasf_ptr + offs_e, mask=mask_e, other=0.0)
    Df = tl.load(Df_ptr + offs_e, mask=mask_e, other=0.0)
    h = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
    for t in range(0, L):
        u = tl.load(uf_base + t * stride_ufl, mask=mask_e, other=0.0).to(tl.float32)
        xr = tl.load(dtxf_base + t * stride_dtxfl, mask=mask_rf, other=0.0).to(tl.float32)
        dza = tl.load(dtzaf_ptr + t)
        dinv_sa = tl.load(dtinv_saf_ptr + t)
        q = _vmfx_quantize(xr, dinv_sa, dza, 0.0, 255.0, 128.0)
        acc = tl.sum(Wqf * q.to(tl.int32)[None, :], axis=1) + (128 - dza.to(tl.int32)) * wsumf
        dt = acc.to(tl.float32) * (tl.load(dtsaf_ptr + t) * swf)
        dt = dt + biasf
        dt = _vmfx_softplus(dt)
        Bt = tl.load(Bf_base + t * stride_Bfl, mask=mask_n, other=0.0).to(tl.float32)
        Ct = tl.load(Cf_base + t * stride_Cfl, mask=mask_n, other=0.0).to(tl.float32)
        h = tl.exp2(dt[:, None] * A2f) * h + (dt * u)[:, None] * Bt[None, :]
        y = tl.sum(h * Ct[None, :], axis=1)
        y = y + Df * u
        tl.store(ws_base + t * E, y, mask=mask_e)
    tl.debug_barrier()  # the forward values are visible to all of the program's threads
    # backward direction: step t belongs to token l = L - 1 - t; merge and quantize there
    A2b = tl.load(Ab_ptr + offs_e[:, None] * N + offs_n[None, :], mask=mask_en, other=0.0) * 1.4426950408889634
    ub_base = ub_ptr + pid_b * stride_ubb + offs_e * stride_ube
    Bb_base = Bb_ptr + pid_b * stride_Bbb + offs_n * stride_Bbn
    Cb_base = Cb_ptr + pid_b * stride_Cbb + offs_n * stride_Cbn
    # dt_proj: the (BLOCK_E, R) int8 weight codes in registers (int32; 0 in the padding)
    mask_rb = offs_r < Rb
    Wqb = tl.load(dtwb_ptr + offs_e[:, None] * stride_dtwbe + offs_r[None, :] * stride_dtwbr,
                  mask=mask_e[:, None] & mask_rb[None, :], other=0).to(tl.int32)
    wsumb = tl.load(dtwsumb_ptr + offs_e, mask=mask_e, other=0)
    swb = tl.load(dtswb_ptr + offs_e, mask=mask_e, other=0.0)
    dtxb_base = dtxb_ptr + pid_b * stride_dtxbb + offs_r * stride_dtxbr
    biasb = tl.load(dtbiasb_ptr + offs_e, mask=mask_e, other=0.0)
    Db = tl.load(Db_ptr + offs_e, mask=mask_e, other=0.0)
    h = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
    for t in range(0, L):
        u = tl.load(ub_base + t * stride_ubl, mask=mask_e, other=0.0).to(tl.float32)
        xr = tl.load(dtxb_base + t * stride_dtxbl, mask=mask_rb, other=0.0).to(tl.float32)
        dza = tl.load(dtzab_ptr + t)
        dinv_sa = tl.load(dtinv_sab_ptr + t)
        q = _vmfx_quantize(xr, dinv_sa, dza, 0.0, 255.0, 128.0)
        acc = tl.sum(Wqb * q.to(tl.int32)[None, :], axis=1) + (128 - dza.to(tl.int32)) * wsumb
        dt = acc.to(tl.float32) * (tl.load(dtsab_ptr + t) * swb)
        dt = dt + biasb
        dt = _vmfx_softplus(dt)
        Bt = tl.load(Bb_base + t * stride_Bbl, mask=mask_n, other=0.0).to(tl.float32)
        Ct = tl.load(Cb_base + t * stride_Cbl, mask=mask_n, other=0.0).to(tl.float32)
        h = tl.exp2(dt[:, None] * A2b) * h + (dt * u)[:, None] * Bt[None, :]
        y = tl.sum(h * Ct[None, :], axis=1)
        y = y + Db * u
        l = L - 1 - t
        yf = tl.load(ws_base + l * E, mask=mask_e, other=0.0)
        g = _vmfx_smooth_silu(tl.load(z_base + l * stride_zl, mask=mask_e, other=0.0).to(tl.float32), zs)
        yf = yf * g
        y = y * g
        m = (yf + y) * c
        tl.store(out_base + l * E, m, mask=mask_e)
