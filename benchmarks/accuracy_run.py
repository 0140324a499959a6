"""Measuring for ``benchmarks/accuracy.py``: quantize a bundled proxy with a method's preset,
evaluate it against the float model and write one record per (seed, method, bit setting).

For each calibration seed, method and bit setting :func:`run` quantizes the model with ``calib_n``
calibration images drawn with that seed from the 4000 training digits (JLSS, where a method runs
it, also shuffles its batches with that seed), evaluates it once on the held-out test digits (all
1000 unless ``test_n``) and compares its outputs with the float model's, which runs once per call.
The record layout is :mod:`accuracy_records`'s.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from typing import Callable

import torch

from accuracy_methods import BITS_LABELS, METHOD_SCAN_STATE, METHODS  # first: puts the repository on sys.path
from vmfx.config import ScanStateConfig, preset_names, resolve_config
from vmfx.data import load_digits, load_proxy_model
from vmfx.data.evaluate import collect_logits, compare_logits
from vmfx.data.proxy import PROXY_MODEL_NAME
from vmfx.data.proxy_vmamba import VMAMBA_PROXY_MODEL_NAME, load_proxy_vmamba
from vmfx.models.hints import config_for_model
from vmfx.passes import JLSSPass
from vmfx.passes.pipeline import Pipeline, method_passes

#: The bundled proxies by model name (the records' model column).
MODELS: dict[str, Callable] = {PROXY_MODEL_NAME: lambda: load_proxy_model(), VMAMBA_PROXY_MODEL_NAME: load_proxy_vmamba}

#: Real calibration images per seed.
REAL_CALIB_N = 256
#: Synthetic calibration images per seed (OuroMamba synthesizes 128).
SYNTHETIC_CALIB_N = 128


def sig4(x: float) -> float:
    """``x`` to 4 significant digits (how the records store KL)."""
    return float(f"{x:.4g}")


def make_record(method: str, bits: str, calib: str, seed, calib_images: int, fp_top1: float, res,
                calib_seconds: float, machine: str, model: str = PROXY_MODEL_NAME) -> dict:
    """A record from a :class:`vmfx.data.evaluate.AgreementResult`, dated today (UTC)."""
    return {
        "model": model, "method": method, "bits": bits, "calib": calib, "seed": seed,
        "calib_images": calib_images, "test_images": res.images,
        "top1": res.top1, "drop": round(fp_top1 - res.top1, 2), "agree": res.agree, "kl": sig4(res.kl),
        "calib_seconds": round(calib_seconds, 2), "machine": machine,
        "measured": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        "wrong": torch.nonzero(~res.correct).flatten().tolist(),
        "disagree": torch.nonzero(~res.agrees).flatten().tolist(),
        "kl_images": [sig4(v) for v in res.kl_per_image.tolist()],
    }


def synthetic_calibration_images(model, n: int, seed: int, cache: str | None) -> torch.Tensor:
    """``n`` images synthesized from ``model`` with ``seed`` and the default settings
    (:func:`vmfx.data.synthesize`), read from / written to ``cache`` when given."""
    from vmfx.data.synthetic import SynthesisConfig, synthesize_with_log

    config = SynthesisConfig()
    path = None
    if cache:
        from synthesis import cache_path  # benchmarks/synthesis.py writes the same files

        path = cache_path(cache, n, seed, config)
        if os.path.exists(path):
            saved = torch.load(path)
            if saved.get("config") == config.to_dict():
                print(f"synthetic images: reusing {path}", flush=True)
                return saved["images"]
    start_cpu, start = time.process_time(), time.perf_counter()
    result = synthesize_with_log(model, n, seed=seed, config=config, progress=False)
    print(json.dumps({"synthesized": n, "seed": seed, "steps": config.steps, "wall_s": round(time.perf_counter() - start, 1),
                      "cpu_s": round(time.process_time() - start_cpu, 1), "final": result.log[-1][-1]}), flush=True)
    if path:
        os.makedirs(cache, exist_ok=True)
        torch.save({"images": result.images, "config": config.to_dict()}, path)
    return result.images


def calibration_images(n: int, seed: int) -> torch.Tensor:
    """The first ``n`` training digits of the permutation drawn with ``seed``."""
    train, _ = load_digits("train")
    idx = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))
    return train[idx[:n]]


def quantize(model, calib: torch.Tensor, preset: str, seed: int, scan_state: ScanStateConfig | None = None):
    """What ``vmfx.compile(model, calib, preset)`` runs, with JLSS's batch-order seed set to ``seed``
    (the config does not carry that seed; JLSSPass defaults to 0, so seed 0 is exactly vmfx.compile)
    and, if given, the preset carrying ``scan_state``."""
    cfg = config_for_model(model, preset, resolve_config(preset))  # the model's preset defaults (VMamba)
    if scan_state is not None:
        cfg = cfg.replace(scan_state=scan_state)
    passes = method_passes(cfg)
    for p in passes:
        if isinstance(p, JLSSPass):
            p.seed = seed
    return Pipeline(passes)(model, calib, config=cfg)


def run(methods: list[str], bits: list[str], seeds: list[int], calib_n: int, test_n: int | None, save,
        calib_kind: str = "real", synthetic_cache: str | None = None,
        model_name: str = PROXY_MODEL_NAME) -> list[dict]:
    """Measure FP once, then every (seed, method, bit setting); ``save(records)`` is called after each
    record, so an interrupted run keeps what it measured."""
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads"
    model = MODELS[model_name]()
    test_x, test_y = load_digits("test")
    if test_n is not None:
        test_x, test_y = test_x[:test_n], test_y[:test_n]
    fp_logits, labels = collect_logits(model, (test_x, test_y))
    fp = compare_logits(fp_logits, fp_logits, labels)
    print(f"fp32: {fp}", flush=True)
    records = [make_record("fp", "fp32", "none", None, 0, fp.top1, fp, 0.0, machine, model=model_name)]
    save(records)
    for seed in seeds:
        if calib_kind == "synthetic":
            calib = synthetic_calibration_images(model, calib_n, seed, synthetic_cache)
        else:
            calib = calibration_images(calib_n, seed)
        for method in methods:
            prefix, _ = METHODS[method]
            for b in bits:
                preset = f"{prefix}-{b}"
                if preset not in preset_names():
                    own = [x for x in BITS_LABELS if f"{prefix}-{x}" in preset_names()]
                    if own:  # a method defined at some bit settings only (ouromamba-official: w4a4, w4a8)
                        print(f"{method}: no {b} preset (it has {', '.join(own)}); skipped", flush=True)
                        continue
                    raise SystemExit(f"no preset {preset!r} for method {method!r}")
                start = time.perf_counter()
                qmodel = quantize(model, calib, preset, seed, METHOD_SCAN_STATE.get(method))
                seconds = time.perf_counter() - start
                q_logits, _ = collect_logits(qmodel, (test_x, test_y))
                res = compare_logits(fp_logits, q_logits, labels)
                rec = make_record(method, b, calib_kind, seed, int(calib.shape[0]), fp.top1, res, seconds, machine,
                                  model=model_name)
                print(json.dumps({k: v for k, v in rec.items() if not isinstance(v, list)}), flush=True)
                records.append(rec)
                save(records)
    return records
