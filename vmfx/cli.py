"""The ``vmfx`` command: evaluate, quantize and inspect Vision Mamba models.

    vmfx eval                          # the bundled proxy model on its 1000 test digits, FP only
    vmfx eval --config minmax-w8a8     # ... and quantized (calibrated on 256 training digits)
    vmfx eval --model vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2 \\
        --checkpoint vim_t_midclstok_76p1acc.pth --data imagenet/val --calib-dir imagenet/train \\
        --config minmax-w8a8
    vmfx quantize --config minmax-w8a8 --output proxy-w8a8.safetensors
    vmfx inspect --config minmax-w8a8          # per-node table of the quantized graph
    vmfx inspect --plot plots/ --block 3       # activation distributions of block 3, as PNGs
    vmfx inspect --config minmax-w8a8 --coverage   # every linear/conv/scan: quantized or float, and why
    vmfx eval --config ptq4vm-w4a4 --calib synthetic --save-synthetic synth/   # data-free calibration
    vmfx inspect --config ouromamba-w4a4 --outliers plots/   # OuroMamba's outlier channel sets
    torchrun --nproc-per-node 2 --no-python vmfx eval --config pts-w8a8 --json r.json   # 2 processes
    vmfx --version

``--model`` takes every family vmfx registers in timm (Vim ``vim_*``, LocalVim ``local_vim_*``, VMamba
``vanilla_vmamba_*`` / ``vmamba_*``, LocalVSSM ``local_vssm_*``) and MambaVision (``mamba_vision_*``,
with the optional ``mambavision`` package); the input size and channels are read from the model.
Without ``--data`` the bundled proxy set and checkpoint are used. Every error a user can cause is
printed as one line naming the problem (exit status 2), not a traceback; an unexpected internal
error keeps its traceback. Every argument is checked before any model is built or evaluated:
numbers and ranges by the parser, then presets, input files and folders, and that every output
path can be written (:func:`validate`). Errors that only the data can reveal (an unreadable
image, more calibration images asked for than there are, a block the model does not have) come
as soon as the data or model is read, still before any evaluation, except an unreadable image,
which is found when its batch is read. With progress on, a line on stderr announces each stage;
progress bars are drawn when stderr is a terminal, and written as sparse plain lines (at most one
per bar every 30 s, no carriage returns) when it is redirected to a file.

``vmfx eval`` prints, per row (the float model, then every preset), top-1 / top-5, the drop, the
top-1 agreement with the float model and the KL divergence from its softmax, the size of the
model on disk and the milliseconds per image of the model as this machine runs it (the quantized
model lowered with ``--backend``; fixed ``--threads``, median of ``--speed-runs`` timed forwards
of ``--speed-batch`` images after one warm-up). ``--json`` records the same, with how it was timed.
Under torchrun every process runs the command on its share of the batches (:mod:`vmfx.distributed`)
and only rank 0 prints and writes; the JSON records ``world_size``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .version import __version__
from .errors import CalibrationDataError, ConfigError, VmfxError

__all__ = ["main", "build_parser", "validate"]

PROXY = "vim-proxy-digits"
#: The lowering backends ``--backend`` takes (:data:`vmfx.lowering.BACKENDS`).
BACKEND_CHOICES = ("auto", "reference", "triton")
#: Seconds between two progress lines when stderr is not a terminal.
LOG_PROGRESS_SECONDS = 30.0


@dataclass
class Workload:
    """A model with its evaluation and calibration data, as the command line resolved them."""

    name: str
    model: nn.Module
    eval_data: Any  # (images, labels) tensors or a Dataset
    calib_data: Any  # a tensor of images or a DataLoader
    calib_images: int
    description: str
    calib_kind: str = "real"  # or "synthetic" (images made from the model, OuroMamba-Gen)


#: Prefix of the MambaVision names, which the optional ``mambavision`` package registers in timm.
MAMBAVISION_PREFIX = "mamba_vision_"


def _vmfx_model_names() -> set[str]:
    """The timm names vmfx registers itself (Vim, LocalVim, VMamba, LocalVSSM)."""
    from .models import LOCAL_VIM_VARIANTS, LOCAL_VSSM_VARIANTS, VIM_VARIANTS, VMAMBA_VARIANTS

    return set(VIM_VARIANTS) | set(LOCAL_VIM_VARIANTS) | set(VMAMBA_VARIANTS) | set(LOCAL_VSSM_VARIANTS)


def _register_model_names(name: str) -> None:
    """Make ``name`` known to timm if vmfx can: importing :mod:`vmfx.models` registers vmfx's own
    names; a ``mamba_vision_*`` name imports the optional ``mambavision`` package (made importable
    on a CPU first), which registers its own.

    Raises:
        ConfigError: a MambaVision name without the ``mambavision`` package.
    """
    from . import models as vmodels  # noqa: F401  (registers vmfx's names in timm)

    if name.startswith(MAMBAVISION_PREFIX):
        from .frontends.mambavision import enable_mambavision_on_cpu

        try:
            enable_mambavision_on_cpu()
        except ImportError as exc:
            raise ConfigError(f"--model {name}: {exc}") from None


def _check_model_name(name: str | None) -> None:
    """``--model`` names the bundled proxy or a model timm knows (after vmfx registered its own)."""
    if name is None or name == PROXY:
        return
    import timm

    _register_model_names(name)
    if not timm.is_model(name):
        raise ConfigError(
            f"unknown model {name!r}: use {PROXY!r} or a timm name (vmfx registers the Vim, LocalVim, VMamba "
            f"and LocalVSSM names, e.g. vmamba_tiny_s1l8; {MAMBAVISION_PREFIX}* needs the mambavision package)"
        )


def _model_input(model: nn.Module) -> tuple[int, int]:
    """``(image side, channels)`` of the square images ``model`` takes, read from (in this order)
    its patch embedding's ``img_size`` (Vim, LocalVim), its own ``img_size`` (LocalVSSM), its
    constructor's ``imgsize`` (VMamba), timm's ``pretrained_cfg["input_size"]`` (MambaVision and
    other timm models), else 224; channels from the patch embedding's ``proj`` conv, else the
    first ``Conv2d``, else the ``pretrained_cfg``, else 3.

    Raises:
        ConfigError: the model takes non-square images (the evaluation transform crops squares).
    """
    pe = getattr(model, "patch_embed", None)
    cfg = getattr(model, "pretrained_cfg", None)
    cfg = cfg if isinstance(cfg, dict) else {}
    kwargs = getattr(model, "init_kwargs", None)
    size = getattr(pe, "img_size", None)
    if size is None:
        size = getattr(model, "img_size", None)
    if size is None and isinstance(kwargs, dict):
        size = kwargs.get("imgsize")
    if size is None and cfg.get("input_size"):
        size = tuple(cfg["input_size"][-2:])
    if size is None:
        size = 224
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
    if h != w:
        raise ConfigError(f"the model takes {h}x{w} images; the vmfx command evaluates square center crops only")
    proj = getattr(pe, "proj", None)
    if isinstance(proj, nn.Conv2d):
        return h, int(proj.in_channels)
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None:
        return h, int(conv.in_channels)
    return h, int(cfg["input_size"][0]) if cfg.get("input_size") else 3


def _model_classes(model: nn.Module) -> int | None:
    """The number of classes ``model`` outputs (``num_classes``, or its classifier's
    ``out_features``), or None where neither says."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else getattr(model, "head", None)
    return int(head.out_features) if isinstance(head, nn.Linear) else None


def _build_model(args, warn: bool = True) -> tuple[str, nn.Module]:
    """The float model ``--model`` names (default the bundled proxy), with ``--checkpoint`` loaded;
    ``warn`` says on stderr when a timm model keeps its random weights."""
    from . import data as vdata
    from . import models as vmodels  # noqa: F401  (registers the Vim names in timm)

    name = args.model or PROXY
    if name == PROXY:
        if args.checkpoint:
            model = vdata.build_proxy_model()
            vmodels.load_checkpoint(model, args.checkpoint)
        else:
            model = vdata.load_proxy_model()
        return name, model.eval()
    import timm

    _register_model_names(name)
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    try:
        model = timm.create_model(name, **kwargs)
    except RuntimeError as exc:  # timm: "Unknown model"
        raise VmfxError(f"unknown model {name!r}: use {PROXY!r} or a timm name (vmfx registers the Vim names)") from exc
    if args.checkpoint:
        vmodels.load_checkpoint(model, args.checkpoint)
    elif warn:
        print(f"warning: no --checkpoint: {name} has random weights", file=sys.stderr)
    return name, model.eval()


def _check_classes(name: str, model: nn.Module, dataset, flag: str = "--data") -> None:
    """Refuse an evaluation folder with more classes than ``model`` outputs (some labels could never
    be predicted), and warn when it has fewer: ImageFolder numbers the class folders 0, 1, ... in
    sorted order, which matches the model's classes only if the folder holds its first classes."""
    classes = list(getattr(dataset, "classes", None) or [])
    outputs = _model_classes(model)
    if not classes or outputs is None or len(classes) == outputs:
        return
    if len(classes) > outputs:
        never = f"label {outputs}" if outputs == len(classes) - 1 else f"labels {outputs} to {len(classes) - 1}"
        raise ConfigError(
            f"{flag} has {len(classes)} class folders but {name} outputs {outputs} classes, so {never} "
            f"could never be predicted: evaluate on a folder of the model's "
            f"classes, or give --num-classes {len(classes)} with a checkpoint trained on these classes"
        )
    print(
        f"warning: {flag} has {len(classes)} class folders ({', '.join(classes[:3])}{', ...' if len(classes) > 3 else ''})"
        f" but {name} outputs {outputs} classes; the folders are numbered 0 to {len(classes) - 1} in sorted order, "
        f"so accuracy is right only if they are the model's first {len(classes)} classes (for a model trained on "
        f"these classes give --num-classes {len(classes)} and its --checkpoint)",
        file=sys.stderr,
    )


def _check_quantizable(name: str, model: nn.Module, data: Any) -> None:
    """Before any evaluation: a model vmfx does not know (not the proxy, not a name vmfx or the
    mambavision package registers) is traced once on one image, and refused if no Mamba mixer is
    found in its graph (``vmfx.compile`` would fail only after the float evaluation)."""
    import vmfx

    if name == PROXY or name in _vmfx_model_names() or name.startswith(MAMBAVISION_PREFIX):
        return
    gm = vmfx.trace(model, (_first_images(data, 1),))
    if not gm.meta.get("vmfx_mixers"):
        raise ConfigError(
            f"{name} has no Mamba mixer vmfx can quantize (no selective scan in its graph): vmfx quantizes "
            "Vision Mamba models (Vim, LocalVim, VMamba, LocalVSSM, MambaVision, or models built from Mamba "
            "blocks; register an adapter for a third-party block with vmfx.frontends.register_adapter)"
        )


def _first_images(data: Any, n: int) -> torch.Tensor:
    """The first ``n`` images (fewer if there are fewer) of ``(images, labels)`` tensors or a Dataset."""
    if isinstance(data, tuple):
        return data[0][:n]
    return torch.stack([data[i][0] for i in range(min(n, len(data)))])


def _workload(args, need_calib: bool) -> Workload:
    from . import data as vdata

    name, model = _build_model(args)
    img_size, channels = _model_input(model)
    crop_pct = args.crop_pct if args.crop_pct is not None else (1.0 if name == PROXY else 0.875)
    border = vdata.digits.DIGITS_BORDER if name == PROXY else 0
    transform = vdata.vim_eval_transform(img_size, crop_pct, channels, border)
    limit = getattr(args, "limit", None)
    if args.data is None and name != PROXY and args.command == "quantize":  # no evaluation: calibration only
        calib, n = _synthetic(args, model) if args.calib == "synthetic" else _calibration_folder(args, transform)
        return Workload(name, model, None, calib, n, "no evaluation data", args.calib)
    if args.data is None:
        if name != PROXY:
            raise VmfxError(f"--data is required for {name}: give an ImageNet-layout validation folder")
        images, labels = vdata.load_digits("test")
        if limit:
            images, labels = images[:limit], labels[:limit]
        eval_data = (images, labels)
        desc = f"bundled proxy digits, test split ({images.shape[0]} images)"
        calib, n = None, 0
        if need_calib and args.calib == "synthetic":
            calib, n = _synthetic(args, model)
        elif need_calib:
            if args.calib_dir:
                calib, n = _calibration_folder(args, transform)
            else:
                train, _ = vdata.load_digits("train")
                if args.calib_n > train.shape[0]:
                    raise CalibrationDataError(
                        f"--calib-n {args.calib_n}: the bundled training split holds only {train.shape[0]} images"
                    )
                idx = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(args.calib_seed))
                calib = train[idx[: args.calib_n]]
                n = calib.shape[0]
        return Workload(name, model, eval_data, calib, n, desc, getattr(args, "calib", "real"))

    dataset = vdata.image_folder(args.data, transform=transform)
    if args.command == "eval":
        _check_classes(name, model, dataset)
    if limit:
        dataset = vdata.calibration_subset(dataset, min(limit, len(dataset)), seed=0)
    desc = f"{args.data} ({len(dataset)} images)"
    if need_calib:
        _check_quantizable(name, model, dataset)
    calib, n = None, 0
    if need_calib and args.calib == "synthetic":
        calib, n = _synthetic(args, model)
    elif need_calib:
        if not args.calib_dir:
            raise VmfxError(
                "--calib-dir is required with --data and --config: calibrate on training images, never on "
                "the images you evaluate on (or on images synthesized from the model: --calib synthetic)"
            )
        calib, n = _calibration_folder(args, transform)
    return Workload(name, model, dataset, calib, n, desc, getattr(args, "calib", "real"))


def _calibration_folder(args, transform):
    """A DataLoader over ``--calib-n`` seeded images of ``--calib-dir``, and their number."""
    from torch.utils.data import DataLoader

    from . import data as vdata

    folder = vdata.image_folder(args.calib_dir, transform=transform)
    if args.calib_n > len(folder):
        raise CalibrationDataError(
            f"--calib-n {args.calib_n}: the calibration folder {args.calib_dir!r} holds only {len(folder)} images"
        )
    subset = vdata.calibration_subset(folder, args.calib_n, args.calib_seed)
    return DataLoader(subset, batch_size=args.batch_size, shuffle=False), len(subset)


# -- data-free calibration (OuroMamba-Gen, vmfx.data.synthetic) ------------------------------------


def _synthetic(args, model):
    """``--calib-n`` images synthesized from the model (seed ``--calib-seed``), saved as PNGs into
    ``--save-synthetic`` when given; synthesized once, whatever the number of presets."""
    from .data.synthetic import SynthesisConfig, Synthetic

    steps = args.synthetic_steps if args.synthetic_steps is not None else SynthesisConfig().steps
    spec = Synthetic(n=args.calib_n, seed=args.calib_seed, config=SynthesisConfig(steps=steps),
                     save_dir=args.save_synthetic)
    progress = not args.no_progress
    _announce(progress, f"synthesizing {spec.n} calibration images from the model ({steps} steps, seed {spec.seed})")
    images = spec.generate(model, progress=progress)
    if args.save_synthetic:
        print(f"wrote {spec.n} synthetic images to {args.save_synthetic}", file=sys.stderr)
    return images, int(images.shape[0])


def _announce(progress: bool, text: str) -> None:
    """One line on stderr per stage (with progress on), so stdout keeps only the results."""
    if progress:
        print(text, file=sys.stderr, flush=True)


def _quantize(work: Workload, preset: str, progress: bool):
    import vmfx

    kind = " synthetic" if work.calib_kind == "synthetic" else ""
    _announce(progress, f"quantizing {work.name} with {preset} (calibration on {work.calib_images}{kind} images)")
    start = time.perf_counter()
    qmodel = vmfx.compile(work.model, work.calib_data, config=preset, progress=progress)
    return qmodel, time.perf_counter() - start


# -- what a compiled model costs: size on disk, time per image ------------------------------------


@dataclass(frozen=True)
class SpeedSetup:
    """How ``vmfx eval`` times its models: ``backend`` (the resolved lowering backend) on ``device``,
    ``threads`` torch threads, one warm-up forward each, then the median of ``runs`` forwards of
    the same ``batch`` images, the models taking turns (:func:`_ms_per_image`)."""

    backend: str
    device: str
    threads: int
    batch: int
    runs: int

    def record(self) -> dict:
        return {"backend": self.backend, "device": self.device, "threads": self.threads, "batch": self.batch,
                "runs": self.runs, "warmup": 1, "statistic": "median", "order": "models in turn"}


def _speed_setup(args, images: int) -> SpeedSetup:
    from .lowering import resolve_backend

    backend = resolve_backend(args.backend)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    return SpeedSetup(backend, device, args.threads, min(args.speed_batch, images), args.speed_runs)


@torch.no_grad()
def _ms_per_image(models: list[nn.Module], images: torch.Tensor, setup: SpeedSetup) -> list[float]:
    """Median wall time of one forward of ``images``, in ms per image, for each of ``models``:
    one warm-up forward each, then ``setup.runs`` rounds in which every model runs once in turn,
    so that all of them see the same load on a shared machine. Uses ``setup.threads`` torch
    threads; the caller's thread count is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(setup.threads)
    try:
        x = images.to(setup.device)
        sync = torch.cuda.synchronize if setup.device == "cuda" else (lambda: None)
        for model in models:
            model(x)
        sync()
        times: list[list[float]] = [[] for _ in models]
        for _ in range(setup.runs):
            for model, own in zip(models, times):
                start = time.perf_counter()
                model(x)
                sync()
                own.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return [1000.0 * statistics.median(own) / x.shape[0] for own in times]


def _float_for_timing(model: nn.Module, setup: SpeedSetup) -> nn.Module:
    if setup.device == "cpu":
        return model
    import copy

    return copy.deepcopy(model).to(setup.device)


def _lowered_for_timing(qmodel, setup: SpeedSetup, preset: str) -> tuple[nn.Module, str]:
    """``qmodel`` lowered with ``setup.backend``, and what that is; where it cannot be lowered, the
    quantized (simulated) graph itself, with a warning."""
    from .errors import LoweringError
    from .lowering import lower

    try:
        model = lower(qmodel, setup.backend)
        what = f"lowered ({setup.backend})"
    except (ConfigError, LoweringError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"warning: {preset} could not be lowered ({first}); its time is the simulated quantized graph's",
              file=sys.stderr)
        model, what = qmodel, "fake-quant graph (not lowered)"
    return (model.to(setup.device) if setup.device != "cpu" else model), what


def _float_size(args, model: nn.Module) -> tuple[int, str]:
    """Bytes of the float model on disk: ``--checkpoint``, the bundled proxy weights, or (random
    weights, no file) its state dict written with ``torch.save`` to a temporary file."""
    if args.checkpoint:
        return os.path.getsize(args.checkpoint), "--checkpoint file"
    if (args.model or PROXY) == PROXY:
        from .data.proxy import PROXY_WEIGHTS

        return os.path.getsize(PROXY_WEIGHTS), "bundled proxy weights (safetensors)"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "float.pth")
        torch.save(model.state_dict(), path)
        return os.path.getsize(path), "float state dict (torch.save, no checkpoint given)"


def _saved_size(qmodel) -> int:
    """Bytes of the file ``vmfx.save`` writes for ``qmodel`` (into a temporary folder, removed after)."""
    import vmfx

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        vmfx.save(qmodel, path)
        return os.path.getsize(path)


# -- commands -------------------------------------------------------------------------------------


def _collect(model: nn.Module, work: Workload, args, desc: str):
    from . import data as vdata

    return vdata.collect_logits(model, work.eval_data, batch_size=args.batch_size,
                                progress=not args.no_progress, desc=desc)


def cmd_eval(args) -> int:
    from .data.evaluate import compare_logits

    work = _workload(args, need_calib=bool(args.config))
    progress = not args.no_progress
    print(f"model: {work.name}\ndata:  {work.description}", flush=True)
    _announce(progress, "evaluating fp32")
    fp_logits, labels = _collect(work.model, work, args, "eval fp32")
    fp = compare_logits(fp_logits, fp_logits, labels)
    speed = _speed_setup(args, fp.images)
    size, size_of = _float_size(args, work.model)
    rows = [{"method": "fp32", "top1": fp.top1, "top5": fp.top5, "drop": 0.0, "agree": fp.agree, "kl": fp.kl,
             "size_mb": size / 1e6, "size_of": size_of, "ms_per_image": None, "timed": "float model",
             "calib_seconds": None, "calib_images": 0}]
    timed = [_float_for_timing(work.model, speed)]
    for preset in args.config or []:
        qmodel, seconds = _quantize(work, preset, progress)
        _announce(progress, f"evaluating {preset}")
        logits, _ = _collect(qmodel, work, args, f"eval {preset}")
        res = compare_logits(fp_logits, logits, labels)
        lowered, what = _lowered_for_timing(qmodel, speed, preset)
        timed.append(lowered)
        rows.append({"method": preset, "top1": res.top1, "top5": res.top5, "drop": fp.top1 - res.top1,
                     "agree": res.agree, "kl": res.kl, "size_mb": _saved_size(qmodel) / 1e6,
                     "size_of": "vmfx.save file", "ms_per_image": None, "timed": what,
                     "calib_seconds": seconds, "calib_images": work.calib_images})
    _announce(progress, f"timing {len(timed)} model(s) in turn: {speed.runs} x {speed.batch} images, "
                        f"{speed.threads} thread(s), {speed.device}")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    for row, ms in zip(rows, _ms_per_image(timed, _first_images(work.eval_data, speed.batch), speed)):
        row["ms_per_image"] = ms
    print(f"\n{'method':<16} {'top-1':>7} {'top-5':>7} {'drop':>6} {'agree':>7} {'KL':>8} {'size MB':>8} "
          f"{'ms/img':>8} {'calibration':>22}")
    for r in rows:
        calib = "" if r["calib_seconds"] is None else f"{r['calib_seconds']:.1f} s on {r['calib_images']} images"
        print(f"{r['method']:<16} {r['top1']:>6.2f}% {r['top5']:>6.2f}% {r['drop']:>6.2f} {r['agree']:>6.2f}% "
              f"{r['kl']:>8.3g} {r['size_mb']:>8.3f} {r['ms_per_image']:>8.2f} {calib:>22}")
    print(f"\nagree: top-1 agreement with fp32; KL: mean KL(fp32 || method) in nats; size: the file on disk "
          f"(fp32: {rows[0]['size_of']}; quantized: vmfx.save); ms/img: median of {speed.runs} forwards of "
          f"{speed.batch} images, {speed.threads} thread(s), {speed.device}, all models in turn, quantized models lowered "
          f"with the {speed.backend} backend")
    if args.json and _world().is_main:
        with open(args.json, "w") as f:
            json.dump({"model": work.name, "data": work.description, "images": fp.images,
                       "world_size": _world().world_size, "timing": {**speed.record(), "load_average": load},
                       "results": rows}, f, indent=2)
    return 0


def cmd_quantize(args) -> int:
    import vmfx

    work = _workload(args, need_calib=True)
    qmodel, seconds = _quantize(work, args.config, not args.no_progress)
    if args.backend:
        from .lowering import lower

        qmodel = lower(qmodel, args.backend)
    if _world().is_main:  # every process holds the same model (vmfx.distributed)
        vmfx.save(qmodel, args.output, float_weights=args.keep_float_weights and not args.backend)
    print(f"quantized {work.name} with {args.config} ({seconds:.1f} s on {work.calib_images} calibration images)")
    print(f"saved to {args.output}")
    return 0


def _mixer_count(model: nn.Module) -> int:
    from .nn import MambaMixer

    return sum(isinstance(m, MambaMixer) for m in model.modules())


def _check_file_model(gm, work: Workload, path: str) -> None:
    """``--plot`` draws the float model's activations and ``--outliers`` feeds the images to the
    saved model: with ``--quantized``, the float model (``--model``, default the proxy) must be the
    architecture the file holds, and its images the file's input shape.

    Raises:
        ConfigError: another class, other constructor arguments or another input shape.
    """
    from .passes.pipeline import model_spec

    cls = type(work.model)
    float_type = f"{cls.__module__}.{cls.__qualname__}"
    saved_type = gm.meta.get("vmfx_source_type") or ""
    saved_spec, float_spec = gm.meta.get("vmfx_model_spec"), model_spec(work.model)
    shapes = gm.meta.get("vmfx_input_shapes") or [[]]
    saved_shape = tuple(shapes[0][1:])
    image_shape = tuple(_first_images(work.eval_data, 1).shape[1:])
    same_spec = saved_spec is None or float_spec is None or (
        json.dumps(saved_spec, sort_keys=True, default=str) == json.dumps(float_spec, sort_keys=True, default=str))
    if saved_type == float_type and same_spec and saved_shape == image_shape:
        return
    dims = "x".join(str(d) for d in saved_shape)
    raise ConfigError(
        f"--quantized {path!r} holds a quantized {saved_type.rsplit('.', 1)[-1]} taking {dims} images, but "
        f"--plot / --outliers would use the float model {work.name} ({cls.__name__}"
        f"{', the default' if work.name == PROXY else ''}) on {'x'.join(str(d) for d in image_shape)} images: "
        "give the float model the file was quantized from with --model (and --checkpoint, --data)"
    )


def _load_quantized(args, work: Workload | None):
    """``vmfx.load(--quantized)``. A file whose architecture vmfx cannot rebuild by itself (e.g. a
    MambaVision) is loaded into a copy of the ``--model`` float model (its weights replaced by the
    file's); any other file is rebuilt from its own header, whatever ``--model`` says.

    Raises:
        ConfigError: a file vmfx cannot rebuild, without ``--model``.
    """
    import copy

    import vmfx

    from .errors import SerializationError

    try:
        return vmfx.load(args.quantized)
    except SerializationError as exc:
        if "model=" not in str(exc):  # not "vmfx cannot rebuild a X by itself: pass ... model=..."
            raise
        if not args.model:
            raise ConfigError(f"--quantized {args.quantized!r}: vmfx cannot rebuild its architecture by itself; "
                              "give the model it was quantized from with --model NAME") from exc
    arch = copy.deepcopy(work.model) if work is not None else _build_model(args, warn=False)[1]
    return vmfx.load(args.quantized, model=arch)


def cmd_inspect(args) -> int:
    import vmfx

    from . import inspect as vinspect

    progress = not args.no_progress
    work = gm = None
    if args.plot or args.outliers:
        work = _workload(args, need_calib=bool(args.config) and not args.quantized)
    if args.quantized:
        gm = _load_quantized(args, work)
        if work is not None:
            _check_file_model(gm, work, args.quantized)
    if work is not None:
        blocks = _mixer_count(work.model)
        if blocks and args.block >= blocks:
            raise ConfigError(f"--block {args.block}: {work.name} has {blocks} blocks (0 to {blocks - 1})")
    if gm is None:
        if work is None:
            work = _workload(args, need_calib=bool(args.config))
        if args.config:
            gm, _ = _quantize(work, args.config, progress)
        else:
            gm = vmfx.trace(work.model, (_first_images(work.eval_data, 1),))
    if args.coverage:
        print(vinspect.coverage(gm))
        print()
    if args.table or not (args.plot or args.dot or args.coverage or args.outliers):
        print(vinspect.table(gm, all_nodes=args.all_nodes))
        print()
    s = vinspect.summary(gm)
    print(f"{s['mixers']} mixers, {s['scans']} scans, {s['quantized_linears']} quantized linears, {s['nodes']} nodes")
    if args.dot:
        vinspect.draw(gm, args.dot)
        print(f"wrote {args.dot}")
    if args.plot:
        images = _first_images(work.eval_data, args.plot_images)
        _announce(progress, f"plotting the activations of block {args.block} of {work.name} on {len(images)} images")
        paths = vinspect.plot_distributions(work.model, images, args.plot, block=args.block)
        print("wrote " + ", ".join(paths))
    if args.outliers:  # OuroMamba: the outlier sets of the mixed-precision quantizers
        _inspect_outliers(vinspect, gm, work, args, progress)
    return 0


def _inspect_outliers(vinspect, gm, work, args, progress: bool) -> None:
    """List the outlier sets per block and quantizer (``vmfx inspect --outliers DIR``) and plot them."""
    images = _first_images(work.eval_data, args.plot_images)
    _announce(progress, f"recording the outlier sets on {len(images)} images")
    sets = vinspect.outlier_sets(gm, images)
    print("block  dir  quantizes                 edge    mean/step  max/step  distinct  grows@%  top channels (freq)")
    for s in sets:
        d = s.summary()
        top = ", ".join(f"{c}({f:.2f})" for c, f in d["top_channels"][:4])
        print(f"{d['block'] if d['block'] is not None else '-':>5}  {(d['direction'] or '-')[:3]:3}  "
              f"{(d['quantizes'] or '-')[-24:]:24}  {d['edge'] or '-':6}  {d['mean_outliers_per_step']:9.2f}  "
              f"{d['max_outliers_per_step']:8d}  {d['distinct_channels']:8d}  {100 * d['change_rate']:6.1f}  {top}")
    paths = vinspect.plot_outliers(sets, args.outliers, block=args.block)
    print("wrote " + ", ".join(paths))


# -- argument checks ------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _crop_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(
            f"must be in (0, 1], the share of the resized image the center crop keeps; got {text}"
        )
    return value


def _check_input_file(path: str | None, flag: str) -> None:
    if path is not None and not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
        raise ConfigError(f"{flag} {path!r} {what}")


def _check_input_dir(path: str | None, flag: str) -> None:
    if path is not None and not os.path.isdir(path):
        what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
        raise ConfigError(f"{flag} {path!r} {what}; give an ImageNet-layout folder (one sub-folder per class)")


def _check_image_folder(path: str | None, flag: str) -> None:
    """``path`` is an ImageNet-layout folder as ImageFolder reads it: at least one class sub-folder,
    and an image in every one (scanned up to the first image of each class, not read)."""
    if path is None:
        return
    from torchvision.datasets.folder import IMG_EXTENSIONS

    try:
        classes = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
    except OSError as exc:
        raise ConfigError(f"{flag} {path!r} cannot be read: {exc.strerror or exc}") from None
    if not classes:
        raise ConfigError(f"{flag} {path!r} has no class sub-folders; give an ImageNet-layout folder "
                          "(one sub-folder of images per class)")

    def has_image(folder: str) -> bool:
        for _, _, files in os.walk(folder, followlinks=True):
            if any(name.lower().endswith(IMG_EXTENSIONS) for name in files):
                return True
        return False

    empty = [c for c in classes if not has_image(os.path.join(path, c))]
    if empty:
        listed = ", ".join(repr(c) for c in empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise ConfigError(f"{flag} {path!r}: the class folder(s) {listed} hold no image "
                          f"({', '.join(IMG_EXTENSIONS[:4])}, ...); add images or remove the empty folders")


def _check_output_file(path: str | None, flag: str, example: str) -> None:
    """``path`` can be created or overwritten: tried by opening it for appending (then removing
    it again if it did not exist), which also holds for root, for whom permission bits do not."""
    if path is None:
        return
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path!r} is a directory; give a file path such as {os.path.join(path, example)!r}")
    parent = os.path.dirname(path)  # as the user wrote it: messages name no path they did not type
    if parent and not os.path.isdir(parent):
        raise ConfigError(f"{flag} {path!r}: the folder {parent!r} does not exist")
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {path!r} cannot be written: {exc.strerror or exc}") from None
    if not existed:
        with contextlib.suppress(FileNotFoundError):  # another process of a torchrun group removed it
            os.remove(path)


def _check_output_dir(path: str | None, flag: str, what: str = "the plots") -> None:
    """``path`` is (or can be made) a folder that files can be written into (``what`` says which
    files, for the message); it is created now."""
    if path is None:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path!r} is a file; give a folder to write {what} into")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".vmfx-write-test")
        with open(probe, "wb"):
            pass
        with contextlib.suppress(FileNotFoundError):  # another process of a torchrun group removed it
            os.remove(probe)
    except OSError as exc:
        raise ConfigError(f"{flag} {path!r} cannot be written: {exc.strerror or exc}") from None


def validate(args: argparse.Namespace) -> None:
    """Check every argument the parser could not, before any model is built or evaluated.

    Raises:
        ConfigError: a ``--backend`` that cannot run here, an unknown preset or model name, an
            option the command does not use (``quantize --limit``), a missing input file, a folder
            without images, an output path that cannot be written, or arguments that contradict
            each other.
    """
    from .config import resolve_config

    _check_backend(getattr(args, "backend", None))  # first: before anything imports Triton
    from .plugins import load_plugin

    for plugin in getattr(args, "plugin", None) or []:  # plug-in methods register their presets
        load_plugin(plugin)
    configs = args.config if isinstance(args.config, list) else [args.config] if args.config else []
    for name in configs:
        resolve_config(name)  # an unknown preset: ConfigError listing the known ones
    if args.command == "quantize" and args.keep_float_weights and args.backend:
        raise ConfigError("--keep-float-weights keeps the float weights of an unlowered model; a lowered file "
                          "(--backend) holds integer codes only: drop one of the two")
    if args.command == "quantize" and args.limit is not None:
        raise ConfigError("--limit sets how many images are evaluated, and quantize evaluates none: drop it "
                          "(--calib-n sets the calibration images)")
    _validate_calibration_source(args)
    _check_model_name(args.model)
    if args.model not in (None, PROXY):
        if args.command == "quantize" and not (args.calib_dir or args.calib == "synthetic"):
            raise ConfigError(f"quantizing {args.model} needs calibration images: give --calib-dir (an ImageNet-layout "
                              "training folder) or --calib synthetic")
        needs_data = args.command == "eval" or (args.command == "inspect" and not (args.quantized and not (
            args.plot or args.outliers)))
        if needs_data and args.data is None:
            raise ConfigError(f"--data is required for {args.model}: give an ImageNet-layout validation folder "
                              "(the bundled digits fit only the bundled proxy model)")
    _check_input_file(args.checkpoint, "--checkpoint")
    _check_input_dir(args.data, "--data")
    _check_input_dir(args.calib_dir, "--calib-dir")
    _check_image_folder(args.data, "--data")
    _check_image_folder(args.calib_dir, "--calib-dir")
    if args.command == "eval":
        _check_output_file(args.json, "--json", "results.json")
    elif args.command == "quantize":
        _check_output_file(args.output, "--output", "model.safetensors")
    elif args.command == "inspect":
        if args.quantized and args.config:
            raise ConfigError("give --quantized (a saved model) or --config (quantize now), not both")
        _check_input_file(args.quantized, "--quantized")
        _check_output_file(args.dot, "--dot", "graph.dot")
        _check_output_dir(args.plot, "--plot")
        _check_output_dir(args.outliers, "--outliers")
        if args.outliers and not (args.config or args.quantized):
            raise ConfigError("--outliers lists the outlier sets of a quantized model: give --config "
                              "(an ouromamba-* preset) or --quantized")


def _triton_imported_for_gpu() -> bool:
    """True when ``triton.language`` was imported with Triton's CPU interpreter off: its library
    functions are then GPU ``JITFunction`` objects, which interpreted kernels cannot call."""
    lang = sys.modules.get("triton.language")
    if lang is None:
        return False
    from triton.runtime.jit import JITFunction

    return isinstance(getattr(lang, "zeros", None), JITFunction)


def _check_backend(backend: str | None) -> None:
    """Decide before any work whether ``--backend`` can run here. ``triton`` needs the triton
    package; without a CUDA device its kernels run in Triton's CPU interpreter, which must be on
    before Triton is first imported: it is switched on here (``TRITON_INTERPRET=1`` unless set,
    with a warning that it is slow), or, when that is no longer possible (the variable says off, or
    Triton was already imported without it), the command is refused with the way out.

    Raises:
        ConfigError: Triton is missing, or cannot run its kernels on this CPU-only machine.
    """
    if backend != "triton":
        return
    if importlib.util.find_spec("triton") is None:
        raise ConfigError("--backend triton needs the triton package (pip install triton); without it use "
                          "--backend reference, vmfx's CPU backend")
    if torch.cuda.is_available():
        return
    value = os.environ.get("TRITON_INTERPRET")
    if value is not None and value.strip().lower() not in ("1", "true", "on", "yes"):
        raise ConfigError(f"--backend triton: no CUDA device, and TRITON_INTERPRET={value!r} keeps Triton's CPU "
                          "interpreter off: unset it (or set it to 1), or use --backend reference")
    if value is None and _triton_imported_for_gpu():
        raise ConfigError("--backend triton: no CUDA device, and Triton was imported before its CPU interpreter "
                          "could be switched on: run with TRITON_INTERPRET=1 set in the environment, or use "
                          "--backend reference")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    print("warning: no CUDA device: --backend triton runs the generated kernels in Triton's CPU interpreter, "
          "which is slow (--backend reference is vmfx's CPU backend)", file=sys.stderr)


def _validate_calibration_source(args: argparse.Namespace) -> None:
    """``--calib real|synthetic`` and the options that only one of them takes; fills in the
    default ``--calib-n`` (256 real images, 128 synthetic ones as in OuroMamba)."""
    calib = getattr(args, "calib", "real")
    if calib == "synthetic":
        if args.calib_dir:
            raise ConfigError("--calib synthetic makes its own images from the model; drop --calib-dir (real images) "
                              "or use --calib real")
        if args.command in ("eval", "inspect") and not args.config:
            raise ConfigError("--calib synthetic makes calibration images for a quantized model: add --config PRESET")
        _check_output_dir(args.save_synthetic, "--save-synthetic", "the synthetic images (PNG)")
    else:
        for flag, value in (("--save-synthetic", getattr(args, "save_synthetic", None)),
                            ("--synthetic-steps", getattr(args, "synthetic_steps", None))):
            if value is not None:
                raise ConfigError(f"{flag} only applies to images synthesized from the model: add --calib synthetic")
    if getattr(args, "calib_n", None) is None:
        args.calib_n = 128 if calib == "synthetic" else 256


# -- parser ---------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"{PROXY!r} (default: the bundled proxy) or a timm model name")
    p.add_argument("--checkpoint", default=None, help="official Vim checkpoint (.pth) or a bare state_dict")
    p.add_argument("--num-classes", type=_positive_int, default=None, help="classes of a timm model (default: timm's)")
    p.add_argument("--data", default=None, help="ImageNet-layout evaluation folder (default: the proxy test set)")
    p.add_argument("--calib-dir", default=None, help="ImageNet-layout folder to draw calibration images from")
    p.add_argument("--calib-n", type=_positive_int, default=None,
                   help="number of calibration images (default 256 real / 128 synthetic; at most what the training data holds)")
    p.add_argument("--calib-seed", type=_non_negative_int, default=0, help="seed of the calibration draw")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--crop-pct", type=_crop_fraction, default=None,
                   help="in (0, 1]: resize to img_size / crop_pct, then center-crop img_size")
    p.add_argument("--limit", type=_positive_int, default=None, help="evaluate on at most this many images")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--plugin", action="append", default=None, metavar="FILE",
                   help="a Python file registering a method and its presets (vmfx.register_method; repeatable), "
                        "loaded before --config is read")
    # data-free calibration (OuroMamba-Gen)
    p.add_argument("--calib", choices=("real", "synthetic"), default="real",
                   help="calibrate on real images (default) or on images synthesized from the model (OuroMamba-Gen)")
    p.add_argument("--synthetic-steps", type=_positive_int, default=None,
                   help="optimisation steps of the synthetic images (default: vmfx.data.synthetic.DEFAULT_STEPS)")
    p.add_argument("--save-synthetic", default=None, metavar="DIR",
                   help="also write the synthetic calibration images as PNGs into DIR")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (the full usage is in ``--help``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vmfx", description="Post-training quantization for Vision Mamba models.")
    parser.add_argument("--version", action="version",
                        version=f"vmfx {__version__} (torch {torch.__version__}, Python {sys.version.split()[0]})")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="FP and quantized top-1/top-5 accuracy")
    _common(p)
    p.add_argument("--config", action="append", default=None, help="a preset to quantize with (repeatable)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="lowering backend the quantized models are timed with (auto: triton on a GPU, else reference)")
    p.add_argument("--threads", type=_positive_int, default=1, help="torch threads while timing (default 1)")
    p.add_argument("--speed-batch", type=_positive_int, default=8, help="images per timed forward (default 8)")
    p.add_argument("--speed-runs", type=_positive_int, default=5,
                   help="timed forwards after one warm-up; the median is reported (default 5)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quantize", help="quantize a model and save it (safetensors + JSON header)")
    _common(p)
    p.add_argument("--config", required=True, help="preset, e.g. minmax-w8a8")
    p.add_argument("--output", "-o", required=True, help="output .safetensors path")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=None,
                   help="also lower the model with this backend before saving (default: save it unlowered)")
    p.add_argument("--keep-float-weights", action="store_true",
                   help="also store the float weights of quantized layers (to calibrate the loaded model again); "
                        "by default the file holds their integer codes only")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("inspect", help="per-node table of the traced or quantized graph; activation plots")
    _common(p)
    p.add_argument("--config", default=None, help="quantize with this preset first")
    p.add_argument("--quantized", default=None,
                   help="a model saved by `vmfx quantize` (with --model: the architecture to load it into, which "
                        "files of models vmfx cannot rebuild by itself need, and the float model --plot draws)")
    p.add_argument("--all-nodes", action="store_true", help="include nodes without a vmfx role")
    p.add_argument("--dot", default=None, help="write the graph as Graphviz DOT to this path")
    p.add_argument("--plot", default=None, metavar="DIR", help="draw activation distributions into DIR")
    p.add_argument("--table", action="store_true", help="print the per-node table also with --plot / --dot / --coverage / --outliers")
    p.add_argument("--coverage", action="store_true",
                   help="list every linear, conv and scan, quantized or float, and why")
    p.add_argument("--outliers", default=None, metavar="DIR",
                   help="OuroMamba: list the outlier channel sets per block and step and plot them into DIR")
    p.add_argument("--block", type=_non_negative_int, default=0, help="the block to plot")
    p.add_argument("--plot-images", type=_positive_int, default=256, help="images used for the plots")
    p.set_defaults(func=cmd_inspect)
    return parser


# -- progress in a log file -----------------------------------------------------------------------


class _LogLines:
    """A file for one tqdm bar that turns its redraws (``"\\r" + bar + padding``) into plain lines,
    at most one every ``interval`` seconds: the first redraw is written at once, later ones only
    when ``interval`` has passed since the last line, and the last one when the bar ends (tqdm
    then writes a newline). Redraws tqdm forces (``set_postfix`` refreshes at every step) are held
    back the same way; cursor moves and clears write nothing."""

    def __init__(self, stream, interval: float):
        self.stream, self.interval = stream, interval
        self.last = -math.inf  # time of the last line written
        self.pending = ""  # the latest redraw not written yet

    def write(self, text: str) -> None:
        line = text.replace("\r", "").replace("\x1b[A", "").strip()
        if line:
            self.pending = line
            if time.monotonic() - self.last >= self.interval:
                self._emit()
        elif "\n" in text and self.pending:  # the bar ended: its final state
            self._emit()

    def _emit(self) -> None:
        self.stream.write(self.pending + "\n")
        self.stream.flush()
        self.pending, self.last = "", time.monotonic()

    def flush(self) -> None:
        self.stream.flush()


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def _progress_output(progress: bool):
    """While the command runs with progress on and stderr is not a terminal, every tqdm bar that
    vmfx opens (``tqdm.auto.tqdm``, looked up when a bar is made) writes its first state, a plain
    line at most every :data:`LOG_PROGRESS_SECONDS` and its final state (:class:`_LogLines`),
    instead of redrawing itself in place; the original class is put back afterwards. On a
    terminal, or with ``--no-progress``, nothing changes."""
    if not progress or _stderr_is_tty():
        yield
        return
    import tqdm.auto

    original = tqdm.auto.tqdm

    class LineProgress(original):
        def __init__(self, *args, **kwargs):
            kwargs["file"] = _LogLines(kwargs.get("file") or sys.stderr, LOG_PROGRESS_SECONDS)
            kwargs.setdefault("mininterval", LOG_PROGRESS_SECONDS)
            kwargs.setdefault("maxinterval", LOG_PROGRESS_SECONDS)
            kwargs.setdefault("ascii", True)
            kwargs.setdefault("ncols", 100)
            super().__init__(*args, **kwargs)

    tqdm.auto.tqdm = LineProgress
    try:
        yield
    finally:
        tqdm.auto.tqdm = original


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (0, or 2 for a user error, printed as one line)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        validate(args)
        with _progress_output(not args.no_progress):
            return _run(args)
    except VmfxError as exc:
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"vmfx {args.command}{_rank_tag()}: error: {message}", file=sys.stderr)
        return 2


# -- several processes (torchrun; vmfx.distributed) ---------------------------------------------------


def _world():
    """This process's place in the torchrun group (one process without torchrun)."""
    from . import distributed

    return distributed.current()


def _rank_tag() -> str:
    """`` (rank R)`` in the error lines of processes other than rank 0 of a torchrun group."""
    from . import distributed

    try:
        _, rank, _ = distributed.environment()
    except VmfxError:
        return ""
    return f" (rank {rank})" if rank else ""


def _run(args) -> int:
    """Run the command, under torchrun as one of its processes: join the group
    (:func:`vmfx.distributed.init`; the data-reading parts of vmfx then share the batches and
    combine their statistics), run the command in every process, and let only rank 0 print and
    write (the others run with stdout, stderr, warnings and progress bars silenced; their errors
    are still printed, tagged with their rank). Without torchrun: the command, unchanged."""
    import warnings

    from . import distributed

    ctx = distributed.init()
    try:
        if ctx.is_main:
            return args.func(args)
        args.no_progress = True
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return args.func(args)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
