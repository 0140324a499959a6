"""CPU speed of the lowered proxy model (``backend="reference"``) against the float model, side by side.

    python benchmarks/cpu.py                      # batch 64, 1 thread, writes benchmarks/results/cpu.md
    python benchmarks/cpu.py --threads 2 --batch 64 --config pts-w8a8 --reps 20

The bundled proxy Vim (:mod:`vmfx.data.proxy`: 197 tokens, width 96, 6 bidirectional blocks) is
quantized with the chosen preset on 64 training digits and lowered to the exact integer reference
(:mod:`vmfx.lowering.reference`). Then, in one process with ``torch.set_num_threads`` fixed, the
same batch of test digits runs through the float model, the lowered model on the fast path (the
default) and the lowered model on the slow path (``VMFX_REFERENCE_SLOW=1``), interleaved: each
repetition times one forward of each, in rotating order, and the table gives the median and the
minimum over the repetitions. The lowered outputs of the two paths are compared bit for bit.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

RESULTS = os.path.join(os.path.dirname(__file__), "results", "cpu.md")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--config", default="pts-w8a8")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--no-slow-timing", action="store_true",
                    help="time only float and the fast path (the slow path still runs once, for the bit-identity check)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import vmfx
    from vmfx.data import load_digits, load_proxy_model
    from vmfx.lowering import lower, reference

    model = load_proxy_model()
    train_x, _ = load_digits("train")
    test_x, _ = load_digits("test")
    q = vmfx.compile(model, train_x[:64], args.config)
    lowered = lower(q, "reference")
    x = test_x[: args.batch]

    def run_float():
        return model(x)

    def run_fast():
        reference.set_fast_path(True)
        return lowered(x)

    def run_slow():
        reference.set_fast_path(False)
        try:
            return lowered(x)
        finally:
            reference.set_fast_path(True)

    runs = {"float model": run_float, "lowered, reference fast path": run_fast,
            "lowered, reference slow path": run_slow}
    if args.no_slow_timing:
        del runs["lowered, reference slow path"]
    load_before = os.getloadavg()
    t_start = time.time()
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        same = torch.equal(run_fast(), run_slow())
        for fn in runs.values():  # warm-up
            fn()
        names = list(runs)
        for i in range(args.reps):
            r = i % len(names)
            for name in names[r:] + names[:r]:
                t0 = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - t0)

    load_after = os.getloadavg()
    base = statistics.median(times["float model"])
    cmd = (f"python benchmarks/cpu.py --threads {args.threads} --batch {args.batch} --config {args.config} "
           f"--reps {args.reps}" + (" --no-slow-timing" if args.no_slow_timing else ""))
    fmt = lambda la: ", ".join(f"{v:.2f}" for v in la)  # noqa: E731
    lines = ["# CPU: lowered proxy model (reference backend) against the float model", "",
             f"Produced by `{cmd}` on {platform.processor() or platform.machine()} "
             f"({os.cpu_count()} CPUs visible), torch {torch.__version__}, "
             f"`torch.set_num_threads({args.threads})`; batch {args.batch} test digits of the bundled proxy Vim "
             f"({args.config}, calibrated on 64 training digits); {args.reps} interleaved repetitions "
             f"({time.time() - t_start:.0f} s). Load average (1, 5, 15 min) before: {fmt(load_before)}; "
             f"after: {fmt(load_after)}.", "",
             "| model | median ms | min ms | vs float (median) |", "| --- | ---: | ---: | ---: |"]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {name} | {1e3 * med:.1f} | {1e3 * min(ts):.1f} | {base / med:.2f}x |")
    lines += ["", f"Fast and slow reference paths bit-identical on this batch: {same}.",
              f"Per-repetition ratio float / fast path (same repetition): median "
              f"{statistics.median(f / q for f, q in zip(times['float model'], times['lowered, reference fast path'])):.2f}x."]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
