"""Benchmark vmfx's selective scan against mamba-ssm's ``selective_scan_ref``, forward and backward.

What it measures: on the same random float32 inputs (a Vision-Mamba-like S6 call: ``z``, ``D``,
``delta_bias``, ``delta_softplus=True``, ``B`` and ``C`` of shape (batch, N, L)), it first checks that
the two implementations agree (output and the gradients of all eight inputs), then times a forward
call and a backward call (``out.backward(grad)``) of each, side by side in one process: one warm-up
run, then the median of ``--repeat`` runs for vmfx and of ``--ref-repeat`` runs for the (much slower)
reference. It prints a table of the forward, backward and forward+backward medians and the ratios,
then the cost of the state hooks: vmfx with a no-op ``state_reader`` (one call per work piece) and
with a ``state_hook`` that fake-quantizes the state to int8 at every step (one call per time step,
also during the backward's recomputation).

Run it from the repository root::

    .venv/bin/python benchmarks/scan.py                      # batch 8, L 197, dim 384, N 16
    .venv/bin/python benchmarks/scan.py --batch 2 --repeat 50

mamba-ssm imports its CUDA extension unconditionally;
:func:`vmfx.frontends.enable_mamba_ssm_on_cpu` makes its pure-PyTorch ``selective_scan_ref``
import on a CPU-only machine. If
mamba-ssm still cannot be imported, the script says so and exits with status 2. It exits with
status 1 if the two implementations disagree.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.provenance import portable_command  # noqa: E402
from vmfx.ops import selective_scan  # noqa: E402

ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def import_reference():
    """mamba-ssm's selective_scan_ref, or None with the reason printed."""
    from vmfx.frontends import enable_mamba_ssm_on_cpu

    try:
        enable_mamba_ssm_on_cpu()
    except ImportError as exc:
        print(f"{exc}; needed to run this benchmark (`make setup` installs it).", file=sys.stderr)
        return None
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    return selective_scan_ref


def make_inputs(batch, length, dim, state, seed=0):
    """Random inputs shaped and scaled like a Vision Mamba layer's scan (float32)."""
    g = torch.Generator().manual_seed(seed)
    # Mamba's initialisation: A = -[1..N] per channel, dt log-uniform in [1e-3, 1e-1] through the
    # bias of a softplus; the projections feeding delta, B, C are random.
    dt = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": 0.5 * torch.randn(batch, dim, length, generator=g),
        "A": -torch.arange(1, state + 1, dtype=torch.float32).repeat(dim, 1)
        * (1 + 0.1 * torch.rand(dim, state, generator=g)),
        "B": torch.randn(batch, state, length, generator=g),
        "C": torch.randn(batch, state, length, generator=g),
        "D": torch.ones(dim) + 0.1 * torch.randn(dim, generator=g),
        "z": torch.randn(batch, dim, length, generator=g),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),  # inverse softplus of dt
    }


def leaves(inputs):
    return {k: v.clone().requires_grad_() for k, v in inputs.items()}


def run_once(fn, inputs, grad_out, **extra):
    """One forward and one backward; returns (forward s, backward s, out, grads)."""
    args = leaves(inputs)
    t0 = time.perf_counter()
    out = fn(**args, delta_softplus=True, **extra)
    t1 = time.perf_counter()
    out.backward(grad_out)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, out.detach(), {k: args[k].grad for k in ARG_NAMES}


def timings(fn, inputs, grad_out, repeat, **extra):
    run_once(fn, inputs, grad_out, **extra)  # warm-up
    runs = [run_once(fn, inputs, grad_out, **extra)[:2] for _ in range(repeat)]
    fwd = statistics.median(r[0] for r in runs)
    bwd = statistics.median(r[1] for r in runs)
    total = statistics.median(r[0] + r[1] for r in runs)
    best = min(r[0] + r[1] for r in runs)
    return fwd, bwd, total, best


def int8_state_hook(dim):
    """A per-step state hook: symmetric int8 fake-quantization with a fixed per-channel step."""
    step = torch.full((dim, 1), 0.05)

    def hook(h, t0, t1, b0, b1):
        return torch.clamp(torch.round(h / step), -127, 127).mul_(step)

    return hook


def rel_diff(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=197)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--repeat", type=int, default=20, help="timed runs of vmfx (default 20)")
    p.add_argument("--ref-repeat", type=int, default=3,
                   help="timed runs of the slow mamba-ssm reference (default 3)")
    p.add_argument("--write", default=os.path.join(os.path.dirname(__file__), "results", "scan.md"),
                   help="also write the report here (default benchmarks/results/scan.md; '' to skip)")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest accepted max|vmfx - ref| / max|ref| per tensor (default 1e-3)")
    args = p.parse_args(argv)

    reference = import_reference()
    if reference is None:
        return 2

    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    inputs = make_inputs(args.batch, args.length, args.dim, args.state)
    grad_out = torch.randn(args.batch, args.dim, args.length, generator=torch.Generator().manual_seed(1))

    say(f"selective scan: batch={args.batch} L={args.length} dim={args.dim} N={args.state}, float32, "
          "z + D + delta_bias + softplus, B/C (batch, N, L)")
    say(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    # Agreement first (the reference run doubles as its warm-up below).
    _, _, out_v, grads_v = run_once(selective_scan, inputs, grad_out)
    _, _, out_r, grads_r = run_once(reference, inputs, grad_out)
    diffs = {"out": rel_diff(out_v, out_r)}
    diffs.update({f"d{k}": rel_diff(grads_v[k], grads_r[k]) for k in ARG_NAMES})
    say("max |vmfx - ref| / max |ref|: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    bad = {k: v for k, v in diffs.items() if not v <= args.tolerance}
    if bad:
        print(f"MISMATCH above {args.tolerance:g}: {bad}", file=sys.stderr)
        return 1

    v = timings(selective_scan, inputs, grad_out, args.repeat)
    r = timings(reference, inputs, grad_out, args.ref_repeat)

    head = (f"{'implementation':<32}{'forward ms':>12}{'backward ms':>13}{'fwd+bwd ms':>12}"
            f"{'(best)':>10}{'runs':>6}")
    say(head)
    say("-" * len(head))
    for name, t, n in (("mamba-ssm selective_scan_ref", r, args.ref_repeat),
                       ("vmfx selective_scan", v, args.repeat)):
        ms = [x * 1e3 for x in t]
        say(f"{name:<32}{ms[0]:>12.1f}{ms[1]:>13.1f}{ms[2]:>12.1f}{ms[3]:>10.1f}{n:>6}")
    say(f"{'speed-up (ref / vmfx)':<32}{r[0] / v[0]:>11.1f}x{r[1] / v[1]:>12.1f}x{r[2] / v[2]:>11.1f}x"
          f"{r[3] / v[3]:>9.1f}x")
    say("(medians of the timed runs after one warm-up; best = fastest single fwd+bwd)")
    say("")
    say("state hooks (vmfx; same inputs):")
    say(head)
    say("-" * len(head))
    for name, extra in (("no hook", {}),
                        ("state_reader (no-op)", {"state_reader": lambda h, t0, t1, b0, b1: None}),
                        ("state_hook (int8 every step)", {"state_hook": int8_state_hook(args.dim)})):
        ms = [x * 1e3 for x in timings(selective_scan, inputs, grad_out, args.repeat, **extra)]
        say(f"{name:<32}{ms[0]:>12.1f}{ms[1]:>13.1f}{ms[2]:>12.1f}{ms[3]:>10.1f}{args.repeat:>6}")
    if args.write:
        os.makedirs(os.path.dirname(os.path.abspath(args.write)), exist_ok=True)
        command = portable_command("benchmarks/scan.py", argv if argv is not None else sys.argv[1:])
        with open(args.write, "w") as f:
            f.write("# Selective scan: vmfx vs mamba-ssm's selective_scan_ref (CPU)\n\n")
            f.write(f"Produced by `{command}` on {platform.machine()} ({os.cpu_count()} CPU cores); "
                    "both implementations timed side by side in one run.\n\n```\n")
            f.write("\n".join(lines) + "\n```\n")
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
