"""The kernel variants whose generated Triton source is kept as a golden snapshot.

:data:`VARIANTS` maps ``<template>.<variant>`` (the snapshot's file name under
``tests/lowering/golden/``, with ``.py``) to the ``render_*`` function of
:mod:`vmfx.lowering.kernels` and its keyword arguments. It holds

* every distinct render call the lowering of the proxy Vim makes at W8A8, W4A8 and W4A4 with the
  minmax, pts, pts-smooth, smoothquant, kscaled, ouromamba, ptq4vm and rotate presets (listed by
  ``benchmarks/dump_kernel_sources.py``, file ``render_calls.txt``): ``conv_bidir``, ``merge``,
  ``mixed_qlinear``, ``qlinear``, ``qlinear_group`` and ``scan_merge``;
* the templates the proxy does not use (``quantize``, ``conv``, ``scan``, ``hadamard_quantize`` and
  ``hadamard_qlinear``: the rotate-online presets; the Smooth-SiLU gate of ``scan`` and ``scan_merge``:
  the rotate-smooth-online presets) and the options the
  presets leave off (packed weights, half-precision outputs, epilogue ops, fixed-block launches,
  stored accumulators, quantized scan states, workspace reuse), as the kernel tests call them.

Each snapshot is rendered with the provenance ``("golden.<name>",)``.
"""

from __future__ import annotations

from vmfx.lowering import kernels
from vmfx.lowering.kernels.scan_merge import DtProj


def _bits(bits: int, per_token: bool) -> str:
    return f"a{bits}.{'token' if per_token else 'tensor'}"


def _preset_variants() -> dict[str, tuple[str, dict]]:
    """The render calls of the proxy's lowering under the eight presets (see module docstring)."""
    out: dict[str, tuple[str, dict]] = {}
    for bits in (8, 4):
        for per_token in (False, True):
            tag = _bits(bits, per_token)
            out[f"qlinear.{tag}.float"] = ("render_qlinear", dict(
                act_bits=bits, autotune=True, bias=False, epilogue=[], per_token=per_token, prequantized=False,
                smooth=False))
            out[f"qlinear.{tag}.codes.add"] = ("render_qlinear", dict(
                act_bits=bits, autotune=True, bias=False, epilogue=[("add", "extra0")], per_token=per_token,
                prequantized=True, smooth=False))
            for packed in ((False, True) if bits == 8 else (True,)):
                out[f"qlinear_group.{tag}.{'packed' if packed else 'int8'}"] = ("render_qlinear_group", dict(
                    act_bits=bits, autotune=True, bias=False, packed=packed, per_token=per_token))
            for smooth in (False, True):
                stag = f"{tag}.{'smooth' if smooth else 'plain'}"
                out[f"conv_bidir.{stag}.codes"] = ("render_conv_bidir", dict(
                    act_bits=bits, autotune=True, bias_b=True, bias_f=True, emit_codes=True, per_token=per_token,
                    smooth_b=smooth, smooth_f=smooth, width=4))
                dt = DtProj(per_token=per_token, smooth=smooth, act_bits=bits, bias=True)
                out[f"scan_merge.{stag}.dt_proj.codes"] = ("render_scan_merge", dict(
                    act_bits=bits, autotune=True, delta_softplus=True, dt_proj_b=dt, dt_proj_f=dt, emit_codes=True,
                    has_D_b=True, has_D_f=True, has_z=True, per_token=per_token, smooth=smooth, write_float=False))
    out["conv_bidir.float"] = ("render_conv_bidir", dict(
        act_bits=8, autotune=True, bias_b=True, bias_f=True, emit_codes=False, per_token=False, smooth_b=False,
        smooth_f=False, width=4))
    out["merge.float"] = ("render_merge", dict(
        act_bits=8, autotune=True, backward=True, emit_codes=False, per_token=False, smooth=False, write_float=True))
    out["scan_merge.float"] = ("render_scan_merge", dict(
        act_bits=8, autotune=True, delta_softplus=True, emit_codes=False, has_D_b=True, has_D_f=True, has_z=True,
        per_token=False, smooth=False, write_float=True))
    for bias in (False, True):
        for wide in (False, True):
            out[f"mixed_qlinear.{'bias' if bias else 'nobias'}.{'wide' if wide else 'narrow'}"] = (
                "render_mixed_qlinear", dict(bias=bias, wide_outliers=wide))
    return out


def _option_variants() -> dict[str, tuple[str, dict]]:
    """Templates and options the presets do not reach on the proxy, as the kernel tests use them."""
    return {
        "quantize.a8.token": ("render_quantize", dict()),
        "hadamard_quantize.n192.a8.token": ("render_hadamard_quantize", dict(n=192)),
        "hadamard_quantize.n64.a4.tensor.smooth.autotune": ("render_hadamard_quantize", dict(
            n=64, per_token=False, smooth=True, act_bits=4, autotune=True)),
        "hadamard_quantize.n20.a8.token": ("render_hadamard_quantize", dict(n=20)),
        "hadamard_qlinear.n192.a4.token.packed.add": ("render_hadamard_qlinear", dict(
            n=192, act_bits=4, packed=True, bias=False, epilogue=[("add", "extra0")], autotune=True)),
        "hadamard_qlinear.n64.a8.tensor.smooth.store_acc.fp16": ("render_hadamard_qlinear", dict(
            n=64, per_token=False, smooth=True, store_acc=True, out_dtype="float16")),
        "quantize.a4.tensor.smooth.autotune": ("render_quantize", dict(per_token=False, smooth=True, act_bits=4,
                                                                       autotune=True)),
        "qlinear.default": ("render_qlinear", dict()),
        "qlinear.smooth.epilogue.fp16": ("render_qlinear", dict(
            smooth=True, epilogue=[("silu",), ("softplus",), ("mul", 0.5), ("rsub", 1.0), ("rdiv", "res"),
                                   ("mul", "gamma", "channel"), ("add", "res")], out_dtype="float16")),
        "qlinear.packed.codes.store_acc": ("render_qlinear", dict(packed=True, prequantized=True, store_acc=True,
                                                                  act_bits=4, per_token=False)),
        "qlinear.packed.float.bf16": ("render_qlinear", dict(packed=True, smooth=True, out_dtype="bfloat16")),
        "qlinear_group.default": ("render_qlinear_group", dict()),
        "qlinear_group.packed.bf16": ("render_qlinear_group", dict(packed=True, per_token=False, bias=True,
                                                                   out_dtype="bfloat16")),
        "conv.default": ("render_conv", dict(width=4)),
        "conv.flip.codes.smooth.fp16": ("render_conv", dict(width=3, flip=True, emit_codes=True, smooth=True,
                                                            act_bits=4, out_dtype="float16")),
        "conv.nobias.tensor.autotune": ("render_conv", dict(width=4, bias=False, emit_codes=True, per_token=False,
                                                            autotune=True)),
        "conv_bidir.nobias.fp16": ("render_conv_bidir", dict(width=3, bias_f=False, bias_b=False,
                                                              out_dtype="float16")),
        "scan.default": ("render_scan", dict()),
        "scan.state.scales": ("render_scan", dict(step_scale=True, out_scale=True, quant_state=True, state_bits=6)),
        "scan.bias.flip.nogate.bf16.autotune": ("render_scan", dict(
            has_D=False, delta_bias=True, delta_softplus=False, flip_z=True, has_z=False, autotune=True,
            out_dtype="bfloat16")),
        "merge.default": ("render_merge", dict()),
        "merge.codes.smooth.token.fp16": ("render_merge", dict(emit_codes=True, smooth=True, act_bits=4,
                                                                out_dtype="float16")),
        "merge.codes_only.forward": ("render_merge", dict(backward=False, write_float=False, emit_codes=True,
                                                          per_token=False)),
        "scan_merge.default": ("render_scan_merge", dict()),
        "scan_merge.workspace.codes.smooth": ("render_scan_merge", dict(emit_codes=True, per_token=True, smooth=True,
                                                                        workspace_is_out=True)),
        "scan_merge.codes_only.noD_b.bf16": ("render_scan_merge", dict(
            emit_codes=True, per_token=False, write_float=False, has_D_b=False, act_bits=4, has_z=False,
            delta_softplus=False, out_dtype="bfloat16")),
        "scan_merge.dt_proj.mixed": ("render_scan_merge", dict(
            emit_codes=True, write_float=False, delta_softplus=False, dt_proj_f=DtProj(False, True, 8, False),
            dt_proj_b=DtProj(True, False, 4, True))),
        "mixed_qlinear.store_acc.fp16": ("render_mixed_qlinear", dict(store_acc=True, out_dtype="float16")),
        "scan.smooth_gate.flip": ("render_scan", dict(smooth_gate=True, flip_z=True)),
        "scan_merge.smooth_gate.dt_proj.float": ("render_scan_merge", dict(
            autotune=True, delta_softplus=True, dt_proj_f=DtProj(True, False, 8, True),
            dt_proj_b=DtProj(True, False, 8, True), has_D_b=True, has_D_f=True, has_z=True, write_float=True,
            smooth_gate=True)),
    }


VARIANTS: dict[str, tuple[str, dict]] = {**_preset_variants(), **_option_variants()}


def render_variant(name: str) -> str:
    """The generated source of the variant ``name`` (provenance ``("golden.<name>",)``)."""
    renderer, kwargs = VARIANTS[name]
    return getattr(kernels, renderer)(**kwargs, provenance=(f"golden.{name}",))
