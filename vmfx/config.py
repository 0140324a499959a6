"""Quantization configs and named presets.

A :class:`QuantConfig` is a frozen, validated dataclass with a ``VERSION`` (so saved configs can
be read back and migrated), ``to_dict`` / ``from_dict``, and no callables. Presets are named
configs: ``"<method>-w<bits>a<bits>"``, e.g. ``"minmax-w8a8"``.

Which passes a method runs is decided by :mod:`vmfx.passes.pipeline`; the config only says what
to quantize and how.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import ClassVar

from .annotations import LINEAR_ROLES
from .errors import ConfigError
from .quant.spec import QuantSpec

__all__ = [
    "QuantConfig",
    "SmoothingConfig",
    "InitConfig",
    "JLSSConfig",
    "PRESETS",
    "preset",
    "preset_names",
    "resolve_config",
    "BIT_SETTINGS",
]

#: The weight/activation bit settings every method is evaluated at.
BIT_SETTINGS = ((8, 8), (6, 6), (4, 8), (4, 4))


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
        if not isinstance(self.candidates, int) or self.candidates < 1:
            raise ConfigError(f"InitConfig.candidates must be a positive integer, got {self.candidates!r}")
        if not float(self.p) > 0:
            raise ConfigError(f"InitConfig.p must be positive, got {self.p!r}")


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
            size (the official code uses all 256 images in every step, on a GPU).
        learn_roles: the linears whose parameters learn. All four by default; the official code's
            behaviour (only ``in_proj`` and ``out_proj`` get gradients; ``x_proj`` / ``dt_proj``
            keep their initial values) is ``("in_proj", "out_proj")``.
    """

    steps: int = 100
    lr_weight: float = 5e-4
    lr_act: float = 5e-4
    lr_smooth: float = 1e-2
    weight_decay: float = 1e-5
    grad_clip: float = 2.0
    batch_size: int = 64
    learn_roles: tuple[str, ...] = LINEAR_ROLES

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"JLSSConfig.steps must be a non-negative integer, got {self.steps!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"JLSSConfig.batch_size must be a positive integer, got {self.batch_size!r}")
        roles = tuple(self.learn_roles)
        if not roles or any(r not in LINEAR_ROLES for r in roles):
            raise ConfigError(f"JLSSConfig.learn_roles must be a non-empty subset of {LINEAR_ROLES}, got {self.learn_roles!r}")
        object.__setattr__(self, "learn_roles", roles)
        for name in ("lr_weight", "lr_act", "lr_smooth", "grad_clip"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"JLSSConfig.{name} must be positive, got {getattr(self, name)!r}")


_SUBCONFIGS = {"smoothing": SmoothingConfig, "init": InitConfig, "jlss": JLSSConfig}


@dataclass(frozen=True)
class QuantConfig:
    """Full control over a quantization run.

    Args:
        method: name of a registered method (``vmfx.passes.pipeline.methods()``), e.g. "minmax".
        weight: spec of the weights of every quantized linear (per-output-channel symmetric by
            default).
        activation: spec of the inputs of every quantized linear.
        roles: which linears of the mixers to quantize (both scan directions of each role).
        calib_batch_size: batch size for calibration when the data is one tensor.
        init: how static step sizes are initialised (min-max or Lp grid search).
        smoothing: SmoothQuant smoothing (None: off).
        jlss: PTQ4VM's block-wise learning of step sizes and smoothing (None: off).

    Example::

        cfg = QuantConfig(method="minmax", weight=QuantSpec(4, True, "channel"),
                          activation=QuantSpec(8, False, "tensor"))
        qmodel = vmfx.compile(model, images, config=cfg)
    """

    VERSION: ClassVar[int] = 1

    method: str = "minmax"
    weight: QuantSpec = field(default_factory=lambda: QuantSpec(8, symmetric=True, granularity="channel"))
    activation: QuantSpec = field(default_factory=lambda: QuantSpec(8, symmetric=False, granularity="tensor"))
    roles: tuple[str, ...] = LINEAR_ROLES
    calib_batch_size: int = 32
    init: InitConfig = field(default_factory=InitConfig)
    smoothing: SmoothingConfig | None = None
    jlss: JLSSConfig | None = None

    def __post_init__(self):
        if not isinstance(self.method, str) or not self.method:
            raise ConfigError(f"QuantConfig.method must be a method name, got {self.method!r}")
        if not isinstance(self.weight, QuantSpec) or not isinstance(self.activation, QuantSpec):
            raise ConfigError("QuantConfig.weight and QuantConfig.activation must be QuantSpec instances")
        if self.weight.dynamic:
            raise ConfigError("weights are quantized once, offline: QuantConfig.weight cannot be dynamic")
        if self.weight.granularity == "token":
            raise ConfigError("weights have no tokens: use granularity 'channel' or 'tensor' for QuantConfig.weight")
        roles = tuple(self.roles)
        unknown = [r for r in roles if r not in LINEAR_ROLES]
        if unknown or not roles:
            raise ConfigError(f"QuantConfig.roles must be a non-empty subset of {LINEAR_ROLES}, got {self.roles!r}")
        object.__setattr__(self, "roles", roles)
        if not isinstance(self.calib_batch_size, int) or self.calib_batch_size < 1:
            raise ConfigError(f"QuantConfig.calib_batch_size must be a positive integer, got {self.calib_batch_size!r}")
        for name, sub_cls in _SUBCONFIGS.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, sub_cls):
                raise ConfigError(f"QuantConfig.{name} must be a {sub_cls.__name__} or None, got {type(value).__name__}")
        if self.init is None:
            raise ConfigError("QuantConfig.init must be an InitConfig")

    @property
    def bits(self) -> str:
        """The bit setting as written in tables, e.g. ``"w4a8"``."""
        return f"w{self.weight.bits}a{self.activation.bits}"

    def replace(self, **changes) -> "QuantConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {
            "version": self.VERSION,
            "method": self.method,
            "weight": self.weight.to_dict(),
            "activation": self.activation.to_dict(),
            "roles": list(self.roles),
            "calib_batch_size": self.calib_batch_size,
            **{name: _sub_to_dict(getattr(self, name)) for name in _SUBCONFIGS},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        d = dict(d)
        version = d.pop("version", cls.VERSION)
        if version != cls.VERSION:
            raise ConfigError(f"QuantConfig version {version} is not supported (this vmfx reads version {cls.VERSION})")
        unknown = set(d) - {"method", "weight", "activation", "roles", "calib_batch_size", *_SUBCONFIGS}
        if unknown:
            raise ConfigError(f"unknown QuantConfig fields {sorted(unknown)}")
        for name, sub_cls in _SUBCONFIGS.items():
            if d.get(name) is not None:
                d[name] = _sub_from_dict(sub_cls, d[name])
        if "weight" in d:
            d["weight"] = QuantSpec.from_dict(d["weight"])
        if "activation" in d:
            d["activation"] = QuantSpec.from_dict(d["activation"])
        if "roles" in d:
            d["roles"] = tuple(d["roles"])
        return cls(**d)


def _sub_to_dict(value) -> dict | None:
    if value is None:
        return None
    d = asdict(value)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _sub_from_dict(cls, d: dict):
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


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
    # ... or as the official code does it (only in_proj / out_proj learn)
    "ptq4vm-official": lambda w, a: _recipe("ptq4vm-official", w, a, granularity="token", init=_LP,
                                            smoothing=SmoothingConfig(0.5),
                                            jlss=JLSSConfig(learn_roles=("in_proj", "out_proj"))),
}

#: Named presets: ``"<recipe>-w<bits>a<bits>"`` for every recipe and bit setting.
PRESETS: dict[str, QuantConfig] = {
    f"{name}-w{w}a{a}": recipe(w, a) for name, recipe in _RECIPES.items() for w, a in BIT_SETTINGS
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


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
