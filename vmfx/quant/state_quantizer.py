"""The quantized hidden state of the selective scan (Shi et al., k-scaled PTQ for Vision Mamba).

Three pieces, used by :mod:`vmfx.passes.scan_state_passes` and the lowering:

* :class:`ScanStateQuant`: the module a scan node reads through its ``state_quant=`` keyword
  (:func:`vmfx.ops.selective_scan`): the reparameterization factors ``r_C`` (dim,), ``r_L`` (L,),
  ``r_D`` (N,) and the static per-step step sizes ``scales`` (L,) of the state, with the bit width.
* :func:`reparameterization_factors`: the factors from calibration statistics of ``|h|``
  averaged over the batch, a (channel, token, state) tensor: each axis's representative vector is
  the mean over the other two axes; its exponent is that vector's standard deviation divided by
  the sum of the three standard deviations; ``r = rep ** exponent`` (the official code's defaults:
  "mean", "std", "normalized", "original"). ``r_C ⊗ r_L ⊗ r_D`` is then a rank-1 model of the
  magnitude of ``h``, and the reparameterized state ``h / (r_C r_L r_D)`` is flatter.
* :func:`search_state_scales`: the per-step scales, chosen step by step: at step ``t`` the state
  ``h[t] = exp(delta A) Q(h[t-1]) + delta B u`` (the previous steps already quantized with their
  chosen scales) is quantized with each candidate ``c * max|h[t]| / qmax``, ``c`` in
  ``linspace(lo, hi, candidates)``, and the candidate whose ``y[t] = sum_n Q(h[t]) C[t]`` has the
  best cosine similarity (over channels, averaged over the batch) with the float scan's ``y[t]``
  is kept; with ``lookahead`` k, the cosines of ``y[t+1] .. y[t+k]`` (the candidate's state carried
  on in float) are averaged in. (Greedy: on random scans it is sometimes worse than max-based
  per-step scales for the whole output at 4 bits; at 8 bits both are within 1e-4 in cosine.)

Invariants: a :class:`ScanStateQuant` without factors (``reparameterized=False``) leaves the
scan's float computation unchanged; with factors, the float scan computes the same output up to
rounding (property-tested); scales are positive and finite once searched.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..ops.selective_scan import reparameterize
from .registry import register_module_kind

__all__ = ["ScanStateQuant", "reparameterization_factors", "search_state_scales", "scan_state_of",
           "STATE_QUANT_KWARG"]

#: The keyword of a scan node that carries its :class:`ScanStateQuant` (a ``get_attr`` node).
STATE_QUANT_KWARG = "state_quant"


class ScanStateQuant(nn.Module):
    """Reparameterization factors and per-step state step sizes of one selective scan.

    Args:
        dim, length, n: the scan's channels, time steps and state size.
        bits: bit width of the symmetric per-step state quantization (2..16).
        reparameterized: hold factors ``r_C``, ``r_L``, ``r_D`` (ones until calibrated).
        quantize: quantize the state (per-step ``scales``, ones until searched); False keeps
            only the reparameterization (a float scan computing the same output).
    """

    def __init__(self, dim: int, length: int, n: int, bits: int = 8, reparameterized: bool = True,
                 quantize: bool = True):
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
            raise ValueError(f"ScanStateQuant.bits must be an integer in 2..16, got {bits!r}")
        self.dim, self.length, self.n = int(dim), int(length), int(n)
        self.bits = bits
        self.reparameterized = bool(reparameterized)
        self.quantize = bool(quantize)
        if self.reparameterized:
            self.register_buffer("r_C", torch.ones(self.dim))
            self.register_buffer("r_L", torch.ones(self.length))
            self.register_buffer("r_D", torch.ones(self.n))
        if self.quantize:
            self.register_buffer("scales", torch.ones(self.length))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def factors(self):
        """``(r_C, r_L, r_D)``, or None without reparameterization."""
        return (self.r_C, self.r_L, self.r_D) if self.reparameterized else None

    def state_scales(self):
        """The (L,) per-step step sizes, or None when the state stays float."""
        return self.scales if self.quantize else None

    def describe(self) -> str:
        """Short text for tables: ``h int8 sym per-step +reparam``."""
        what = f"h int{self.bits} sym per-step" if self.quantize else "h float"
        return what + (" +reparam" if self.reparameterized else "")

    def to_dict(self) -> dict:
        """The structure (not the tensors), for :mod:`vmfx.serialize`."""
        return {"dim": self.dim, "length": self.length, "n": self.n, "bits": self.bits,
                "reparameterized": self.reparameterized, "quantize": self.quantize}

    @classmethod
    def from_dict(cls, d: dict) -> "ScanStateQuant":
        return cls(int(d["dim"]), int(d["length"]), int(d["n"]), int(d["bits"]),
                   bool(d["reparameterized"]), bool(d["quantize"]))

    def forward(self):  # a holder read by the scan op, never called
        raise RuntimeError("ScanStateQuant is read by selective_scan(state_quant=...), not called")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, length={self.length}, n={self.n}, {self.describe()}"


def scan_state_of(node: fx.Node) -> ScanStateQuant | None:
    """The :class:`ScanStateQuant` a scan node reads (its ``state_quant=`` keyword), or None."""
    ref = node.kwargs.get(STATE_QUANT_KWARG)
    if not isinstance(ref, fx.Node) or ref.op != "get_attr":
        return None
    module = node.graph.owning_module.get_submodule(ref.target)
    return module if isinstance(module, ScanStateQuant) else None


def reparameterization_factors(abs_h: torch.Tensor, eps: float = 1e-8):
    """``(r_C, r_L, r_D)`` from ``|h|`` averaged over the batch, shaped (channel, token, state).

    Representatives: the mean over the other two axes (clamped to ``eps`` times the largest, so a
    dead channel gets a tiny, finite factor); exponents: each representative's standard deviation
    over the sum of the three (all zero: every factor is 1).
    """
    if abs_h.dim() != 3:
        raise ValueError(f"reparameterization_factors expects (channel, token, state) statistics, got {tuple(abs_h.shape)}")
    m = abs_h.detach().double()
    reps = [m.mean((1, 2)), m.mean((0, 2)), m.mean((0, 1))]
    top = max(float(r.max()) for r in reps)
    if not top > 0:
        return tuple(torch.ones(s, dtype=abs_h.dtype) for s in m.shape)
    reps = [r.clamp_min(top * eps) for r in reps]
    spreads = [float(r.std()) if r.numel() > 1 else 0.0 for r in reps]
    total = sum(spreads)
    powers = [s / total if total > 0 else 0.0 for s in spreads]
    return tuple((r ** p).to(abs_h.dtype) for r, p in zip(reps, powers))


def _per_channel(M: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C, (batch, N, L) or (batch, G, N, L), as (batch, dim or 1, N, L)."""
    if M.dim() == 3:
        return M.unsqueeze(1)
    return M.repeat_interleave(dim // M.shape[1], dim=1)


def _step_E(delta, A, step, t):
    E = torch.exp(delta[:, :, t, None] * A)
    return E.mul_(step[t]) if step is not None else E


def _step_x(delta, u, Bc, t):
    return (delta[:, :, t] * u[:, :, t])[..., None] * Bc[..., t]


def _score_candidates(h, grid, base, ahead, y_fs, t, delta, A, step, u, Bc, Cc, out_w, qmax, per, exhaustive):
    """{grid index: mean cosine of y over the scored steps} for the candidates scored."""
    scores: dict[int, float] = {}

    def score(indices):
        indices = [i for i in indices if i not in scores]
        for c0 in range(0, len(indices), per):
            idx = indices[c0 : c0 + per]
            cand = (grid[idx] * base).view(-1, 1, 1, 1)
            hq = (h.unsqueeze(0) / cand).round_().clamp_(-qmax, qmax).mul_(cand)
            sim = 0
            for k, y_f in zip(ahead, y_fs):
                if k > t:
                    hq = _step_E(delta, A, step, k) * hq + _step_x(delta, u, Bc, k)
                y = _weighted((hq * Cc[..., k].unsqueeze(0)).sum(-1), out_w)
                sim = sim + F.cosine_similarity(y, y_f.unsqueeze(0).expand_as(y), dim=-1).mean(-1)
            for i, v in zip(idx, (sim / len(y_fs)).tolist()):
                scores[i] = v

    n = grid.numel()
    if exhaustive or n <= 16:
        score(range(n))
        return scores
    stride = math.ceil(math.sqrt(n))
    score(list(range(0, n, stride)) + [n - 1])
    best = max(scores, key=lambda i: (scores[i], -i))
    score(range(max(0, best - stride + 1), min(n, best + stride)))
    return scores


def _weighted(y, w):
    return y * w if w is not None else y


@torch.no_grad()
def search_state_scales(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *,
                        factors=None, bits: int = 8, candidates: int = 101, lo: float = 0.01,
                        hi: float = 1.2, lookahead: int = 0, exhaustive: bool = False,
                        chunk_elements: int = 2**20) -> torch.Tensor:
    """Per-step state step sizes of one scan, searched step by step (see the module docstring).

    Args:
        u, delta, A, B, C, D, z, delta_bias, delta_softplus: the scan's calibration inputs, as
            :func:`vmfx.ops.selective_scan` takes them (B, C time-varying). ``D`` and ``z`` do
            not change the state and are ignored.
        factors: ``(r_C, r_L, r_D)`` of a reparameterized scan (its state is searched), or None.
        bits: state bit width.
        candidates, lo, hi: the candidate grid, ``linspace(lo, hi, candidates)`` times
            ``max|h[t]| / qmax``.
        lookahead: also score ``y[t+1] .. y[t+lookahead]``, computed from the candidate's
            quantized ``h[t]`` carried forward in float (the error a clipped state leaves in later
            steps); the score is the mean cosine over the ``1 + lookahead`` steps.
        exhaustive: score every candidate of the grid; otherwise coarse to fine on the same grid:
            every ``ceil(sqrt(candidates))``-th candidate, then the ones within that stride of the
            best (about ``3 sqrt(candidates)`` scored: 29 of 101), which finds the grid's best
            wherever the score is unimodal at that resolution.
        chunk_elements: bound on the (candidates x batch x dim x N) work tensor. 2^20 (4 MB in
            float32) keeps it near the cache: 101 candidates on a random (32, 192, 8, 197) scan took
            4.3 CPU-s against 8.7 with 2^24, the same scales (one torch thread).

    Returns:
        (L,) float32 scales.
    """
    del D, z
    ct = torch.float32 if u.dtype != torch.float64 else torch.float64
    u, delta, A, B, C = (t.detach().to(ct) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.detach().to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    step = r_C = None
    if factors is not None:
        u, B, C, step, r_C = reparameterize(u, B, C, *(f.detach().to(ct) for f in factors))
    batch, dim, length = u.shape
    Bc, Cc = _per_channel(B, dim), _per_channel(C, dim)
    qmax = 2 ** (bits - 1) - 1
    grid = torch.linspace(lo, hi, candidates, dtype=ct)
    per = max(1, chunk_elements // max(1, batch * dim * A.shape[1]))
    out_w = r_C[None, :] if r_C is not None else None  # y = r_C y'
    h_f = torch.zeros(batch, dim, A.shape[1], dtype=ct)
    h_q = torch.zeros_like(h_f)
    scales = torch.empty(length, dtype=ct)
    for t in range(length):
        E = _step_E(delta, A, step, t)
        x = _step_x(delta, u, Bc, t)
        h_f = E * h_f + x
        h = E * h_q + x
        base = float(h.abs().max()) / qmax
        if not base > 0:
            scales[t] = 1.0
            h_q = h
            continue
        # the float ys of steps t .. t+lookahead (the float state carried on)
        ahead = range(t, min(length, t + 1 + lookahead))
        y_fs, hf = [], h_f
        for k in ahead:
            if k > t:
                hf = _step_E(delta, A, step, k) * hf + _step_x(delta, u, Bc, k)
            y_fs.append(_weighted((hf * Cc[..., k]).sum(-1), out_w))
        scores = _score_candidates(h, grid, base, ahead, y_fs, t, delta, A, step, u, Bc, Cc, out_w, qmax, per,
                                   exhaustive)
        k = max(scores, key=lambda i: (scores[i], -i))
        best_s = float(grid[k] * base)
        scales[t] = best_s
        # the chosen step size, as the scan op applies it (a Python number of the compute dtype)
        s = float(scales[t])
        h_q = h.div(s).round_().clamp_(-qmax, qmax).mul_(s)
    return scales.float()


register_module_kind(ScanStateQuant)
