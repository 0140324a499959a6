"""OuroMamba-Gen: calibration images synthesized from the model alone (data-free calibration).

:func:`synthesize` starts from Gaussian noise and optimises the images (Adam on the pixels, in
the model's input space) against two losses, as OuroMamba (Ramachandran et al., ICCV 2025) does:

* **a patch-level contrastive loss** (InfoNCE) on the *patched hidden state* of every selected
  scan. For a scan with hidden states ``h[t]`` (``dim x N`` per token ``t``) and time steps
  ``delta[t]`` (after the bias and the softplus), each image token's feature is the
  delta-weighted sum of the states over its ``p x p`` spatial neighbourhood::

      w[s]   = mean_d delta[s, d], min-max normalised over the image's patch tokens
      f[t]   = sum_{s in N_p(t)} w[s] h[s]         (replicate padding at the grid's border)

  (class tokens are left out; tokens are put back in raster order first, so a backward scan's
  features are comparable with a forward scan's). Within each image, the ``k`` (12) tokens most
  similar to token ``i`` (cosine similarity, self excluded) are its positives and all others its
  negatives; with ``s = cos / tau``::

      L_C = mean_{image, i, p in P(i)}  -log( exp(s_ip) / (exp(s_ip) + sum_{n in N(i)} exp(s_in)) )

* **an output loss**: cross-entropy of the logits to a target class per image (classes dealt out
  evenly, in a seeded order), plus two small image priors (total variation and L2, both means
  over pixels).

The total is ``contrastive_weight * L_C + output_weight * CE + tv_weight * TV + l2_weight * L2``.

How the scan's internals are read
---------------------------------
The model is traced with vmfx's tracer and detection (the graph ``vmfx.compile`` quantizes), the
scan nodes are found by their annotation (role ``"scan"``, with their block and token layout),
and the graph is run by an ``fx.Interpreter`` that calls each selected scan with a
:class:`~vmfx.ops.StateRecorder` as its ``state_reader``. The recorded states are read-only, so
they re-enter autograd through :class:`_ScanStates`, whose backward is the adjoint recurrence of
``h[t] = exp(delta[t] A) h[t-1] + delta[t] B[t] u[t]`` (gradients to ``u``, ``delta``, ``B``,
``A`` and the delta bias); the model itself is neither patched nor copied by hand.

Differences from the paper and the released code (``data_gen/`` of georgia-tech-synergy-lab/
ICCV-OuroMamba ships only the patched scan): the optimiser, learning rate, temperature and the
output loss are not released; the choices here are Adam with a cosine-decayed learning rate, tau =
0.2, and cross-entropy plus priors. The released code min-max normalises the delta weights across
the *batch* for every token; here they are normalised within each image, so the images optimised
together do not interact (each image's losses are its own). The paper reports 1000
iterations; the default here is fewer (:data:`DEFAULT_STEPS`) so that 128 images for the proxy model
take minutes on a CPU (``benchmarks/results/synthetic.md``).

Determinism: the noise, the target classes and the optimisation are seeded; the same seed gives
bit-identical images in one process and environment (same torch build and thread count).
"""

from __future__ import annotations

import inspect
import math
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..annotations import annotation
from ..errors import CalibrationDataError, ConfigError
from ..ops.selective_scan import StateRecorder, selective_scan

__all__ = [
    "DEFAULT_STEPS",
    "SynthesisConfig",
    "Synthetic",
    "ScanSite",
    "SynthesisResult",
    "synthesize",
    "synthesize_with_log",
    "scan_sites",
    "capture_patched_states",
    "patched_states",
    "patch_infonce",
    "input_normalization",
    "save_images",
    "is_synthetic",
    "resolve_calibration_data",
]

#: Default optimisation steps per image batch (the paper: 1000 iterations on a GPU).
DEFAULT_STEPS = 30


@dataclass(frozen=True)
class SynthesisConfig:
    """How :func:`synthesize` optimises its images (every field validated on construction).

    Args:
        steps: Adam steps per batch of images.
        lr: Adam's learning rate (cosine-decayed to 0 over ``steps``), in input units.
        batch_size: images optimised together (they do not interact: each image's losses are its own).
        patch: neighbourhood size ``p`` of the patched hidden state (odd; the paper's code: 3).
        positives: positives per token (``k``, the paper: 12).
        temperature: InfoNCE temperature ``tau``.
        contrastive_weight, output_weight, tv_weight, l2_weight: loss weights (see the module docstring).
        blocks: indices of the blocks whose scans enter the contrastive loss, negative ones
            counting from the end (default: the last block; None: all blocks). On the proxy model
            (batch 8, CPU time) a step with every block costs about 4x the model's own forward and
            backward, with one block about 1.5x.
    """

    steps: int = DEFAULT_STEPS
    lr: float = 0.1
    batch_size: int = 32
    patch: int = 3
    positives: int = 12
    temperature: float = 0.2
    contrastive_weight: float = 1.0
    output_weight: float = 1.0
    tv_weight: float = 0.5
    l2_weight: float = 0.01
    blocks: tuple[int, ...] | None = (-1,)

    def __post_init__(self):
        for name in ("steps", "batch_size", "positives"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"SynthesisConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.patch, int) or self.patch < 1 or self.patch % 2 == 0:
            raise ConfigError(f"SynthesisConfig.patch must be a positive odd integer (the neighbourhood is "
                              f"centred on the token), got {self.patch!r}")
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"SynthesisConfig.{name} must be a positive number, got {value!r}")
        for name in ("contrastive_weight", "output_weight", "tv_weight", "l2_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"SynthesisConfig.{name} must be a number >= 0, got {value!r}")
        if self.contrastive_weight == 0 and self.output_weight == 0:
            raise ConfigError("SynthesisConfig: contrastive_weight and output_weight are both 0; the images "
                              "would only follow the priors")
        if self.blocks is not None:
            blocks = tuple(self.blocks)
            if not blocks or any(not isinstance(b, int) or isinstance(b, bool) for b in blocks):
                raise ConfigError(f"SynthesisConfig.blocks must be None (all) or block indices, got {self.blocks!r}")
            object.__setattr__(self, "blocks", blocks)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blocks"] = list(self.blocks) if self.blocks is not None else None
        return d


@dataclass(frozen=True)
class Synthetic:
    """Calibration data to synthesize: pass it (or the string ``"synthetic"``, meaning
    ``Synthetic()``) as ``calib_data`` to :func:`vmfx.compile`.

    Args:
        n: number of images (the paper: 128).
        seed: seed of the noise, the target classes and the optimisation.
        config: a :class:`SynthesisConfig` (steps, learning rate, loss weights, ...).
        save_dir: also write the images as PNGs into this folder (:func:`save_images`).
        workers: batches optimised at once, one thread each (:func:`synthesize`); the images do
            not depend on it.
    """

    n: int = 128
    seed: int = 0
    config: SynthesisConfig = field(default_factory=SynthesisConfig)
    save_dir: str | None = None
    workers: int = 1

    def __post_init__(self):
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise ConfigError(f"Synthetic.n must be a positive number of images, got {self.n!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"Synthetic.seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.config, SynthesisConfig):
            raise ConfigError(f"Synthetic.config must be a SynthesisConfig, got {type(self.config).__name__}")
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 1:
            raise ConfigError(f"Synthetic.workers must be a positive number of threads, got {self.workers!r}")

    def generate(self, model: nn.Module, *, progress: bool = False) -> torch.Tensor:
        images = synthesize(model, self.n, seed=self.seed, config=self.config, progress=progress,
                            workers=self.workers)
        if self.save_dir is not None:
            save_images(images, self.save_dir, normalization=input_normalization(model))
        return images


# --------------------------------------------------------------------------------------------------
# the model: geometry, normalization, the scans in its graph


@dataclass(frozen=True)
class ScanSite:
    """A scan node of the traced graph whose states enter the contrastive loss.

    Attributes:
        node: the node's name.
        block: its block index; direction: its direction label.
        positions: ``positions[i]`` = position in the scan's sequence of canonical token ``i``.
        patch_tokens: canonical indices of the image (patch) tokens, in raster order.
    """

    node: str
    block: int | None
    direction: str | None
    positions: tuple[int, ...]
    patch_tokens: tuple[int, ...]


def _geometry(model: nn.Module, image_size, channels, grid, class_tokens):
    """(channels, (H, W), (gh, gw), class-token positions) of ``model``'s input, from its patch
    embedding (``patch_embed.img_size`` / ``grid_size`` / ``proj``) and ``token_position``, unless given."""
    pe = getattr(model, "patch_embed", None)
    if image_size is None and pe is not None and hasattr(pe, "img_size"):
        image_size = pe.img_size
    if channels is None and pe is not None and isinstance(getattr(pe, "proj", None), nn.Conv2d):
        channels = pe.proj.in_channels
    if grid is None and pe is not None and hasattr(pe, "grid_size"):
        grid = pe.grid_size
    if class_tokens is None:
        pos = getattr(model, "token_position", None)
        class_tokens = () if pos is None else (pos,) if isinstance(pos, int) else tuple(pos)
    missing = [name for name, v in (("image_size", image_size), ("channels", channels), ("grid", grid)) if v is None]
    if missing:
        raise ConfigError(
            f"synthesize: cannot read the input {', '.join(missing)} of a {type(model).__name__} (it has no "
            "Vim-style patch_embed with img_size / grid_size / proj); pass "
            + ", ".join(f"{m}=" for m in missing)
        )
    image_size = (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    grid = (int(grid), int(grid)) if isinstance(grid, int) else tuple(int(s) for s in grid)
    return int(channels), image_size, grid, tuple(int(c) for c in class_tokens)


def input_normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The ``(mean, std)`` the model's inputs were normalised with, from its timm
    ``pretrained_cfg`` / ``default_cfg`` (None when it carries none)."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("mean") is not None and cfg.get("std") is not None:
            return tuple(float(m) for m in cfg["mean"]), tuple(float(s) for s in cfg["std"])
    return None


def _trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """vmfx's traced and annotated graph of ``model`` (what ``vmfx.trace`` returns)."""
    from ..passes.detect import DetectMambaMixersPass
    from ..passes.manager import PassManager
    from ..passes.pipeline import trace_for_quantization

    gm, _ = trace_for_quantization(model, example_inputs=(example,))
    gm = PassManager([DetectMambaMixersPass()])(gm).graph_module
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm.eval()


def scan_sites(gm: fx.GraphModule, grid: tuple[int, int], class_tokens: Sequence[int] = (),
               blocks: Sequence[int] | None = None) -> list[ScanSite]:
    """The annotated scan nodes of ``gm`` (of ``blocks``, or all), with the token permutation from
    their recorded layout. Raises :class:`~vmfx.errors.ConfigError` when the graph has no scan,
    a requested block does not exist, or a scan's layout is unknown or does not fit the grid."""
    scans = [n for n in gm.graph.nodes if annotation(n) is not None and annotation(n).role == "scan"]
    if not scans:
        raise ConfigError("synthesize: the traced model has no selective-scan node that detection recognised; "
                          "OuroMamba-Gen reads the scan's hidden states, so it needs a Mamba model")
    present = sorted({annotation(n).block for n in scans if annotation(n).block is not None})
    if blocks is not None:
        count = (present[-1] + 1) if present else 0
        absent = sorted(b for b in blocks if not -count <= b < count)
        if absent:
            raise ConfigError(f"synthesize: blocks {absent} do not exist; the model has {count} blocks "
                              f"(0..{count - 1}, or -{count}..-1 from the end)")
        blocks = {b % count for b in blocks}
    gh, gw = grid
    sites = []
    for n in scans:
        a = annotation(n)
        if blocks is not None and a.block not in blocks:
            continue
        layout = a.layout
        if layout is None:
            raise ConfigError(f"synthesize: the token layout of scan {n.name} is unknown "
                              f"({gm.meta.get('vmfx_layout_unknown')}); cannot map its states to image positions")
        positions = layout.positions_of_tokens()
        total = len(positions)
        special = sorted(set(class_tokens))
        if total != gh * gw + len(special) or any(not 0 <= c < total for c in special) or -1 in positions:
            raise ConfigError(
                f"synthesize: scan {n.name} holds {total} tokens, which is not the {gh}x{gw} patch grid plus "
                f"the class tokens at {special}; pass grid= and class_tokens= for this model"
            )
        patch_tokens = tuple(i for i in range(total) if i not in special)
        sites.append(ScanSite(n.name, a.block, a.direction, tuple(positions), patch_tokens))
    return sites


# --------------------------------------------------------------------------------------------------
# the hidden states, differentiably


class _ScanStates(torch.autograd.Function):
    """Puts the read-only states a ``StateRecorder`` recorded back into autograd.

    ``forward(h, u, delta, A, B, delta_bias, softplus)`` returns ``h`` (b, dim, L, N) as recorded;
    the backward turns ``dLoss/dh`` into gradients of the scan's inputs through the recurrence
    ``h[t] = exp(dt[t] A) h[t-1] + dt[t] B[t] u[t]`` (``dt`` = softplus(delta + bias) or delta):
    the adjoint ``g[t] = dh[t] + exp(dt[t+1] A) g[t+1]``, then ``du = dt sum_n g B``,
    ``d dt = sum_n g exp(dt A) h[t-1] A + u sum_n g B``, ``dB = sum_d g dt u``,
    ``dA = sum_{b,t} g exp(dt A) h[t-1] dt``, and through the softplus and the bias.
    """

    @staticmethod
    def forward(ctx, h, u, delta, A, B, delta_bias, softplus):
        ctx.save_for_backward(h, u, delta, A, B, delta_bias)
        ctx.softplus = softplus
        return h.view_as(h)

    @staticmethod
    def backward(ctx, dh):
        h, u, delta, A, B, delta_bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        ct = h.dtype
        raw = delta.to(ct) + (delta_bias.to(ct)[:, None] if delta_bias is not None else 0)
        dt = F.softplus(raw) if ctx.softplus else raw  # (b, dim, L)
        Ac = A.to(ct)
        # time-major (L, b, dim, N): one time step is one contiguous slab for the recurrence
        decay = torch.exp(dt.permute(2, 0, 1)[..., None] * Ac)
        g = dh.to(ct).permute(2, 0, 1, 3).contiguous()
        for t in range(g.shape[0] - 2, -1, -1):  # the adjoint recurrence, backwards in time
            g[t].addcmul_(decay[t + 1], g[t + 1])
        hp = h.permute(2, 0, 1, 3)
        q = decay.mul_(g)  # decay is not needed any more: q = g exp(dt A) h[t-1] = dLoss / d(dt A)
        q[1:].mul_(hp[:-1])
        q[0].zero_()
        gB = _bc_contract(g, B.to(ct))  # dLoss / d(dt u), (L, b, dim)
        dt_tm, u_tm = dt.permute(2, 0, 1), u.to(ct).permute(2, 0, 1)
        du = (gB * dt_tm).permute(1, 2, 0).to(u.dtype) if need[1] else None
        ddelta = dbias = None
        if need[2] or need[5]:
            ddt = torch.einsum("lbdn,dn->lbd", q, Ac) + gB * u_tm
            if ctx.softplus:
                ddt = ddt * torch.sigmoid(raw.permute(2, 0, 1))
            ddelta = ddt.permute(1, 2, 0).to(delta.dtype) if need[2] else None
            dbias = ddt.sum((0, 1)).to(delta_bias.dtype) if need[5] and delta_bias is not None else None
        dA = torch.einsum("lbdn,lbd->dn", q, dt_tm).to(A.dtype) if need[3] else None
        dB = _bc_grad(g, dt_tm * u_tm, B).to(B.dtype) if need[4] else None
        return None, du, ddelta, dA, dB, dbias, None


def _bc_contract(g: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``sum_n g[l, b, d, n] B[b, d, l, n]`` for ``B`` in any of the scan's forms -> (L, b, dim)."""
    if B.dim() == 2:  # (dim, N)
        return torch.einsum("lbdn,dn->lbd", g, B)
    if B.dim() == 3:  # (b, N, L)
        return torch.einsum("lbdn,bnl->lbd", g, B)
    L, b, dim, n = g.shape
    groups = B.shape[1]  # (b, G, N, L)
    return torch.einsum("lbgen,bgnl->lbge", g.view(L, b, groups, dim // groups, n), B).reshape(L, b, dim)


def _bc_grad(g: torch.Tensor, x: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``dB = sum_d g[l, b, d, n] x[l, b, d]`` in the shape of ``B``'s form."""
    if B.dim() == 2:
        return torch.einsum("lbdn,lbd->dn", g, x)
    if B.dim() == 3:
        return torch.einsum("lbdn,lbd->bnl", g, x)
    L, b, dim, n = g.shape
    groups = B.shape[1]
    return torch.einsum("lbgen,lbge->bgnl", g.view(L, b, groups, dim // groups, n),
                        x.view(L, b, groups, dim // groups))


_SCAN_SIGNATURE = inspect.signature(selective_scan)


def _padded_grid_index(site: ScanSite, grid: tuple[int, int], r: int) -> torch.Tensor:
    """Scan positions of the (gh + 2r) x (gw + 2r) patch grid in raster order, border cells
    repeating their nearest patch (replicate padding)."""
    gh, gw = grid
    rows = torch.arange(-r, gh + r).clamp(0, gh - 1)
    cols = torch.arange(-r, gw + r).clamp(0, gw - 1)
    cells = (rows[:, None] * gw + cols[None, :]).reshape(-1)
    positions = torch.tensor([site.positions[i] for i in site.patch_tokens])
    return positions[cells]


def _box_sum(x: torch.Tensor, p: int, dims: tuple[int, int]) -> torch.Tensor:
    """Sums over every p x p window (stride 1, no padding) of the two ``dims`` of ``x``."""
    for d in dims:
        size = x.shape[d] - p + 1
        acc = x.narrow(d, 0, size)
        for k in range(1, p):
            acc = acc + x.narrow(d, k, size)
        x = acc
    return x


def patched_states(states: torch.Tensor, dt: torch.Tensor, site: ScanSite, grid: tuple[int, int],
                   patch: int = 3) -> torch.Tensor:
    """The patched hidden state of one scan: (b, tokens, dim * N) features of the image tokens in
    raster order (see the module docstring).

    Args:
        states: (b, dim, L, N) hidden states in the scan's order.
        dt: (b, dim, L) time steps after bias and softplus, in the scan's order.
        site: the scan (its token permutation and patch tokens).
        grid: (gh, gw) of the patch grid.
        patch: neighbourhood size p (odd).
    """
    b, dim, _, n = states.shape
    gh, gw = grid
    r = patch // 2
    index = _padded_grid_index(site, grid, r).to(states.device)
    w = dt.mean(1)  # (b, L): the channel mean of delta, then min-max over the patch tokens
    lo = w.index_select(1, index).amin(1, keepdim=True)  # the padded grid holds every patch token
    hi = w.index_select(1, index).amax(1, keepdim=True)
    w = (w.index_select(1, index) - lo) / (hi - lo).clamp_min(1e-12)  # (b, (gh+2r)(gw+2r))
    x = states.index_select(2, index) * w[:, None, :, None]  # (b, dim, cells, N)
    x = _box_sum(x.view(b, dim, gh + 2 * r, gw + 2 * r, n), patch, (2, 3))  # (b, dim, gh, gw, N)
    return x.permute(0, 2, 3, 1, 4).reshape(b, gh * gw, dim * n)


class _StateTap(fx.Interpreter):
    """Runs the traced graph; at every selected scan node, calls the scan with a
    :class:`StateRecorder` as ``state_reader`` and keeps the patched hidden state (differentiable)."""

    def __init__(self, gm: fx.GraphModule, sites: Sequence[ScanSite], grid, patch: int):
        super().__init__(gm, garbage_collect_values=True)
        self.sites = {s.node: s for s in sites}
        self.grid, self.patch = grid, patch
        self.features: list[torch.Tensor] = []

    def run_node(self, node: fx.Node) -> Any:
        site = self.sites.get(node.name)
        if site is None:
            return super().run_node(node)
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        bound = _SCAN_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        p = bound.arguments
        if p["state_hook"] is not None or p["state_reader"] is not None:
            raise ConfigError(f"synthesize: scan {node.name} already carries a state hook; synthesize from the "
                              "float model, not a quantized graph")
        recorder = StateRecorder()
        out = selective_scan(*args, **{**kwargs, "state_reader": recorder})
        states = _ScanStates.apply(recorder.states, p["u"], p["delta"], p["A"], p["B"], p["delta_bias"],
                                   bool(p["delta_softplus"]))
        raw = p["delta"] + (p["delta_bias"][:, None] if p["delta_bias"] is not None else 0)
        dt = F.softplus(raw) if p["delta_softplus"] else raw
        self.features.append(patched_states(states, dt.to(states.dtype), site, self.grid, self.patch))
        return out


def capture_patched_states(gm: fx.GraphModule, images: torch.Tensor, sites: Sequence[ScanSite],
                           grid: tuple[int, int], patch: int = 3) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``images`` through ``gm``; returns ``(logits, [patched state of each site])``, both
    differentiable with respect to ``images``."""
    tap = _StateTap(gm, sites, grid, patch)
    logits = tap.run(images)
    return logits, tap.features


# --------------------------------------------------------------------------------------------------
# the losses


def patch_infonce(features: torch.Tensor, positives: int = 12, temperature: float = 0.2,
                  per_image: bool = False) -> torch.Tensor:
    """The patch-level InfoNCE loss of (b, tokens, c) features (see the module docstring).

    Positives of token ``i`` are its ``positives`` most cosine-similar other tokens (chosen
    without gradient, ties broken by ``torch.topk``), negatives every other token but ``i``.

    Returns:
        The mean over images, tokens and positives (a scalar), or with ``per_image`` one value per image.
    """
    b, tokens, _ = features.shape
    if tokens < positives + 2:
        raise ConfigError(f"patch_infonce: {tokens} tokens cannot give {positives} positives and at least one "
                          "negative per token; use fewer positives")
    norms = features.norm(dim=-1).clamp_min(1e-12)  # (b, T)
    gram = features @ features.transpose(1, 2)
    logits = gram / (norms[:, :, None] * norms[:, None, :] * temperature)  # cosine / tau, (b, T, T)
    eye = torch.eye(tokens, dtype=torch.bool, device=features.device)
    masked = logits.detach().masked_fill(eye, float("-inf"))
    pos_idx = masked.topk(positives, dim=-1).indices  # (b, T, k)
    negative = ~eye.expand(b, tokens, tokens).clone()
    negative.scatter_(-1, pos_idx, False)
    neg_lse = logits.masked_fill(~negative, float("-inf")).logsumexp(-1, keepdim=True)  # (b, T, 1)
    pos = logits.gather(-1, pos_idx)  # (b, T, k)
    loss = torch.logaddexp(pos, neg_lse) - pos  # -log(e^p / (e^p + sum_n e^n))
    per = loss.mean((1, 2))
    return per if per_image else per.mean()


def _tv(x: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared difference of horizontally and vertically adjacent pixels."""
    return (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean((1, 2, 3)) + (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean((1, 2, 3))


# --------------------------------------------------------------------------------------------------
# synthesis


@dataclass
class SynthesisResult:
    """The images and what their optimisation did.

    Attributes:
        images: (n, C, H, W) float32 images in the model's input space.
        targets: (n,) the target class of every image.
        log: per batch, the losses (means over the batch) at some steps: dicts with ``step``,
            ``contrastive``, ``output``, ``tv``, ``l2``, ``total``.
        sites: the scans whose states entered the contrastive loss.
        config: the :class:`SynthesisConfig` used.
        seconds: wall time.
    """

    images: torch.Tensor
    targets: torch.Tensor
    log: list[list[dict]]
    sites: list[ScanSite]
    config: SynthesisConfig
    seconds: float


def synthesize(model: nn.Module, n: int = 128, *, seed: int = 0, steps: int | None = None,
               config: SynthesisConfig | None = None, progress: bool = True, workers: int = 1,
               **geometry) -> torch.Tensor:
    """Synthesize ``n`` calibration images from ``model`` alone (OuroMamba-Gen; module docstring).

    Args:
        model: a float Vision Mamba (not modified).
        n: number of images.
        seed: seeds the noise, the target classes and the optimisation (same seed, same images).
        steps: optimisation steps (overrides ``config.steps``).
        config: a :class:`SynthesisConfig` (default: ``SynthesisConfig()``).
        progress: show a tqdm progress bar (on stderr) with the current losses.
        workers: batches (``config.batch_size`` images each) optimised at the same time, one
            thread each. The batches are independent, so the images are the same for any number
            of workers. On a CPU, ``torch.set_num_threads(1)`` with one worker per core is an
            alternative to torch's intra-op threads, which divide small ops poorly.
        **geometry: ``image_size``, ``channels``, ``grid`` (patch grid) and ``class_tokens``
            (canonical positions of the class tokens), for models that do not expose them the
            way Vim does (``patch_embed.img_size``, ``patch_embed.grid_size``, ``token_position``).

    Returns:
        (n, C, H, W) float32 images in the model's input space (clamped to the valid pixel range
        when the model records its input normalisation, see :func:`input_normalization`).

    Example::

        images = vmfx.data.synthesize(model, 128, seed=0)
        vmfx.data.save_images(images, "synthetic/", normalization=vmfx.data.input_normalization(model))
        qmodel = vmfx.compile(model, images, config="ptq4vm-w4a4")
    """
    return synthesize_with_log(model, n, seed=seed, steps=steps, config=config, progress=progress, workers=workers,
                               **geometry).images


def synthesize_with_log(model: nn.Module, n: int = 128, *, seed: int = 0, steps: int | None = None,
                        config: SynthesisConfig | None = None, progress: bool = True, log_every: int = 10,
                        workers: int = 1, image_size=None, channels=None, grid=None,
                        class_tokens=None) -> SynthesisResult:
    """:func:`synthesize`, returning a :class:`SynthesisResult` with the loss log."""
    import time

    if not isinstance(model, nn.Module):
        raise ConfigError(f"synthesize needs a torch nn.Module, got {type(model).__name__}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"synthesize: n must be a positive number of images, got {n!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"synthesize: seed must be an integer >= 0, got {seed!r}")
    config = config if config is not None else SynthesisConfig()
    if not isinstance(config, SynthesisConfig):
        raise ConfigError(f"synthesize: config must be a SynthesisConfig, got {type(config).__name__}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(f"synthesize: workers must be a positive number of threads, got {workers!r}")
    if steps is not None:
        config = replace(config, steps=steps)
    start = time.perf_counter()
    c, (height, width), grid, class_tokens = _geometry(model, image_size, channels, grid, class_tokens)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gm = _trace(model, torch.zeros(1, c, height, width, dtype=dtype, device=device))
    sites = scan_sites(gm, grid, class_tokens, config.blocks) if config.contrastive_weight > 0 else []
    tokens = grid[0] * grid[1]
    if sites and tokens < config.positives + 2:
        raise ConfigError(f"synthesize: the {grid[0]}x{grid[1]} patch grid has too few tokens for "
                          f"{config.positives} positives; lower SynthesisConfig.positives")
    norm = input_normalization(model)
    bounds = None
    if norm is not None:
        mean = torch.tensor(norm[0], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(norm[1], dtype=torch.float32).view(1, -1, 1, 1)
        bounds = ((0 - mean) / std, (1 - mean) / std)

    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, c, height, width, generator=gen)
    with torch.no_grad():
        classes = int(gm(torch.zeros(1, c, height, width, dtype=dtype, device=device)).shape[-1])
    targets = (torch.arange(n) % classes)[torch.randperm(n, generator=gen)]

    batches = [(i, min(n, i + config.batch_size)) for i in range(0, n, config.batch_size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches) * config.steps, desc=f"synthesizing {n} images", unit="step", file=sys.stderr)
    def optimise(b0: int, b1: int) -> tuple[torch.Tensor, list[dict]]:
        """Optimise images ``b0:b1`` (independent of every other batch: same result in any order)."""
        x = noise[b0:b1].clone()
        if bounds is not None:
            x = torch.maximum(torch.minimum(x, bounds[1]), bounds[0])
        x = x.to(device=device, dtype=dtype).requires_grad_(True)
        y = targets[b0:b1].to(device)
        opt = torch.optim.Adam([x], lr=config.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps)
        entries = []
        for step in range(config.steps):
            opt.zero_grad(set_to_none=True)
            logits, features = capture_patched_states(gm, x, sites, grid, config.patch)
            parts = {
                "contrastive": (torch.stack([patch_infonce(f, config.positives, config.temperature, per_image=True)
                                             for f in features]).mean(0) if features else logits.new_zeros(len(x))),
                "output": F.cross_entropy(logits.float(), y, reduction="none"),
                "tv": _tv(x.float()),
                "l2": x.float().pow(2).mean((1, 2, 3)),
            }
            weights = {"contrastive": config.contrastive_weight, "output": config.output_weight,
                       "tv": config.tv_weight, "l2": config.l2_weight}
            per_image = sum(weights[k] * v for k, v in parts.items())
            per_image.sum().backward()  # images are independent: the sum keeps each one's gradient its own
            opt.step()
            sched.step()
            if bounds is not None:
                with torch.no_grad():
                    x.copy_(torch.maximum(torch.minimum(x, bounds[1].to(x)), bounds[0].to(x)))
            if step % log_every == 0 or step == config.steps - 1:
                entry = {"step": step, **{k: float(v.detach().mean()) for k, v in parts.items()},
                         "total": float(per_image.detach().mean())}
                entries.append(entry)
                if bar is not None:
                    bar.set_postfix(contrastive=f"{entry['contrastive']:.3f}", output=f"{entry['output']:.3f}")
            if bar is not None:
                bar.update(1)
        return x.detach().float().cpu(), entries

    try:
        if workers == 1 or len(batches) == 1:
            results = [optimise(b0, b1) for b0, b1 in batches]
        else:
            # batches are independent and each one's ops run in its own thread (torch releases the GIL
            # in its kernels; CPU autograd runs backward on the calling thread): same images as in turn
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(workers, len(batches))) as pool:
                results = list(pool.map(lambda b: optimise(*b), batches))
    finally:
        if bar is not None:
            bar.close()
    out = [images for images, _ in results]
    log = [entries for _, entries in results]
    images = torch.cat(out)
    if not bool(torch.isfinite(images).all()):
        raise CalibrationDataError("synthesize: the optimisation diverged (non-finite pixels); lower "
                                   "SynthesisConfig.lr")
    return SynthesisResult(images, targets, log, sites, config, time.perf_counter() - start)


# --------------------------------------------------------------------------------------------------
# looking at them


def save_images(images: torch.Tensor, folder: str, *, normalization=None, prefix: str = "synthetic",
                grid: bool = True) -> list[str]:
    """Write (n, C, H, W) images as PNGs into ``folder`` (created): ``<prefix>_0000.png``, ... and,
    with ``grid``, one ``<prefix>_grid.png`` holding them all.

    Pixels are ``x * std + mean`` clipped to [0, 1] with ``normalization=(mean, std)`` (e.g.
    :func:`input_normalization` of the model); without it each image is min-max scaled to [0, 1].
    Returns the paths written.
    """
    from PIL import Image

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ConfigError("save_images takes a (n, C, H, W) tensor with 1 or 3 channels, got "
                          f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"save_images: {folder!r} is a file; give a folder to write the PNGs into")
    os.makedirs(folder, exist_ok=True)
    x = images.detach().float().cpu()
    if normalization is not None:
        mean = torch.tensor(normalization[0]).view(1, -1, 1, 1)
        std = torch.tensor(normalization[1]).view(1, -1, 1, 1)
        x = (x * std + mean).clamp(0, 1)
    else:
        lo = x.amin((1, 2, 3), keepdim=True)
        hi = x.amax((1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-12)
    pixels = (x * 255).round().to(torch.uint8)
    paths = []

    def write(arr: torch.Tensor, path: str) -> None:
        a = arr.permute(1, 2, 0).numpy()
        Image.fromarray(a[..., 0] if a.shape[2] == 1 else a).save(path)
        paths.append(path)

    for i, img in enumerate(pixels):
        write(img, os.path.join(folder, f"{prefix}_{i:04d}.png"))
    if grid:
        cols = math.ceil(math.sqrt(len(pixels)))
        rows = math.ceil(len(pixels) / cols)
        c, h, w = pixels.shape[1:]
        sheet = torch.zeros(c, rows * (h + 1), cols * (w + 1), dtype=torch.uint8)
        for i, img in enumerate(pixels):
            r, q = divmod(i, cols)
            sheet[:, r * (h + 1): r * (h + 1) + h, q * (w + 1): q * (w + 1) + w] = img
        write(sheet, os.path.join(folder, f"{prefix}_grid.png"))
    return paths


# --------------------------------------------------------------------------------------------------
# calibration data by name


def is_synthetic(calib_data: Any) -> bool:
    """Whether ``calib_data`` asks for synthetic images (``"synthetic"`` or a :class:`Synthetic`)."""
    return isinstance(calib_data, Synthetic) or (isinstance(calib_data, str) and calib_data == "synthetic")


def resolve_calibration_data(model: nn.Module, calib_data: Any, *, progress: bool = False) -> Any:
    """What :func:`vmfx.compile` calibrates on: ``"synthetic"`` / a :class:`Synthetic` become
    images synthesized from ``model``; any other string is refused (a typo, or a path that should
    have been loaded); everything else is returned unchanged."""
    if isinstance(calib_data, str):
        if calib_data != "synthetic":
            raise CalibrationDataError(
                f"calib_data {calib_data!r}: the only calibration data named by a string is 'synthetic' "
                "(images generated from the model, OuroMamba-Gen); give images as a tensor (N, C, H, W) or "
                "an iterable of batches, e.g. vmfx.data.image_folder(path) in a DataLoader"
            )
        calib_data = Synthetic()
    if isinstance(calib_data, Synthetic):
        return calib_data.generate(model, progress=progress)
    return calib_data
