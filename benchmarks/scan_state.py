"""Side-by-side timing of the selective scan: this tree's float path against a baseline version of
``vmfx/ops/selective_scan.py`` (a git revision of this repository, e.g. ``main``), and the cost of the
quantized state.

The baseline file is read from the revision with ``git show`` (the output names its commit, never a
local path), written to a temporary file and loaded under another name in the same process (it
imports only torch),
and the calls are interleaved (baseline, current, baseline, current, ...), so both see the same
machine load. Inputs: a Vision-Mamba-like S6 call (as ``benchmarks/scan.py``: ``z``, ``D``,
``delta_bias``, softplus, B and C (batch, N, L)), float32, forward + backward.

Rows: ``baseline float``, ``current float`` (must not be slower), ``current + reparam`` (step
ratio and output factor), ``current + state int8`` (per-step state quantization, inline),
``current + reparam + state int8``, and ``state_hook int8`` (the same quantization through a
Python hook, for comparison). Medians of ``--repeat`` interleaved runs; record ``uptime`` with them.

    OMP_NUM_THREADS=1 python benchmarks/scan_state.py --baseline main
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.provenance import ROOT, git_commit  # noqa: E402
from vmfx.ops.selective_scan import reparameterize, selective_scan  # noqa: E402

SCAN_FILE = "vmfx/ops/selective_scan.py"


def load_baseline(rev: str):
    """(``selective_scan`` of ``vmfx/ops/selective_scan.py`` at git revision ``rev`` of this
    repository, that revision's full commit)."""
    commit = git_commit(rev)
    text = subprocess.run(["git", "-C", ROOT, "show", f"{commit}:{SCAN_FILE}"], check=True, capture_output=True,
                          text=True).stdout
    with tempfile.TemporaryDirectory(prefix="scan-baseline-") as tmp:
        path = os.path.join(tmp, "baseline_selective_scan.py")
        with open(path, "w") as f:
            f.write(text)
        spec = importlib.util.spec_from_file_location("baseline_selective_scan", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod.selective_scan, commit


def make_inputs(batch, length, dim, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    dt = torch.exp(torch.rand(dim, generator=g) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                   + torch.log(torch.tensor(1e-3)))
    return dict(u=r(batch, dim, length), delta=r(batch, dim, length) * 0.1,
                A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(dim, 1), B=r(batch, n, length),
                C=r(batch, n, length), D=torch.ones(dim), z=r(batch, dim, length),
                delta_bias=dt + torch.log(-torch.expm1(-dt)))


def time_fwd_bwd(fn, x, grad):
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    t0 = time.perf_counter()
    out = fn(leaves)
    t1 = time.perf_counter()
    out.backward(grad)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", required=True,
                   help=f"git revision of this repository whose {SCAN_FILE} is the baseline (e.g. main)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=197)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--repeat", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    base, base_commit = load_baseline(args.baseline)
    x = make_inputs(args.batch, args.length, args.dim, args.state)
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(args.batch, args.dim, args.length, generator=g)
    factors = tuple(torch.rand(s, generator=g) + 0.5 for s in (args.dim, args.length, args.state))
    scales = torch.full((args.length,), 0.05)
    vals = scales.tolist()

    def hook(h, t0, t1, b0, b1):
        return h.div_(vals[t0]).round_().clamp_(-127, 127).mul_(vals[t0])

    def reparam(v, **kw):
        u, B, C, step, out_scale = reparameterize(v["u"], v["B"], v["C"], *factors)
        return selective_scan(u, v["delta"], v["A"], B, C, v["D"], v["z"], v["delta_bias"], True,
                              step_scale=step, out_scale=out_scale, **kw)

    cases = {
        "baseline float": lambda v: base(**v, delta_softplus=True),
        "current float": lambda v: selective_scan(**v, delta_softplus=True),
        "current + reparam": lambda v: reparam(v),
        "current + state int8": lambda v: selective_scan(**v, delta_softplus=True, state_scales=scales),
        "current + reparam + state int8": lambda v: reparam(v, state_scales=scales),
        "state_hook int8": lambda v: selective_scan(**v, delta_softplus=True, state_hook=hook),
    }
    times = {k: ([], []) for k in cases}
    for name, fn in cases.items():  # warm-up
        time_fwd_bwd(fn, x, grad)
    for _ in range(args.repeat):
        for name, fn in cases.items():
            f, b = time_fwd_bwd(fn, x, grad)
            times[name][0].append(f)
            times[name][1].append(b)
    print(f"baseline: {SCAN_FILE} at {base_commit} (--baseline {args.baseline}); current: this tree "
          f"(HEAD {git_commit('HEAD')}, uncommitted changes included)")
    print(f"batch {args.batch}, L {args.length}, dim {args.dim}, N {args.state}, float32, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeat} interleaved runs")
    print(f"{'case':34s} {'fwd ms':>8s} {'bwd ms':>8s} {'fwd+bwd':>8s} {'vs baseline':>11s}")
    ref = None
    for name, (f, b) in times.items():
        mf, mb = statistics.median(f) * 1e3, statistics.median(b) * 1e3
        tot = statistics.median([a + c for a, c in zip(f, b)]) * 1e3
        ref = ref or tot
        print(f"{name:34s} {mf:8.2f} {mb:8.2f} {tot:8.2f} {tot / ref:10.2f}x")


if __name__ == "__main__":
    main()
