"""The canonical Mamba mixer: one graph vocabulary for every Vision Mamba.

``MambaMixer`` holds the parameters of the upstream ``mamba_ssm`` ``Mamba`` block under the same
names (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``) and, with
``bimamba_type="v2"``, the separate backward-scan set of the official Vim mixer (``A_b_log``,
``D_b``, ``conv1d_b``, ``x_proj_b``, ``dt_proj_b``), so official checkpoints load without renaming.

Its forward is written so that tracing it gives the graph every vmfx pass expects::

    xz = in_proj(h)                          # (B, L, 2E), token-major
    x, z = xz[..., :E], xz[..., E:]
    per direction (the backward one sees x.flip(1), z.flip(1)):
        xc    = silu(conv1d(x^T)[..., :L])   # causal depthwise conv, (B, E, L)
        x_dbl = x_proj(xc^T)                 # (B, L, R + 2N)
        delta = dt_proj(x_dbl[..., :R])      # bias included
        y     = selective_scan(xc, delta^T, -exp(A_log), B^T, C^T, D, delta_softplus=True)
        y     = y * silu(z^T)                # the gate
    out = y_f + flip(y_b)  [/ 2]
    out_proj(out^T)

This is the math of the official fast path (``mamba_inner_fn_no_out_proj`` twice for Vim), with
``dt_proj``'s bias applied by the linear instead of inside the scan (``softplus(W dt + b)`` either
way; the softplus stays inside the scan op, as in mamba-ssm's kernel) and the SiLU(z) gate outside
the scan op, so that it is a visible, quantizable graph node.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.selective_scan import selective_scan

__all__ = ["MambaMixer"]


class MambaMixer(nn.Module):
    """Mamba (v1) selective-state-space mixer, uni- or bidirectional.

    Args:
        d_model: model width D.
        d_state: SSM state size N.
        d_conv: causal conv1d kernel size.
        expand: E = expand * D is the inner width.
        dt_rank: R, the rank of the dt projection; "auto" is ceil(D / 16).
        dt_min, dt_max, dt_init, dt_scale, dt_init_floor: Mamba's initialisation of dt_proj.
        conv_bias: whether conv1d has a bias.
        bias: whether in_proj and out_proj have biases.
        bimamba_type: "none" (one forward scan, upstream Mamba) or "v2" (Vim: a second, fully
            separate parameter set scanning the reversed sequence).
        if_divide_out: divide the sum of both directions by 2 (Vim's ``div2``).
        init_layer_scale: if given, a learnable per-channel output scale ``gamma``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank="auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        bimamba_type: str = "none",
        if_divide_out: bool = False,
        init_layer_scale=None,
        layer_idx=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if bimamba_type not in ("none", "v2"):
            raise ValueError(
                f"bimamba_type={bimamba_type!r} is not supported: use 'none' (upstream Mamba) or "
                "'v2' (Vim; every released Vim checkpoint uses v2)"
            )
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.bimamba_type = bimamba_type
        self.if_divide_out = if_divide_out
        self.layer_idx = layer_idx
        self.init_layer_scale = init_layer_scale
        if init_layer_scale is not None:
            self.gamma = nn.Parameter(init_layer_scale * torch.ones(d_model, **factory))

        # Creation order follows the official module so that state_dict keys come out in its order.
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory)
        self.conv1d = self._make_conv(conv_bias, factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = self._make_dt_proj(dt_init, dt_scale, dt_min, dt_max, dt_init_floor, factory)
        self.A_log = nn.Parameter(self._s4d_real_A_log(device))
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        if bimamba_type == "v2":
            self.A_b_log = nn.Parameter(self._s4d_real_A_log(device))
            self.conv1d_b = self._make_conv(conv_bias, factory)
            self.x_proj_b = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
            # The official Vim mixer gives the backward dt_proj torch's default Linear init (no
            # Mamba dt init), and VisionMamba's init then zeroes its bias; kept as is.
            self.dt_proj_b = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
            self.D_b = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        for p in (self.A_log, self.D) + ((self.A_b_log, self.D_b) if bimamba_type == "v2" else ()):
            p._no_weight_decay = True

    # -- construction helpers (Mamba's initialisation) -------------------------------------------

    def _make_conv(self, conv_bias: bool, factory: dict) -> nn.Conv1d:
        return nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=self.d_conv, groups=self.d_inner,
            padding=self.d_conv - 1, bias=conv_bias, **factory,
        )

    def _make_dt_proj(self, dt_init, dt_scale, dt_min, dt_max, dt_init_floor, factory) -> nn.Linear:
        dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(dt_proj.weight, -std, std)
        else:
            raise ValueError(f"dt_init={dt_init!r}: use 'random' or 'constant'")
        # Bias such that softplus(bias) is log-uniform in [dt_min, dt_max].
        dt = torch.exp(
            torch.rand(self.d_inner, device=factory["device"]) * (math.log(dt_max) - math.log(dt_min))
            + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        with torch.no_grad():
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        dt_proj.bias._no_reinit = True
        return dt_proj

    def _s4d_real_A_log(self, device) -> torch.Tensor:
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=device)
        return torch.log(A).repeat(self.d_inner, 1).contiguous()  # (E, N), kept in fp32

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, inference_params=None) -> torch.Tensor:
        """(B, L, D) -> (B, L, D). ``inference_params`` (step-wise decoding) is not supported."""
        if inference_params is not None:
            raise NotImplementedError(
                "vmfx's MambaMixer runs whole sequences only; step-wise decoding "
                "(inference_params) is not supported"
            )
        E = self.d_inner
        xz = self.in_proj(hidden_states)
        x = xz[..., :E]
        z = xz[..., E:]
        out = self._direction(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        if self.bimamba_type == "v2":
            out_b = self._direction(
                x.flip(1), z.flip(1), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b
            )
            out = out + out_b.flip(1)
            if self.if_divide_out:
                out = out / 2
        out = self.out_proj(out)
        if self.init_layer_scale is not None:
            out = out * self.gamma
        return out

    def _direction(self, x, z, conv1d, x_proj, dt_proj, A_log, D):
        """One scan direction on token-major x, z of shape (B, L, E); returns (B, L, E)."""
        R, N = self.dt_rank, self.d_state
        xc = conv1d(x.transpose(1, 2))  # (B, E, L + d_conv - 1)
        if self.d_conv > 1:
            xc = xc[..., : 1 - self.d_conv]  # causal: keep the first L outputs
        xc = F.silu(xc)
        x_dbl = x_proj(xc.transpose(1, 2))  # (B, L, R + 2N)
        delta = dt_proj(x_dbl[..., :R])  # (B, L, E), before the softplus
        B = x_dbl[..., R : R + N]
        C = x_dbl[..., R + N :]
        A = -torch.exp(A_log.float())
        y = selective_scan(
            xc, delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D.float(), delta_softplus=True
        )
        y = y * F.silu(z.transpose(1, 2))
        return y.transpose(1, 2)
