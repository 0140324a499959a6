"""Dump the Triton source of every kernel the lowering emits for the proxy model, one file each.

For each preset below the bundled proxy Vim is compiled with a few calibration digits (learning
cut to ``--steps`` steps), lowered with the reference backend (every partition renders its Triton
source whatever the backend), and every partition's source is written to
``<out>/<preset>/<index>.<template>.py``. The render calls are also recorded (template name and
keyword arguments, provenance left out) in ``<out>/render_calls.txt``, one distinct call per line:
the list the golden snapshots of ``tests/lowering/test_golden_sources.py`` cover. Finally the
golden variants of that test are rendered into ``<out>/variants/``.

Use it to check that a change to the code generators leaves the generated source unchanged::

    PYTHONPATH=. python benchmarks/dump_kernel_sources.py --out /tmp/src_before
    # ... change the generators ...
    PYTHONPATH=. python benchmarks/dump_kernel_sources.py --out /tmp/src_after
    diff -r /tmp/src_before /tmp/src_after
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import warnings

import torch

PRESETS = [
    f"{method}-{bits}"
    for bits in ("w8a8", "w4a8", "w4a4")
    for method in ("minmax", "pts", "pts-smooth", "smoothquant", "kscaled", "ouromamba", "ptq4vm", "rotate")
]

RENDERERS = ("render_qlinear", "render_quantize", "render_conv", "render_scan", "render_merge", "render_scan_merge",
             "render_mixed_qlinear", "render_conv_bidir", "render_qlinear_group")


def _short_config(name: str, steps: int):
    """The preset ``name`` with its learning (JLSS) cut to ``steps`` steps."""
    from vmfx.config import resolve_config

    cfg = resolve_config(name)
    if cfg.jlss is not None:
        cfg = dataclasses.replace(cfg, jlss=dataclasses.replace(cfg.jlss, steps=steps))
    return cfg


def _record_render_calls(calls: set) -> None:
    """Wrap the package's ``render_*`` functions (those the lowered partitions call) so that each
    call's template and keyword arguments (provenance left out) are added to ``calls``."""
    from vmfx.lowering import kernels

    for name in RENDERERS:
        original = getattr(kernels, name)

        @functools.wraps(original)
        def recording(*args, _original=original, _name=name, **kwargs):
            kept = {k: v for k, v in kwargs.items() if k != "provenance"}
            calls.add(f"{_name}({', '.join(f'{k}={v!r}' for k, v in sorted(kept.items()))})")
            return _original(*args, **kwargs)

        setattr(kernels, name, recording)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--presets", nargs="*", default=PRESETS)
    parser.add_argument("--calib", type=int, default=8, help="calibration images")
    parser.add_argument("--steps", type=int, default=1, help="learning steps of JLSS-based presets")
    args = parser.parse_args(argv)

    import vmfx
    from vmfx.data import load_digits, load_proxy_model
    from vmfx.lowering.runtime import lowered_partitions

    calls: set[str] = set()
    _record_render_calls(calls)
    torch.manual_seed(0)
    model = load_proxy_model()
    images = load_digits("train")[0][: args.calib]
    for preset in args.presets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lowered = vmfx.compile(model, images, _short_config(preset, args.steps), backend="reference")
        folder = os.path.join(args.out, preset)
        os.makedirs(folder, exist_ok=True)
        parts = lowered_partitions(lowered)
        for i, part in enumerate(parts):
            with open(os.path.join(folder, f"{i:03d}.{part.kind}.py"), "w") as f:
                f.write(part.source())
        print(f"{preset}: {len(parts)} partitions", flush=True)
    if args.presets:
        with open(os.path.join(args.out, "render_calls.txt"), "w") as f:
            f.write("\n".join(sorted(calls)) + "\n")
        print(f"{len(calls)} distinct render calls (render_calls.txt)")

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "lowering"))
    from golden_variants import VARIANTS, render_variant

    folder = os.path.join(args.out, "variants")
    os.makedirs(folder, exist_ok=True)
    for variant in VARIANTS:
        with open(os.path.join(folder, f"{variant}.py"), "w") as f:
            f.write(render_variant(variant))
    print(f"{len(VARIANTS)} golden variants written to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
