"""How long OuroMamba-Gen (``vmfx.data.synthesize``) takes for the proxy model, and what it made.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/synthesis.py                 # 128 images, seed 0, 2 threads
    .venv/bin/python benchmarks/synthesis.py --n 16 --threads 1 --out /tmp/s    # a trial

Synthesizes ``--n`` images with the default :class:`vmfx.data.SynthesisConfig` and records, as one
row of ``benchmarks/results/synthesis.md`` (raw: ``synthesis.json``): the wall time, the process CPU
time, the torch thread count, the 1-minute load average before and after (the machine is shared:
wall time depends on the load, CPU time much less), the losses at the first and last step, and
how many images the float model assigns to their target class. The images go to the cache that
``benchmarks/accuracy.py --calib synthetic`` reads (``--cache``), so the accuracy run calibrates on
exactly these images, and as PNGs to ``--save DIR`` when given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vmfx.data import load_proxy_model  # noqa: E402
from vmfx.data.synthetic import SynthesisConfig, input_normalization, save_images, synthesize_with_log  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def cache_path(cache: str, n: int, seed: int, config: SynthesisConfig) -> str:
    """Where ``benchmarks/accuracy.py --calib synthetic`` looks for these images."""
    import hashlib

    key = hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(cache, f"proxy_n{n}_seed{seed}_{key}.pt")


def load1() -> float:
    return os.getloadavg()[0]


def write_markdown(rows: list[dict], md_path: str) -> None:
    """synthesis.md from the rows of synthesis.json."""
    lines = [
        "# OuroMamba-Gen: synthesis time on the proxy model",
        "",
        "Produced by `python benchmarks/synthesis.py` (do not edit by hand); raw rows in `synthesis.json`.",
        "Wall time depends on the machine's load (a shared 2-core machine: the 1-minute load average",
        "before and after is given); CPU time is the process's user+system time, summed over its threads.",
        "Losses are batch means at the first and last step; hits: images the float model assigns to their target class.",
        "",
        "| measured (UTC) | n | steps | blocks | threads | workers | wall s | CPU s | load before / after | contrastive first -> last | CE first -> last | hits |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['measured']} | {r['n']} | {r['steps']} | {r['blocks']} | {r['threads']} | {r.get('workers', 1)} | {r['wall_s']} | {r['cpu_s']} | "
            f"{r['load1_before']:.1f} / {r['load1_after']:.1f} | {r['loss_first']['contrastive']} -> {r['loss_last']['contrastive']} | "
            f"{r['loss_first']['output']} -> {r['loss_last']['output']} | {r['target_hits']}/{r['n']} |"
        )
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--workers", type=int, default=1,
                   help="batches optimised at once, one thread each (vmfx.data.synthesize(workers=...))")
    p.add_argument("--steps", type=int, default=None, help="default: SynthesisConfig().steps")
    p.add_argument("--cache", default=os.path.join("/tmp", "vmfx-synthetic"))
    p.add_argument("--save", default=None, metavar="DIR", help="also write the images as PNGs")
    p.add_argument("--out", default=RESULTS, help="folder of synthesis.json / synthesis.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = SynthesisConfig() if args.steps is None else SynthesisConfig(steps=args.steps)
    model = load_proxy_model()
    before = load1()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = synthesize_with_log(model, args.n, seed=args.seed, config=config, progress=True, workers=args.workers)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    after = load1()
    with torch.no_grad():
        hits = int((model(result.images).argmax(-1) == result.targets).sum())
    first = {k: round(sum(b[0][k] for b in result.log) / len(result.log), 4) for k in result.log[0][0] if k != "step"}
    last = {k: round(sum(b[-1][k] for b in result.log) / len(result.log), 4) for k in result.log[0][-1] if k != "step"}
    row = {
        "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "n": args.n, "seed": args.seed, "steps": config.steps, "batch_size": config.batch_size,
        "blocks": list(config.blocks) if config.blocks is not None else None,
        "threads": torch.get_num_threads(), "workers": args.workers, "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load1_before": before, "load1_after": after,
        "loss_first": first, "loss_last": last, "target_hits": hits,
    }
    print(json.dumps(row), flush=True)
    if args.cache:
        os.makedirs(args.cache, exist_ok=True)
        path = cache_path(args.cache, args.n, args.seed, config)
        torch.save({"images": result.images, "config": config.to_dict()}, path)
        print(f"images cached in {path}")
    if args.save:
        save_images(result.images, args.save, normalization=input_normalization(model))
        print(f"PNGs in {args.save}")
    os.makedirs(args.out, exist_ok=True)
    json_path, md_path = os.path.join(args.out, "synthesis.json"), os.path.join(args.out, "synthesis.md")
    rows = json.load(open(json_path)) if os.path.exists(json_path) else []
    rows.append(row)
    with open(json_path, "w") as f:
        json.dump(rows, f, indent=1)
    write_markdown(rows, md_path)
    print(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
