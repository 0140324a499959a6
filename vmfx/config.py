"""Quantization configs and named presets.

A :class:`QuantConfig` is a frozen, validated dataclass with a ``VERSION`` (so saved configs can
be read back and migrated), ``to_dict`` / ``from_dict``, and no callables. Presets are named
configs: ``"<method>-w<bits>a<bits>"``, e.g. ``"minmax-w8a8"``.

Which passes a method runs is decided by :mod:`vmfx.passes.pipeline`; the config only says what
to quantize and how. What the methods are configured with lives in the config's sections
(:mod:`vmfx.sections`): the built-in ones (``smoothing``, ``jlss``, ``search``, ``outliers``,
``scan_state``, ``split_softplus``, ``bias_correction``) are registered here, a plug-in's with the
same :func:`register_section`.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

from .annotations import LINEAR_ROLES, QUANTIZABLE_ROLES, ROLES
from .errors import ConfigError
from .quant.spec import QuantSpec
from .sections import (
    Sections,
    fields_from_dict,
    fields_to_dict,
    method_options,
    method_section,
    register_options,
    register_section,
    reserve_names,
    section_from_dict,
    section_info,
    section_names,
    section_to_dict,
)

__all__ = [
    "QuantConfig",
    "QuantRule",
    "SmoothingConfig",
    "InitConfig",
    "JLSSConfig",
    "SimilaritySearchConfig",
    "ScanStateConfig",
    "SplitSoftplusConfig",
    "BiasCorrectionConfig",
    "Sections",
    "register_section",
    "PRESETS",
    "preset",
    "preset_names",
    "resolve_config",
    "BIT_SETTINGS",
    "kscaled_rules",
    "kscaled_official_rules",
    "KSCALED_OFFICIAL_SOURCE",
    "OUROMAMBA_OFFICIAL_SOURCE",
    "OutlierConfig",
    "check_rules_match",
    "Selector",
    "SettingRule",
    "PER_NODE_SETTINGS",
    "register_options",
    "register_preset",
    "method_options",
    "SCAN_OPERANDS",
    "SCAN_EDGES",
    "SHARING",
]

#: The weight/activation bit settings every method is evaluated at.
BIT_SETTINGS = ((8, 8), (6, 6), (4, 8), (4, 4))

#: Upper bound of a grid search's candidate count (each candidate costs a pass over the data).
MAX_CANDIDATES = 10_000

#: The edges a rule can quantize: a linear's input and weight, or the output of any detected node
#: (a conv, a SiLU, delta, the scan, ...: every user of that value reads the quantized one).
EDGES = ("input", "weight", "output")

#: The operands of the selective scan a rule can quantize, each on its input edge of the scan node
#: (``selective_scan(u, delta, A, B, C, D, z, ...)``, see :mod:`vmfx.ops.selective_scan`). The
#: hidden state is not a rule edge: :class:`ScanStateConfig` quantizes it.
SCAN_OPERANDS = ("u", "delta", "A", "B", "C", "D", "z")
#: The scan operands that are functions of parameters (``A = -exp(A_log)``, ``D``): quantized like
#: weights, from their value, with a static per-tensor or per-channel (dim 0) spec.
SCAN_WEIGHT_OPERANDS = ("A", "D")
#: The rule edges of the scan's operands: ``"scan.u"``, ``"scan.delta"``, ... ``"scan.z"``.
SCAN_EDGES = tuple(f"scan.{name}" for name in SCAN_OPERANDS)
#: How a scan-operand rule may share one quantizer between scans: ``"mixer"``: the scans of one
#: mixer (both directions of a Vim block) use one quantizer module, calibrated on all of them.
SHARING = ("mixer",)


@dataclass(frozen=True)
class SmoothingConfig:
    """SmoothQuant smoothing of every quantized linear's input.

    ``s_j = max|x_j|^alpha / max_i|W_ij|^(1 - alpha)`` per input channel j (activation maxima
    clamped to >= 1e-3, weight maxima to >= 1e-5, s to >= 1e-5); the linear computes
    ``Q(x / s) @ Q(W * s)^T``. With ``fold``, ``1/s`` is folded into the op producing the input
    when that is exact (a norm read only by this linear) after all learning is done.

    Args:
        alpha: migration strength (PTQ4VM: 0.5 for Vim, 0.65 for VMamba).
        fold: fold into the preceding norm where exact.
    """

    alpha: float = 0.5
    fold: bool = True

    def __post_init__(self):
        if not isinstance(self.alpha, (int, float)) or not 0.0 <= float(self.alpha) <= 1.0:
            raise ConfigError(f"SmoothingConfig.alpha must be in [0, 1], got {self.alpha!r}")


@dataclass(frozen=True)
class InitConfig:
    """How static step sizes are initialised from calibration statistics.

    Args:
        method: "minmax" (cover the observed range) or "lp" (grid search: the candidate
            clipping range with the smallest mean ``|x - Q(x)|^p``; per token for activations, per
            output channel for weights, as PTQ4VM does).
        p: the norm of the grid search (PTQ4VM: 2.4).
        candidates: number of candidate clipping ranges (PTQ4VM: 100).
    """

    method: str = "minmax"
    p: float = 2.4
    candidates: int = 100

    def __post_init__(self):
        if self.method not in ("minmax", "lp"):
            raise ConfigError(f"InitConfig.method must be 'minmax' or 'lp', got {self.method!r}")
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or not 1 <= self.candidates <= MAX_CANDIDATES:
            raise ConfigError(
                f"InitConfig.candidates must be an integer from 1 to {MAX_CANDIDATES}, got {self.candidates!r} "
                "(PTQ4VM uses 100; the grid search costs one quantize-dequantize of the calibration data per candidate)"
            )
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)) or not math.isfinite(self.p) or not self.p > 0:
            raise ConfigError(f"InitConfig.p must be a positive number (PTQ4VM: 2.4), got {self.p!r}")


@dataclass(frozen=True)
class JLSSConfig:
    """PTQ4VM's joint learning of smoothing scales and step sizes, block by block.

    For every mixer in turn, AdamW minimises ``1 - cosine(float mixer output, quantized mixer
    output)`` over that block's step sizes and smoothing factors, the quantized block reading the
    outputs of the already-quantized earlier blocks.

    Args:
        steps: optimizer steps per block (PTQ4VM Vim: 100).
        lr_weight, lr_act, lr_smooth: learning rates of the three parameter groups (Vim: 5e-4,
            5e-4, 1e-2).
        weight_decay: AdamW weight decay (1e-5).
        grad_clip: gradient-norm clip (2.0).
        batch_size: images per step; steps cycle through the calibration set in batches of this
            size. None: every calibration image in every step, as the official code does.
        micro_batch: images per forward / backward pass inside a step (None: the whole batch in one
            pass). The passes' gradients add up to the batch's, so a step is the same up to rounding
            while the memory held for backward scales with this instead of the batch (quantizers
            compute no statistics across images).
        learn_roles: the linears whose parameters learn. All four by default; the official code's
            behaviour (only ``in_proj`` and ``out_proj`` get gradients; ``x_proj`` / ``dt_proj``
            keep their initial values) is ``("in_proj", "out_proj")``.
        frozen_gradient: how gradients cross the quantized linears that do not learn: "ste"
            (through their quantized weights, straight-through the quantizers' rounding and
            clipping) or "float" (through their float, unsmoothed weights, ignoring their quantizers:
            the official code's hand-written backward of x_proj / dt_proj).
        learn_outputs: also learn the static step sizes of the block's quantizers on node outputs
            (OuroMamba's delta quantizer on ``dt_proj``'s output), in the activation group.
        activation_rounding: the gradient of the activation quantizers' rounding while learning:
            "ste" (straight through) or "zero" (plain ``round``, as the official OuroMamba code: the
            step sizes get ``q`` and the activations no gradient through the rounding). Weight
            quantizers always use the straight-through estimator.
    """

    steps: int = 100
    lr_weight: float = 5e-4
    lr_act: float = 5e-4
    lr_smooth: float = 1e-2
    weight_decay: float = 1e-5
    grad_clip: float = 2.0
    batch_size: int | None = 64
    micro_batch: int | None = None
    learn_roles: tuple[str, ...] = LINEAR_ROLES
    frozen_gradient: str = "ste"
    learn_outputs: bool = False
    activation_rounding: str = "ste"

    WRITTEN_WHEN_SET: ClassVar[tuple[str, ...]] = ("activation_rounding",)

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"JLSSConfig.steps must be a non-negative integer, got {self.steps!r}")
        if self.batch_size is not None and (
            isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise ConfigError(
                f"JLSSConfig.batch_size must be a positive integer or None (all images), got {self.batch_size!r}"
            )
        if self.micro_batch is not None and (
            isinstance(self.micro_batch, bool) or not isinstance(self.micro_batch, int) or self.micro_batch < 1
        ):
            raise ConfigError(
                f"JLSSConfig.micro_batch must be a positive integer or None (the whole batch in one pass), "
                f"got {self.micro_batch!r}"
            )
        if self.frozen_gradient not in ("ste", "float"):
            raise ConfigError(f"JLSSConfig.frozen_gradient must be 'ste' or 'float', got {self.frozen_gradient!r}")
        if not isinstance(self.learn_outputs, bool):
            raise ConfigError(f"JLSSConfig.learn_outputs must be a boolean, got {self.learn_outputs!r}")
        if self.activation_rounding not in ("ste", "zero"):
            raise ConfigError(f"JLSSConfig.activation_rounding must be 'ste' (straight-through estimator) or 'zero' "
                              f"(plain round, the official OuroMamba learning), got {self.activation_rounding!r}")
        roles = tuple(self.learn_roles)
        if not roles or any(r not in LINEAR_ROLES for r in roles):
            raise ConfigError(f"JLSSConfig.learn_roles must be a non-empty subset of {LINEAR_ROLES}, got {self.learn_roles!r}")
        object.__setattr__(self, "learn_roles", roles)
        for name in ("lr_weight", "lr_act", "lr_smooth", "grad_clip", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"JLSSConfig.{name} must be a finite number, got {value!r}")
            if name == "weight_decay":
                if value < 0:
                    raise ConfigError(f"JLSSConfig.weight_decay must be non-negative, got {value!r}")
            elif not value > 0:
                raise ConfigError(f"JLSSConfig.{name} must be positive, got {getattr(self, name)!r}")


# -- k-scaled ViM PTQ (Shi et al.): similarity-based scale search -----------------------------------


@dataclass(frozen=True)
class SimilaritySearchConfig:
    """k-scaled ViM PTQ's (PTQ4ViT-style) search of static scales by cosine similarity.

    Every static symmetric output quantizer, and every static symmetric weight quantizer of a
    linear, starts from its max-based scale ``s0`` (per cluster, channel or tensor) and takes the
    candidate ``m * s0``, ``m`` in ``candidates`` evenly spaced values from ``low`` to ``high``, with
    the best mean cosine similarity between the float layer output and the quantized one (along
    the channel dim). ``rounds`` rounds alternate weights, then outputs.

    Args:
        rounds: weight / output rounds (official: 3).
        candidates: candidate multipliers (official: 101, 0.01 to 1.2).
        low, high: the smallest and largest multiplier.
        images: calibration images the search scores on (the first ones; None: all of them, as
            the official code does). The statistics (cluster assignment, max-based scales) use all
            calibration images. 8 by default: the search costs about 0.8 CPU-seconds per output
            quantizer per 32 images of the proxy Vim and phase (101 candidates; 1.5 before the
            candidates were scored one at a time), so all 256 proxy calibration images take
            about 25 CPU-minutes, beyond the 10-minute calibration budget.
        weights: search the weight scales too (False: outputs only).
        keep_roles: roles of the nodes whose output quantizers keep their min-max scales (not
            searched); the official code searches none of the patch embedding's and the norms'
            (``("patch_embed", "norm")``).
    """

    rounds: int = 3
    candidates: int = 101
    low: float = 0.01
    high: float = 1.2
    images: int | None = 8
    weights: bool = True
    keep_roles: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("rounds", "candidates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value > MAX_CANDIDATES:
                raise ConfigError(f"SimilaritySearchConfig.{name} must be an integer from 1 to {MAX_CANDIDATES}, got {value!r}")
        for name in ("low", "high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"SimilaritySearchConfig.{name} must be a positive number, got {value!r}")
        if self.low > self.high:
            raise ConfigError(f"SimilaritySearchConfig.low ({self.low}) must not exceed high ({self.high})")
        if self.images is not None and (isinstance(self.images, bool) or not isinstance(self.images, int) or self.images < 1):
            raise ConfigError(f"SimilaritySearchConfig.images must be a positive integer or None (all), got {self.images!r}")
        if not isinstance(self.weights, bool):
            raise ConfigError(f"SimilaritySearchConfig.weights must be a boolean, got {self.weights!r}")
        roles = tuple(self.keep_roles) if isinstance(self.keep_roles, (tuple, list)) else None
        if roles is None or any(r not in ROLES for r in roles):
            raise ConfigError(f"SimilaritySearchConfig.keep_roles must be a tuple of roles ({', '.join(ROLES)}), "
                              f"got {self.keep_roles!r}")
        object.__setattr__(self, "keep_roles", roles)


register_section("smoothing", SmoothingConfig, builtin=True)
register_section("jlss", JLSSConfig, builtin=True)
register_section("search", SimilaritySearchConfig, builtin=True)


# -- OuroMamba: mixed-precision activations --------------------------------------------------------


@dataclass(frozen=True)
class OutlierConfig:
    """OuroMamba's mixed-precision activations (:class:`vmfx.quant.mixed.MixedPrecisionQuantize`):
    static per-token inliers at the activation spec's bits, and per time step the channels past
    ``mean + sigma * std`` of ``|x|`` join an outlier set quantized dynamically at ``bits``, the set
    emptied every ``refresh`` steps.

    Args:
        bits: bits of the outlier channels, 2..16 (W4A4O8: 8; W4A8O16: 16).
        sigma: the threshold of the symmetric quantizers on the linears' inputs (3).
        sigma_asym: the threshold of the asymmetric variant (delta, ``dt_proj``'s output) (4).
        refresh: window length in time steps (10).
        trigger: when a step adds outlier channels: "sample" (vmfx: each image against the static
            scale, so an image's output does not depend on its batch) or "batch" (the official
            code: the step fires for the whole batch when any image exceeds the static scale;
            :func:`~vmfx.quant.mixed.select_outliers`).
        float_outliers: keep the outlier channels in floating point instead of quantizing them at
            ``bits`` (the official W4A8O16 "O16"); such quantizers do not lower to the integer kernels.
    """

    bits: int = 8
    sigma: float = 3.0
    sigma_asym: float = 4.0
    refresh: int = 10
    trigger: str = "sample"
    float_outliers: bool = False

    WRITTEN_WHEN_SET: ClassVar[tuple[str, ...]] = ("trigger", "float_outliers")

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ConfigError(f"OutlierConfig.bits must be an integer from 2 to 16, got {self.bits!r}")
        for name in ("sigma", "sigma_asym"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"OutlierConfig.{name} must be a non-negative number of standard deviations, got {v!r}")
        if isinstance(self.refresh, bool) or not isinstance(self.refresh, int) or self.refresh < 1:
            raise ConfigError(f"OutlierConfig.refresh must be a positive number of time steps, got {self.refresh!r}")
        if self.trigger not in ("sample", "batch"):
            raise ConfigError(f"OutlierConfig.trigger must be 'sample' (per image) or 'batch' (the official code: "
                              f"any image of the batch), got {self.trigger!r}")
        if not isinstance(self.float_outliers, bool):
            raise ConfigError(f"OutlierConfig.float_outliers must be True or False, got {self.float_outliers!r}")

    def sigma_for(self, spec: QuantSpec) -> float:
        """The threshold of a quantizer with inlier ``spec``: ``sigma_asym`` for asymmetric ones."""
        return self.sigma if spec.symmetric else self.sigma_asym


register_section("outliers", OutlierConfig, builtin=True)


# -- scan state (the quantized hidden state of the selective scan) ----------------------------------


@dataclass(frozen=True)
class ScanStateConfig:
    """Quantize the selective scan's hidden state (Shi et al.): static per-step scales, optionally
    on the reparameterized state. Orthogonal to the rest of the config: any preset can carry it
    (``vmfx.preset("pts-w8a8").replace(scan_state=ScanStateConfig())``).

    Args:
        bits: state bit width (symmetric, one static scale per time step; the paper: 8).
        reparameterize: fold the factors r_C, r_L, r_D from calibration statistics of |h| into
            the scan first (:class:`vmfx.passes.ReparameterizeScanPass`).
        quantize: quantize the state; False keeps only the (float-exact) reparameterization.
        candidates, lo, hi: the per-step search grid, ``linspace(lo, hi, candidates)`` times
            ``max|h[t]| / qmax`` (the official code: 101 candidates from 0.01 to 1.2).
        search_samples: calibration images whose scan inputs are kept for the step-by-step search
            (memory: about samples x dim x L x 4 floats per scan).
        lookahead: also score each candidate by ``y`` of the next ``lookahead`` steps (its
            quantized state carried on in float); 0 scores ``y[t]`` alone.
        exhaustive: score all candidates at every step (as the official code); False (default)
            searches the same grid coarse to fine (29 of 101 candidates scored, 3.5x faster).
    """

    bits: int = 8
    reparameterize: bool = True
    quantize: bool = True
    candidates: int = 101
    lo: float = 0.01
    hi: float = 1.2
    search_samples: int = 32
    lookahead: int = 0
    exhaustive: bool = False

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ConfigError(f"ScanStateConfig.bits must be an integer in 2..16 (the paper: 8), got {self.bits!r}")
        for name in ("reparameterize", "quantize", "exhaustive"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"ScanStateConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if not (self.reparameterize or self.quantize):
            raise ConfigError("ScanStateConfig with reparameterize=False and quantize=False does nothing; "
                              "use scan_state=None")
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or not 1 <= self.candidates <= MAX_CANDIDATES:
            raise ConfigError(f"ScanStateConfig.candidates must be an integer from 1 to {MAX_CANDIDATES}, got {self.candidates!r}")
        for name in ("lo", "hi"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not v > 0:
                raise ConfigError(f"ScanStateConfig.{name} must be a positive number, got {v!r}")
        if not self.lo <= self.hi:
            raise ConfigError(f"ScanStateConfig.lo ({self.lo}) must not exceed hi ({self.hi})")
        if isinstance(self.search_samples, bool) or not isinstance(self.search_samples, int) or self.search_samples < 1:
            raise ConfigError(f"ScanStateConfig.search_samples must be a positive integer, got {self.search_samples!r}")
        if isinstance(self.lookahead, bool) or not isinstance(self.lookahead, int) or self.lookahead < 0:
            raise ConfigError(f"ScanStateConfig.lookahead must be a non-negative integer, got {self.lookahead!r}")


register_section("scan_state", ScanStateConfig, builtin=True)


@dataclass(frozen=True)
class SplitSoftplusConfig:
    """Give a selective scan's fused delta softplus a node of its own (role ``dt_act``:
    :class:`vmfx.passes.split_softplus.SplitDeltaSoftplusPass`), so that output rules on ``dt_act``
    quantize it on Vim too (the official k-scaled code's softplus output). It has no fields: the
    section being present turns it on. Its keyword reads as a bool: ``QuantConfig(split_softplus=True)``,
    ``config.split_softplus``."""

    @classmethod
    def from_keyword(cls, value: Any) -> "SplitSoftplusConfig | None":
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, bool):
            raise ConfigError(f"QuantConfig.split_softplus must be True or False, got {value!r}")
        return cls() if value else None

    @classmethod
    def keyword_value(cls, section: "SplitSoftplusConfig | None") -> bool:
        return section is not None


#: The roles of the linears whose bias :class:`BiasCorrectionConfig` can correct.
BIAS_CORRECTION_ROLES = LINEAR_ROLES + ("head", "linear")


@dataclass(frozen=True)
class BiasCorrectionConfig:
    """The linears (by role) whose bias absorbs the mean output error of their quantized weight on
    the calibration data (:class:`vmfx.passes.bias_correction.BiasCorrectionPass`). Its keyword
    reads as the tuple of roles: ``QuantConfig(bias_correction=("dt_proj", "head"))``,
    ``config.bias_correction`` (``()``: off, the section absent).

    Args:
        roles: non-empty, from :data:`BIAS_CORRECTION_ROLES` (the official k-scaled code:
            ``("dt_proj", "head")``, its linears with a bias).
    """

    roles: tuple[str, ...] = ("dt_proj", "head")

    def __post_init__(self):
        roles = tuple(self.roles) if isinstance(self.roles, (tuple, list)) else None
        if not roles or any(r not in BIAS_CORRECTION_ROLES for r in roles):
            raise ConfigError(f"QuantConfig.bias_correction (BiasCorrectionConfig.roles) must be a non-empty tuple of "
                              f"linear roles ({', '.join(BIAS_CORRECTION_ROLES)}), got {self.roles!r}; () turns it off")
        object.__setattr__(self, "roles", roles)

    @classmethod
    def from_keyword(cls, value: Any) -> "BiasCorrectionConfig | None":
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"QuantConfig.bias_correction must be a tuple of linear roles "
                              f"({', '.join(BIAS_CORRECTION_ROLES)}), got {value!r}")
        return cls(tuple(value)) if value else None

    @classmethod
    def keyword_value(cls, section: "BiasCorrectionConfig | None") -> tuple[str, ...]:
        return section.roles if section is not None else ()


register_section("split_softplus", SplitSoftplusConfig, builtin=True)
register_section("bias_correction", BiasCorrectionConfig, builtin=True)


@dataclass(frozen=True)
class QuantRule:
    """One line of a config's spec table: which edges it matches and the spec they get.

    A rule matches the ``edge`` ("input" or "weight" of a linear, "output" of any annotated node)
    of every node that satisfies all of its given selectors (None matches anything): its detected
    ``role`` (e.g. "out_proj", "conv_act", "scan"; both scan directions), its module path against
    the shell-style pattern ``module`` (e.g. ``"layers.1*.mixer.*"``; a scan node, a function call,
    has its mixer's path, e.g. ``"layers.1.mixer"``), and its graph node name
    ``node``. ``spec=None`` keeps the edge in floating point. Rules are applied in order after the
    config's defaults (which quantize no outputs); the last match wins.

    Scan operands: the edge ``"scan.<operand>"`` (one of :data:`SCAN_EDGES`: ``scan.u``,
    ``scan.delta``, ``scan.A``, ``scan.B``, ``scan.C``, ``scan.D``, ``scan.z``) quantizes that
    input of every selected selective-scan node (role "scan": both directions; select one with
    ``module`` or ``node``). ``u``, ``delta``, ``B``, ``C`` and ``z`` are activations, (batch,
    channels, L) with the tokens on the last dim in the scan's own order (the backward scan's
    per-token scales are indexed by its time steps): calibrated like any activation, or dynamic.
    ``A`` (dim, N) and ``D`` (dim,) are functions of parameters: a static per-tensor or
    per-channel (dim 0: the model channel) spec, its min-max parameters computed from their value
    when the quantizer is inserted; or a static per-token spec, which reads the whole value as one
    time step whose channels are all its elements and quantizes it with OuroMamba's outlier
    channels (:class:`~vmfx.quant.mixed.FlatMixedPrecisionQuantize`, the official layout; needs
    ``QuantConfig.outliers``), calibrated on the value by the config's observer. ``delta`` is the scan's argument, before the softplus it
    applies itself (``delta_softplus``). The hidden state has its own config, :class:`ScanStateConfig`.
    ``shared="mixer"`` makes the scans of one mixer (both directions) use one quantizer module,
    its scale calibrated on all of their data (OuroMamba's delta quantizer); on an ``"output"``
    rule, the nodes it selects in one mixer share one output quantizer (the official k-scaled
    code's ``act_z``, one module for the gate SiLUs of both directions; the similarity search
    scores its scale on both).

    Weights besides the linears': a ``"weight"`` rule also selects a conv (``conv1d``,
    ``patch_embed``) or a norm with a weight (``norm``); such a node is made functional
    (:func:`vmfx.passes.graph_utils.functionalize_weighted`) and its weight gets a min-max quantizer.

    ``op`` selects by the operation a node computes (:func:`vmfx.annotations.node_op`: ``"silu"``,
    ``"mul"``, ...), e.g. the SiLU of a gate (role ``gate`` covers both the SiLU and the multiply):
    ``QuantRule("output", spec, role="gate", op="silu")``.

    Example::

        # in_proj at W8A8, out_proj at W4A4, the rest as the config's defaults say
        QuantRule("input", QuantSpec(8, False, "token"), role="in_proj")
        QuantRule("weight", QuantSpec(4, True, "channel"), role="out_proj")
        # B and C per token, A per tensor, delta with one quantizer for both directions
        QuantRule("scan.B", QuantSpec(8, False, "token"))
        QuantRule("scan.C", QuantSpec(8, False, "token"))
        QuantRule("scan.A", QuantSpec(8, True, "tensor"))
        QuantRule("scan.delta", QuantSpec(8, False, "tensor"), shared="mixer")
    """

    edge: str
    spec: QuantSpec | None
    role: str | None = None
    module: str | None = None
    node: str | None = None
    shared: str | None = None
    op: str | None = None

    def __post_init__(self):
        if not isinstance(self.edge, str) or (self.edge not in EDGES and not self.edge.startswith("scan.")):
            raise ConfigError(f"QuantRule.edge must be one of {', '.join(EDGES + SCAN_EDGES)}, got {self.edge!r}")
        if self.edge.startswith("scan."):
            self._check_scan_edge()
        if self.spec is not None and not isinstance(self.spec, QuantSpec):
            raise ConfigError(f"QuantRule.spec must be a QuantSpec or None (float), got {type(self.spec).__name__}")
        if self.role is not None and self.role not in ROLES:
            raise ConfigError(f"QuantRule.role must be one of {', '.join(ROLES)}, got {self.role!r}")
        for name in ("module", "node", "op"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"QuantRule.{name} must be a non-empty string or None, got {value!r}")
        if self.spec is not None and self.edge == "weight":
            _check_weight_spec(self.spec, "a weight rule's spec")
        if self.spec is not None and self.operand in SCAN_WEIGHT_OPERANDS and not (
                self.spec.granularity == "token" and not self.spec.dynamic):
            _check_weight_spec(self.spec, f"the scan operand {self.operand} (a function of parameters; a static "
                               "'token' spec reads it as one time step, with OuroMamba's outliers)")
        if self.shared is not None:
            if self.shared not in SHARING:
                raise ConfigError(f"QuantRule.shared must be None or one of {', '.join(map(repr, SHARING))}, "
                                  f"got {self.shared!r}")
            if self.operand is None and self.edge != "output":
                raise ConfigError(f"QuantRule.shared={self.shared!r} shares a scan operand's or an output's quantizer "
                                  f"between the nodes it selects in one mixer; it does not apply to {self.edge!r} "
                                  "edges (use a 'scan.<operand>' or 'output' edge, or drop shared)")

    def _check_scan_edge(self) -> None:
        operand = self.edge[len("scan."):]
        if operand in ("state", "h"):
            raise ConfigError(
                f"QuantRule edge {self.edge!r}: the scan's hidden state is not a rule edge; quantize it with "
                "QuantConfig(scan_state=ScanStateConfig(bits=...)) (per-step static scales, optionally "
                "reparameterized)"
            )
        if operand not in SCAN_OPERANDS:
            raise ConfigError(
                f"QuantRule edge {self.edge!r} names no operand of the selective scan; the scan's operand "
                f"edges are {', '.join(SCAN_EDGES)} (the hidden state: QuantConfig.scan_state)"
            )
        if self.role is not None and self.role != "scan":
            raise ConfigError(f"QuantRule edge {self.edge!r} quantizes an input of the scan nodes: its role "
                              f"selector can only be 'scan' (or None), got {self.role!r}")

    @property
    def operand(self) -> str | None:
        """The scan operand of a ``"scan.<operand>"`` rule (e.g. ``"B"``), else None."""
        return self.edge[len("scan."):] if self.edge.startswith("scan.") else None

    def describe(self) -> str:
        """E.g. ``"input -> float where module='layer.0.*'"``."""
        selectors = [f"{name}={getattr(self, name)!r}" for name in ("role", "module", "node", "op")
                     if getattr(self, name) is not None]
        spec = "float" if self.spec is None else self.spec.describe()
        shared = f", shared per {self.shared}" if self.shared is not None else ""
        return f"{self.edge} -> {spec}{shared}" + (f" where {', '.join(selectors)}" if selectors else " everywhere")

    def matches(self, edge: str, role: str | None, module: str | None, node: str | None,
                op: str | None = None) -> bool:
        """Whether this rule selects ``edge`` of the node with this role, module path, name and
        operation (a ``"scan.<operand>"`` rule selects scan nodes only; a rule with an ``op``
        selector matches only where ``op`` is given and equal)."""
        if edge != self.edge:
            return False
        if self.op is not None and op != self.op:
            return False
        if self.role is not None and role != self.role:
            return False
        if self.operand is not None and role != "scan":
            return False
        if self.module is not None and (module is None or not fnmatch.fnmatchcase(module, self.module)):
            return False
        return self.node is None or node == self.node

    def to_dict(self) -> dict:
        d = {"edge": self.edge, "spec": None if self.spec is None else self.spec.to_dict(),
             "role": self.role, "module": self.module, "node": self.node}
        for name in ("shared", "op"):  # written only when set: older readers read the other rules
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantRule":
        if not isinstance(d, dict):
            raise ConfigError(f"a QuantRule must be a dict, got {type(d).__name__}")
        unknown = set(d) - {"edge", "spec", "role", "module", "node", "shared", "op"}
        if unknown:
            raise ConfigError(f"unknown QuantRule fields {sorted(unknown)}")
        d = dict(d)
        if d.get("spec") is not None:
            d["spec"] = QuantSpec.from_dict(d["spec"])
        return cls(**d)


#: (role, module path or None, node name[, operation]) of one node a rule can select.
RuleTarget = tuple


# -- per-node method settings ----------------------------------------------------------------------


@dataclass(frozen=True)
class Selector:
    """Which annotated nodes something applies to: every given field must match (None: any).

    Args:
        role: the detected role (``"out_proj"``, ``"in_proj"``, ...; both scan directions).
        module: a shell-style pattern of the node's module path (``"layers.1*.mixer.*"``).
        node: the graph node's name.
        block: the block (mixer) index.
        direction: the scan direction (``"forward"``, ``"backward"``, ...).
    """

    role: str | None = None
    module: str | None = None
    node: str | None = None
    block: int | None = None
    direction: str | None = None

    def __post_init__(self):
        if self.role is not None and self.role not in ROLES:
            raise ConfigError(f"a selector's role must be one of {', '.join(ROLES)}, got {self.role!r}")
        for name in ("module", "node", "direction"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"a selector's {name} must be a non-empty string or None, got {value!r}")
        if self.block is not None and (isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 0):
            raise ConfigError(f"a selector's block must be a block index (an integer >= 0) or None, got {self.block!r}")

    def matches(self, role: str | None, module: str | None, node: str | None, block: int | None = None,
                direction: str | None = None) -> bool:
        """Whether a node with these facts is selected."""
        if self.role is not None and role != self.role:
            return False
        if self.module is not None and (module is None or not fnmatch.fnmatchcase(module, self.module)):
            return False
        if self.node is not None and node != self.node:
            return False
        if self.block is not None and block != self.block:
            return False
        return self.direction is None or direction == self.direction

    def describe(self) -> str:
        """E.g. ``"role='out_proj', block=3"`` (``"every node"`` when nothing is given)."""
        given = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if getattr(self, f.name) is not None]
        return ", ".join(given) or "every node"

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "Selector":
        if not isinstance(d, dict):
            raise ConfigError(f"a selector must be a dict, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown selector fields {sorted(unknown)}")
        return cls(**d)


#: The method settings a :class:`SettingRule` can vary per node, and the nodes each is read at.
#: A setting is ``"<section>.<field>"``: a field of one of the config's sections.
PER_NODE_SETTINGS = {
    "smoothing.alpha": "each smoothed linear (SmoothQuantPass)",
    "jlss.steps": "each block (JLSSPass; select it with block=)",
    "jlss.lr_weight": "each block (JLSSPass; select it with block=)",
    "jlss.lr_act": "each block (JLSSPass; select it with block=)",
    "jlss.lr_smooth": "each block (JLSSPass; select it with block=)",
}


@dataclass(frozen=True)
class SettingRule:
    """A method setting for the nodes a selector picks, e.g. SmoothQuant's alpha for ``out_proj``::

        SettingRule("smoothing.alpha", 0.8, Selector(role="out_proj"))
        SettingRule("jlss.steps", 200, Selector(block=0))

    The config's own value (``config.smoothing.alpha``) applies where no rule matches; rules
    apply in order and the last match wins (:meth:`QuantConfig.setting_for`). ``setting`` is one
    of :data:`PER_NODE_SETTINGS`; ``value`` is checked as the section class checks it.
    """

    setting: str
    value: Any
    select: Selector = field(default_factory=Selector)

    def __post_init__(self):
        if self.setting not in PER_NODE_SETTINGS:
            raise ConfigError(f"SettingRule.setting must be one of {', '.join(PER_NODE_SETTINGS)} (the settings a pass "
                              f"reads per node), got {self.setting!r}")
        if not isinstance(self.select, Selector):
            raise ConfigError(f"SettingRule.select must be a Selector, got {type(self.select).__name__}")
        sub, name = self.setting.split(".")
        if sub == "jlss" and any(getattr(self.select, f) is not None for f in ("role", "module", "node", "direction")):
            raise ConfigError(f"{self.setting} is read per block: select blocks with Selector(block=...), got "
                              f"{self.select.describe()}")
        try:
            replace(section_info(sub).cls(), **{name: self.value})
        except (ConfigError, TypeError, ValueError) as exc:
            raise ConfigError(f"SettingRule({self.setting!r}, {self.value!r}): {exc}") from exc

    def describe(self) -> str:
        return f"{self.setting} = {self.value!r} where {self.select.describe()}"

    def to_dict(self) -> dict:
        return {"setting": self.setting, "value": self.value, "select": self.select.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "SettingRule":
        if not isinstance(d, dict) or set(d) - {"setting", "value", "select"} or "setting" not in d or "value" not in d:
            raise ConfigError(f"a SettingRule must be a dict with 'setting', 'value' and 'select', got {d!r}")
        return cls(d["setting"], d["value"], Selector.from_dict(d.get("select") or {}))


def check_rules_match(config: "QuantConfig", linears: list[RuleTarget], outputs: list[RuleTarget],
                      weighted: list[RuleTarget] = ()) -> None:
    """Refuse rules that select nothing in a model, naming what exists.

    ``linears`` are the model's annotated linears (the nodes ``input`` / ``weight`` rules select;
    ``weighted``: its convs and norms with a weight, which ``weight`` rules select too),
    ``outputs`` every annotated node (``output`` rules; its scan nodes for ``scan.<operand>``
    rules). A rule whose ``module`` or ``node``
    selector matches none of them is a typo until shown otherwise: :class:`ConfigError` with the
    closest module paths / node names. A rule selecting only by a role the model does not have
    (``dt_act`` on a Vim, which fuses the softplus into its scan) may be meant (a config shared
    across model families): a :class:`~vmfx.errors.ConfigWarning` with the roles it has. A
    preset's own rules are exempt from that warning: they cover several model families on purpose.
    """
    import difflib
    import warnings

    from .errors import ConfigWarning

    preset_rules = {rule for cfg in PRESETS.values() for rule in cfg.rules}
    for index, rule in enumerate(config.rules):
        if rule.operand is not None:  # a scan operand: the scan nodes
            targets = [t for t in outputs if t[0] == "scan"]
        else:
            targets = outputs if rule.edge == "output" else list(linears) + (
                list(weighted) if rule.edge == "weight" else [])
        if any(rule.matches(rule.edge, t[0], t[1], t[2], t[3] if len(t) > 3 else None) for t in targets):
            continue
        what = f"QuantRule #{index} ({rule.describe()})"
        where = "scan" if rule.operand is not None else "annotated node" if rule.edge == "output" else "linear"
        problems = []
        if rule.module is not None and not any(m is not None and fnmatch.fnmatchcase(m, rule.module)
                                               for m in (t[1] for t in targets)):
            close = _close_patterns(rule.module, sorted({t[1] for t in targets if t[1] is not None}))
            problems.append(f"module={rule.module!r} matches no {where}'s module path (closest: "
                            f"{', '.join(repr(m) for m in close)})")
        if rule.node is not None and not any(t[2] == rule.node for t in targets):
            names = sorted({t[2] for t in targets})
            close = difflib.get_close_matches(rule.node, names, n=3, cutoff=0.5) or names[:3]
            problems.append(f"node={rule.node!r} is no {where}'s node name (closest: "
                            f"{', '.join(repr(n) for n in close)})")
        roles = sorted({t[0] for t in targets if t[0]})
        if rule.role is not None and rule.role not in roles:
            problems.append(f"role={rule.role!r} is not a role of any {where} of this model (its roles: "
                            f"{', '.join(roles)})")
        if not problems:
            problems.append(f"no {where} satisfies all of its selectors at once")
        message = f"{what} matches nothing in this model: {'; '.join(problems)}"
        if rule.module is None and rule.node is None:
            if rule not in preset_rules:
                warnings.warn(message + ". It is ignored; remove it if it was not meant for another model",
                              ConfigWarning, stacklevel=2)
            continue
        raise ConfigError(message + ". See the names with vmfx.inspect.table(vmfx.trace(model, images[:1]))")


def _close_patterns(pattern: str, modules: list[str]) -> list[str]:
    """Patterns like ``pattern`` that do match some of ``modules``: its leading literal components
    (before the first wildcard) replaced by the closest prefix of the model's module paths
    (``"layer.0.*"`` -> ``"layers.0.*"``); else the closest module paths themselves."""
    import difflib

    parts = pattern.split(".")
    k = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))
    prefixes = sorted({".".join(m.split(".")[:k]) for m in modules if len(m.split(".")) >= k})
    out = []
    for prefix in difflib.get_close_matches(".".join(parts[:k]), prefixes, n=3, cutoff=0.5) if k else []:
        candidate = ".".join([prefix] + parts[k:])
        if any(fnmatch.fnmatchcase(m, candidate) for m in modules):
            out.append(candidate)
    return out or difflib.get_close_matches(pattern, modules, n=3, cutoff=0.3) or modules[:3]


def _check_weight_spec(spec: QuantSpec, what: str) -> None:
    if spec.dynamic:
        raise ConfigError(f"weights are quantized once, offline: {what} cannot be dynamic")
    if spec.granularity == "token":
        raise ConfigError(f"weights have no tokens: use granularity 'channel' or 'tensor' for {what}")
    if spec.granularity == "cluster":  # k-scaled clusters are an activation granularity
        raise ConfigError(f"'cluster' scales cluster an activation's tokens or channels: use granularity "
                          f"'channel' or 'tensor' for {what}")

#: Methods' settings whose passes need static activation ranges (calibrated observers, smoothing, learning).
_STATIC_ONLY_FEATURES = ("smoothing", "jlss", "search")


class _SectionAlias:
    """``config.<name>`` for the built-in section ``name``: its keyword value (the instance, None
    when absent; a bool / tuple where the section class translates it)."""

    def __init__(self, doc: str):
        self.__doc__ = doc

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, config, owner=None):
        if config is None:
            return self
        return config.section(self.name)


#: Marks a keyword that was not given (None is a value: "no options").
_NOT_GIVEN = object()
_DEFAULT_WEIGHT = QuantSpec(8, symmetric=True, granularity="channel")
_DEFAULT_ACTIVATION = QuantSpec(8, symmetric=False, granularity="tensor")
_DEFAULT_INIT = InitConfig()
#: The keys of a version-1 to -3 config dict that are sections now (``options``: the method's own).
_LEGACY_SECTION_KEYS = ("smoothing", "jlss", "search", "outliers", "scan_state", "split_softplus", "bias_correction")
_CORE_KEYS = ("method", "weight", "activation", "roles", "calib_batch_size", "init", "rules", "settings")


@dataclass(frozen=True, init=False)
class QuantConfig:
    """Full control over a quantization run.

    Args:
        method: name of a registered method (``vmfx.passes.pipeline.methods()``), e.g. "minmax".
        weight: spec of the weights of every quantized linear (per-output-channel symmetric by
            default).
        activation: spec of the inputs of every quantized linear.
        roles: which linears to quantize: mixer roles (both scan directions of each) and
            ``"linear"``, every other linear except the classifier head (attention, MLPs).
        calib_batch_size: batch size for calibration when the data is one tensor.
        init: how static step sizes are initialised (min-max or Lp grid search); every method
            initialises step sizes, so this is a field of its own, not a section.
        rules: :class:`QuantRule` entries applied after the defaults above (``weight`` / ``activation``
            on the linears of ``roles``), in order, the last match winning: mixed precision,
            per-module bits, linears kept in float. :meth:`spec_for` resolves one edge.
        settings: :class:`SettingRule` entries: method settings that vary by node (SmoothQuant's
            alpha per linear, JLSS's steps and learning rates per block), in order, the last
            match winning over the section's value. :meth:`setting_for` resolves one node.
        sections: what the methods are configured with: section name -> instance of the frozen
            dataclass registered under that name (:mod:`vmfx.sections`; a dict is fine, it is kept
            as an immutable :class:`~vmfx.sections.Sections`). An absent section is off.
        options: the method's own options, for a method registered with an options class
            (:func:`register_options`; the section named after the method; None or not given:
            that class's defaults).
        **section_values: a section by its name, e.g. ``jlss=JLSSConfig()`` (None removes it);
            these win over ``sections``.

    The built-in sections, each also read as ``config.<name>`` (None / False / ``()`` when absent):

    * ``smoothing``: SmoothQuant smoothing (:class:`SmoothingConfig`).
    * ``jlss``: PTQ4VM's block-wise learning of step sizes and smoothing (:class:`JLSSConfig`).
    * ``search``: k-scaled ViM PTQ's similarity search of static scales after conversion
      (:class:`SimilaritySearchConfig`).
    * ``outliers``: OuroMamba's mixed-precision activations (:class:`OutlierConfig`): every static
      activation quantizer becomes a :class:`~vmfx.quant.mixed.MixedPrecisionQuantize`.
    * ``scan_state``: quantize the selective scan's hidden state, optionally reparameterized
      (:class:`ScanStateConfig`).
    * ``split_softplus``: the scan's fused delta softplus as a node of its own
      (:class:`SplitSoftplusConfig`; the keyword and attribute are a bool).
    * ``bias_correction``: linears whose bias absorbs their weight quantization's mean output error
      (:class:`BiasCorrectionConfig`; the keyword and attribute are a tuple of roles).

    A plug-in's section (:func:`register_section`) works the same way: its keyword, ``config.<name>``,
    ``config.section(name)``, saved and loaded with the config.

    Example::

        cfg = QuantConfig(method="minmax", weight=QuantSpec(4, True, "channel"),
                          activation=QuantSpec(8, False, "tensor"))
        qmodel = vmfx.compile(model, images, config=cfg)

        mixed = vmfx.preset("minmax-w8a8").replace(rules=(
            QuantRule("input", QuantSpec(4, False, "tensor"), role="out_proj"),
            QuantRule("weight", QuantSpec(4, True, "channel"), role="out_proj")))
        learned = vmfx.preset("pts-w4a4").replace(smoothing=SmoothingConfig(0.5), jlss=JLSSConfig(steps=50))
    """

    #: 4: the methods' settings in ``sections``; 3: per-method fields, ``options``, ``split_softplus``,
    #: ``bias_correction``; 2: no ``settings``; 1: no ``rules``.
    VERSION: ClassVar[int] = 4

    method: str = "minmax"
    weight: QuantSpec = _DEFAULT_WEIGHT
    activation: QuantSpec = _DEFAULT_ACTIVATION
    roles: tuple[str, ...] = QUANTIZABLE_ROLES
    calib_batch_size: int = 32
    init: InitConfig = _DEFAULT_INIT
    rules: tuple[QuantRule, ...] = ()
    settings: tuple[SettingRule, ...] = ()
    sections: Sections = field(default_factory=Sections)

    smoothing = _SectionAlias("SmoothQuant smoothing (:class:`SmoothingConfig`; None: off).")
    jlss = _SectionAlias("PTQ4VM's block-wise learning (:class:`JLSSConfig`; None: off).")
    search = _SectionAlias("k-scaled ViM PTQ's similarity search (:class:`SimilaritySearchConfig`; None: off).")
    outliers = _SectionAlias("OuroMamba's mixed-precision activations (:class:`OutlierConfig`; None: off).")
    scan_state = _SectionAlias("The scan's quantized hidden state (:class:`ScanStateConfig`; None: float).")
    split_softplus = _SectionAlias("Whether the scan's softplus is split into a node of its own (a bool).")
    bias_correction = _SectionAlias("The roles of the linears whose bias is corrected (a tuple; () off).")

    def __init__(self, method: str = "minmax", weight: QuantSpec = _DEFAULT_WEIGHT,
                 activation: QuantSpec = _DEFAULT_ACTIVATION, roles: tuple[str, ...] = QUANTIZABLE_ROLES,
                 calib_batch_size: int = 32, init: InitConfig = _DEFAULT_INIT, *, rules: tuple[QuantRule, ...] = (),
                 settings: tuple[SettingRule, ...] = (), sections: Any = None, options: Any = _NOT_GIVEN,
                 **section_values: Any):
        for name, value in (("method", method), ("weight", weight), ("activation", activation), ("roles", roles),
                            ("calib_batch_size", calib_batch_size), ("init", init),
                            ("rules", rules), ("settings", settings)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "sections", self._gather_sections(sections, options, section_values))
        self._validate()

    def _gather_sections(self, sections: Any, options: Any, section_values: dict) -> Sections:
        """The sections of this config: ``sections``, then the keywords, then ``options`` (the
        method's own section; filled with its class's defaults when absent). Every entry is
        checked against its registered class; the options of another method are refused."""
        if not isinstance(self.method, str) or not self.method:
            raise ConfigError(f"QuantConfig.method must be a method name, got {self.method!r}")
        if sections is not None and not isinstance(sections, Mapping):
            raise ConfigError(f"QuantConfig.sections must map section names to sections, got {type(sections).__name__}")
        given = [(name, value, f"QuantConfig.sections[{name!r}]") for name, value in (sections or {}).items()]
        given += [(name, value, f"QuantConfig.{name}") for name, value in section_values.items()]
        values = {}
        for name, value, where in given:
            info = section_info(name) if isinstance(name, str) else None
            if info is None:
                raise ConfigError(
                    f"{where}: {name!r} is neither a QuantConfig field ({', '.join(_CORE_KEYS)}, sections, options) nor "
                    f"a registered config section ({', '.join(section_names())}); a plug-in's section "
                    "is registered by importing its module (vmfx.register_section)")
            values[name] = info.to_section(value, where)
        own = method_section(self.method)
        if options is not _NOT_GIVEN:
            if own is None and options is not None:
                raise ConfigError(f"QuantConfig.options is for a method's own options, but method {self.method!r} "
                                  f"declares none (got a {type(options).__name__}): register them with "
                                  "vmfx.passes.register_method(name, options=TheirClass)")
            if own is not None:
                if options is not None and not isinstance(options, own.cls):
                    raise ConfigError(f"method {self.method!r} takes options of type {own.cls.__name__}, got "
                                      f"{type(options).__name__}")
                values[own.name] = options
        values = {name: value for name, value in values.items() if value is not None}
        for name in values:
            owner = section_info(name).method
            if owner is not None and owner != self.method:
                drop = f"{name}=None" if name.isidentifier() else f"**{{{name!r}: None}}"
                raise ConfigError(f"the section {name!r} holds the options of method {owner!r}, but this config's method "
                                  f"is {self.method!r}: drop it (config.replace({drop}, ...))")
        if own is not None and own.name not in values:
            values[own.name] = own.cls()
        return Sections(values)

    def __getattr__(self, name: str) -> Any:
        """``config.<name>`` for a plug-in's section (the built-in ones are properties)."""
        info = section_info(name) if not name.startswith("_") else None
        if info is None:
            raise AttributeError(f"'QuantConfig' object has no attribute {name!r}")
        return info.keyword_value(object.__getattribute__(self, "sections").get(name))

    def section(self, name: str) -> Any:
        """Section ``name`` as its keyword reads (the instance, or None when absent; a bool for
        ``split_softplus``, a tuple of roles for ``bias_correction``)."""
        info = section_info(name)
        if info is None:
            raise ConfigError(f"{name!r} is not a registered config section; those are "
                              f"{', '.join(section_names())}")
        return info.keyword_value(self.sections.get(name))

    @property
    def options(self) -> Any:
        """The method's own options (the section named after the method), or None when the method
        declares none."""
        own = method_section(self.method)
        return self.sections.get(own.name) if own is not None else None

    def _validate(self) -> None:
        """Check the core fields and the settings against the sections (normalising sequences to
        tuples)."""
        if not isinstance(self.weight, QuantSpec) or not isinstance(self.activation, QuantSpec):
            raise ConfigError("QuantConfig.weight and QuantConfig.activation must be QuantSpec instances")
        _check_weight_spec(self.weight, "QuantConfig.weight")
        rules = tuple(self.rules)
        for rule in rules:
            if not isinstance(rule, QuantRule):
                raise ConfigError(f"QuantConfig.rules must hold QuantRule instances, got {type(rule).__name__}")
        object.__setattr__(self, "rules", rules)
        roles = tuple(self.roles)
        unknown = [r for r in roles if r not in QUANTIZABLE_ROLES]
        if unknown or not roles:
            raise ConfigError(f"QuantConfig.roles must be a non-empty subset of {QUANTIZABLE_ROLES}, got {self.roles!r}")
        object.__setattr__(self, "roles", roles)
        if not isinstance(self.calib_batch_size, int) or self.calib_batch_size < 1:
            raise ConfigError(f"QuantConfig.calib_batch_size must be a positive integer, got {self.calib_batch_size!r}")
        if not isinstance(self.init, InitConfig):
            raise ConfigError(f"QuantConfig.init must be an InitConfig, got {type(self.init).__name__}")
        settings = tuple(self.settings)
        for rule in settings:
            if not isinstance(rule, SettingRule):
                raise ConfigError(f"QuantConfig.settings must hold SettingRule instances, got {type(rule).__name__}")
            sub = rule.setting.split(".")[0]
            if sub not in self.sections:
                raise ConfigError(f"the setting rule '{rule.describe()}' sets {rule.setting}, but this config has no "
                                  f"{sub} (QuantConfig.{sub} is None: method {self.method!r} does not run it)")
        object.__setattr__(self, "settings", settings)
        self._check_dynamic_activations()
        self._check_clusters_not_learned()

    def _check_clusters_not_learned(self) -> None:
        """JLSS learns a linear's input step sizes position by position: it would break k-scaled
        clusters (one shared scale per cluster). Refuse the combination up front."""
        if self.jlss is None:
            return
        specs = [self.activation] + [r.spec for r in self.rules if r.edge == "input" and r.spec is not None]
        if any(s.granularity == "cluster" for s in specs):
            raise ConfigError(
                "JLSS cannot learn 'cluster' (k-scaled) input scales: it learns one step size per position. "
                "Use cluster specs on output edges (JLSS leaves those alone) or another input granularity"
            )

    def _check_dynamic_activations(self) -> None:
        """Dynamic activations have no calibrated range: smoothing statistics and learned step
        sizes need static ones. Say so now, not deep inside the pipeline."""
        dynamic = [f"a rule on {r.edge} edges" for r in self.rules if r.edge != "weight" and r.spec is not None and r.spec.dynamic]
        if self.activation.dynamic:
            dynamic.insert(0, "QuantConfig.activation")
        if not dynamic:
            return
        used = [name for name in _STATIC_ONLY_FEATURES if getattr(self, name) is not None]
        if self.init.method != "minmax":
            used.append(f"init={self.init.method!r}")
        if used:
            raise ConfigError(
                f"dynamic activation specs cannot be combined with {', '.join(used)} (method {self.method!r}): "
                "smoothing, grid-search initialisation and JLSS all work on calibrated static ranges. Use a "
                "static activation spec (dynamic=False), or method 'minmax' without smoothing/jlss and "
                "init=InitConfig('minmax') for dynamic activations"
            )

    def spec_for(self, edge: str, role: str | None, module: str | None = None, node: str | None = None,
                 op: str | None = None) -> QuantSpec | None:
        """The spec of one edge of one node: the defaults (``weight`` / ``activation`` for the
        linears whose role is in ``roles``), then every matching rule in order. None: float.
        Output edges and scan operands (``"scan.B"``, ...) have no default: rules alone decide.
        ``op``: the node's operation (:func:`vmfx.annotations.node_op`), for rules that select by it."""
        if edge not in EDGES and edge not in SCAN_EDGES:
            raise ConfigError(f"edge must be one of {', '.join(EDGES + SCAN_EDGES)}, got {edge!r}")
        if edge == "output" or edge in SCAN_EDGES:
            spec = None
        else:
            spec = (self.weight if edge == "weight" else self.activation) if role in self.roles else None
        for rule in self.rules:
            if rule.matches(edge, role, module, node, op):
                spec = rule.spec
        return spec

    def setting_for(self, setting: str, role: str | None = None, module: str | None = None, node: str | None = None,
                    block: int | None = None, direction: str | None = None) -> Any:
        """The value of a per-node method setting (:data:`PER_NODE_SETTINGS`) at one node: the
        section's value, then every matching :class:`SettingRule` in order (the last wins)."""
        if setting not in PER_NODE_SETTINGS:
            raise ConfigError(f"{setting!r} is not a per-node setting; those are {', '.join(PER_NODE_SETTINGS)}")
        sub, name = setting.split(".")
        if sub not in self.sections:
            raise ConfigError(f"this config has no {sub} (QuantConfig.{sub} is None), so no {setting}")
        value = getattr(self.sections[sub], name)
        for rule in self.settings:
            if rule.setting == setting and rule.select.matches(role, module, node, block, direction):
                value = rule.value
        return value

    def rule_for(self, edge: str, role: str | None, module: str | None = None, node: str | None = None,
                 op: str | None = None) -> "QuantRule | None":
        """The last rule matching ``edge`` of this node (the one :meth:`spec_for` takes), or None."""
        found = None
        for rule in self.rules:
            if rule.matches(edge, role, module, node, op):
                found = rule
        return found

    @property
    def bits(self) -> str:
        """The bit setting as written in tables, e.g. ``"w4a8"`` (``"w4a8+rules"`` when rules
        change some edges)."""
        text = f"w{self.weight.bits}a{self.activation.bits}"
        return text + ("+rules" if self.rules else "")

    def replace(self, **changes) -> "QuantConfig":
        """A copy with ``changes``: fields, sections by name (None removes one) or ``options``."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """The config as JSON values (version 4): the core fields, and ``sections`` with each
        section's dict; ``section_modules`` names the module that registered each section not
        defined by :mod:`vmfx.config` (so a reader without it can say what to import)."""
        d = {
            "version": self.VERSION,
            "method": self.method,
            "weight": self.weight.to_dict(),
            "activation": self.activation.to_dict(),
            "roles": list(self.roles),
            "calib_batch_size": self.calib_batch_size,
            "init": fields_to_dict(self.init),
            "rules": [r.to_dict() for r in self.rules],
            "settings": [r.to_dict() for r in self.settings],
            "sections": {name: section_to_dict(value) for name, value in self.sections.items()},
        }
        modules = {name: type(value).__module__ for name, value in self.sections.items()
                   if not section_info(name).builtin}
        if modules:
            d["section_modules"] = modules
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        """Read a dict written by :meth:`to_dict` of this or an earlier version (version 3 held each
        built-in section and ``options`` as a field of its own, version 2 had no ``settings``,
        version 1 no ``rules``). A section not registered here is a :class:`ConfigError` that
        names it and what to import."""
        if not isinstance(d, dict):
            raise ConfigError(f"a QuantConfig must be read from a dict, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("version", cls.VERSION)
        if version not in (1, 2, 3, cls.VERSION):
            raise ConfigError(f"QuantConfig version {version} is not supported (this vmfx reads versions 1 to {cls.VERSION})")
        keys = set(_CORE_KEYS) | ({"sections", "section_modules"} if version >= 4 else
                                  {"options", *_LEGACY_SECTION_KEYS})
        unknown = set(d) - keys
        if unknown:
            raise ConfigError(f"unknown QuantConfig fields {sorted(unknown)} (version {version})")
        kwargs = _core_from_dict(d)
        if version >= 4:
            kwargs["sections"] = _sections_from_dict(d.get("sections", {}), d.get("section_modules", {}))
        else:
            kwargs.update(_legacy_sections_from_dict(d))
        return cls(**kwargs)


def _core_from_dict(d: dict) -> dict:
    """The core fields of a saved config dict, as QuantConfig keywords."""
    kwargs = {name: d[name] for name in ("method", "calib_batch_size") if name in d}
    for name in ("rules", "settings"):
        if name in d and not isinstance(d[name], list):
            raise ConfigError(f"QuantConfig.{name} must be a list, got {type(d[name]).__name__}")
    if "rules" in d:
        kwargs["rules"] = tuple(QuantRule.from_dict(r) for r in d["rules"])
    if "settings" in d:
        kwargs["settings"] = tuple(SettingRule.from_dict(r) for r in d["settings"])
    for name in ("weight", "activation"):
        if name in d:
            kwargs[name] = QuantSpec.from_dict(d[name])
    if "roles" in d:
        kwargs["roles"] = tuple(d["roles"])
    if d.get("init") is not None:
        kwargs["init"] = fields_from_dict(InitConfig, d["init"])
    return kwargs


def _sections_from_dict(sections: Any, modules: Any) -> dict:
    """The ``sections`` of a version-4 dict, each read by its registered class."""
    if not isinstance(sections, dict) or not isinstance(modules, dict):
        raise ConfigError(f"QuantConfig.sections and section_modules must be dicts, got {type(sections).__name__} "
                          f"and {type(modules).__name__}")
    return {name: section_from_dict(name, value, modules.get(name)) for name, value in sections.items()}


def _legacy_sections_from_dict(d: dict) -> dict:
    """The sections of a version-1 to -3 dict, as QuantConfig keywords: the built-in ones were
    fields of their own (``split_softplus`` a bool, ``bias_correction`` a list of roles), a method's
    own options the field ``options``."""
    kwargs = {}
    for name in ("smoothing", "jlss", "search", "outliers", "scan_state"):
        if d.get(name) is not None:
            kwargs[name] = section_from_dict(name, d[name])
    if "split_softplus" in d:
        kwargs["split_softplus"] = d["split_softplus"]
    if "bias_correction" in d:
        roles = d["bias_correction"]
        kwargs["bias_correction"] = tuple(roles) if isinstance(roles, list) else roles
    if d.get("options") is not None:
        method = d.get("method", "minmax")
        options_class = method_options(method)
        if options_class is None:
            raise ConfigError(f"the config has options for method {method!r}, which has no options class registered "
                              "here: import the module that registers the method (vmfx.passes.register_method) first")
        kwargs["options"] = fields_from_dict(options_class, d["options"])
    return kwargs


reserve_names(list(_CORE_KEYS) + [name for name in dir(QuantConfig) if not name.startswith("_")])


def _recipe(method: str, wbits: int, abits: int, **fields_) -> QuantConfig:
    return QuantConfig(method=method, weight=QuantSpec(wbits, symmetric=True, granularity="channel"),
                       activation=QuantSpec(abits, symmetric=False, granularity=fields_.pop("granularity")),
                       **fields_)


_LP = InitConfig(method="lp", p=2.4, candidates=100)

#: The methods, as (preset prefix, recipe). Every recipe quantizes the inputs of every mixer linear
#: (in_proj, x_proj, dt_proj, out_proj, both scan directions) with asymmetric activations and
#: per-output-channel symmetric weights.
_RECIPES = {
    # static min-max, one activation scale per tensor
    "minmax": lambda w, a: _recipe("minmax", w, a, granularity="tensor"),
    # SmoothQuant: per-tensor activations after smoothing (alpha 0.5), min-max ranges
    "smoothquant": lambda w, a: _recipe("smoothquant", w, a, granularity="tensor", smoothing=SmoothingConfig(0.5)),
    # PTQ4VM ablations: per-token static scales (PTS) with the Lp grid-search initialisation ...
    "pts": lambda w, a: _recipe("pts", w, a, granularity="token", init=_LP),
    # ... plus smoothing ...
    "pts-smooth": lambda w, a: _recipe("pts-smooth", w, a, granularity="token", init=_LP, smoothing=SmoothingConfig(0.5)),
    # ... plus JLSS: PTQ4VM, with every linear learning (vmfx's default) ...
    "ptq4vm": lambda w, a: _recipe("ptq4vm", w, a, granularity="token", init=_LP, smoothing=SmoothingConfig(0.5),
                                   jlss=JLSSConfig()),
    # ... or as the official code does it (only in_proj / out_proj learn, every image in every step,
    # gradients through x_proj / dt_proj's float weights)
    "ptq4vm-official": lambda w, a: _recipe("ptq4vm-official", w, a, granularity="token", init=_LP,
                                            smoothing=SmoothingConfig(0.5),
                                            jlss=JLSSConfig(learn_roles=("in_proj", "out_proj"),
                                                             batch_size=None, frozen_gradient="float")),
}

#: Named presets: ``"<recipe>-w<bits>a<bits>"`` for every recipe and bit setting.
PRESETS: dict[str, QuantConfig] = {
    f"{name}-w{w}a{a}": recipe(w, a) for name, recipe in _RECIPES.items() for w, a in BIT_SETTINGS
}


# -- k-scaled ViM PTQ (Shi et al.) ------------------------------------------------------------------


def kscaled_rules(abits: int, k: int = 4) -> tuple[QuantRule, ...]:
    """The official k-scaled ("PTQ4ViM") assignment at ``abits``-bit activations: layer *outputs*
    are quantized, linear inputs are not. Token-wise clusters with power-of-two ratios at the
    out_proj and SSM (scan) outputs; channel-wise clusters at the conv1d output (power-of-two),
    the SiLU output (``conv_act``) and the softplus / delta output (``dt_act``, where the softplus
    is a node of its own: Vim fuses it into the scan, so there only dt_proj's output is quantized);
    plain per-tensor scales at the norm, in_proj, x_proj and dt_proj outputs. Every spec is static
    and symmetric."""
    tensor = QuantSpec(abits, True, "tensor")

    def cluster(axis: str, pow2: bool) -> QuantSpec:
        return QuantSpec(abits, True, "cluster", cluster_axis=axis, clusters=k, pow2=pow2)

    return (
        *(QuantRule("input", None, role=r) for r in LINEAR_ROLES),
        *(QuantRule("output", tensor, role=r) for r in ("norm", "in_proj", "x_proj", "dt_proj")),
        QuantRule("output", cluster("channel", True), role="conv1d"),
        QuantRule("output", cluster("channel", False), role="conv_act"),
        QuantRule("output", cluster("channel", False), role="dt_act"),
        QuantRule("output", cluster("token", True), role="scan"),
        QuantRule("output", cluster("token", True), role="out_proj"),
    )


def _kscaled_recipe(wbits: int, abits: int) -> QuantConfig:
    """k-scaled ViM PTQ on the linears and convs' outputs (the paper's Table I setting): per-tensor
    symmetric weights (the official config), :func:`kscaled_rules` activations, min-max init then
    the similarity search (3 rounds, 101 candidates from 0.01x to 1.2x)."""
    return QuantConfig(method="kscaled", weight=QuantSpec(wbits, True, "tensor"),
                       activation=QuantSpec(abits, True, "tensor"), rules=kscaled_rules(abits),
                       search=SimilaritySearchConfig())


_RECIPES["kscaled"] = _kscaled_recipe
PRESETS.update({f"kscaled-w{w}a{a}": _kscaled_recipe(w, a) for w, a in BIT_SETTINGS})

#: The official k-scaled code this family follows (Access-IC-Lab/PTQ_for_ViM at this commit).
KSCALED_OFFICIAL_SOURCE = "Access-IC-Lab/PTQ_for_ViM@d6fc957ac680543f8cf4aed9c17bbde35aa451bb"
#: The official OuroMamba code the ``ouromamba-official-*`` presets follow.
OUROMAMBA_OFFICIAL_SOURCE = "georgia-tech-synergy-lab/ICCV-OuroMamba@562d7e3869afb7fe515db78f61f26ff6770233fa"


def kscaled_official_rules(wbits: int, abits: int, k: int = 4) -> tuple[QuantRule, ...]:
    """The tensors the official k-scaled code quantizes (:data:`KSCALED_OFFICIAL_SOURCE`,
    src/quant_configs/PTQ4ViM.py ``get_module`` and src/quant_utils/net_wrap.py), each at its
    granularity, in the official integer range (``int_range="full"``) with k-means on the
    per-position mean ``|x|`` (``cluster_stat="mean_abs"``):

    * weights, per tensor at ``wbits``: the patch-embedding conv, every RMSNorm, conv1d (min-max) and
      the head (the linears' come from :attr:`QuantConfig.weight`);
    * outputs, per tensor at ``abits``: the patch embedding, the norms, in_proj, x_proj, dt_proj and
      the head;
    * outputs, k-scaled channel-wise (``k`` clusters): conv1d, the SiLU after it, the softplus
      (delta; where the model has it as a node of its own) and the gate's SiLU ``act_z`` (one
      quantizer for both directions of a block, as there);
    * outputs, k-scaled token-wise with power-of-two ratios: the scan and out_proj.

    conv1d's clusters get no power-of-two ratios: the config asks for them (PTQ4ViM.py:65) but
    ``QuantConv1d._search_best_o_interval`` (src/quant_layers/QuantConv1d.py:245-289) never applies
    them. Linear inputs stay float."""
    full = {"int_range": "full"}
    tensor = QuantSpec(abits, True, "tensor", **full)
    weight = QuantSpec(wbits, True, "tensor", **full)

    def cluster(axis: str, pow2: bool) -> QuantSpec:
        return QuantSpec(abits, True, "cluster", cluster_axis=axis, clusters=k, pow2=pow2, cluster_stat="mean_abs",
                         **full)

    return (
        *(QuantRule("input", None, role=r) for r in LINEAR_ROLES),
        *(QuantRule("weight", weight, role=r) for r in ("patch_embed", "norm", "conv1d", "head")),
        *(QuantRule("output", tensor, role=r) for r in ("patch_embed", "norm", "in_proj", "x_proj", "dt_proj", "head")),
        QuantRule("output", cluster("channel", False), role="conv1d"),
        QuantRule("output", cluster("channel", False), role="conv_act"),
        QuantRule("output", cluster("channel", False), role="dt_act"),
        QuantRule("output", cluster("channel", False), role="gate", op="silu", shared="mixer"),
        QuantRule("output", cluster("token", True), role="scan"),
        QuantRule("output", cluster("token", True), role="out_proj"),
    )


def _kscaled_official_recipe(wbits: int, abits: int) -> QuantConfig:
    """k-scaled ViM PTQ as the official code runs it: :func:`kscaled_official_rules`, per-tensor
    full-range linear weights, the similarity search on every calibration image (the patch
    embedding's and the norms' scales stay min-max), and the 8-bit reparameterized hidden state
    searched exhaustively (the official ``h_config`` keeps 8 bits at every setting); a scan's fused
    softplus is split off so that its output is quantized (``split_softplus``); dt_proj's and the
    head's biases absorb their weight quantization's mean output error (``bias_correction``)."""
    return QuantConfig(method="kscaled-official", weight=QuantSpec(wbits, True, "tensor", int_range="full"),
                       activation=QuantSpec(abits, True, "tensor", int_range="full"),
                       rules=kscaled_official_rules(wbits, abits),
                       search=SimilaritySearchConfig(images=None, keep_roles=("patch_embed", "norm")),
                       scan_state=ScanStateConfig(bits=8, reparameterize=True, exhaustive=True),
                       split_softplus=True, bias_correction=("dt_proj", "head"))


_RECIPES["kscaled-official"] = _kscaled_official_recipe
PRESETS.update({f"kscaled-official-w{w}a{a}": _kscaled_official_recipe(w, a) for w, a in BIT_SETTINGS})
# -- OuroMamba presets ------------------------------------------------------------------------------


def _ouromamba_recipe(w: int, a: int) -> QuantConfig:
    """OuroMamba-Quant: 4-bit (w) per-channel weights by the Lp (p = 2.4) grid; symmetric per-token
    inliers at ``a`` bits on the inputs of every mixer linear, and the asymmetric variant on delta
    (``dt_proj``'s output); outlier channels at ``min(2a, 16)`` bits (W4A4O8, W4A8O16); block-wise
    step-size learning (AdamW 5e-4 for weights and activations, 1 - cosine, gradient clip 2.0), the
    delta quantizer learning too. No smoothing."""
    return QuantConfig(
        method="ouromamba",
        weight=QuantSpec(w, symmetric=True, granularity="channel"),
        activation=QuantSpec(a, symmetric=True, granularity="token"),
        init=_LP,
        jlss=JLSSConfig(lr_weight=5e-4, lr_act=5e-4, grad_clip=2.0, learn_outputs=True),
        outliers=OutlierConfig(bits=min(2 * a, 16)),
        rules=(QuantRule("output", QuantSpec(a, symmetric=False, granularity="token"), role="dt_proj"),),
    )


_RECIPES["ouromamba"] = _ouromamba_recipe
PRESETS.update({f"ouromamba-w{w}a{a}": _ouromamba_recipe(w, a) for w, a in BIT_SETTINGS})


def ouromamba_scan_rules(a: int) -> tuple[QuantRule, ...]:
    """The scan operands the official OuroMamba code quantizes, each with one quantizer per mixer
    shared by both directions (ICCV-OuroMamba@562d7e3, quant/vim/modified/mamba_simple.py:84-89
    and :252-277, selective_scan_interface.py:276-306): ``A``, ``B``, ``C`` and ``D`` symmetric per
    token (``A`` and ``D`` as one step holding all their elements), ``delta`` (``dt_proj``'s output,
    bias included, before the softplus) asymmetric per token; all with outlier channels."""
    sym, asym = QuantSpec(a, symmetric=True, granularity="token"), QuantSpec(a, symmetric=False, granularity="token")
    return (*(QuantRule(f"scan.{name}", sym, shared="mixer") for name in ("A", "B", "C", "D")),
            QuantRule("scan.delta", asym, shared="mixer"))


def _ouromamba_official_recipe(w: int, a: int) -> QuantConfig:
    """OuroMamba-Quant as its official code runs it (eval_vim.sh, ouroquant/calibrate.py): the
    linears' inputs and the scan operands A, B, C, D, delta (:func:`ouromamba_scan_rules`) with
    static per-token inliers and outliers at ``2a`` bits, kept in floating point at 16 (W4A8O16);
    the outlier trigger batch-wide; step-size learning for 10 AdamW steps over every calibration
    image (lr 5e-4, weight decay 1e-5, clip 2), only in_proj / out_proj learning, gradients through
    x_proj / dt_proj's float weights, the activations rounded without straight-through estimator,
    delta not learned."""
    return QuantConfig(
        method="ouromamba-official",
        weight=QuantSpec(w, symmetric=True, granularity="channel"),
        activation=QuantSpec(a, symmetric=True, granularity="token"),
        init=_LP,
        jlss=JLSSConfig(steps=10, lr_weight=5e-4, lr_act=5e-4, weight_decay=1e-5, grad_clip=2.0, batch_size=None,
                        learn_roles=("in_proj", "out_proj"), frozen_gradient="float", learn_outputs=False,
                        activation_rounding="zero"),
        outliers=OutlierConfig(bits=min(2 * a, 16), trigger="batch", float_outliers=2 * a >= 16),
        rules=ouromamba_scan_rules(a),
    )


#: The bit settings of the official OuroMamba runs (eval_vim.sh: W4A4O8, W4A8O16).
OUROMAMBA_OFFICIAL_BITS = ((4, 4), (4, 8))
_RECIPES["ouromamba-official"] = _ouromamba_official_recipe
PRESETS.update({f"ouromamba-official-w{w}a{a}": _ouromamba_official_recipe(w, a) for w, a in OUROMAMBA_OFFICIAL_BITS})


#: The presets vmfx itself defines (plug-ins register others, under other names).
_BUILTIN_PRESETS = frozenset(PRESETS)


def preset_names() -> list[str]:
    return sorted(PRESETS)


def register_preset(name: str, config: QuantConfig) -> QuantConfig:
    """Add ``config`` as the preset ``name`` (e.g. a plug-in method's ``"mymethod-w8a8"``), usable
    wherever a preset name is (``vmfx.compile``, the CLI's ``--config``). A built-in preset's name
    cannot be taken; registering a name again replaces that registration."""
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ConfigError(f"a preset name is a non-empty word, got {name!r}")
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"register_preset takes a QuantConfig, got {type(config).__name__}")
    if name in _BUILTIN_PRESETS:
        raise ConfigError(f"{name!r} is a built-in preset: give yours another name")
    PRESETS[name] = config
    return config


def preset(name: str) -> QuantConfig:
    """The preset called ``name``; a :class:`ConfigError` listing the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}") from None


def resolve_config(config) -> QuantConfig:
    """A preset name or a QuantConfig -> QuantConfig. Anything else is a ConfigError."""
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, str):
        return preset(config)
    raise ConfigError(
        f"config must be a preset name (one of {', '.join(preset_names())}) or a vmfx.QuantConfig, "
        f"got {type(config).__name__}"
    )
