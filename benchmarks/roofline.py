"""Roofline on paper: the end-to-end time of Vim-T/S/B implied by published GPU peaks, FP16 against
the quantized forms vmfx builds or plans, so the speed targets are checked before a GPU measures them.

    python benchmarks/roofline.py        # writes benchmarks/results/roofline.md (no GPU needed)

Every kernel of one forward pass is listed with the bytes it must move (each operand read once,
each result written once: the compulsory traffic of a fused kernel) and the operations it does;
its time is ``max(bytes / bandwidth, ops / peak)`` at the published dense figures of
:data:`GPUS`, with the peak that the operation runs on (fp16 or int8 tensor cores for GEMMs, the
fp32 CUDA cores for the scan). Kernel times add up: no overlap between kernels, no launch
overhead, no cache reuse between kernels, peaks reached (all of them optimistic, for every form
alike). The FP16 baseline has the same kernel fusion as the official Vim with ``mamba_ssm``
(conv + SiLU, scan + D + gate, add + RMSNorm each one kernel; cuBLAS GEMMs).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

RESULTS = os.path.join(os.path.dirname(__file__), "results", "roofline.md")

#: Published dense peaks of the SXM parts (NVIDIA datasheets; the datasheets' larger tensor-core
#: figures are with 2:4 sparsity, halved here). Bandwidth B/s, tensor-core fp16 FLOP/s, tensor-core
#: int8 OP/s, fp32 CUDA-core FLOP/s. A100 80GB SXM4: 2039 GB/s, 312 TF fp16, 624 TOPS int8,
#: 19.5 TF fp32. H100 SXM5: 3.35 TB/s, 989 TF fp16, 1979 TOPS int8, 67 TF fp32.
GPUS = {
    "A100": {"bw": 2.039e12, "fp16": 312e12, "int8": 624e12, "fp32": 19.5e12},
    "H100": {"bw": 3.35e12, "fp16": 989e12, "int8": 1979e12, "fp32": 67e12},
}

#: Vim variants: embedding width D, depth (timm names in benchmarks/kernels.py).
MODELS = {"Vim-T": (192, 24), "Vim-S": (384, 24), "Vim-B": (768, 24)}
TOKENS, D_STATE, EXPAND, CONV_W, PATCH_IN, CLASSES = 197, 16, 2, 4, 3 * 16 * 16, 1000
SCAN_OPS = 8  # per (token, channel, state): delta*A, exp, delta*B, *u, h*dA + dBu (2), C*h accumulate (2)


@dataclass(frozen=True)
class Form:
    """How one implementation stores things: bytes of a float activation, of a quantized linear's
    input (codes, or floats), of a weight; which peak its GEMMs use; whether the scan reads codes."""

    name: str
    act: float          # bytes of a float activation between kernels
    linear_in: float    # bytes a quantized linear reads per input element
    weight: float       # bytes per weight element of the quantized linears
    gemm: str           # "fp16" or "int8"
    quant_scan: bool    # conv writes codes only; scan reads int8 u, delta, B, C (part 4)
    residual: float = 4.0  # the residual stream is fp32 in the official Vim (residual_in_fp32)


FORMS = [
    Form("FP16 (fused, mamba_ssm-like)", 2, 2, 2, "fp16", False),
    Form("W8A8 as built (fp32 in/out, fp32 model)", 4, 4, 1, "int8", False),
    Form("W8A8, fp16 I/O, codes in (parts 1, 3)", 2, 1, 1, "int8", False),
    Form("W4A8, fp16 I/O, codes in (parts 1-3)", 2, 1, 0.5, "int8", False),
    Form("W4A8 + quantized scan (parts 1-4)", 2, 1, 0.5, "int8", True),
]


def kernels(d: int, depth: int, batch: int, f: Form) -> list[tuple[str, float, float, str]]:
    """(name, bytes, ops, peak) of every kernel of one forward pass of a Vim of width d."""
    m, e, n = batch * TOKENS, EXPAND * d, D_STATE
    r = math.ceil(d / 16)
    fp = FORMS[0]
    q = f.gemm == "int8"
    out = []

    def linear(name, k, nn, x_bytes, out_bytes, quantized=True):
        wb, peak = (f.weight, f.gemm) if quantized else (fp.weight, "fp16")
        out.append((name, m * k * x_bytes + k * nn * wb + m * nn * out_bytes, 2.0 * m * k * nn, peak))

    # not quantized: patch embedding (as a GEMM), final norm, head
    mp = batch * (TOKENS - 1)
    out.append(("patch_embed", mp * PATCH_IN * 2 + PATCH_IN * d * 2 + mp * d * f.act, 2.0 * mp * PATCH_IN * d, "fp16"))
    for _ in range(depth):
        # add + RMSNorm: read residual and hidden, write residual and the normed input of in_proj
        normed = f.linear_in if q else f.act
        out.append(("add+rmsnorm", m * d * (f.residual + f.act + f.residual + normed), 10.0 * m * d, "fp32"))
        linear("in_proj", d, 2 * e, f.linear_in, f.act)
        for _direction in range(2):
            conv_out = (f.linear_in if f.quant_scan else f.act + (f.linear_in if q else 0))
            out.append(("conv+silu", m * e * (f.act + conv_out), m * e * (2 * CONV_W + 4), "fp32"))
            xp_out = (f.linear_in if f.quant_scan else f.act)
            linear("x_proj", e, r + 2 * n, f.linear_in, xp_out)
            linear("dt_proj", r, e, f.linear_in, f.linear_in if f.quant_scan else f.act)
            u = delta = bc = f.linear_in if f.quant_scan else f.act
            out.append(("scan+D+gate", m * e * (u + delta + f.act + f.act) + 2 * m * n * bc,
                        float(SCAN_OPS * m * e * n), "fp32"))
        # merge the two directions, write out_proj's input (codes where quantized)
        out.append(("merge", m * e * (2 * f.act + (f.linear_in if q else f.act)), 2.0 * m * e, "fp32"))
        linear("out_proj", e, d, f.linear_in, f.act)
    out.append(("norm_f+head", batch * d * 4 + d * CLASSES * 2 + batch * CLASSES * 2, 2.0 * batch * d * CLASSES, "fp16"))
    return out


def kernel_ms(nbytes: float, ops: float, peak: str, gpu: str) -> float:
    g = GPUS[gpu]
    return 1e3 * max(nbytes / g["bw"], ops / g[peak])


def total_ms(d, depth, batch, form, gpu) -> float:
    return sum(kernel_ms(b, o, p, gpu) for _, b, o, p in kernels(d, depth, batch, form))


def breakdown(d, depth, batch, form, gpu) -> dict[str, float]:
    acc: dict[str, float] = {}
    for name, b, o, p in kernels(d, depth, batch, form):
        acc[name] = acc.get(name, 0.0) + kernel_ms(b, o, p, gpu)
    return acc


def report() -> list[str]:
    lines = ["# Roofline on paper: expected end-to-end speed-up over FP16", "",
             "Produced by `python benchmarks/roofline.py` (arithmetic only, no GPU). Published dense peaks "
             "(NVIDIA datasheets, SXM parts; the datasheets' larger tensor-core figures assume 2:4 sparsity "
             "and are halved here):", "",
             "| GPU | HBM bandwidth | fp16 tensor | int8 tensor | fp32 CUDA cores |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for gname, g in GPUS.items():
        lines.append(f"| {gname} SXM | {g['bw'] / 1e12:.3g} TB/s | {g['fp16'] / 1e12:.0f} TFLOP/s | "
                     f"{g['int8'] / 1e12:.0f} TOP/s | {g['fp32'] / 1e12:.1f} TFLOP/s |")
    lines += ["", "## What the model counts and assumes", "",
              "- Every kernel of one forward pass at 197 tokens: patch embedding (as a GEMM), per block "
              "add + RMSNorm, `in_proj`, per direction (2) conv + SiLU, `x_proj`, `dt_proj`, the scan fused with "
              "D and the SiLU(z) gate, then the merge of the directions and `out_proj`; final norm and head. "
              f"d_state {D_STATE}, expand {EXPAND}, conv width {CONV_W}, dt_rank ceil(D/16), depth 24.",
              "- Bytes: the compulsory traffic of a fused kernel (each input read once, each output written "
              "once), the residual stream in fp32 (the official Vim's `residual_in_fp32`). Ops: 2MNK per "
              f"GEMM, {SCAN_OPS} per (token, channel, state) in the scan (exp counted as one op at the fp32 "
              "rate: the real special-function rate is lower, so the scan may be compute-bound on an H100), "
              "a few per element elsewhere.",
              "- Time of a kernel = max(bytes / bandwidth, ops / peak); kernels add up (no overlap, no launch "
              "overhead, no L2 reuse between kernels, peaks reached): optimistic for every form alike; the "
              "ratios are what the published peaks imply, not a prediction of a measurement.",
              "- FP16 baseline: the fusion of the official Vim with `mamba_ssm` (fused conv, fused scan, fused "
              "add + norm, cuBLAS GEMMs). Patch embedding and head stay FP16 in every form.",
              "- Forms: **as built** = what vmfx lowers today (the lowered model runs in fp32: 4-byte "
              "activations between kernels; the fused linear reads fp32); **parts 1, 3** = fp16 between "
              "kernels and every quantized linear reading int8 codes written by its producer's epilogue; "
              "**parts 1-3** = the same with 4-bit weights packed two per byte; **parts 1-4** = also the "
              "conv writing only codes and the scan reading int8 u, delta, B, C.", ""]
    lines += ["## Expected speed-up over FP16 (FP16 time / form time)", "",
              "| model | batch | GPU | FP16 ms | " + " | ".join(f.name for f in FORMS[1:]) + " |",
              "| --- | ---: | --- | ---: | " + " | ".join("---:" for _ in FORMS[1:]) + " |"]
    for mname, (d, depth) in MODELS.items():
        for batch in (64, 256):
            for gpu in GPUS:
                t16 = total_ms(d, depth, batch, FORMS[0], gpu)
                cells = " | ".join(f"{t16 / total_ms(d, depth, batch, f, gpu):.2f}x" for f in FORMS[1:])
                lines.append(f"| {mname} | {batch} | {gpu} | {t16:.2f} | {cells} |")
    d, depth = MODELS["Vim-B"]
    lines += ["", "## Where the time goes: Vim-B, batch 256, H100 (ms per forward pass, summed over the blocks)", "",
              "| kernel | " + " | ".join(f.name for f in FORMS) + " |",
              "| --- | " + " | ".join("---:" for _ in FORMS) + " |"]
    parts = [breakdown(d, depth, 256, f, "H100") for f in FORMS]
    for name in parts[0]:
        lines.append(f"| {name} | " + " | ".join(f"{p[name]:.2f}" for p in parts) + " |")
    lines.append("| **total** | " + " | ".join(f"**{sum(p.values()):.2f}**" for p in parts) + " |")
    best = max(total_ms(d, depth, b, FORMS[0], g) / total_ms(d, depth, b, FORMS[-1], g)
               for b in (64, 256) for g in GPUS)
    lines += ["", "## The 2.4x target on paper", "",
              f"Against a fused FP16 baseline, the best form here (parts 1-4) reaches at most {best:.2f}x "
              "end to end on Vim-B (table above): the GEMMs gain at most 2x (int8 against fp16 peaks, or "
              "half the input bytes where memory-bound), and the scan, conv, norm and merge, which are "
              "memory-bound, gain only through the bytes quantized I/O removes. **The 2.4x end-to-end target "
              "is therefore not reachable against a fused FP16 baseline under this roofline**; it can only be "
              "met against a slower baseline (e.g. FP16 eager PyTorch without fused scan/conv kernels, whose "
              "unfused elementwise ops move far more bytes; which baseline the papers' figures used is not "
              "checked here). The 1.8x target for the W8A8 linear at "
              "the Vim-B in_proj shape is within the roofline (2.0x at H100 figures with int8 codes in and fp16 "
              "out: `python benchmarks/kernels.py --roofline`).", "",
              "Against the H200 measurements (`benchmarks/results/kernels.md`): the lowered Vim-B measured 1.57x "
              "faster than an FP16 model whose scan was swapped for vmfx's Triton scan but whose norms, gates and "
              "casts run as separate eager torch ops: that baseline is far from the fused one assumed here, so "
              "the measurement does not contradict the 0.55x this table gives the as-built form. The measured "
              "int8 GEMM reached 626 TOP/s (codes in, fp16 out, Vim-B in_proj at batch 256), a third of the "
              "1979 TOP/s dense peak used here, and equal to FP16 cuBLAS at that shape (641 TFLOP/s).", ""]
    return lines


def main() -> int:
    lines = report()
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
