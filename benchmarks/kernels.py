"""GPU speed of vmfx's generated kernels against FP16 (cuBLAS and torch.compile), side by side.

    .venv/bin/python benchmarks/kernels.py            # needs a CUDA GPU; says so and exits 0 without one

Measured with ``triton.testing.do_bench`` (median of repeated runs after warm-up), in one run:

1. the fused quantized linear (smoothing + per-token static quantize + int8 GEMM + dequantize),
   W8A8 and W4A8, at the ``in_proj`` shapes of Vim-T/S/B (tokens 197, batch 64 and 256), against
   ``torch.nn.functional.linear`` in FP16 (cuBLAS) and ``torch.compile`` of it;
2. the scan kernel against ``vmfx.ops.selective_scan`` (torch) in FP32 at Vim-T/S/B shapes;
3. end to end, Vim-T/S/B (random weights, batch 64): FP16 eager against the model quantized with
   ``pts-w8a8`` and lowered to Triton.

It writes ``benchmarks/results/kernels.md`` with the GPU's name and every figure. The targets the
project set: >= 1.8x for the fused W8A8 linear at the Vim-B in_proj shape, >= 2.4x end to end on
Vim-B over FP16 eager.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

RESULTS = os.path.join(os.path.dirname(__file__), "results", "kernels.md")
VIM = {"Vim-T": 192, "Vim-S": 384, "Vim-B": 768}
NAMES = {
    "Vim-T": "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
    "Vim-S": "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
    "Vim-B": "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2",
}
TOKENS = 197


def bench(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def linear_rows(lines: list[str]) -> None:
    from vmfx.lowering import kernels
    from vmfx.lowering.reference import QWeight, make_act_quant

    lines += ["## Fused quantized linear (in_proj shapes)", "",
              "| model | batch | M x K x N | FP16 cuBLAS ms | FP16 torch.compile ms | W8A8 ms | W4A8 ms | "
              "W8A8 vs cuBLAS | W4A8 vs cuBLAS |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    compiled = torch.compile(torch.nn.functional.linear)
    for name, d in VIM.items():
        k, n = d, 4 * d
        for batch in (64, 256):
            m = batch * TOKENS
            x = torch.randn(batch, TOKENS, k, device="cuda")
            w = torch.randn(n, k, device="cuda") / k**0.5
            xh, wh = x.half(), w.half()
            act = make_act_quant(torch.rand(TOKENS, device="cuda") * 0.05 + 0.01,
                                 torch.full((TOKENS,), 128.0, device="cuda"), 8,
                                 smooth=torch.rand(k, device="cuda") + 0.5)
            res = {}
            res["fp16"] = bench(lambda: torch.nn.functional.linear(xh, wh))
            res["compile"] = bench(lambda: compiled(xh, wh))
            for bits in (8, 4):
                q = 2 ** (bits - 1) - 1
                wq = QWeight.from_float(w, w.abs().amax(1) / q, bits)
                res[f"w{bits}"] = bench(lambda: kernels.qlinear(x, wq, act))
            lines.append(
                f"| {name} | {batch} | {m} x {k} x {n} | {res['fp16']:.3f} | {res['compile']:.3f} | "
                f"{res['w8']:.3f} | {res['w4']:.3f} | {res['fp16'] / res['w8']:.2f}x | {res['fp16'] / res['w4']:.2f}x |"
            )
            print(lines[-1], flush=True)


def scan_rows(lines: list[str]) -> None:
    from vmfx.lowering import kernels
    from vmfx.ops import selective_scan

    lines += ["", "## Selective scan (one direction, batch 64, 197 tokens, N 16)", "",
              "| model | E | torch (vmfx.ops) ms | Triton kernel ms | speed-up |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, d in VIM.items():
        e, b = 2 * d, 64
        u, delta, z = (torch.randn(b, e, TOKENS, device="cuda") for _ in range(3))
        A = -torch.rand(e, 16, device="cuda")
        B, C = torch.randn(b, 16, TOKENS, device="cuda"), torch.randn(b, 16, TOKENS, device="cuda")
        D = torch.randn(e, device="cuda")
        with torch.no_grad():
            t_ref = bench(lambda: selective_scan(u, delta, A, B, C, D, z, delta_softplus=True))
        t_k = bench(lambda: kernels.selective_scan(u, delta, A, B, C, D, z, delta_softplus=True))
        lines.append(f"| {name} | {e} | {t_ref:.3f} | {t_k:.3f} | {t_ref / t_k:.2f}x |")
        print(lines[-1], flush=True)


def end_to_end_rows(lines: list[str]) -> None:
    import timm

    import vmfx
    import vmfx.models  # noqa: F401

    lines += ["", "## End to end (random weights, batch 64, 224x224)", "",
              "| model | FP16 eager ms | pts-w8a8 lowered ms | speed-up |", "| --- | ---: | ---: | ---: |"]
    for name, timm_name in NAMES.items():
        torch.manual_seed(0)
        model = timm.create_model(timm_name).eval()
        calib = torch.randn(16, 3, 224, 224)
        lowered = vmfx.compile(model, calib, "pts-w8a8", backend="triton").cuda()
        fp16 = model.half().cuda()
        x = torch.randn(64, 3, 224, 224, device="cuda")
        with torch.no_grad():
            t_fp = bench(lambda: fp16(x.half()))
            t_q = bench(lambda: lowered(x))
        lines.append(f"| {name} | {t_fp:.2f} | {t_q:.2f} | {t_fp / t_q:.2f}x |")
        print(lines[-1], flush=True)
        del model, fp16, lowered
        torch.cuda.empty_cache()


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py measures GPU kernels and needs a CUDA GPU; none is available here, "
              "so nothing was measured (the kernels' correctness is tested on the CPU by tests/lowering).")
        return 0
    gpu = torch.cuda.get_device_name(0)
    lines = ["# Kernel benchmarks", "", f"Produced by `python benchmarks/kernels.py` on {gpu} "
             f"(torch {torch.__version__}); medians of `triton.testing.do_bench`.", ""]
    linear_rows(lines)
    scan_rows(lines)
    end_to_end_rows(lines)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
