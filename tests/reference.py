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
