"""``JLSSPass``: PTQ4VM's Joint Learning of Smoothing scales and Step sizes, block by block.

For every mixer, in graph order:

1. run the block in floating point (every quantizer disabled) on the float stream, giving the
   target mixer output and the float stream for the next block;
2. switch on gradients for that block's learnable tensors: the step sizes of the input and weight
   quantizers and the smoothing factors of its quantized linears whose role is in
   ``learn_roles``; everything else stays frozen;
3. AdamW with three parameter groups (weight step sizes ``lr_weight``, activation step sizes
   ``lr_act``, smoothing factors ``lr_smooth``) for ``steps`` steps, each on one batch of the
   calibration images, minimising ``mean(1 - cosine(target, quantized mixer output))`` over the
   channel dimension, the gradient norm clipped to ``grad_clip``;
4. run the block quantized on the quantized stream: the next block learns on the outputs of the
   already-quantized blocks, so it sees (and compensates) their error.

Unlike the official code, ``x_proj`` and ``dt_proj`` learn too by default: vmfx's scan op is
differentiable, so their step sizes and smoothing factors get real gradients. ``learn_roles=
("in_proj", "out_proj")`` reproduces the official behaviour (their parameters keep their initial
values). The block runs on stored block inputs (:class:`~.segments.SegmentRunner`), never
re-running earlier blocks. Memory: the float and quantized streams' block-boundary values and the
targets, for all calibration images.

Requires: a converted graph (quantized linears with static quantizers), detected mixers, and
calibration data in the context. Invariants: only step sizes and smoothing factors change (they
stay positive: clamped at use while learning, and afterwards); the graph structure is untouched;
every parameter is frozen again afterwards.
"""

from __future__ import annotations

import math
import time

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..annotations import annotation
from ..config import JLSSConfig
from ..ops.quantize import MIN_SCALE
from ..quant.modules import SMOOTH_MIN, FakeQuantize, QuantLinear
from .base import Pass, PassContext, PassResult
from .calibrate import input_expectation, iter_calibration_batches
from .detect import detected_mixers
from .patterns import module_of
from .segments import SegmentRunner

__all__ = ["JLSSPass", "quantization_disabled"]


class quantization_disabled:
    """Context manager: every ``FakeQuantize`` in ``module`` passes its input through."""

    def __init__(self, module: torch.nn.Module):
        self.quantizers = [m for m in module.modules() if isinstance(m, FakeQuantize)]

    def __enter__(self):
        self.saved = [q.enabled for q in self.quantizers]
        for q in self.quantizers:
            q.enabled = False
        return self

    def __exit__(self, *exc):
        for q, state in zip(self.quantizers, self.saved):
            q.enabled = state


class JLSSPass(Pass):
    """Block-wise learning of step sizes and smoothing factors (see module docstring).

    Args:
        config: the hyper-parameters (:class:`vmfx.config.JLSSConfig`).
        seed: seed of the batch order.
    """

    needs_data = True

    def __init__(self, config: JLSSConfig = JLSSConfig(), seed: int = 0):
        self.config = config
        self.seed = seed

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if not detected_mixers(gm):
            raise self.fail("no mixers detected: run DetectMambaMixersPass first")
        if not any(isinstance(m, QuantLinear) and m.input_quantizer is not None for m in gm.modules()):
            raise self.fail("no quantized linear to learn: run ConvertPass first")
        if ctx.calib_data is None:
            from ..errors import CalibrationDataError

            raise CalibrationDataError("JLSS needs calibration images: pass calib_data")

    def _block_linears(self, gm: fx.GraphModule, block: int) -> list[tuple[str, QuantLinear]]:
        out = []
        for node in gm.graph.nodes:
            ann = annotation(node)
            m = module_of(node)
            if ann is not None and ann.block == block and isinstance(m, QuantLinear) and ann.role in self.config.learn_roles:
                out.append((node.name, m))
        return out

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = self.config
        mixers = detected_mixers(gm)
        nodes = {n.name: n for n in gm.graph.nodes}
        cuts = [nodes[m["out_proj"]] for m in mixers]
        runner = SegmentRunner(gm, cuts)
        batches = list(iter_calibration_batches(ctx.calib_data, cfg.batch_size, input_expectation(gm)))
        batches = _rebatch(batches, cfg.batch_size)
        was_training = gm.training
        gm.eval()
        for p in gm.parameters():
            p.requires_grad_(False)

        fp_envs = [runner.initial_env(x) for x in batches]
        q_envs = [dict(env) for env in fp_envs]
        generator = torch.Generator().manual_seed(self.seed)
        history = []
        blocks = range(len(mixers))
        if ctx.progress:
            from tqdm.auto import tqdm

            blocks = tqdm(blocks, desc="JLSS", unit="block")
        start = time.perf_counter()
        for b in blocks:
            segment = b  # segment b: the nodes after block b-1's out_proj through block b's
            out_node = cuts[b]
            with torch.no_grad(), quantization_disabled(gm):
                fp_envs = [runner.run(segment, env, keep=[out_node]) for env in fp_envs]
            targets = [env[out_node] for env in fp_envs]
            record = self._learn_block(gm, runner, segment, out_node, b, q_envs, targets, generator)
            history.append(record)
            if ctx.progress and hasattr(blocks, "set_postfix"):
                blocks.set_postfix(loss=f"{record['final_loss']:.4f}")
            with torch.no_grad():
                q_envs = [runner.run(segment, env) for env in q_envs]
        gm.train(was_training)
        gm.meta["vmfx_jlss"] = {"blocks": history, "seconds": time.perf_counter() - start,
                                "images": sum(x.shape[0] for x in batches)}
        return PassResult(gm, True)

    def _learn_block(self, gm, runner, segment, out_node, block, q_envs, targets, generator) -> dict:
        cfg = self.config
        linears = self._block_linears(gm, block)
        w_params, a_params, s_params = [], [], []
        for _, m in linears:
            if m.weight_quantizer is not None and m.weight_quantizer.scale is not None:
                w_params.append(m.weight_quantizer.scale)
            if m.input_quantizer is not None and m.input_quantizer.scale is not None:
                a_params.append(m.input_quantizer.scale)
            if m.smooth is not None:
                s_params.append(m.smooth)
        params = w_params + a_params + s_params
        record = {"block": block, "learned_tensors": len(params), "steps": 0}
        if cfg.steps == 0 or not params:
            record["initial_loss"] = record["final_loss"] = self._loss(runner, segment, out_node, q_envs, targets)
            return record
        for p in params:
            p.requires_grad_(True)
        groups = [g for g in (
            {"params": w_params, "lr": cfg.lr_weight},
            {"params": a_params, "lr": cfg.lr_act},
            {"params": s_params, "lr": cfg.lr_smooth},
        ) if g["params"]]
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        record["initial_loss"] = self._loss(runner, segment, out_node, q_envs, targets)
        order = []
        losses = []
        for step in range(cfg.steps):
            if not order:
                order = torch.randperm(len(q_envs), generator=generator).tolist()
            i = order.pop()
            out = runner.run(segment, q_envs[i], keep=[out_node])[out_node]
            loss = (1 - F.cosine_similarity(targets[i].float(), out.float(), dim=-1)).mean()
            if not math.isfinite(loss.item()):
                raise self.fail(f"the loss of block {block} became {loss.item()} at step {step}; lower the learning rates")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            losses.append(loss.item())
        for p in params:
            p.requires_grad_(False)
        for p in s_params:
            p.data.clamp_(min=SMOOTH_MIN)
        for p in w_params + a_params:
            p.data.clamp_(min=MIN_SCALE)
        record["steps"] = cfg.steps
        record["train_losses"] = [round(v, 6) for v in losses[:: max(1, cfg.steps // 10)]]
        record["final_loss"] = self._loss(runner, segment, out_node, q_envs, targets)
        return record

    @staticmethod
    def _loss(runner, segment, out_node, q_envs, targets) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for env, target in zip(q_envs, targets):
                out = runner.run(segment, env, keep=[out_node])[out_node]
                total += float((1 - F.cosine_similarity(target.float(), out.float(), dim=-1)).sum())
                count += target.shape[0] * target.shape[1] if target.dim() > 2 else target.shape[0]
        return total / max(count, 1)


def _rebatch(batches: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """Concatenate and split into batches of ``size`` (the last may be smaller)."""
    return list(torch.cat(batches).split(size))
