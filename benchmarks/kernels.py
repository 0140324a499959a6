"""GPU speed of vmfx's generated kernels against FP16 (cuBLAS and torch.compile), with the roofline.

    python benchmarks/kernels.py                  # all sections on a CUDA GPU
    python benchmarks/kernels.py --quick          # batch 64 only, shorter timing
    python benchmarks/kernels.py --sections linear,scan --out /tmp/k.md
    python benchmarks/kernels.py --roofline       # no GPU needed: the paper figures alone

Measured with ``triton.testing.do_bench`` (median of repeated runs after warm-up), in one run:

1. ``linear``: the fused quantized linear (smoothing + per-token static quantize + int8 GEMM +
   dequantize), W8A8 and W4A8 from float32 input, W8A8 from int8 codes (the "quantize once"
   input), and the standalone quantize kernel, at the ``in_proj`` shapes of Vim-T/S/B (197
   tokens, batch 64 and 256), against ``F.linear`` in FP16 (cuBLAS), ``torch.compile`` of it and
   cuBLAS's own int8 GEMM (``torch._int_mm``, int32 out: the int8 ceiling of the library);
2. ``scan``: the scan kernel against ``vmfx.ops.selective_scan`` (torch) in FP32;
3. ``e2e``: Vim-T/S/B end to end (random weights, batch 64): FP16 eager and FP32 eager against the
   model quantized with ``pts-w8a8`` (calibrated on a few random images, on the GPU when the
   pipeline allows, else on the CPU) and lowered to Triton;
4. ``compile``: FP16 ``torch.compile`` of Vim-T/S/B end to end (slow to compile; last);
5. ``mixed`` (``--sections mixed``): OuroMamba's mixed-precision linear (int8 inlier GEMM + outlier
   columns) at the official harness's shape, W4A4O8 and W4A8O16, against FP16 cuBLAS.

Every section runs in its own ``try``: a failure is recorded in the results with its traceback
and the next section runs. The results file is rewritten after every row, so a run stopped by a
time limit keeps what it measured. Next to each measured linear the bytes moved, the operations
and the time they imply at the published A100 / H100 figures are printed (see ``ROOFLINE`` and
``benchmarks/results/roofline.md``).

Targets the project set: fused W8A8 linear >= 1.8x FP16 cuBLAS at the Vim-B in_proj shape
(M = 256 * 197, K = 768, N = 3072); end to end Vim-B >= 2.4x FP16 eager, >= 1.5x FP16
``torch.compile``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.provenance import portable_command  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results", "kernels.md")
VIM = {"Vim-T": 192, "Vim-S": 384, "Vim-B": 768}
NAMES = {
    "Vim-T": "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
    "Vim-S": "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
    "Vim-B": "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2",
}
TOKENS = 197
SECTIONS = ("linear", "scan", "e2e", "compile", "mixed")  # mixed: OuroMamba (issue 11), not in the default run

#: Published dense peaks (NVIDIA datasheets, SXM parts; sparsity doubles the tensor-core figures
#: and is not used here): HBM bandwidth in bytes/s, int8 tensor-core ops/s, fp16 tensor-core
#: FLOP/s. A100 SXM4 80GB: 2.039 TB/s, 624 TOPS int8, 312 TFLOPS fp16. H100 SXM5: 3.35 TB/s,
#: 1979 TOPS int8, 989 TFLOPS fp16 (the datasheet's 3958 / 1979 are with sparsity).
ROOFLINE = {
    "A100": {"bw": 2.039e12, "int8": 624e12, "fp16": 312e12},
    "H100": {"bw": 3.35e12, "int8": 1979e12, "fp16": 989e12},
}


def roofline_ms(nbytes: float, ops: float, gpu: str, kind: str) -> float:
    """max(bytes / bandwidth, ops / peak) in milliseconds: the time the published figures imply."""
    g = ROOFLINE[gpu]
    return 1e3 * max(nbytes / g["bw"], ops / g[kind])


def linear_traffic(m: int, k: int, n: int, x_bytes: float, w_bytes: float, out_bytes: float) -> float:
    """Compulsory bytes of a (M, K) x (K, N) linear: each operand read once, the output written once."""
    return m * k * x_bytes + n * k * w_bytes + m * n * out_bytes


class Report:
    """The results file, rewritten after every row (so a stopped run keeps what it measured)."""

    def __init__(self, path: str, header: list[str]):
        self.path = path
        self.lines = list(header)
        self.flush()

    def add(self, *lines: str, echo: bool = True) -> None:
        self.lines += lines
        if echo:
            for line in lines:
                print(line, flush=True)
        self.flush()

    def failure(self, what: str) -> None:
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        self.add("", f"**{what} failed**:", "", "```", tb.rstrip()[-3000:], "```", "", echo=False)
        print(f"{what} failed (traceback recorded)", flush=True)

    def flush(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "w") as f:
            f.write("\n".join(self.lines) + "\n")


def bench(fn, quick: bool = False) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median"))


def linear_rows(rep: Report, quick: bool) -> None:
    import torch.nn.functional as F

    from vmfx.lowering import kernels
    from vmfx.lowering.params import QWeight, make_act_quant

    rep.add("## Fused quantized linear (in_proj shapes)", "",
            "vmfx kernels: *fp32 io* = float32 in and out; *fp16 io* = float16 in and out; *codes in* = int8 "
            "codes in (written by the producer's epilogue), float16 out. Float input is quantized once by the "
            "standalone quantize kernel, then the GEMM reads codes (`quantize_once`, the GPU default).", "",
            "| model | batch | M x K x N | FP16 cuBLAS ms | int8 cuBLAS (_int_mm, int32 out) ms | "
            "W8A8 fp32 io ms | W8A8 fp16 io ms | W8A8 codes in, fp16 out ms | W4A8 fp16 io ms | "
            "fp16 io vs cuBLAS | codes in vs cuBLAS |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    nan = float("nan")
    for name, d in VIM.items():
        k, n = d, 4 * d
        for batch in (64,) if quick else (64, 256):
            m = batch * TOKENS
            res = {key: nan for key in ("fp16", "int_mm", "w8", "w8h", "w8c", "w4h")}
            try:
                x = torch.randn(batch, TOKENS, k, device="cuda")
                w = torch.randn(n, k, device="cuda") / k**0.5
                xh, wh = x.half(), w.half()
                act = make_act_quant(torch.rand(TOKENS, device="cuda") * 0.05 + 0.01,
                                     torch.full((TOKENS,), 128.0, device="cuda"), 8,
                                     smooth=torch.rand(k, device="cuda") + 0.5)
                wq8 = QWeight.from_float(w, w.abs().amax(1) / 127, 8)
                wq4 = QWeight.from_float(w, w.abs().amax(1) / 7, 4)
                res["fp16"] = bench(lambda: F.linear(xh, wh), quick)
                for key, fn in (
                    ("int_mm", lambda: torch._int_mm(a8, b8)),
                    ("w8", lambda: kernels.qlinear(x, wq8, act)),
                    ("w8h", lambda: kernels.qlinear(xh, wq8, act)),
                    ("w8c", lambda: kernels.qlinear(codes, wq8, act, out_dtype=torch.float16)),
                    ("w4h", lambda: kernels.qlinear(xh, wq4, act)),
                ):
                    try:
                        if key == "int_mm":
                            a8 = torch.randint(-127, 127, (m, k), dtype=torch.int8, device="cuda")
                            b8 = torch.randint(-127, 127, (n, k), dtype=torch.int8, device="cuda").t()
                        if key == "w8c":
                            codes = kernels.quantize(x, act)
                        res[key] = bench(fn, quick)
                    except Exception:
                        rep.failure(f"linear {name} batch {batch} {key}")
            except Exception:
                rep.failure(f"linear {name} batch {batch}")
            rep.add(
                f"| {name} | {batch} | {m} x {k} x {n} | {res['fp16']:.3f} | {res['int_mm']:.3f} | "
                f"{res['w8']:.3f} | {res['w8h']:.3f} | {res['w8c']:.3f} | {res['w4h']:.3f} | "
                f"{res['fp16'] / res['w8h']:.2f}x | {res['fp16'] / res['w8c']:.2f}x |")
            torch.cuda.empty_cache()


def scan_rows(rep: Report, quick: bool) -> None:
    from vmfx.lowering import kernels
    from vmfx.ops import selective_scan

    rep.add("", "## Selective scan (one direction, batch 64, 197 tokens, N 16, float32)", "",
            "| model | E | torch (vmfx.ops) ms | Triton kernel ms | speed-up |", "| --- | ---: | ---: | ---: | ---: |")
    for name, d in VIM.items():
        try:
            e, b = 2 * d, 64
            u, delta, z = (torch.randn(b, e, TOKENS, device="cuda") for _ in range(3))
            A = -torch.rand(e, 16, device="cuda")
            B, C = torch.randn(b, 16, TOKENS, device="cuda"), torch.randn(b, 16, TOKENS, device="cuda")
            D = torch.randn(e, device="cuda")
            with torch.no_grad():
                t_ref = bench(lambda: selective_scan(u, delta, A, B, C, D, z, delta_softplus=True), quick)
            t_k = bench(lambda: kernels.selective_scan(u, delta, A, B, C, D, z, delta_softplus=True), quick)
            rep.add(f"| {name} | {e} | {t_ref:.3f} | {t_k:.3f} | {t_ref / t_k:.2f}x |")
        except Exception:
            rep.failure(f"scan {name}")


def _share_kernels(lowered) -> None:
    """Drop each lowered partition's provenance, so that partitions of the same form share one
    compiled kernel (the provenance is part of the generated source's header: with it, every layer
    compiles and autotunes its own copy, hundreds for a 24-block Vim)."""
    from vmfx.lowering import lowered_partitions

    for p in lowered_partitions(lowered):
        p.provenance = []


def _quantize_model(model, calib, config):
    """Calibrate on the GPU if the pipeline allows, else on the CPU. Returns (lowered, where, seconds)."""
    import vmfx

    t0 = time.time()
    try:
        lowered = vmfx.compile(model.cuda(), calib.cuda(), config, backend="triton")
        _share_kernels(lowered)
        return lowered.cuda(), "GPU", time.time() - t0
    except Exception:
        print("calibration on the GPU failed; falling back to the CPU:\n" + traceback.format_exc(),
              file=sys.stderr, flush=True)
    t0 = time.time()
    lowered = vmfx.compile(model.cpu(), calib.cpu(), config, backend="triton")
    _share_kernels(lowered)
    return lowered.cuda(), "CPU", time.time() - t0


def _triton_scan_in(module):
    """Context: the float model's scan (``vmfx.nn.mamba.selective_scan``, torch) replaced by vmfx's
    Triton scan kernel (float32 inside; half inputs converted), as a fused-scan float baseline."""
    import contextlib

    from vmfx.lowering import kernels

    @contextlib.contextmanager
    def ctx():
        original = module.selective_scan

        def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
            f = lambda t: None if t is None else t.float()  # noqa: E731
            y = kernels.selective_scan(f(u), f(delta), f(A), f(B), f(C), f(D), f(z), f(delta_bias),
                                       delta_softplus=delta_softplus)
            return y.to(u.dtype)

        module.selective_scan = scan
        try:
            yield
        finally:
            module.selective_scan = original

    return ctx()


def end_to_end_rows(rep: Report, quick: bool, calib_n: int, config: str, models=tuple(NAMES),
                    gemm_configs: str = "") -> None:
    import timm

    from vmfx.lowering.kernels import linear as linear_module

    if gemm_configs:  # kernels rendered from now on autotune over these configs only
        chosen = [linear_module.AUTOTUNE_CONFIGS[int(i)] for i in gemm_configs.split(",")]
        linear_module.AUTOTUNE_CONFIGS[:] = chosen
        rep.add("", f"(End-to-end qlinear kernels autotuned over {chosen}.)")

    import vmfx.models  # noqa: F401  (registers the Vim models with timm)
    import vmfx.nn.mamba as mamba_module

    rep.add("", f"## End to end (random weights, batch 64, 224x224; {config} calibrated on {calib_n} random images)",
            "", "The float models' own scan is `vmfx.ops.selective_scan` (torch, a loop over tokens: 118-236 ms "
            "a call at batch 64); the float baselines here run with it replaced by vmfx's Triton scan kernel "
            "(float32 inside), the closest fused-scan baseline available here. The lowered model is what vmfx "
            "lowers today: float32 between kernels.", "",
            "| model | FP16 + Triton scan ms | FP32 + Triton scan ms | lowered W8A8 (Triton) ms | vs FP16 | vs FP32 | "
            "calibrated on (s) |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    eager_note = ""
    for name in models:
        timm_name = NAMES[name]
        try:
            torch.manual_seed(0)
            model = timm.create_model(timm_name).eval()
            x = torch.randn(64, 3, 224, 224, device="cuda")
            with torch.no_grad():
                lowered, where, secs = _quantize_model(model, torch.randn(calib_n, 3, 224, 224), config)
                t_q = bench(lambda: lowered(x), quick)
                del lowered
                fp32 = model.cuda()
                with _triton_scan_in(mamba_module):
                    t_fp32 = bench(lambda: fp32(x), quick)
                    fp16 = model.half().cuda()
                    xh = x.half()
                    t_fp16 = bench(lambda: fp16(xh), quick)
            rep.add(f"| {name} | {t_fp16:.2f} | {t_fp32:.2f} | {t_q:.2f} | {t_fp16 / t_q:.2f}x | {t_fp32 / t_q:.2f}x | "
                    f"{where} ({secs:.0f}) |")
            if name == "Vim-T":  # the eager FP16 model with its torch scan: one timed forward
                with torch.no_grad():
                    fp16(xh)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    fp16(xh)
                    torch.cuda.synchronize()
                eager_note = (f"Vim-T FP16 eager with its own torch scan: {1e3 * (time.perf_counter() - t0):.0f} ms "
                              "(one forward after one warm-up).")
            del model, fp16, fp32
        except Exception:
            rep.failure(f"end to end {name}")
        torch.cuda.empty_cache()
    if eager_note:
        rep.add("", eager_note)


def compile_rows(rep: Report, quick: bool) -> None:
    import timm

    import vmfx.models  # noqa: F401

    rep.add("", "## End to end FP16 torch.compile (random weights, batch 64)", "",
            "| model | FP16 eager ms | FP16 torch.compile ms | compile time s |", "| --- | ---: | ---: | ---: |")
    for name, timm_name in NAMES.items():
        try:
            torch.manual_seed(0)
            model = timm.create_model(timm_name).eval().half().cuda()
            xh = torch.randn(64, 3, 224, 224, device="cuda").half()
            with torch.no_grad():
                t_eager = bench(lambda: model(xh), quick)
                cm = torch.compile(model)
                t0 = time.time()
                cm(xh)
                torch.cuda.synchronize()
                secs = time.time() - t0
                t_c = bench(lambda: cm(xh), quick)
            rep.add(f"| {name} | {t_eager:.2f} | {t_c:.2f} | {secs:.0f} |")
            del model, cm
        except Exception:
            rep.failure(f"torch.compile {name}")
        torch.cuda.empty_cache()


def roofline_linear_lines() -> list[str]:
    """The roofline of every benchmarked linear shape (no GPU needed)."""
    lines = ["## Roofline of the benchmarked linears (published dense peaks, compulsory traffic)", "",
             "Bytes: activation read once, weight read once, output written once. FP16: 2-byte in / "
             "weight / out. vmfx as built: fp32 in (4 B), int8 weight, fp32 out. Target form: int8 codes "
             "in, fp16 out. Ops: 2 M N K.", "",
             "| model | batch | M x K x N | GOP | FP16 MB | FP16 A100 / H100 us | W8A8 fp32-io MB | "
             "A100 / H100 us | W8A8 codes-in fp16-out MB | A100 / H100 us | best W8A8 vs FP16 (H100) |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, d in VIM.items():
        k, n = d, 4 * d
        for batch in (64, 256):
            m = batch * TOKENS
            ops = 2.0 * m * n * k
            b16 = linear_traffic(m, k, n, 2, 2, 2)
            b32 = linear_traffic(m, k, n, 4, 1, 4)
            b8 = linear_traffic(m, k, n, 1, 1, 2)
            t = lambda b, kind, g: roofline_ms(b, ops, g, kind) * 1e3  # noqa: E731
            lines.append(
                f"| {name} | {batch} | {m} x {k} x {n} | {ops / 1e9:.1f} | {b16 / 1e6:.1f} | "
                f"{t(b16, 'fp16', 'A100'):.0f} / {t(b16, 'fp16', 'H100'):.0f} | {b32 / 1e6:.1f} | "
                f"{t(b32, 'int8', 'A100'):.0f} / {t(b32, 'int8', 'H100'):.0f} | {b8 / 1e6:.1f} | "
                f"{t(b8, 'int8', 'A100'):.0f} / {t(b8, 'int8', 'H100'):.0f} | "
                f"{t(b16, 'fp16', 'H100') / t(b8, 'int8', 'H100'):.2f}x |")
    return lines


# -- OuroMamba's mixed-precision linear (issue 11) ---------------------------------------------------

#: The official OuroMamba harness's shape (system/test_submission.py): weight 12288 x 3072, 64 x 788
#: activation rows, 20% outliers. Here: rows M = 64 * 788 tokens, K = 3072 input channels, N = 12288
#: output channels, 20% of the K columns outliers in every row tile (the worst case of the per-tile lists).
MIXED_SHAPE = (64 * 788, 3072, 12288)
MIXED_OUTLIER_FRACTION = 0.2


def mixed_traffic(m: int, k: int, n: int, j: int, out_bytes_per_code: float, w_bytes: float,
                  with_quantize: bool) -> float:
    """Compulsory bytes of the mixed linear: int8 inlier codes (M K), the J gathered outlier columns of
    codes (1 or 2 bytes), the weight once (the gathered rows are rows of the same weight), fp16 out, the
    per-row / per-token scales; with the quantize kernel before it: fp16 x read, codes written."""
    b = m * k * 1 + m * j * out_bytes_per_code + n * k * w_bytes + m * n * 2 + m * 8
    if with_quantize:
        b += m * k * 2 + m * k * 1 + m * j * out_bytes_per_code
    return b


def roofline_mixed_lines() -> list[str]:
    """The roofline of the mixed-precision linear at the paper's shape (no GPU needed)."""
    m, k, n = MIXED_SHAPE
    j = int(round(MIXED_OUTLIER_FRACTION * k))
    lines = ["## Roofline of OuroMamba's mixed-precision linear (published dense peaks, compulsory traffic)", "",
             f"Shape of the official harness: M = {m} rows (64 x 788 tokens), K = {k}, N = {n}, J = {j} outlier "
             f"columns ({100 * MIXED_OUTLIER_FRACTION:.0f}% of K) in every row tile. FP16: 2-byte in / weight / out, "
             "2 M N K on fp16 tensor cores. Mixed: int8 inlier codes, gathered outlier codes (1 B at O8, 2 B at "
             "O16), int4 weights packed (0.5 B; the vmfx kernel reads them unpacked, 1 B: the second figure), "
             "fp16 out; 2 M N K inlier ops + 2 M N J outlier ops (x2 at O16: two int8 planes) on int8 tensor "
             "cores. *+quantize*: the activation's quantize kernel before it (fp16 read, codes written).", "",
             "| form | GOP | MB | A100 ms | H100 ms | vs FP16 (A100 / H100) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    fp_ops = 2.0 * m * n * k
    fp_b = linear_traffic(m, k, n, 2, 2, 2)
    fp = {g: roofline_ms(fp_b, fp_ops, g, "fp16") for g in ROOFLINE}
    lines.append(f"| FP16 | {fp_ops / 1e9:.0f} | {fp_b / 1e6:.0f} | {fp['A100']:.2f} | {fp['H100']:.2f} | 1.00x / 1.00x |")
    for label, ob, planes in (("W4A4O8", 1, 1), ("W4A8O16", 2, 2)):
        for wb in (0.5, 1.0):
            for quant in (False, True):
                ops = 2.0 * m * n * k + planes * 2.0 * m * n * j
                b = mixed_traffic(m, k, n, j, ob, wb, quant)
                t = {g: roofline_ms(b, ops, g, "int8") for g in ROOFLINE}
                lines.append(f"| {label}, {'packed' if wb == 0.5 else 'int8'} weights{' +quantize' if quant else ''} | "
                             f"{ops / 1e9:.0f} | {b / 1e6:.0f} | {t['A100']:.2f} | {t['H100']:.2f} | "
                             f"{fp['A100'] / t['A100']:.2f}x / {fp['H100'] / t['H100']:.2f}x |")
    return lines


def mixed_rows(rep: Report, quick: bool) -> None:
    """Time the generated mixed-precision linear against FP16 cuBLAS at the paper's shape (GPU)."""
    import torch.nn.functional as F

    from vmfx.lowering import kernels
    from vmfx.lowering.mixed_reference import MixedCodes
    from vmfx.lowering.params import QWeight

    m, k, n = MIXED_SHAPE
    if quick:
        m = 16 * 788
    j = int(round(MIXED_OUTLIER_FRACTION * k))
    rep.add("## OuroMamba mixed-precision linear", "",
            "| M x K x N | outlier columns | FP16 cuBLAS ms | W4A4O8 ms | W4A8O16 ms | O8 vs FP16 | O16 vs FP16 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    g = torch.Generator(device="cuda").manual_seed(0)
    xh = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=g)
    wh = torch.randn(n, k, device="cuda", dtype=torch.float16, generator=g)
    res = {"fp16": bench(lambda: F.linear(xh, wh), quick)}
    cols = torch.randperm(k, device="cuda", generator=g)[:j]
    mask = torch.zeros(m, k, dtype=torch.bool, device="cuda")
    mask[:, cols] = True
    weight = QWeight.from_float(wh.float(), wh.float().abs().amax(1) / 7, 4)
    for key, bits, dtype in (("o8", 4, torch.int8), ("o16", 8, torch.int16)):
        qi = torch.randint(-7, 8, (m, k), dtype=torch.int8, device="cuda").masked_fill_(mask, 0)
        hi = 127 if dtype == torch.int8 else 32767
        qo = torch.randint(-hi, hi + 1, (m, k), dtype=torch.int32, device="cuda").to(dtype).masked_fill_(~mask, 0)
        codes = MixedCodes(qi, torch.full((1,), 0.1, device="cuda"), qo, torch.full((m,), 0.01, device="cuda"), mask,
                           bits, 8 if dtype == torch.int8 else 16)
        res[key] = bench(lambda: kernels.mixed_qlinear(codes, weight, block={"BLOCK_M": 128, "BLOCK_N": 128,
                                                                             "BLOCK_K": 64, "BLOCK_J": 64,
                                                                             "num_warps": 8, "num_stages": 3}), quick)
    rep.add(f"| {m} x {k} x {n} | {j} | {res['fp16']:.3f} | {res['o8']:.3f} | {res['o16']:.3f} | "
            f"{res['fp16'] / res['o8']:.2f}x | {res['fp16'] / res['o16']:.2f}x |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", default="linear,scan,e2e,compile",
                    help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--quick", action="store_true", help="batch 64 only for the linears, shorter timing")
    ap.add_argument("--calib", type=int, default=4, help="calibration images for the end-to-end models")
    ap.add_argument("--config", default="pts-w8a8", help="vmfx preset for the end-to-end models")
    ap.add_argument("--out", default=RESULTS, help="results file (markdown), rewritten after every row")
    ap.add_argument("--models", default=",".join(NAMES), help="end-to-end models, in this order")
    ap.add_argument("--e2e-gemm-configs", default="0,5",
                    help="indices of qlinear's autotune configs the end-to-end models use ('' = all): "
                         "every config of every kernel form compiles once")
    ap.add_argument("--roofline", action="store_true", help="print the roofline table alone (no GPU needed)")
    args = ap.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.roofline or not torch.cuda.is_available():
        if not args.roofline:
            print("No CUDA GPU here: nothing measured (the kernels' correctness is tested on the CPU by "
                  "tests/lowering); the roofline alone:\n")
        print("\n".join(roofline_linear_lines()))
        print("\n" + "\n".join(roofline_mixed_lines()))
        return 0
    import triton

    gpu = torch.cuda.get_device_name(0)
    rep = Report(args.out, [
        "# Kernel benchmarks", "",
        f"Produced by `{portable_command('benchmarks/kernels.py', sys.argv[1:] if argv is None else argv)}` on {gpu} (torch {torch.__version__}, triton {triton.__version__}); "
        "medians of `triton.testing.do_bench`.", ""])
    runners = {"linear": lambda: linear_rows(rep, args.quick), "scan": lambda: scan_rows(rep, args.quick),
               "e2e": lambda: end_to_end_rows(rep, args.quick, args.calib, args.config, args.models.split(","),
                                              args.e2e_gemm_configs),
               "compile": lambda: compile_rows(rep, args.quick),
               "mixed": lambda: mixed_rows(rep, args.quick)}  # OuroMamba (issue 11)
    for s in sections:
        t0 = time.time()
        try:
            runners[s]()
        except Exception:
            rep.failure(f"section {s}")
        print(f"[section {s}: {time.time() - t0:.0f} s]", flush=True)
    rep.add("", *roofline_linear_lines(), echo=False)
    rep.add("", *roofline_mixed_lines(), echo=False)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
