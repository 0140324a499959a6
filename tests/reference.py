"""A small float64 oracle for the quantization math, re-derived independently of vmfx.ops."""

from __future__ import annotations

import math

import torch


def fake_quant_ref(x, scale, zero_point, qmin, qmax):
    """(clamp(round_half_even(x / s) + zp, qmin, qmax) - zp) * s in float64."""
    x, scale = x.double(), torch.as_tensor(scale, dtype=torch.float64)
    zero_point = torch.as_tensor(zero_point, dtype=torch.float64)
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.double(), test.double()
    noise = ((ref - test) ** 2).sum()
    return float(10 * torch.log10((ref**2).sum() / noise)) if noise > 0 else float("inf")


def local_scan_ref(grid: torch.Tensor, window: int) -> torch.Tensor:
    """LocalMamba's windowed scan of a (B, H, W, C) grid, re-derived with explicit loops in float64:
    zero-pad H and W up to multiples of ``window``, visit the windows in raster order and the tokens
    of each window in raster order. Returns (B, L_padded, C)."""
    B, H, W, C = grid.shape
    hg, wg = -(-H // window), -(-W // window)
    out = []
    for gi in range(hg):
        for gj in range(wg):
            for i in range(window):
                for j in range(window):
                    r, c = gi * window + i, gj * window + j
                    inside = r < H and c < W
                    out.append(grid[:, r, c].double() if inside else grid.new_zeros(B, C, dtype=torch.float64))
    return torch.stack(out, dim=1)


# -- OuroMamba-Gen (vmfx.data.synthetic) --------------------------------------------------------------


def scan_states_ref(u, delta, A, B, delta_bias=None, softplus=False):
    """Hidden states h (b, dim, L, N) of the selective scan by its per-step loop, in float64 and
    differentiable by autograd: h[t] = exp(dt[t] A) h[t-1] + dt[t] B[t] u[t]. ``B``: (dim, N),
    (b, N, L) or (b, G, N, L)."""
    u, delta, A, B = u.double(), delta.double(), A.double(), B.double()
    dt = delta + (delta_bias.double()[:, None] if delta_bias is not None else 0)
    if softplus:
        dt = torch.nn.functional.softplus(dt)
    b, dim, length = u.shape
    h = torch.zeros(b, dim, A.shape[1], dtype=torch.float64)
    out = []
    for t in range(length):
        if B.dim() == 2:
            Bt = B[None]
        elif B.dim() == 3:
            Bt = B[:, None, :, t]
        else:
            Bt = B[..., t].repeat_interleave(dim // B.shape[1], dim=1)
        h = torch.exp(dt[:, :, t, None] * A) * h + dt[:, :, t, None] * Bt * u[:, :, t, None]
        out.append(h)
    return torch.stack(out, dim=2)


def patched_states_ref(states, dt, positions, patch_tokens, grid, patch):
    """The patched hidden state by loops over tokens and neighbours, in float64: (b, tokens, dim*N)."""
    states, dt = states.double(), dt.double()
    gh, gw = grid
    r = patch // 2
    b = states.shape[0]
    w = torch.stack([dt[:, :, positions[i]].mean(1) for i in patch_tokens], dim=1)  # (b, tokens)
    w = (w - w.min(1, keepdim=True).values) / (w.max(1, keepdim=True).values - w.min(1, keepdim=True).values)
    out = torch.zeros(b, gh * gw, states.shape[1] * states.shape[3], dtype=torch.float64)
    for y in range(gh):
        for x in range(gw):
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    k = min(max(y + dy, 0), gh - 1) * gw + min(max(x + dx, 0), gw - 1)
                    h = states[:, :, positions[patch_tokens[k]], :].reshape(b, -1)
                    out[:, y * gw + x] += w[:, k, None] * h
    return out


def patch_infonce_ref(features, positives, temperature):
    """The patch-level InfoNCE loss by loops, in float64: mean over images, anchors i and their
    ``positives`` most cosine-similar other tokens p of -log(e^s_ip / (e^s_ip + sum_negatives e^s_in))."""
    f = features.double()
    b, tokens, _ = f.shape
    total, count = 0.0, 0
    for k in range(b):
        for i in range(tokens):
            sims = [float(torch.dot(f[k, i], f[k, j]) / (f[k, i].norm() * f[k, j].norm())) / temperature
                    for j in range(tokens)]
            others = sorted((j for j in range(tokens) if j != i), key=lambda j: -sims[j])
            pos, neg = others[:positives], others[positives:]
            neg_sum = sum(math.exp(sims[j]) for j in neg)
            for p in pos:
                total += -math.log(math.exp(sims[p]) / (math.exp(sims[p]) + neg_sum))
                count += 1
    return total / count


# -- VMamba (VSSM), float64, from an official-layout state dict -----------------------------------
#
# Written from the official computation as described in ../shared/research/archs.md section 2
# (not from vmfx's module): the stacked per-direction weights are used as stacked tensors
# (einsum "b k d l, k c d -> b k c l"), the four directions run as ONE grouped scan over
# (B, K*d, L) with B/C grouped (B, K, N, L), the dt bias is the scan's delta_bias, and the
# cross-merge adds y0 + flip(y2) + untranspose(y1) + untranspose(flip(y3)). Everything runs
# channel-last in float64; the channel-first models compute the same function.


def _ln(x, sd, key, eps=1e-5):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps)


def _w2(w):  # Linear2d files may hold 1x1-conv weights
    return w.flatten(1) if w.dim() == 4 else w


def grouped_scan_ref(u, delta, A, B, C, D, delta_bias):
    """Sequential selective scan: u, delta (b, K*d, L); A (K*d, N); B, C (b, K, N, L) shared by the
    d channels of each group; softplus(delta + delta_bias); y = C.h + D u."""
    b, KD, L = u.shape
    K, N = B.shape[1], A.shape[1]
    delta = torch.nn.functional.softplus(delta + delta_bias[:, None])
    Bx = B.repeat_interleave(KD // K, dim=1)  # (b, K*d, N, L)
    Cx = C.repeat_interleave(KD // K, dim=1)
    h = u.new_zeros(b, KD, N)
    ys = []
    for t in range(L):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * Bx[..., t] * u[:, :, t, None]
        ys.append((h * Cx[..., t]).sum(-1))
    return torch.stack(ys, dim=-1) + D[:, None] * u


def ss2d_ref(x, sd, p, with_z):
    """SS2D on channel-last x (b, H, W, C); ``p`` the key prefix ("...op.")."""
    b, H, W, _ = x.shape
    L = H * W
    xz = x @ _w2(sd[p + "in_proj.weight"]).T
    if with_z:
        xs_, z = xz.chunk(2, dim=-1)
        z = torch.nn.functional.silu(z)
    else:
        xs_, z = xz, None
    d = xs_.shape[-1]
    xc = torch.nn.functional.conv2d(xs_.permute(0, 3, 1, 2), sd[p + "conv2d.weight"], sd.get(p + "conv2d.bias"),
                                    padding=sd[p + "conv2d.weight"].shape[-1] // 2, groups=d)
    xc = torch.nn.functional.silu(xc)  # (b, d, H, W)
    hw = torch.stack([xc.reshape(b, d, L), xc.transpose(2, 3).reshape(b, d, L)], dim=1)
    xs = torch.cat([hw, hw.flip(-1)], dim=1)  # (b, 4, d, L)
    xpw, dtw = sd[p + "x_proj_weight"], sd[p + "dt_projs_weight"]
    K, R = dtw.shape[0], dtw.shape[2]
    N = sd[p + "A_logs"].shape[1]
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, xpw)
    dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, dtw)
    y = grouped_scan_ref(xs.reshape(b, -1, L), dts.reshape(b, -1, L), -torch.exp(sd[p + "A_logs"]), Bs, Cs,
                         sd[p + "Ds"], sd[p + "dt_projs_bias"].reshape(-1)).view(b, K, d, L)
    inv = y[:, 2:4].flip(-1)
    wh = y[:, 1].view(b, d, W, H).transpose(2, 3).reshape(b, d, L)
    invwh = inv[:, 1].view(b, d, W, H).transpose(2, 3).reshape(b, d, L)
    y = (y[:, 0] + inv[:, 0] + wh + invwh).transpose(1, 2)  # (b, L, d)
    y = _ln(y, sd, p + "out_norm").view(b, H, W, d)
    if z is not None:
        y = y * z
    return y @ _w2(sd[p + "out_proj.weight"]).T


def vssm_ref(sd, x, *, depths, forward_type, mlp_ratio, downsample_version, patchembed_version):
    """The VSSM classifier's logits in float64 from an official-layout state dict ``sd``."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    gelu = torch.nn.functional.gelu
    if patchembed_version == "v1":
        w = sd["patch_embed.0.weight"]
        x = torch.nn.functional.conv2d(x, w, sd["patch_embed.0.bias"], stride=w.shape[-1]).permute(0, 2, 3, 1)
        x = _ln(x, sd, "patch_embed.2")
    else:
        x = torch.nn.functional.conv2d(x, sd["patch_embed.0.weight"], sd["patch_embed.0.bias"], stride=2, padding=1)
        x = gelu(_ln(x.permute(0, 2, 3, 1), sd, "patch_embed.2")).permute(0, 3, 1, 2)
        x = torch.nn.functional.conv2d(x, sd["patch_embed.5.weight"], sd["patch_embed.5.bias"], stride=2, padding=1)
        x = _ln(x.permute(0, 2, 3, 1), sd, "patch_embed.7")
    for i, depth in enumerate(depths):
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            x = x + ss2d_ref(_ln(x, sd, p + "norm"), sd, p + "op.", with_z=forward_type == "v0")
            if mlp_ratio > 0:
                h = gelu(_ln(x, sd, p + "norm2") @ _w2(sd[p + "mlp.fc1.weight"]).T + sd[p + "mlp.fc1.bias"])
                x = x + h @ _w2(sd[p + "mlp.fc2.weight"]).T + sd[p + "mlp.fc2.bias"]
        if i < len(depths) - 1:
            q = f"layers.{i}.downsample."
            if downsample_version == "v1":
                Hh, Ww = x.shape[1], x.shape[2]
                x = torch.nn.functional.pad(x, (0, 0, 0, Ww % 2, 0, Hh % 2))
                x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
                x = _ln(x, sd, q + "norm") @ _w2(sd[q + "reduction.weight"]).T
            else:
                w = sd[q + "1.weight"]
                pad = 1 if w.shape[-1] == 3 else 0
                x = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2), w, sd[q + "1.bias"], stride=2, padding=pad)
                x = _ln(x.permute(0, 2, 3, 1), sd, q + "3")
    x = _ln(x, sd, "classifier.norm").mean(dim=(1, 2))
    return x @ sd["classifier.head.weight"].T + sd["classifier.head.bias"]
