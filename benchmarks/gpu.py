"""Where a lowered Vision Mamba's time goes on a GPU, and how it compares with a fused FP16 model.

    python benchmarks/gpu.py --plan              # any machine: launches and bytes per forward, from the graph
    python benchmarks/gpu.py                     # on a CUDA GPU: one prepared run (< 8 minutes on an H100)
    python benchmarks/gpu.py --models Vim-T --skip-calibration

``--plan`` (no GPU needed) lowers random-weight Vim-T/S/B (``--config``, calibrated on 2 random
images) and prints, per model, what :func:`vmfx.lowering.launch_plan` measures by running the
lowered half-precision graph once on the CPU: launches per block (views excluded) and by kind,
launches outside the blocks, and the bytes one forward reads and writes at ``--batch``, beside the
compulsory bytes of the roofline's FP16 and "parts 1, 3" forms (``benchmarks/roofline.py``) and
beside the same plan of the lowering without its rewrites (``lower(..., optimize=False)``). It
writes ``benchmarks/results/gpu_plan.md``.

On a GPU the same models run, batch ``--batch`` at 224x224, random weights, in this order (each
section in its own ``try``; the results are rewritten after every record, so a run stopped by a
time limit keeps what it measured):

1. ``fp16-fused``: the float model in half precision, its scan replaced by vmfx's Triton float scan,
   the rest under ``torch.compile`` (the baseline a deployment engineer would otherwise run);
2. ``w8a8`` (and ``w4a8`` for Vim-B): ``pts-w8a8`` / ``pts-w4a8`` lowered to Triton, in half precision,
   under ``torch.compile(fullgraph=True)`` (every partition is one opaque custom op), each timed with
   ``triton.testing.do_bench`` and profiled once with ``torch.profiler`` (CUDA kernels per forward,
   the top kernels by time);
3. ``calibrate-ptq4vm-w4a4``: the wall time of ``vmfx.compile(model, 256 images, "ptq4vm-w4a4")`` on
   Vim-S on the GPU (``--skip-calibration`` leaves it out).

Records go to ``benchmarks/results/gpu.json`` (a list; one record per measurement:
``{"date", "gpu", "model", "batch", "form", "ms", "baseline_form", "baseline_ms", "command"}`` plus
``launches`` / ``top_kernels`` where profiled) and ``gpu.md`` is written from it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from benchmarks.provenance import portable_command  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
NAMES = {
    "Vim-T": "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
    "Vim-S": "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
    "Vim-B": "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2",
}


def _model(name: str):
    import timm

    import vmfx.models  # noqa: F401  (registers the Vim models with timm)

    torch.manual_seed(0)
    return timm.create_model(NAMES[name]).eval()


def _command(argv) -> str:
    return portable_command("benchmarks/gpu.py", argv)  # no local absolute paths in the results


# -- the plan (any machine) ------------------------------------------------------------------------


def plan_lines(models, config: str, batch: int, argv) -> list[str]:
    import roofline

    import vmfx
    from vmfx.lowering import launch_plan, lower

    lines = [f"# Launch plan of the lowered Vim-T/S/B ({config}, half precision)", "",
             f"Produced by `{_command(argv)}` on {torch.get_num_threads()} CPU thread(s): the lowered graph run once "
             "on a 1-image batch with `vmfx.lowering.launch_plan` (reference backend; a launch is a call that makes a "
             "new tensor, views excluded); activation bytes scaled to the batch. Roofline columns: the compulsory "
             f"bytes of `benchmarks/roofline.py`'s forms at batch {batch}.", "",
             "| model | lowering | launches / block | by kind (one block) | outside blocks | "
             f"MB / forward (batch {batch}) | roofline FP16 MB | roofline parts 1, 3 MB |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    forms = {f.name: f for f in roofline.FORMS}
    for name in models:
        t0 = time.time()
        model = _model(name)
        calib = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
        q = vmfx.compile(model, calib, config)
        d, depth = roofline.MODELS[name]
        rf = {key: sum(b for _, b, _, _ in roofline.kernels(d, depth, batch, forms[key])) / 1e6
              for key in forms if key in (roofline.FORMS[0].name, roofline.FORMS[2].name)}
        fp16_mb, codes_mb = rf[roofline.FORMS[0].name], rf[roofline.FORMS[2].name]
        for label, optimize in (("vmfx (rewrites, paired directions)", True), ("without rewrites", False)):
            lowered = lower(q, "reference", optimize=optimize).half()
            plan = launch_plan(lowered, calib[:1].half())
            per_block = sorted(set(plan.per_block().values()))
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(plan.kinds_per_block(plan.blocks[0]).items()))
            s = plan.summary(batch)
            lines.append(f"| {name} | {label} | {'/'.join(map(str, per_block))} | {kinds} | "
                         f"{s['launches_outside_blocks']} | {s['bytes_per_forward'] / 1e6:,.0f} | {fp16_mb:,.0f} | "
                         f"{codes_mb:,.0f} |")
            print(lines[-1], flush=True)
        print(f"({name}: {time.time() - t0:.0f} s)", flush=True)
    lines += ["", f"Measured {datetime.date.today().isoformat()}. Launches per block count what runs per forward: "
              "\"without rewrites\" is `lower(..., optimize=False)` (the form before issue 22: per direction a conv, a "
              "scan, the flips of the backward direction, `-exp(A_log)` and the casts of `A` and `D` recomputed). "
              "The bytes include what a kernel moves besides its inputs and outputs (`scan_merge`'s float32 workspace, "
              "`conv_bidir`'s second read of its input). Not the same accounting as the roofline: the lowered model "
              "carries the residual stream in the model's dtype (fp16 here; the roofline counts it in fp32), and "
              "the roofline's forms run each direction's `dt_proj`, scan and the merge as kernels of their own."]
    return lines


# -- the GPU run -------------------------------------------------------------------------------------


def _bench(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=50, rep=200))


def _profile(fn) -> tuple[int, list[tuple[str, float]]]:
    """CUDA kernels per forward and the five longest (name, ms) of one profiled forward."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_name: dict[str, float] = {}
    for e in events:
        per_name[e.name] = per_name.get(e.name, 0.0) + e.device_time_total / 1e3
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:5]
    return len(events), [(n[:80], round(ms, 3)) for n, ms in top]


class Records:
    """gpu.json (a list of records), rewritten after every record, and gpu.md written from it."""

    def __init__(self, path_json: str, argv):
        self.path = path_json
        self.command = _command(argv)
        self.records = json.load(open(path_json)) if os.path.exists(path_json) else []
        self.gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
        self.date = datetime.date.today().isoformat()

    def add(self, **record) -> None:
        record = {"date": self.date, "gpu": self.gpu, "command": self.command, **record}
        print(json.dumps(record), flush=True)
        self.records.append(record)
        with open(self.path, "w") as f:
            json.dump(self.records, f, indent=1)
        self.write_md()

    def write_md(self) -> None:
        lines = ["# GPU measurements (issue 22)", "", f"Written by `benchmarks/gpu.py` from `gpu.json`.", "",
                 "| date | GPU | model | batch | form | ms | baseline | baseline ms | speed-up | launches |",
                 "| --- | --- | --- | ---: | --- | ---: | --- | ---: | ---: | ---: |"]
        for r in self.records:
            speed = f"{r['baseline_ms'] / r['ms']:.2f}x" if r.get("baseline_ms") and r.get("ms") else ""
            lines.append(f"| {r['date']} | {r['gpu']} | {r['model']} | {r['batch']} | {r['form']} | {r['ms']:.2f} | "
                         f"{r.get('baseline_form') or ''} | {r['baseline_ms'] or 0:.2f} | {speed} | "
                         f"{r.get('launches', '')} |")
        with open(self.path[:-5] + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")


@contextlib.contextmanager
def _triton_float_scan():
    """The float Vim's scan (``vmfx.nn.mamba.selective_scan``) replaced by vmfx's Triton float scan
    (half in, half out, float32 inside), outside torch.compile's graph; restored on exit."""
    import vmfx.nn.mamba as mamba_module
    from vmfx.lowering import kernels

    @torch.compiler.disable
    def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        f = lambda t: None if t is None else t.float()  # noqa: E731
        return kernels.selective_scan(u, delta, f(A), B, C, f(D), z, f(delta_bias), delta_softplus=delta_softplus,
                                      out_dtype=u.dtype)

    original = mamba_module.selective_scan
    mamba_module.selective_scan = scan
    try:
        yield
    finally:
        mamba_module.selective_scan = original


def gpu_run(models, batch: int, calibrate: bool, argv) -> None:
    import vmfx

    rec = Records(os.path.join(RESULTS, "gpu.json"), argv)
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    for name in models:
        baseline_ms = None
        try:
            model = _model(name)
            calib = torch.randn(4, 3, 224, 224)
            forms = [("w8a8", "pts-w8a8")] + ([("w4a8", "pts-w4a8")] if name == "Vim-B" else [])
            lowered = {}
            for form, config in forms:  # calibrate on the CPU copy before the float model moves
                lowered[form] = vmfx.compile(model, calib, config, backend="triton").cuda().half()
            xh = x.half()
            with torch.no_grad(), _triton_float_scan():  # the fused FP16 baseline
                fused = torch.compile(model.half().cuda())
                fused(xh)
                baseline_ms = _bench(lambda: fused(xh))
                launches, top = _profile(lambda: fused(xh))
                rec.add(model=name, batch=batch, form="fp16-fused", ms=baseline_ms, baseline_form=None,
                        baseline_ms=None, launches=launches, top_kernels=top)
            with torch.no_grad():
                for form, low in lowered.items():
                    compiled = torch.compile(low, fullgraph=True)
                    got, eager = compiled(xh[:8]).float(), low(xh[:8]).float()  # timed only if it computes the same
                    diff = float((got - eager).abs().max() / eager.abs().max())
                    ms = _bench(lambda: compiled(xh))
                    launches, top = _profile(lambda: compiled(xh))
                    rec.add(model=name, batch=batch, form=form, ms=ms, baseline_form="fp16-fused",
                            baseline_ms=baseline_ms, launches=launches, top_kernels=top,
                            compiled_vs_eager_max_rel_diff=diff)
            del model, fused, lowered
        except Exception:
            traceback.print_exc()
            print(f"{name} failed (traceback above)", flush=True)
        torch.cuda.empty_cache()
    if calibrate:
        try:
            model = _model("Vim-S").cuda()
            images = torch.randn(256, 3, 224, 224, device="cuda")
            torch.cuda.synchronize()
            t0 = time.time()
            vmfx.compile(model, images, "ptq4vm-w4a4")
            torch.cuda.synchronize()
            rec.add(model="Vim-S", batch=256, form="calibrate-ptq4vm-w4a4", ms=1e3 * (time.time() - t0),
                    baseline_form=None, baseline_ms=None)
        except Exception:
            traceback.print_exc()
            print("calibration failed (traceback above)", flush=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", action="store_true", help="launches and bytes from the lowered graph (no GPU needed)")
    ap.add_argument("--models", default="Vim-T,Vim-S,Vim-B", help="comma-separated, of " + ", ".join(NAMES))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--config", default="pts-w8a8", help="preset of the plan's models")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (plan)")
    ap.add_argument("--skip-calibration", action="store_true", help="GPU run: leave out Vim-S's ptq4vm-w4a4 timing")
    ap.add_argument("--out", default=os.path.join(RESULTS, "gpu_plan.md"), help="the plan's markdown file")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in NAMES]
    if unknown or not models:
        ap.error(f"unknown model(s) {unknown}; use {', '.join(NAMES)}")
    if args.batch < 1:
        ap.error("--batch must be positive")
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be positive")
        torch.set_num_threads(args.threads)
    if args.plan:
        lines = plan_lines(models, args.config, args.batch, argv)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        return 0
    if not torch.cuda.is_available():
        ap.error("no CUDA GPU here: run with --plan for the launch and byte counts")
    gpu_run(models, args.batch, not args.skip_calibration, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
