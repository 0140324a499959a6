"""Model-declared defaults for the named presets.

Some methods' papers tune a knob per backbone: PTQ4VM smooths with alpha 0.5 on Vim and 0.65 on
VMamba. A model class states its value as a class attribute (``vmfx_smoothing_alpha = 0.65`` on
:class:`vmfx.models.VSSM`); :func:`config_for_model` applies it when the config was given as a
preset *name* (``"ptq4vm-w8a8"``), so ``vmfx.compile(vmamba, calib, "ptq4vm-w8a8")`` runs the
paper's recipe for that backbone. A :class:`~vmfx.config.QuantConfig` passed explicitly is never
changed: it says exactly what runs.
"""

from __future__ import annotations

from torch import nn

from ..config import QuantConfig

__all__ = ["SMOOTHING_ALPHA_ATTR", "config_for_model"]

#: Class attribute of a model naming its smoothing alpha for the presets.
SMOOTHING_ALPHA_ATTR = "vmfx_smoothing_alpha"


def config_for_model(model: nn.Module, given, cfg: QuantConfig) -> QuantConfig:
    """``cfg`` with the model's declared preset defaults applied if ``given`` was a preset name.

    Args:
        model: the float model (its class attributes are read; it is not modified).
        given: what the user passed as ``config`` (a preset name or a QuantConfig).
        cfg: ``given`` resolved to a QuantConfig.
    """
    if not isinstance(given, str) or cfg.smoothing is None:
        return cfg
    alpha = getattr(type(model), SMOOTHING_ALPHA_ATTR, None)
    if alpha is None or float(alpha) == float(cfg.smoothing.alpha):
        return cfg
    from dataclasses import replace

    return cfg.replace(smoothing=replace(cfg.smoothing, alpha=float(alpha)))
