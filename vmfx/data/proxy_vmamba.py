"""The bundled VMamba proxy: a small ``vmfx.models.VSSM`` (v2v layout) trained here on the digits.

``benchmarks/train_proxy_vmamba.py`` writes ``proxy/vmamba_proxy_digits.safetensors`` (official
VMamba keys) and ``proxy/vmamba_proxy_digits.json`` (constructor arguments, recipe, log, test
accuracy); :func:`load_proxy_vmamba` rebuilds the model from them.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = ["VMAMBA_PROXY_WEIGHTS", "VMAMBA_PROXY_META", "VMAMBA_PROXY_MODEL_NAME", "vmamba_proxy_metadata",
           "load_proxy_vmamba"]

_DIR = os.path.join(os.path.dirname(__file__), "proxy")
VMAMBA_PROXY_WEIGHTS = os.path.join(_DIR, "vmamba_proxy_digits.safetensors")
VMAMBA_PROXY_META = os.path.join(_DIR, "vmamba_proxy_digits.json")
VMAMBA_PROXY_MODEL_NAME = "vmamba-proxy-digits"


def vmamba_proxy_metadata() -> dict[str, Any]:
    """The JSON record written by the training script."""
    if not os.path.exists(VMAMBA_PROXY_META):
        raise CheckpointError(f"the VMamba proxy's metadata is missing ({VMAMBA_PROXY_META}); train it with "
                              "`python benchmarks/train_proxy_vmamba.py`")
    with open(VMAMBA_PROXY_META) as f:
        return json.load(f)


def load_proxy_vmamba() -> torch.nn.Module:
    """The trained VMamba proxy in eval mode."""
    from safetensors.torch import load_file

    from ..models.vmamba import VSSM

    model = VSSM(**vmamba_proxy_metadata()["model_kwargs"])
    if not os.path.exists(VMAMBA_PROXY_WEIGHTS):
        raise CheckpointError(f"the VMamba proxy weights are missing ({VMAMBA_PROXY_WEIGHTS})")
    model.load_state_dict(load_file(VMAMBA_PROXY_WEIGHTS))
    return model.eval()
