"""The records of ``benchmarks/accuracy.py``: their fields, their key, merging and the JSON layout.

A record is one evaluation of one quantized model (or of the float model)::

    {"model", "method", "bits", "calib", "seed", "calib_images", "test_images", "top1", "drop",
     "agree", "kl", "calib_seconds", "machine", "measured", "wrong", "disagree", "kl_images"}

top1, drop (FP top-1 minus top-1) and agree (top-1 agreement with the float model) in percent; kl the
mean over test images of KL(p_float || p_quant) of the softmax outputs (nats); measured the UTC date;
wrong / disagree the sorted test indices the model gets wrong / on which its top-1 differs from the
float model's; kl_images the per-image KL (4 significant digits); machine where calib_seconds was
timed. The per-image fields make every comparison between two records on the same test images
paired. FP is method "fp", bits "fp32", calib "none", seed null.

Records written before the seed / test_images / machine / agree / kl fields existed still read:
the accessors here fill in what was used then (:data:`SEED_ASSUMED`, :data:`TEST_IMAGES_ASSUMED`,
:data:`MACHINE_ASSUMED`), and the per-image fields are simply absent. Nothing here imports torch or
vmfx.
"""

from __future__ import annotations

import json

#: Records that predate the ``test_images`` field were measured on the whole test split.
TEST_IMAGES_ASSUMED = 1000
#: Records that predate the ``seed`` field were calibrated with seed 0.
SEED_ASSUMED = 0
#: Where records that predate the ``machine`` field were timed (the table of commit 28f5970 says so).
MACHINE_ASSUMED = "x86_64, 2 torch threads"


def record_seed(r: dict):
    """The record's calibration seed: None for FP (no calibration), SEED_ASSUMED where missing."""
    if r.get("calib") == "none":
        return None
    return r.get("seed", SEED_ASSUMED)


def seed_assumed(r: dict) -> bool:
    """Whether the record predates the seed field (its seed is :data:`SEED_ASSUMED`)."""
    return r.get("calib") != "none" and "seed" not in r


def test_images(r: dict) -> int:
    """How many test images the record was evaluated on."""
    return int(r.get("test_images", TEST_IMAGES_ASSUMED))


def record_key(r: dict) -> tuple:
    """(model, method, bits, calib, seed): records with the same key replace each other."""
    return (r["model"], r["method"], r["bits"], r["calib"], record_seed(r))


def record_name(r: dict) -> str:
    """How notes name a record: ``method bits seed s``."""
    seed = record_seed(r)
    return f"{r['method']} {r['bits']}" + ("" if seed is None else f" seed {seed}")


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with every record of ``new`` added, a new record replacing an old one of the same key;
    old records keep their place, new keys follow in their order."""
    merged = {record_key(r): r for r in old}
    merged.update({record_key(r): r for r in new})
    return list(merged.values())


def dumps_records(records: list[dict]) -> str:
    """JSON with one scalar field per line and each per-image list on one line."""
    blocks = []
    for r in records:
        items = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in r.items()]
        blocks.append(" {\n" + ",\n".join(items) + "\n }")
    return "[\n" + ",\n".join(blocks) + "\n]\n"
