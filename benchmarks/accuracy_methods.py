"""What ``benchmarks/accuracy.py`` measures: each method's preset, its description, the scan-state
quantization it adds, and the pairs of methods the report compares.

Three plain tables, one entry a line, so that a new method is one line in :data:`METHODS` (plus, if
its preset quantizes the selective scan's hidden state, one line in :data:`METHOD_SCAN_STATE`, and
any pair it should be read against in :data:`PAIRS`). The order of :data:`METHODS` is the order of
the tables' rows, of the "Methods" list and of ``--methods``'s default.
"""

from __future__ import annotations

import os
import sys

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPOSITORY not in sys.path:  # vmfx, for a script run as ``python benchmarks/<name>.py``
    sys.path.insert(0, REPOSITORY)

from vmfx.config import BIT_SETTINGS, ScanStateConfig  # noqa: E402

#: method name in the tables -> (preset prefix, one-line description). The preset of a method at
#: bits ``wXaY`` is ``<prefix>-wXaY``.
METHODS: dict[str, tuple[str, str]] = {
    "minmax": ("minmax", "static min-max; per-channel symmetric weights, per-tensor asymmetric activations"),
    "smoothquant": ("smoothquant", "SmoothQuant (alpha 0.5) then static min-max, per-tensor activations"),
    "pts": ("pts", "PTQ4VM ablation: per-token static activations, Lp (p=2.4) grid-search init, no smoothing"),
    "pts-smooth": ("pts-smooth", "PTQ4VM ablation: per-token static + SmoothQuant (alpha 0.5) + Lp init, no JLSS"),
    "ptq4vm": ("ptq4vm", "PTQ4VM: PTS + smoothing + JLSS (100 steps/block, lr 5e-4/5e-4/1e-2), every linear learns"),
    "ptq4vm-official": ("ptq4vm-official", "PTQ4VM as the official code runs JLSS: only in_proj/out_proj learn; "
                        "x_proj/dt_proj keep their initial step sizes and smoothing factors and stay quantized"),
    "ouromamba": ("ouromamba", "OuroMamba-Quant: per-token static inliers + dynamic outlier channels "
                  "(mean+3sd, delta mean+4sd asymmetric; reset every 10 tokens) at 2x the activation bits "
                  "(W4A4O8, W4A8O16), Lp weights, block-wise step-size learning (100 steps/block, AdamW 5e-4)"),
    "pts-ssm": ("pts", "pts plus the scan's hidden state quantized to 8 bits, static per-step scales searched step by "
                "step (cosine of y; 101-point grid 0.01-1.2x max searched coarse to fine; the first 16 calibration "
                "images), on the reparameterized state (r_C, r_L, r_D)"),
    "pts-ssm-norep": ("pts", "pts-ssm without the reparameterization: per-step 8-bit scales on the raw state"),
    "pts-ssm-h4": ("pts", "pts-ssm with a 4-bit hidden state"),
    "pts-ssm-h4-norep": ("pts", "pts-ssm-norep with a 4-bit hidden state"),
    "kscaled": ("kscaled", "k-scaled ViM PTQ (Shi et al.) on linear/conv outputs, the paper's Table I setting: "
                "k-means (k=4) token-wise clusters with power-of-two ratios at out_proj and scan outputs, "
                "channel-wise clusters at conv1d (pow2) / SiLU outputs, per-tensor at norm/in_proj/x_proj/dt_proj "
                "outputs; per-tensor symmetric weights; cosine-similarity search (3 rounds, 101 candidates "
                "0.01x..1.2x, on the first 8 calibration images); linear inputs, conv1d weights and the "
                "hidden state stay float"),
    "kscaled-ssm": ("kscaled", "kscaled plus the scan's hidden state quantized to 8 bits (static per-step scales "
                    "searched step by step on the first 16 calibration images) on the reparameterized state "
                    "(r_C, r_L, r_D): the paper's full setting"),
    "kscaled-ssm-norep": ("kscaled", "kscaled-ssm without the reparameterization: per-step 8-bit scales on the raw state"),
    "ptq4vm-ssm": ("ptq4vm", "a combination: PTQ4VM (PTS + smoothing + JLSS) on the linears, then the reparameterized "
                   "scan with its hidden state quantized to 8 bits as in kscaled-ssm"),
    "ouromamba-official": ("ouromamba-official", "OuroMamba-Quant as the official code quantizes: also A, B, C, D "
                           "and delta as scan operands shared per mixer, batch-wide outlier trigger, W4A8O16 "
                           "outliers in float, 10 steps/block of in_proj/out_proj learning without STE "
                           "(w4a4 and w4a8 only)"),
    "kscaled-official": ("kscaled-official", "k-scaled ViM PTQ on the tensors the official code quantizes "
                         "(README: k-scaled ViM PTQ): kscaled's outputs plus the patch embedding, norms, conv1d "
                         "weights, act_z, the softplus, the head and the 8-bit reparameterized state; official "
                         "integer range, k-means on mean |x|, search on every calibration image, bias correction"),
    "rotate": ("rotate", "MambaQuant's KLT-enhanced rotation of the residual stream (KLT eigenvectors times a Hadamard) "
               "folded into the weights, then PTS (per-token static, Lp init), no learning"),
    "rotate-hadamard": ("rotate-hadamard", "rotate with QuaRot's randomized Hadamard (seed 0) in place of the KLT"),
    "ptq4vm-rotate": ("ptq4vm-rotate", "the KLT-enhanced rotation, then PTQ4VM (PTS + smoothing + JLSS)"),
    "ptq4vm-rotate-hadamard": ("ptq4vm-rotate-hadamard", "the randomized Hadamard rotation, then PTQ4VM"),
    "rotate-online": ("rotate-online", "rotate plus an online Hadamard on out_proj's input (FWHT at run time, "
                      "its transpose folded into out_proj), then PTS, no learning"),
    "ptq4vm-rotate-online": ("ptq4vm-rotate-online", "the KLT-enhanced rotation and the online Hadamard on out_proj's "
                             "input, then PTQ4VM (PTS + smoothing + JLSS)"),
    "rotate-smooth-online": ("rotate-smooth-online", "rotate-online plus MambaQuant's smooth-fused gate before the "
                             "online Hadamard (SmoothQuant factors, alpha 0.5, of out_proj's input absorbed into "
                             "in_proj's gate rows, a Smooth-SiLU gate and out_proj), then PTS, no learning"),
}

#: method name -> the ScanStateConfig its preset is run with (``QuantConfig.scan_state``); methods
#: absent here run their preset as it is.
METHOD_SCAN_STATE: dict[str, ScanStateConfig] = {
    "pts-ssm": ScanStateConfig(bits=8, reparameterize=True, search_samples=16),
    "pts-ssm-norep": ScanStateConfig(bits=8, reparameterize=False, search_samples=16),
    "pts-ssm-h4": ScanStateConfig(bits=4, reparameterize=True, search_samples=16),
    "pts-ssm-h4-norep": ScanStateConfig(bits=4, reparameterize=False, search_samples=16),
    "kscaled-ssm": ScanStateConfig(bits=8, reparameterize=True, search_samples=16),
    "kscaled-ssm-norep": ScanStateConfig(bits=8, reparameterize=False, search_samples=16),
    "ptq4vm-ssm": ScanStateConfig(bits=8, reparameterize=True, search_samples=16),
}

#: Pairs of methods (a, b) whose difference a - b the report tabulates, besides each method against
#: minmax; in the order of the "Other pairs" table.
PAIRS: tuple[tuple[str, str], ...] = (
    ("smoothquant", "pts"),
    ("pts-smooth", "smoothquant"),
    ("pts-smooth", "pts"),
    ("ptq4vm", "pts-smooth"),
    ("ptq4vm", "ptq4vm-official"),
    ("pts-ssm", "pts"),
    ("pts-ssm-norep", "pts"),
    ("pts-ssm", "pts-ssm-norep"),
    ("pts-ssm-h4", "pts-ssm-h4-norep"),
    ("kscaled-ssm", "kscaled"),
    ("kscaled-ssm", "kscaled-ssm-norep"),
    ("ptq4vm-ssm", "ptq4vm"),
    ("ptq4vm-ssm", "kscaled-ssm"),
    ("ouromamba", "ouromamba-official"),
    ("kscaled-official", "kscaled-ssm"),
    ("rotate", "pts"),
    ("rotate-hadamard", "pts"),
    ("rotate", "rotate-hadamard"),
    ("ptq4vm-rotate", "ptq4vm"),
    ("ptq4vm-rotate-hadamard", "ptq4vm"),
    ("ptq4vm-rotate", "rotate"),
    ("rotate-online", "rotate"),
    ("ptq4vm-rotate-online", "ptq4vm"),
    ("ptq4vm-rotate-online", "ptq4vm-rotate"),
    ("rotate-smooth-online", "rotate-online"),
)


def bits_label(w: int, a: int) -> str:
    """The bit setting's name in records and presets: ``w4a8``."""
    return f"w{w}a{a}"


#: Every bit setting, in the tables' order.
BITS_LABELS = [bits_label(w, a) for w, a in BIT_SETTINGS]
