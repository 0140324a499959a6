"""OuroMamba's outlier channel sets on the proxy model: the plots and the per-quantizer summary.

Quantizes the bundled proxy Vim with an ``ouromamba-*`` preset on real training digits, runs test
digits through it and records, for every mixed-precision quantizer (the inputs of ``in_proj``,
``x_proj``, ``dt_proj``, ``out_proj`` and delta), which channels were outliers at which step
(:func:`vmfx.inspect.outlier_sets`); draws one block (:func:`vmfx.inspect.plot_outliers`) and writes
``outliers.md``: the command, its settings, and one line per quantizer (mean and largest set size
per step, distinct channels, how often a set grows, the most frequent channels).

``vmfx inspect --config ouromamba-w4a4 --outliers DIR`` draws the same plots with the full preset;
``--jlss-steps`` here shortens the block-wise step-size learning (the preset's 100 steps per block
cost about half an hour of one CPU core on the proxy), and the file says how many steps ran.

    python benchmarks/outliers.py --calib-n 64 --jlss-steps 20 --images 64 --block 3 --out benchmarks/results/outliers
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vmfx  # noqa: E402
from vmfx.config import PRESETS  # noqa: E402
from vmfx.data import load_digits, load_proxy_model  # noqa: E402

from benchmarks.provenance import portable_command  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="ouromamba-w4a4", help="an ouromamba-* preset")
    p.add_argument("--calib-n", type=int, default=64, help="real training digits to calibrate on")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw and of JLSS")
    p.add_argument("--jlss-steps", type=int, default=None, help="JLSS steps per block (default: the preset's)")
    p.add_argument("--images", type=int, default=64, help="test digits whose outlier sets are recorded")
    p.add_argument("--block", type=int, default=3, help="the block to draw")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", required=True, help="folder for the PNGs and outliers.md")
    args = p.parse_args(argv)
    if args.config not in PRESETS or not args.config.startswith("ouromamba"):
        p.error(f"--config must be an ouromamba-* preset, got {args.config!r}")
    torch.set_num_threads(args.threads)
    config = PRESETS[args.config]
    steps = config.jlss.steps if args.jlss_steps is None else args.jlss_steps
    if args.jlss_steps is not None:
        config = dataclasses.replace(config, jlss=dataclasses.replace(config.jlss, steps=args.jlss_steps))

    model = load_proxy_model()
    train, _ = load_digits("train")
    idx = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(args.seed))
    calib = train[idx[: args.calib_n]]
    test, _ = load_digits("test")
    torch.manual_seed(args.seed)
    t0 = time.time()
    qmodel = vmfx.compile(model, calib, config=config)
    seconds = time.time() - t0
    sets = vmfx.inspect.outlier_sets(qmodel, test[: args.images])
    os.makedirs(args.out, exist_ok=True)
    paths = vmfx.inspect.plot_outliers(sets, args.out, block=args.block)  # the block's two plots, all blocks' one

    # paths relative to the repository; a folder outside it is recorded as <local>/<its name>
    command = portable_command("benchmarks/outliers.py", argv if argv is not None else sys.argv[1:])
    lines = [
        f"# OuroMamba outlier sets on the proxy model ({args.config})", "",
        f"Produced by `{command}` (do not edit by hand): {args.config} with {steps} JLSS steps per block"
        f" (the preset: {PRESETS[args.config].jlss.steps}), calibrated on {args.calib_n} real training digits"
        f" (seed {args.seed}) in {seconds:.0f} s on {args.threads} thread(s); outlier sets recorded on the first"
        f" {args.images} test digits. Plots: " + ", ".join(f"`{os.path.basename(x)}`" for x in paths) + ".", "",
        "Per quantizer: mean and largest number of outlier channels per step, distinct channels that were ever"
        " outliers, how often a step's set grows (%), and the most frequent outlier channels (fraction of image-steps in which each is an outlier).", "",
        "| block | dir | quantizes | edge | channels | mean/step | max/step | distinct | grows % | top channels |",
        "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for s in sets:
        d = s.summary()
        top = ", ".join(f"{c} ({f:.2f})" for c, f in d["top_channels"][:4])
        lines.append(f"| {d['block'] if d['block'] is not None else '-'} | {d['direction'] or '-'} | {d['quantizes'] or '-'} | "
                     f"{d['edge'] or '-'} | {s.mask.shape[-1]} | {d['mean_outliers_per_step']:.2f} | "
                     f"{d['max_outliers_per_step']} | {d['distinct_channels']} | {100 * d['change_rate']:.1f} | {top} |")
    with open(os.path.join(args.out, "outliers.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
