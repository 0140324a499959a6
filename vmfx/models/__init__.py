"""Model definitions with the official checkpoint layouts, and their timm registration.

Importing this package registers the five official Vim names, LocalMamba's five LocalVim and four LocalVSSM names and
the nine VMamba builder names (``vanilla_vmamba_tiny``, ``vmamba_tiny_s1l8``, ...) in timm's model registry, so that
``timm.create_model("vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
num_classes=10)`` works. The registration is idempotent: importing (or reloading) the package again
does not duplicate entries or warn. No weights are downloaded: ``pretrained=True`` raises and points
to :func:`load_checkpoint` with the official file names.

Example::

    import timm, vmfx.models
    model = timm.create_model(
        "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2")
    vmfx.models.load_checkpoint(model, "vim_t_midclstok_76p1acc.pth")
"""

from __future__ import annotations

import warnings

from .checkpoint import CheckpointNotFoundError, LoadedCheckpoint, load_checkpoint
from .vim import VIM_ENTRYPOINTS, VIM_VARIANTS, VisionMamba
from .localmamba import LOCAL_VIM_ENTRYPOINTS, LOCAL_VIM_VARIANTS, LocalVim
from .vmamba import VMAMBA_ENTRYPOINTS, VMAMBA_VARIANTS, VSSM
from .local_vmamba import LOCAL_VSSM_ENTRYPOINTS, LOCAL_VSSM_VARIANTS, LocalVSSM

__all__ = [
    "VisionMamba",
    "load_checkpoint",
    "LoadedCheckpoint",
    "CheckpointNotFoundError",
    "VIM_VARIANTS",
    "register_timm_models",
    # LocalMamba: LocalVim
    "LocalVim",
    "LOCAL_VIM_VARIANTS",
    # VMamba
    "VSSM",
    "VMAMBA_VARIANTS",
    # LocalMamba: LocalVSSM
    "LocalVSSM",
    "LOCAL_VSSM_VARIANTS",
]


def register_timm_models() -> None:
    """Register the official Vim entry points in timm's registry (idempotent).

    A name already bound to the same function is left alone; a name bound to an earlier version of
    these entry points (after ``importlib.reload``) is re-bound without timm's overwrite warning. A
    name registered by another package (e.g. the official ``models_mamba``) is overwritten, with
    timm's warning.
    """
    from timm.models import is_model, model_entrypoint, register_model

    for fn in VIM_ENTRYPOINTS + LOCAL_VIM_ENTRYPOINTS + VMAMBA_ENTRYPOINTS + LOCAL_VSSM_ENTRYPOINTS:
        name = fn.__name__
        if is_model(name):
            current = model_entrypoint(name)
            if current is fn:
                continue
            if getattr(current, "__module__", None) == fn.__module__:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    register_model(fn)
                continue
        register_model(fn)


register_timm_models()
