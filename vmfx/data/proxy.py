"""The bundled proxy model: a small Vim trained here on the bundled digits.

``benchmarks/train_proxy.py`` trains it (official Vim architecture: bidirectional v2 mixers,
middle class token, absolute position embedding, RMSNorm residual stream; 30x30 one-channel images
in 4x4 patches at stride 2, so 14x14 = 196 patches and 197 tokens) and writes two files next to this module:

* ``proxy/vim_proxy_digits.safetensors``: the float32 weights (official state_dict keys);
* ``proxy/vim_proxy_digits.json``: the constructor arguments, the training recipe and log, and the
  test accuracy it reached on the fixed 1000-image split of :mod:`vmfx.data.digits`.

:func:`load_proxy_model` rebuilds it from those two files. The recorded accuracy is a regression
anchor: the tests check that the loaded model reproduces it exactly.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = ["PROXY_DIR", "PROXY_WEIGHTS", "PROXY_META", "PROXY_MODEL_NAME", "proxy_metadata", "build_proxy_model", "load_proxy_model"]

PROXY_DIR = os.path.join(os.path.dirname(__file__), "proxy")
PROXY_WEIGHTS = os.path.join(PROXY_DIR, "vim_proxy_digits.safetensors")
PROXY_META = os.path.join(PROXY_DIR, "vim_proxy_digits.json")
PROXY_MODEL_NAME = "vim-proxy-digits"


def proxy_metadata() -> dict[str, Any]:
    """The JSON record written by the training script (model kwargs, recipe, log, accuracy)."""
    if not os.path.exists(PROXY_META):
        raise CheckpointError(
            f"the bundled proxy model's metadata is missing ({PROXY_META}); train it with "
            "`python benchmarks/train_proxy.py`"
        )
    with open(PROXY_META) as f:
        return json.load(f)


def build_proxy_model(**overrides) -> torch.nn.Module:
    """An untrained proxy Vim with the recorded constructor arguments (``overrides`` win)."""
    from ..models.vim import VisionMamba

    from .digits import DIGITS_MEAN, DIGITS_STD

    kwargs = dict(proxy_metadata()["model_kwargs"])
    kwargs.update(overrides)
    model = VisionMamba(**kwargs)
    # the input normalisation, where timm models keep theirs (read by vmfx.data.input_normalization)
    model.pretrained_cfg = model.default_cfg = {"mean": (DIGITS_MEAN,), "std": (DIGITS_STD,)}
    return model


def load_proxy_model() -> torch.nn.Module:
    """The trained proxy Vim in eval mode (weights from the bundled safetensors file)."""
    from safetensors.torch import load_file

    model = build_proxy_model()
    if not os.path.exists(PROXY_WEIGHTS):
        raise CheckpointError(f"the bundled proxy weights are missing ({PROXY_WEIGHTS})")
    state = load_file(PROXY_WEIGHTS)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"proxy weights do not fit the recorded model: missing {missing}, unexpected {unexpected}")
    return model.eval()
