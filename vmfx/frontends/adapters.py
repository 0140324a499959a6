"""Canonicalization: swap known third-party modules for vmfx's canonical ones.

An *adapter* turns one foreign module into a canonical vmfx module with the same parameters
(same names, same values), so that tracing needs no CUDA extension and every model reaches one
graph vocabulary. Adapters are registered by the foreign class's fully qualified name
(``module.QualName``), so vmfx never imports the third-party package itself: upstream
``mamba_ssm`` cannot even be imported on a machine without its CUDA extension.

Built in:

* ``mamba_ssm.modules.mamba_simple.Mamba`` (upstream Mamba v1, and the official Vim fork of it
  with ``bimamba_type="v2"``) -> :class:`vmfx.nn.MambaMixer`;
* ``mamba_ssm.ops.triton.layer_norm.RMSNorm`` -> :class:`vmfx.nn.RMSNorm`.

Invariant: an adapter's output computes the same function as its input (tested against the real
package) and holds the same ``state_dict`` keys.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..nn.mamba import MambaMixer
from ..nn.norm import RMSNorm

__all__ = ["register_adapter", "canonicalize", "adapters", "qualified_name"]

Adapter = Callable[[nn.Module], nn.Module]
_ADAPTERS: dict[str, Adapter] = {}


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_adapter(qualname: str | type) -> Callable[[Adapter], Adapter]:
    """Register ``fn(module) -> canonical module`` for modules of the given class.

    Args:
        qualname: the class, or its fully qualified name (``"package.module.ClassName"``), which
            avoids importing the package.

    Example::

        @vmfx.frontends.register_adapter("mylib.blocks.MyMamba")
        def _(m):
            mixer = vmfx.nn.MambaMixer(m.dim, d_state=m.n)
            mixer.load_state_dict(m.state_dict())
            return mixer
    """
    key = qualname if isinstance(qualname, str) else qualified_name(qualname)

    def decorator(fn: Adapter) -> Adapter:
        _ADAPTERS[key] = fn
        return fn

    return decorator


def adapters() -> dict[str, Adapter]:
    """A copy of the registry: qualified class name -> adapter."""
    return dict(_ADAPTERS)


def canonicalize(model: nn.Module) -> nn.Module:
    """Replace, in place, every module with a registered adapter; returns the (possibly new) root.

    Children are visited before their parents are considered, and an adapted module's own
    children are not visited again.
    """
    adapter = _ADAPTERS.get(qualified_name(type(model)))
    if adapter is not None:
        return adapter(model)
    for name, child in list(model.named_children()):
        new_child = canonicalize(child)
        if new_child is not child:
            setattr(model, name, new_child)
    return model


# -- built-in adapters ----------------------------------------------------------------------------


@register_adapter("mamba_ssm.modules.mamba_simple.Mamba")
def _adapt_mamba_ssm_mamba(m: nn.Module) -> MambaMixer:
    """Upstream ``Mamba`` (v1) or the Vim fork's bidirectional ``Mamba`` -> ``MambaMixer``."""
    bimamba_type = getattr(m, "bimamba_type", "none")
    if bimamba_type not in ("none", "v2"):
        raise ValueError(
            f"cannot adapt a mamba_ssm Mamba with bimamba_type={bimamba_type!r}: vmfx supports 'none' and 'v2'"
        )
    init_layer_scale = getattr(m, "init_layer_scale", None)
    mixer = MambaMixer(
        d_model=m.d_model,
        d_state=m.d_state,
        d_conv=m.d_conv,
        expand=m.expand,
        dt_rank=m.dt_rank,
        conv_bias=m.conv1d.bias is not None,
        bias=m.in_proj.bias is not None,
        bimamba_type=bimamba_type,
        if_divide_out=bool(getattr(m, "if_divide_out", False)),
        init_layer_scale=init_layer_scale,
        layer_idx=getattr(m, "layer_idx", None),
        device="meta",
    )
    activation = getattr(m, "activation", "silu")
    if activation not in ("silu", "swish"):
        raise ValueError(f"cannot adapt a mamba_ssm Mamba with activation={activation!r}: only SiLU is supported")
    mixer.load_state_dict(m.state_dict(), strict=True, assign=True)
    return mixer.train(m.training)


@register_adapter("mamba_ssm.ops.triton.layer_norm.RMSNorm")
def _adapt_mamba_ssm_rmsnorm(m: nn.Module) -> RMSNorm:
    norm = RMSNorm(m.weight.shape[0], eps=m.eps, device="meta")
    norm.load_state_dict({"weight": m.weight}, strict=True, assign=True)
    return norm.train(m.training)
