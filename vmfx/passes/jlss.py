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

With ``learn_outputs``, the block's static quantizers on node outputs (OuroMamba's delta) learn
their step sizes in the activation group too. ``activation_rounding="zero"`` makes the quantizers
on the linears' inputs round without the straight-through estimator while the block learns (the
official OuroMamba code), so their step sizes get ``q`` as gradient and gradients do not cross them
to earlier nodes (outliers kept in floating point still pass theirs).

Unlike the official code, ``x_proj`` and ``dt_proj`` learn too by default: vmfx's scan op is
differentiable, so their step sizes and smoothing factors get real gradients. ``learn_roles=
("in_proj", "out_proj")`` reproduces the official behaviour (their parameters keep their initial
values), and ``frozen_gradient="float"`` its backward: gradients cross the frozen linears through
their float, unsmoothed weights, with no straight-through estimator through their quantizers (the
forward stays quantized). ``batch_size=None`` uses every calibration image in every step, as the
official code does; ``micro_batch`` splits each step's batch into passes of that many images whose
gradients add up to the batch's gradient (the same step, up to rounding, in less memory).

The learnable tensors are found from the graph: the quantizer and smoothing nodes whose annotation
names a linear of the block (``extra["quantizes"]``); the block's end is its ``out_proj`` node
(annotation role and block), never a node name. The block runs on stored block inputs
(:class:`~.segments.SegmentRunner`), never re-running earlier blocks. Memory: the float and
quantized streams' block-boundary values and the targets, for all calibration images.

Across processes (:mod:`vmfx.distributed`) every process takes the same steps on the same step
batches, holding a contiguous share of each (``tensor_split``); each backpropagates its share of
the batch's loss and the gradients are summed with one ``all_reduce`` before clipping and AdamW, as
DDP averages them, so the learned values are the one-process values up to float rounding (not bit
for bit); rank 0's are broadcast after each block so that every process holds the same model.

Requires: a converted graph (static quantizer nodes), detected mixers, smoothing not yet folded,
and calibration data in the context. Invariants: only step sizes and smoothing factors change (they
stay positive: clamped at use while learning, and afterwards); the graph structure is untouched;
every parameter is frozen again afterwards.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import distributed
from ..annotations import annotation
from ..config import JLSSConfig, SettingRule
from ..errors import CalibrationDataError, ConfigError
from ..ops.quantize import MIN_SCALE
from ..quant.modules import SMOOTH_MIN, FakeQuantize
from .base import Pass, PassContext, PassResult
from .calibrate import input_expectation, iter_calibration_batches
from .detect import detected_mixers
from .linear_edges import LinearEdges, quantized_linears
from .segments import SegmentRunner

__all__ = ["JLSSPass", "quantization_disabled", "activation_rounding"]


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


class activation_rounding:
    """Context manager: the quantizers on the inputs of ``gm``'s quantized linears round with
    gradient ``mode`` ("ste" or "zero", :attr:`FakeQuantize.round_gradient`); the previous modes
    come back on exit. Weight quantizers and quantizers elsewhere (node outputs, scan operands)
    keep theirs: the official OuroMamba code rounds its linears' inputs with ``torch.round`` while
    its hand-written scan backward passes the scan operands' gradients straight through."""

    def __init__(self, gm: fx.GraphModule, mode: str):
        found = [e.quantizer("input") for e in quantized_linears(gm)]
        self.quantizers = list({id(q): q for q in found if isinstance(q, FakeQuantize)}.values())
        self.mode = mode

    def __enter__(self):
        self.saved = [q.round_gradient for q in self.quantizers]
        for q in self.quantizers:
            q.round_gradient = self.mode
        return self

    def __exit__(self, *exc):
        for q, state in zip(self.quantizers, self.saved):
            q.round_gradient = state


class JLSSPass(Pass):
    """Block-wise learning of step sizes and smoothing factors (see module docstring).

    Args:
        config: the hyper-parameters (:class:`vmfx.config.JLSSConfig`).
        seed: seed of the batch order.
        settings: setting rules; those for ``"jlss.steps"`` and ``"jlss.lr_*"`` change the
            hyper-parameters of the blocks they select (:meth:`block_config`).
    """

    needs_data = True
    requires_facts = ("quantizers_calibrated",)
    forbids_facts = ("smoothing_folded",)
    ensures_facts = ("learning_done",)

    def __init__(self, config: JLSSConfig = JLSSConfig(), seed: int = 0, settings: tuple = ()):
        settings = tuple(settings)
        if not all(isinstance(r, SettingRule) for r in settings):
            raise ConfigError("JLSSPass(settings=...) takes vmfx.SettingRule entries")
        self.config = config
        self.seed = seed
        self.settings = tuple(r for r in settings if r.setting.startswith("jlss."))

    def block_config(self, block: int) -> JLSSConfig:
        """The hyper-parameters of one block: the config's, then each setting rule that selects
        the block, in order (the last wins)."""
        changes = {}
        for rule in self.settings:
            if rule.select.matches(None, None, None, block, None):
                changes[rule.setting.split(".", 1)[1]] = rule.value
        return replace(self.config, **changes) if changes else self.config

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if not detected_mixers(gm):
            raise self.fail("no mixers detected: run DetectMambaMixersPass first")
        if not any(e.act_quant is not None for e in quantized_linears(gm)):
            raise self.fail("no quantized linear to learn: run ConvertPass first")
        if ctx.calib_data is None:
            raise CalibrationDataError("JLSS needs calibration images: pass calib_data")

    def _block_linears(self, gm: fx.GraphModule, block: int) -> list[LinearEdges]:
        return [e for e in quantized_linears(gm)
                if (a := annotation(e.linear)) is not None and a.block == block]

    @staticmethod
    def block_ends(gm: fx.GraphModule) -> list[fx.Node]:
        """The node ending each block (its ``out_proj``), by annotation, in block order."""
        ends: dict[int, fx.Node] = {}
        for node in gm.graph.nodes:
            ann = annotation(node)
            if ann is not None and ann.role == "out_proj" and ann.block is not None:
                ends[ann.block] = node
        return [ends[b] for b in sorted(ends)]

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = self.config
        cuts = self.block_ends(gm)
        blocks = list(range(len(cuts)))
        for rule in self.settings:
            if not any(rule.select.matches(None, None, None, b, None) for b in blocks):
                raise ConfigError(f"the setting rule '{rule.describe()}' selects none of this model's "
                                  f"{len(blocks)} blocks (0 to {len(blocks) - 1})")
        runner = SegmentRunner(gm, cuts)
        batches = list(iter_calibration_batches(ctx.calib_data, cfg.batch_size or 256, input_expectation(gm)))
        batches = _rebatch(batches, cfg.batch_size)
        dist = distributed.current()
        # each step's batch runs as one or more passes (micro-batches); steps pick a group of passes.
        # Across processes each keeps its contiguous share of every step's batch (maybe none).
        step_passes, passes = [], []
        for x in batches:
            if dist.active:
                x = x.tensor_split(dist.world_size)[dist.rank]
            chunks = [] if x.shape[0] == 0 else [x] if cfg.micro_batch is None else list(x.split(cfg.micro_batch))
            step_passes.append(list(range(len(passes), len(passes) + len(chunks))))
            passes += chunks
        was_training = gm.training
        gm.eval()
        for p in gm.parameters():
            p.requires_grad_(False)

        fp_envs = [runner.initial_env(x) for x in passes]
        q_envs = [dict(env) for env in fp_envs]
        generator = torch.Generator().manual_seed(self.seed)
        history = []
        progress = None
        if ctx.progress:
            from tqdm.auto import tqdm

            method = getattr(ctx.config, "method", None) or "JLSS"
            progress = tqdm(total=sum(max(self.block_config(b).steps, 1) for b in blocks),
                            desc=f"{method}: JLSS block 1/{len(cuts)}", unit="step")
        start = time.perf_counter()
        for b, out_node in enumerate(cuts):
            segment = b  # segment b: the nodes after block b-1's out_proj through block b's
            if progress is not None:
                progress.set_description(f"{getattr(ctx.config, 'method', None) or 'JLSS'}: JLSS block {b + 1}/{len(cuts)}")
            with torch.no_grad(), quantization_disabled(gm):
                fp_envs = [runner.run(segment, env, keep=[out_node]) for env in fp_envs]
            targets = [env[out_node] for env in fp_envs]
            with activation_rounding(gm, self.block_config(b).activation_rounding):
                record = self._learn_block(gm, runner, segment, out_node, b, q_envs, targets, step_passes, generator,
                                           progress, dist)
            history.append(record)
            with torch.no_grad():
                q_envs = [runner.run(segment, env) for env in q_envs]
        if progress is not None:
            progress.close()
        gm.train(was_training)
        gm.meta["vmfx_jlss"] = {"blocks": history, "seconds": time.perf_counter() - start,
                                "images": sum(x.shape[0] for x in batches),
                                "batch_size": cfg.batch_size, "micro_batch": cfg.micro_batch,
                                "frozen_gradient": cfg.frozen_gradient}
        return PassResult(gm, True)

    def _learn_block(self, gm, runner, segment, out_node, block, q_envs, targets, step_passes, generator, progress,
                     dist=distributed.SINGLE) -> dict:
        cfg = self.block_config(block)
        w_params, a_params, s_params = [], [], []
        frozen: list[LinearEdges] = []
        for e in self._block_linears(gm, block):
            if annotation(e.linear).role not in cfg.learn_roles:
                frozen.append(e)
                continue
            for edge, group in (("weight", w_params), ("input", a_params)):
                q = e.quantizer(edge)
                if isinstance(q, FakeQuantize) and q.scale is not None and not any(q.scale is p for p in group):
                    group.append(q.scale)
            smooth = e.smooth_module()
            if smooth is not None and not any(smooth.factors is p for p in s_params):
                s_params.append(smooth.factors)
        if cfg.learn_outputs:
            for q in _block_output_quantizers(gm, block):
                if not any(q.scale is p for p in a_params):
                    a_params.append(q.scale)
        params = w_params + a_params + s_params
        overrides = _float_gradient_overrides(gm, frozen) if cfg.frozen_gradient == "float" else {}
        record = {"block": block, "learned_tensors": len(params), "steps": 0}
        if cfg.steps == 0 or not params:
            record["initial_loss"] = record["final_loss"] = self._loss(runner, segment, out_node, q_envs, targets, dist)
            if progress is not None:
                progress.update(max(cfg.steps, 1))
            return record
        for p in params:
            p.requires_grad_(True)
        groups = [g for g in (
            {"params": w_params, "lr": cfg.lr_weight},
            {"params": a_params, "lr": cfg.lr_act},
            {"params": s_params, "lr": cfg.lr_smooth},
        ) if g["params"]]
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        record["initial_loss"] = self._loss(runner, segment, out_node, q_envs, targets, dist)
        order = []
        losses = []
        loop_start = time.perf_counter()
        for step in range(cfg.steps):
            if not order:
                order = torch.randperm(len(step_passes), generator=generator).tolist()
            group = step_passes[order.pop()]
            optimizer.zero_grad(set_to_none=True)
            envs, step_targets = [q_envs[i] for i in group], [targets[i] for i in group]
            if dist.active:
                loss = self._backward_shared(runner, segment, out_node, envs, step_targets, overrides, params, dist)
            else:
                loss = self._backward_batch(runner, segment, out_node, envs, step_targets, overrides)
            if not math.isfinite(loss):
                raise self.fail(f"the loss of block {block} became {loss} at step {step}; lower the learning rates")
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            losses.append(loss)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}")
        record["step_seconds"] = round((time.perf_counter() - loop_start) / cfg.steps, 4)
        for p in params:
            p.requires_grad_(False)
            if dist.active:  # the processes took the same steps; rank 0's values make that certain
                distributed.broadcast_(p.data, dist)
        for p in s_params:
            p.data.clamp_(min=SMOOTH_MIN)
        for p in w_params + a_params:
            p.data.clamp_(min=MIN_SCALE)
        record["steps"] = cfg.steps
        record["train_losses"] = [round(v, 6) for v in losses[:: max(1, cfg.steps // 10)]]
        record["final_loss"] = self._loss(runner, segment, out_node, q_envs, targets, dist)
        return record

    @staticmethod
    def _backward_batch(runner, segment, out_node, envs, targets, overrides) -> float:
        """Accumulate into ``.grad`` the gradient of one step's loss, ``mean(1 - cosine)`` over every
        token of the batch, running the batch as ``len(envs)`` passes (micro-batches); returns the loss.

        Each pass backpropagates its share (its sum over the batch's token count), so the
        accumulated gradient is the batch's gradient up to rounding. One pass is the plain mean."""
        if len(envs) == 1:
            out = runner.run(segment, envs[0], keep=[out_node], overrides=overrides)[out_node]
            loss = (1 - F.cosine_similarity(targets[0].float(), out.float(), dim=-1)).mean()
            loss.backward()
            return loss.item()
        count = sum(t[..., 0].numel() for t in targets)
        return JLSSPass._backward_shares(runner, segment, out_node, envs, targets, overrides, count)

    @staticmethod
    def _backward_shares(runner, segment, out_node, envs, targets, overrides, count: int) -> float:
        """Backpropagate, pass by pass, each pass's share of the loss: its sum of ``1 - cosine``
        over its tokens divided by ``count``, the token count of the whole batch. Returns the sum
        of the shares."""
        total = 0.0
        for env, target in zip(envs, targets):
            out = runner.run(segment, env, keep=[out_node], overrides=overrides)[out_node]
            share = (1 - F.cosine_similarity(target.float(), out.float(), dim=-1)).sum() / count
            share.backward()
            total += share.item()
        return total

    @staticmethod
    def _backward_shared(runner, segment, out_node, envs, targets, overrides, params, dist) -> float:
        """One step's gradient across processes (DDP's scheme): each process backpropagates its
        share of the batch's ``mean(1 - cosine)`` (its sum over the tokens it holds, divided by the
        token count of the whole batch), then the gradients and losses are summed over the
        processes with one ``all_reduce`` (in float64), so ``.grad`` holds the whole batch's
        gradient, identical in every process (the one-process gradient up to float rounding)."""
        (count,) = distributed.all_reduce_sum([sum(t[..., 0].numel() for t in targets)], dist)
        total = JLSSPass._backward_shares(runner, segment, out_node, envs, targets, overrides, count)
        flat = torch.cat([torch.zeros(1, dtype=torch.float64)] + [
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).double().cpu()
            for p in params])
        flat[0] = total
        distributed.all_reduce_sum_(flat, dist)
        offset = 1
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(device=p.device, dtype=p.dtype)
            offset += n
        return float(flat[0])

    @staticmethod
    def _loss(runner, segment, out_node, q_envs, targets, dist=distributed.SINGLE) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for env, target in zip(q_envs, targets):
                out = runner.run(segment, env, keep=[out_node])[out_node]
                total += float((1 - F.cosine_similarity(target.float(), out.float(), dim=-1)).sum())
                count += target.shape[0] * target.shape[1] if target.dim() > 2 else target.shape[0]
        if dist.active:  # every process's images
            sums = distributed.all_reduce_sum_(torch.tensor([total, float(count)], dtype=torch.float64), dist)
            total, count = float(sums[0]), int(sums[1])
        return total / max(count, 1)


def _block_output_quantizers(gm: fx.GraphModule, block: int) -> list[FakeQuantize]:
    """The static quantizers on node outputs (annotation ``extra["edge"] == "output"``) of ``block``."""
    out = []
    for node in gm.graph.nodes:
        ann = annotation(node)
        if ann is None or ann.block != block or ann.extra.get("edge") != "output" or node.op != "call_module":
            continue
        q = gm.get_submodule(node.target)
        if isinstance(q, FakeQuantize) and q.scale is not None:
            out.append(q)
    return out


def _float_gradient_overrides(gm: fx.GraphModule, frozen: list[LinearEdges]) -> dict:
    """For linears that do not learn: keep the quantized forward, but let the gradient reach their
    input through the float, unsmoothed weights (no straight-through estimator), as the official
    PTQ4VM backward does for x_proj / dt_proj."""
    overrides = {}
    for e in frozen:
        if e.source is None or e.module is None:
            continue
        module = e.linear_module(gm)

        def compute(quantized, env, e=e, module=module):
            x = env[e.source]
            float_out = F.linear(x, module.weight, module.bias)
            return quantized.detach() + (float_out - float_out.detach())

        overrides[e.linear] = compute
    return overrides


def _rebatch(batches: list[torch.Tensor], size: int | None) -> list[torch.Tensor]:
    """Concatenate and split into batches of ``size`` (the last may be smaller); None: one batch."""
    images = torch.cat(batches)
    return [images] if size is None else list(images.split(size))
