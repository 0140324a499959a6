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

Without ``--data`` the bundled proxy set and checkpoint are used. Every error a user can cause is
printed as one line naming the problem (exit status 2), not a traceback; an unexpected internal
error keeps its traceback. Every argument is checked before any model is built or evaluated:
numbers and ranges by the parser, then presets, input files and folders, and that every output
path can be written (:func:`validate`). Errors that only the data can reveal (an unreadable
image, more calibration images asked for than there are, a block the model does not have) come
as soon as the data or model is read, still before any evaluation, except an unreadable image,
which is found when its batch is read. With progress on, a line on stderr announces each stage.
Under torchrun every process runs the command on its share of the batches (:mod:`vmfx.distributed`)
and only rank 0 prints and writes; the JSON records ``world_size``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .errors import CalibrationDataError, ConfigError, VmfxError

__all__ = ["main", "build_parser", "validate"]

PROXY = "vim-proxy-digits"


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


def _model_input(model: nn.Module) -> tuple[int, int]:
    pe = getattr(model, "patch_embed", None)
    if pe is None:
        return 224, 3
    return int(pe.img_size[0]), int(pe.proj.in_channels)


def _build_model(args) -> tuple[str, nn.Module]:
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

    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    try:
        model = timm.create_model(name, **kwargs)
    except RuntimeError as exc:  # timm: "Unknown model"
        raise VmfxError(f"unknown model {name!r}: use {PROXY!r} or a timm name (vmfx registers the Vim names)") from exc
    if args.checkpoint:
        vmodels.load_checkpoint(model, args.checkpoint)
    else:
        print(f"warning: no --checkpoint: {name} has random weights", file=sys.stderr)
    return name, model.eval()


def _workload(args, need_calib: bool) -> Workload:
    from . import data as vdata

    name, model = _build_model(args)
    img_size, channels = _model_input(model)
    crop_pct = args.crop_pct if args.crop_pct is not None else (1.0 if name == PROXY else 0.875)
    border = vdata.digits.DIGITS_BORDER if name == PROXY else 0
    transform = vdata.vim_eval_transform(img_size, crop_pct, channels, border)
    if args.data is None:
        if name != PROXY:
            raise VmfxError(f"--data is required for {name}: give an ImageNet-layout validation folder")
        images, labels = vdata.load_digits("test")
        if args.limit:
            images, labels = images[: args.limit], labels[: args.limit]
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
    if args.limit:
        dataset = vdata.calibration_subset(dataset, min(args.limit, len(dataset)), seed=0)
    desc = f"{args.data} ({len(dataset)} images)"
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


# -- commands -------------------------------------------------------------------------------------


def cmd_eval(args) -> int:
    from .data import evaluate

    work = _workload(args, need_calib=bool(args.config))
    progress = not args.no_progress
    print(f"model: {work.name}\ndata:  {work.description}", flush=True)
    _announce(progress, "evaluating fp32")
    fp = evaluate(work.model, work.eval_data, batch_size=args.batch_size, progress=progress, desc="eval fp32")
    rows = [{"method": "fp32", "top1": fp.top1, "top5": fp.top5, "drop": 0.0, "calib_seconds": None, "calib_images": 0}]
    for preset in args.config or []:
        qmodel, seconds = _quantize(work, preset, progress)
        _announce(progress, f"evaluating {preset}")
        res = evaluate(qmodel, work.eval_data, batch_size=args.batch_size, progress=progress, desc=f"eval {preset}")
        rows.append({"method": preset, "top1": res.top1, "top5": res.top5, "drop": fp.top1 - res.top1,
                     "calib_seconds": seconds, "calib_images": work.calib_images})
    print(f"\n{'method':<16} {'top-1':>7} {'top-5':>7} {'drop':>6} {'calibration':>22}")
    for r in rows:
        calib = "" if r["calib_seconds"] is None else f"{r['calib_seconds']:.1f} s on {r['calib_images']} images"
        print(f"{r['method']:<16} {r['top1']:>6.2f}% {r['top5']:>6.2f}% {r['drop']:>6.2f} {calib:>22}")
    if args.json and _world().is_main:
        with open(args.json, "w") as f:
            json.dump({"model": work.name, "data": work.description, "world_size": _world().world_size,
                       "results": rows}, f, indent=2)
    return 0


def cmd_quantize(args) -> int:
    import vmfx

    work = _workload(args, need_calib=True)
    qmodel, seconds = _quantize(work, args.config, not args.no_progress)
    if _world().is_main:  # every process holds the same model (vmfx.distributed)
        vmfx.save(qmodel, args.output)
    print(f"quantized {work.name} with {args.config} ({seconds:.1f} s on {work.calib_images} calibration images)")
    print(f"saved to {args.output}")
    return 0


def _mixer_count(model: nn.Module) -> int:
    from .nn import MambaMixer

    return sum(isinstance(m, MambaMixer) for m in model.modules())


def cmd_inspect(args) -> int:
    import vmfx

    from . import inspect as vinspect

    progress = not args.no_progress
    work = None
    if args.plot or args.outliers:
        work = _workload(args, need_calib=bool(args.config) and not args.quantized)
        blocks = _mixer_count(work.model)
        if blocks and args.block >= blocks:
            raise ConfigError(f"--block {args.block}: {work.name} has {blocks} blocks (0 to {blocks - 1})")
    if args.quantized:
        gm = vmfx.load(args.quantized)
    else:
        if work is None:
            work = _workload(args, need_calib=bool(args.config))
        if args.config:
            gm, _ = _quantize(work, args.config, progress)
        else:
            example = work.eval_data[0][:1] if isinstance(work.eval_data, tuple) else work.eval_data[0][0][None]
            gm = vmfx.trace(work.model, (example,))
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
        images = work.eval_data[0] if isinstance(work.eval_data, tuple) else torch.stack(
            [work.eval_data[i][0] for i in range(min(len(work.eval_data), args.plot_images))]
        )
        _announce(progress, f"plotting the activations of block {args.block} on {min(len(images), args.plot_images)} images")
        paths = vinspect.plot_distributions(work.model, images[: args.plot_images], args.plot, block=args.block)
        print("wrote " + ", ".join(paths))
    if args.outliers:  # OuroMamba (issue 11): the outlier sets of the mixed-precision quantizers
        _inspect_outliers(vinspect, gm, work, args, progress)
    return 0


def _inspect_outliers(vinspect, gm, work, args, progress: bool) -> None:
    """List the outlier sets per block and quantizer (``vmfx inspect --outliers DIR``) and plot them."""
    images = work.eval_data[0] if isinstance(work.eval_data, tuple) else torch.stack(
        [work.eval_data[i][0] for i in range(min(len(work.eval_data), args.plot_images))]
    )
    images = images[: args.plot_images]
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


def _check_output_file(path: str | None, flag: str, example: str) -> None:
    """``path`` can be created or overwritten: tried by opening it for appending (then removing
    it again if it did not exist), which also holds for root, for whom permission bits do not."""
    if path is None:
        return
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path!r} is a directory; give a file path such as {os.path.join(path, example)!r}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
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


def _check_output_dir(path: str | None, flag: str) -> None:
    """``path`` is (or can be made) a folder that files can be written into; it is created now."""
    if path is None:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path!r} is a file; give a folder to write the plots into")
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
        ConfigError: an unknown preset, a missing input file or folder, an output path that
            cannot be written, or arguments that contradict each other.
    """
    from .config import resolve_config

    configs = args.config if isinstance(args.config, list) else [args.config] if args.config else []
    for name in configs:
        resolve_config(name)  # an unknown preset: ConfigError listing the known ones
    _check_input_file(args.checkpoint, "--checkpoint")
    _validate_calibration_source(args)
    _check_input_dir(args.data, "--data")
    _check_input_dir(args.calib_dir, "--calib-dir")
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
        _check_output_dir(args.save_synthetic, "--save-synthetic")
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
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="FP and quantized top-1/top-5 accuracy")
    _common(p)
    p.add_argument("--config", action="append", default=None, help="a preset to quantize with (repeatable)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quantize", help="quantize a model and save it (safetensors + JSON header)")
    _common(p)
    p.add_argument("--config", required=True, help="preset, e.g. minmax-w8a8")
    p.add_argument("--output", "-o", required=True, help="output .safetensors path")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("inspect", help="per-node table of the traced or quantized graph; activation plots")
    _common(p)
    p.add_argument("--config", default=None, help="quantize with this preset first")
    p.add_argument("--quantized", default=None, help="a model saved by `vmfx quantize`")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (0, or 2 for a user error, printed as one line)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        validate(args)
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
