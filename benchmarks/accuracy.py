"""Accuracy of every vmfx method on the bundled proxy model, at W8A8, W6A6, W4A8 and W4A4.

    .venv/bin/python benchmarks/accuracy.py                          # every method, seed 0
    .venv/bin/python benchmarks/accuracy.py --seeds 0,1,2            # three calibration seeds
    .venv/bin/python benchmarks/accuracy.py --methods minmax --bits w8a8 --calib-n 32 --test-n 200 --out /tmp/acc
    .venv/bin/python benchmarks/accuracy.py --table-only             # re-render accuracy.md from accuracy.json
    .venv/bin/python benchmarks/accuracy.py --compare-with before.json   # plus each record minus an earlier run's
    .venv/bin/python benchmarks/accuracy.py --model vmamba-proxy-digits --methods minmax,ptq4vm   # the VMamba proxy

The command line over four modules beside it:

  * ``accuracy_methods``: what each method is (preset, description, scan state) and the pairs read;
  * ``accuracy_run``: quantize, evaluate and make one record per (seed, method, bit setting);
  * ``accuracy_records`` / ``accuracy_stats``: the record fields, merging, and the 95 % intervals
    of every difference between two records;
  * ``accuracy_report``: ``accuracy.md``, tables and notes computed from the records.

Records are merged into ``<out>/accuracy.json`` (default ``benchmarks/results``), replacing records
with the same (model, method, bits, calib, seed); ``<out>/accuracy.md`` is rewritten from all
records after each measurement (the key holds no test-set or calibration size: other sizes belong in
another ``--out`` folder). Trial settings (``--test-n``, a ``--calib-n`` other than 256) need
``--out``, so they never replace the full records. Records written before the seed/agree/kl fields
existed still render: their seed is taken as 0 (the only seed used then, and said so in the table),
missing cells are blank, and comparisons involving them are unpaired (marked ``u``).

Every difference the tables state is computed (``accuracy_stats``) with a 95 % interval:
  * two accuracies (top-1, or agreement) of records on the same test images: Agresti-Min interval
    for paired proportions, from the per-image correctness (discordant counts);
  * the same where a record lacks per-image data: Agresti-Caffo interval for two independent
    proportions (conservative for models evaluated on the same images), marked ``u``;
  * two mean KLs: normal interval of the mean per-image difference (paired).
A difference is marked ``*`` when its interval excludes 0. The notes under the tables are computed
from the records and name the records they read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
if BENCHMARKS not in sys.path:  # the accuracy_* modules, when this file is loaded by path
    sys.path.insert(0, BENCHMARKS)

from accuracy_methods import BITS_LABELS, METHODS  # noqa: E402
from accuracy_records import dumps_records, merge  # noqa: E402
from accuracy_report import write_markdown  # noqa: E402
from accuracy_run import MODELS, PROXY_MODEL_NAME, REAL_CALIB_N, SYNTHETIC_CALIB_N, run  # noqa: E402

RESULTS = os.path.join(BENCHMARKS, "results")
JSON_PATH = os.path.join(RESULTS, "accuracy.json")
MD_PATH = os.path.join(RESULTS, "accuracy.md")


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise SystemExit(f"--{what} is empty")
    return values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--bits", default=",".join(BITS_LABELS), help=f"comma-separated subset of {', '.join(BITS_LABELS)}")
    p.add_argument("--seeds", default="0", help="comma-separated calibration seeds (draw of the calibration images "
                   "and JLSS batch order), e.g. 0,1,2")
    p.add_argument("--calib-n", type=int, default=None,
                   help="calibration images (default 256 real, 128 synthetic)")
    p.add_argument("--model", default=PROXY_MODEL_NAME, choices=sorted(MODELS),
                   help="which bundled proxy to quantize (the records' model column)")
    p.add_argument("--test-n", type=int, default=None, help="evaluate on the first N test digits only (trial runs)")
    p.add_argument("--out", default=None, help=f"folder of accuracy.json / accuracy.md (default {RESULTS})")
    p.add_argument("--compare-with", default=None, metavar="JSON",
                   help="an earlier run's accuracy.json: add a table of each record minus the earlier record with the same key")
    p.add_argument("--table-only", action="store_true",
                   help="measure nothing: rewrite accuracy.md from the records in accuracy.json")
    p.add_argument("--calib", choices=("real", "synthetic"), default="real",
                   help="calibrate on real training digits (default) or on images synthesized from the model "
                        "(vmfx.data.synthesize, default settings, the seed of --seeds)")
    p.add_argument("--synthetic-cache", default=os.path.join("/tmp", "vmfx-synthetic"), metavar="DIR",
                   help="keep synthesized images here (per n, seed and settings) so that a later run reuses them")
    args = p.parse_args(argv)
    json_path = os.path.join(args.out, "accuracy.json") if args.out else JSON_PATH
    md_path = os.path.join(args.out, "accuracy.md") if args.out else MD_PATH
    baseline = None
    if args.compare_with:
        with open(args.compare_with) as f:
            baseline = (json.load(f), os.path.basename(args.compare_with))
    if args.table_only:
        with open(json_path) as f:
            write_markdown(json.load(f), md_path, baseline)
        print(f"wrote {md_path}")
        return 0
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    bits = [b for b in args.bits.split(",") if b]
    bad_bits = [b for b in bits if b not in BITS_LABELS]
    if bad_bits:
        raise SystemExit(f"unknown bit settings {bad_bits}; known: {', '.join(BITS_LABELS)}")
    seeds = _int_list(args.seeds, "seeds")
    default_n = SYNTHETIC_CALIB_N if args.calib == "synthetic" else REAL_CALIB_N
    explicit_n = args.calib_n is not None and args.calib_n != default_n
    args.calib_n = default_n if args.calib_n is None else args.calib_n
    if args.calib_n < 1 or (args.test_n is not None and args.test_n < 1):
        raise SystemExit("--calib-n and --test-n must be positive")
    if (args.test_n is not None or explicit_n) and args.out is None:
        raise SystemExit(f"--test-n and a --calib-n other than {default_n} are for trial runs: pass --out DIR so the "
                         f"records do not replace the full ones in {RESULTS}")
    os.makedirs(os.path.dirname(json_path) or ".", exist_ok=True)
    old = []
    if os.path.exists(json_path):
        with open(json_path) as f:
            old = json.load(f)

    def save(records: list[dict]) -> None:
        merged = merge(old, records)
        with open(json_path, "w") as f:
            f.write(dumps_records(merged))
        write_markdown(merged, md_path, baseline)

    run(methods, bits, seeds, args.calib_n, args.test_n, save, args.calib, args.synthetic_cache,
        model_name=args.model)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
