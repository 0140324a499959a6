"""Side-by-side timing of one JLSS step of ``ptq4vm-official`` (every calibration image in every
step) run in one pass against the same step run in micro-batches (``JLSSConfig.micro_batch``), with
the fake quantizers as one fused autograd node each (``vmfx.ops.quantize.FakeQuantizeFunction``, the
default) against their composed elementwise form (``composed_fake_quantize``).

The proxy Vim is quantized once up to ``ConvertPass`` (the preset's passes, with a 10-candidate
Lp grid instead of 100: a step's cost does not depend on where the step sizes start); then JLSS
runs ``--steps`` steps per block on copies of that graph, once per setting, the settings
interleaved (``--repeat`` rounds of one-pass, micro-batches, ...) so that they see the same machine
load. The time of a step is JLSS's own ``step_seconds`` (mean over the steps of a block),
averaged over the blocks; the table reports the median over rounds.

    OMP_NUM_THREADS=1 python benchmarks/jlss_step.py --micro-batch 64 32 --repeat 2
    OMP_NUM_THREADS=1 python benchmarks/jlss_step.py --micro-batch 64 --fake-quant composed fused

Record ``uptime`` with the figures (``--out`` appends a row per setting to a Markdown file).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from accuracy_run import calibration_images  # noqa: E402  (the images accuracy.py calibrates on)
from vmfx.config import InitConfig, resolve_config  # noqa: E402
from vmfx.data import load_proxy_model  # noqa: E402
from vmfx.ops.quantize import composed_fake_quantize  # noqa: E402
from vmfx.passes import JLSSPass  # noqa: E402
from vmfx.passes.pipeline import Pipeline, method_passes  # noqa: E402


def converted_graph(preset: str, calib: torch.Tensor):
    """The preset's passes before JLSS, with a cheap initial grid; returns (graph, config, JLSS config)."""
    cfg = resolve_config(preset)
    if cfg.jlss is None:
        raise SystemExit(f"{preset} runs no JLSS")
    cfg = cfg.replace(init=InitConfig(cfg.init.method, cfg.init.p, 10) if cfg.init is not None else None)
    before = [p for p in method_passes(cfg) if not isinstance(p, JLSSPass)]
    before = before[: next(i for i, p in enumerate(before) if p.name == "ConvertPass") + 1]
    return Pipeline(before)(load_proxy_model(), calib, config=cfg), cfg, cfg.jlss


def time_step(gm, cfg, jlss, calib, steps: int, micro_batch: int | None, fake_quant: str = "fused") -> float:
    work = copy.deepcopy(gm)
    config = dataclasses.replace(jlss, steps=steps, micro_batch=micro_batch)
    with composed_fake_quantize() if fake_quant == "composed" else contextlib.nullcontext():
        out = Pipeline([JLSSPass(config)])(work, calib, config=cfg)
    return statistics.mean(b["step_seconds"] for b in out.meta["vmfx_jlss"]["blocks"])


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="ptq4vm-official-w4a4")
    p.add_argument("--images", type=positive_int, default=256, help="calibration images (accuracy.py's draw)")
    p.add_argument("--micro-batch", type=positive_int, nargs="+", default=[64], help="micro-batch sizes to compare")
    p.add_argument("--fake-quant", nargs="+", choices=("fused", "composed"), default=["fused"],
                   help="fake-quantizer autograd forms to compare (the first is the baseline)")
    p.add_argument("--steps", type=positive_int, default=1, help="JLSS steps per block in each timing")
    p.add_argument("--repeat", type=positive_int, default=2, help="interleaved rounds")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--out", help="append the table to this Markdown file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    calib = calibration_images(args.images, 0)
    gm, cfg, jlss = converted_graph(args.preset, calib)
    settings = [(form, s) for form in args.fake_quant for s in [None] + args.micro_batch]
    times = {s: [] for s in settings}
    for r in range(args.repeat):
        for form, s in settings:
            times[form, s].append(time_step(gm, cfg, jlss, calib, args.steps, s, form))
            print(f"round {r + 1}: fake_quant={form} micro_batch={s}: {times[form, s][-1]:.3f} s a step", flush=True)
    base = statistics.median(times[settings[0]])
    lines = [f"JLSS step of {args.preset} on {args.images} proxy images, {args.steps} step(s) a block, "
             f"median of {args.repeat} interleaved rounds, torch threads {args.threads}, "
             f"{platform.processor() or platform.machine()}, {datetime.date.today()}", "",
             f"| fake quantizers | micro_batch | s a step | vs {settings[0][0]}, one pass |",
             "| --- | --- | ---: | ---: |"]
    for form, s in settings:
        med = statistics.median(times[form, s])
        lines.append(f"| {form} | {s if s is not None else 'none (one pass)'} | {med:.2f} | {base / med:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
