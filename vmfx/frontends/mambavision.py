"""MambaVision (NVlabs, pip package ``mambavision``): CPU import and canonicalization adapters.

``mambavision`` imports mamba-ssm's CUDA-only ``selective_scan_fn`` with no guard, so building a
MambaVision on a CPU needs :func:`enable_mambavision_on_cpu` first (it calls
:func:`~vmfx.frontends.enable_mamba_ssm_on_cpu` and, when the CUDA extension is missing, points the
package's ``selective_scan_fn`` at mamba-ssm's pure-PyTorch ``selective_scan_ref``, so the float
model runs)::

    import vmfx
    vmfx.frontends.enable_mambavision_on_cpu()
    from mambavision.models.mamba_vision import mamba_vision_T
    qmodel = vmfx.compile(mamba_vision_T(), calib_images, "minmax-w8a8")

Adapters (registered by class name; vmfx never imports the package itself):

* ``MambaVisionMixer`` -> :class:`vmfx.nn.ConcatMambaMixer` (same parameters; vmfx's scan op);
* ``MambaVisionLayer`` -> :class:`vmfx.nn.WindowedStage` (same children, traceable window logic;
  its blocks are canonicalized too). Its attention blocks (timm-style ``Attention`` and ``Mlp``)
  trace as they are; their linears get the generic role ``"linear"``.
"""

from __future__ import annotations

import importlib
import types

from torch import nn

from ..nn.mambavision import ConcatMambaMixer, WindowedStage
from .adapters import canonicalize, register_adapter
from .upstream import _has_real_extension, enable_mamba_ssm_on_cpu

__all__ = ["enable_mambavision_on_cpu", "MAMBAVISION_INSTALL"]

_MODULE = "mambavision.models.mamba_vision"

#: How the project installs the optional MambaVision package (see the Makefile).
MAMBAVISION_INSTALL = "pip install --no-deps mambavision==1.2.0 (after mamba-ssm, timm and einops)"


def enable_mambavision_on_cpu() -> types.ModuleType:
    """Make ``mambavision`` importable and its float models runnable without mamba-ssm's CUDA
    extension; returns ``mambavision.models.mamba_vision``.

    Raises:
        ImportError: ``mambavision`` (or mamba-ssm, timm, einops) is not installed; the message
            says how the project installs it.
    """
    stubbed = not _has_real_extension()
    try:
        enable_mamba_ssm_on_cpu()
        module = importlib.import_module(_MODULE)
        interface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    except Exception as exc:
        raise ImportError(
            f"mambavision cannot be imported ({type(exc).__name__}: {exc}); install it with: {MAMBAVISION_INSTALL}"
        ) from exc
    if stubbed:
        module.selective_scan_fn = interface.selective_scan_ref
    return module


@register_adapter(f"{_MODULE}.MambaVisionMixer")
def _adapt_mixer(m: nn.Module) -> ConcatMambaMixer:
    mixer = ConcatMambaMixer(m.d_model, d_state=m.d_state, d_conv=m.d_conv, expand=m.expand, dt_rank=m.dt_rank,
                             conv_bias=m.conv1d_x.bias is not None, bias=m.in_proj.bias is not None, device="meta")
    mixer.load_state_dict(m.state_dict(), strict=True, assign=True)
    return mixer.train(m.training)


@register_adapter(f"{_MODULE}.MambaVisionLayer")
def _adapt_layer(m: nn.Module) -> WindowedStage:
    blocks = canonicalize(m.blocks)
    return WindowedStage(blocks, m.downsample, m.window_size, m.transformer_block).train(m.training)
