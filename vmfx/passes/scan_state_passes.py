"""Passes that quantize the selective scan's hidden state (Shi et al., k-scaled PTQ for Vision Mamba).

* :class:`ReparameterizeScanPass`: runs the calibration data through the graph with a
  ``state_reader`` on every scan node (found by its ``scan`` role annotation), accumulating the
  mean over images of ``|h|`` as a (channel, token, state) tensor per scan, turns it into the
  factors ``r_C``, ``r_L``, ``r_D`` (:func:`vmfx.quant.state_quantizer.reparameterization_factors`) and
  gives the scan a :class:`~vmfx.quant.state_quantizer.ScanStateQuant` holding them (the scan reads it
  through ``state_quant=``): the float output is unchanged up to rounding.
* :class:`QuantizeScanStatePass`: keeps the scan inputs of the first ``search_samples``
  calibration images, searches one static step size per time step for the (reparameterized)
  state, step by step, for the best cosine similarity of ``y``
  (:func:`vmfx.quant.state_quantizer.search_state_scales`), and stores them in the scan's
  :class:`ScanStateQuant` (attaching one without factors if the scan has none).

:func:`scan_state_passes` is what a config's ``scan_state`` (:class:`vmfx.config.ScanStateConfig`)
adds to a method's pipeline, after every other pass (the search sees the scan inputs the
quantized upstream layers produce).

Invariants: scans are found by annotation, never by name; the graph is changed only through
:func:`vmfx.passes.graph_utils.attach_scan_state` (logged, replayed by ``vmfx.load``); while data
runs, the scans compute with a float state (the statistics of one scan never depend on another
scan's half-calibrated state). Exception to "statistics are reductions": the state search keeps
``search_samples`` images' scan inputs (bounded; the search is sequential in time over the whole
sample set).
"""

from __future__ import annotations

import inspect as _inspect
import time

import torch
import torch.fx as fx

from ..annotations import annotation
from ..config import ScanStateConfig
from ..errors import CalibrationDataError
from ..ops.selective_scan import selective_scan
from ..quant.state_quantizer import STATE_QUANT_KWARG, ScanStateQuant, reparameterization_factors, scan_state_of, search_state_scales
from .base import FACTS, Pass, PassContext, PassResult
from .calibrate import input_expectation, iter_calibration_batches
from .graph_utils import attach_scan_state
from .insert_observers import QUANT_PREFIX

__all__ = ["ReparameterizeScanPass", "QuantizeScanStatePass", "scan_state_passes", "scan_nodes"]

FACTS.update({
    "scan_reparameterized": "scans carry hidden-state reparameterization factors (ReparameterizeScanPass)",
    "scan_state_quantized": "scans quantize their hidden state with searched per-step scales (QuantizeScanStatePass)",
})

_SIGNATURE = _inspect.signature(selective_scan)


def scan_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The selective-scan nodes of ``gm``, by their ``scan`` role annotation."""
    out = []
    for node in gm.graph.nodes:
        ann = annotation(node)
        if ann is not None and ann.role == "scan" and node.op == "call_function":
            out.append(node)
    return out


class _Probe:
    """Stands in for ``selective_scan`` on one node while data runs: computes the float scan
    (without the node's quantized state), accumulating ``sum_b |h|`` (channel, token, state) and/or
    keeping the inputs of up to ``keep`` images."""

    __name__ = __qualname__ = "vmfx_scan_probe"  # fx code generation names call targets

    def __init__(self, stats: bool, keep: int):
        self.stats, self.keep = stats, keep
        self.abs_sum: torch.Tensor | None = None
        self.images = 0
        self.kept: list[dict] = []
        self.kept_images = 0

    @property
    def full(self) -> bool:
        return not self.stats and self.kept_images >= self.keep

    def __call__(self, *args, **kwargs):
        kwargs.pop(STATE_QUANT_KWARG, None)
        bound = _SIGNATURE.bind(*args, **kwargs)
        a = bound.arguments
        u = a["u"]
        if self.kept_images < self.keep:
            take = self.keep - self.kept_images
            self.kept.append({k: (v[:take].detach().clone() if k in ("u", "delta", "z") or (k in ("B", "C") and v.dim() > 2)
                                  else v) for k, v in a.items() if k not in ("state_hook", "state_reader")})
            self.kept_images += min(take, u.shape[0])
        if self.stats:
            batch, dim, length = u.shape
            if self.abs_sum is None:
                self.abs_sum = torch.zeros(dim, length, a["A"].shape[1], dtype=torch.float64)

            def reader(h, t0, t1, b0, b1):  # h: (T, p, dim, N)
                self.abs_sum[:, t0:t1] += h.abs().sum(1).permute(1, 0, 2).double()

            kwargs["state_reader"] = reader
            self.images += batch
        return selective_scan(*args, **kwargs)

    def inputs(self) -> dict:
        """The kept inputs, concatenated over batches."""
        first = self.kept[0]
        out = {}
        for k, v in first.items():
            if isinstance(v, torch.Tensor) and (k in ("u", "delta", "z") or (k in ("B", "C") and v.dim() > 2)):
                out[k] = torch.cat([d[k] for d in self.kept], 0)
            else:
                out[k] = v
        return out


def _run_probes(gm: fx.GraphModule, ctx: PassContext, probes: dict[fx.Node, _Probe]) -> tuple[int, float]:
    """Run the calibration data with the probes in place of the scans (restored afterwards);
    stops early once every probe only keeps inputs and has enough. Returns (images, seconds)."""
    if ctx.calib_data is None:
        raise CalibrationDataError("calibration data is required to quantize the scan state: pass images as calib_data")
    originals = {node: node.target for node in probes}
    start = time.perf_counter()
    images = 0
    try:
        for node, probe in probes.items():
            node.target = probe
        gm.recompile()
        was_training = gm.training
        gm.eval()
        with torch.no_grad():
            for x in iter_calibration_batches(ctx.calib_data, ctx.calib_batch_size, input_expectation(gm),
                                              check_scale=False):
                gm(x)
                images += x.shape[0]
                if all(p.full for p in probes.values()):
                    break
        gm.train(was_training)
    finally:
        for node, target in originals.items():
            node.target = target
        gm.recompile()
    return images, time.perf_counter() - start


def _state_path(scan: fx.Node) -> str:
    return f"{QUANT_PREFIX}.{scan.name}__state"


def _record(gm: fx.GraphModule, key: str, value) -> None:
    calib = dict(gm.meta.get("vmfx_calibration") or {})
    calib[key] = value
    gm.meta["vmfx_calibration"] = calib


class ReparameterizeScanPass(Pass):
    """Give every scan the reparameterization factors of its hidden state (module docstring).

    Args:
        config: the :class:`~vmfx.config.ScanStateConfig` (bits and whether the state is then
            quantized are recorded in the attached module).
    """

    needs_data = True
    requires_facts = ("mixers_detected",)
    forbids_facts = ("scan_state_quantized",)  # searched scales belong to the factors they saw
    ensures_facts = ("scan_reparameterized",)

    def __init__(self, config: ScanStateConfig | None = None):
        self.config = config or ScanStateConfig()

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if not scan_nodes(gm):
            raise self.fail("the graph has no annotated selective-scan node to reparameterize")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        scans = scan_nodes(gm)
        probes = {node: _Probe(stats=True, keep=0) for node in scans}
        _, seconds = _run_probes(gm, ctx, probes)
        for node in scans:
            probe = probes[node]
            if probe.abs_sum is None:
                raise self.fail("the calibration data never reached this scan", node)
            factors = reparameterization_factors((probe.abs_sum / probe.images).float())
            dim, length, n = probe.abs_sum.shape
            module = ScanStateQuant(dim, length, n, self.config.bits, reparameterized=True,
                                    quantize=self.config.quantize)
            module.r_C.copy_(factors[0])
            module.r_L.copy_(factors[1])
            module.r_D.copy_(factors[2])
            attach_scan_state(gm, node, module, _state_path(node))
        _record(gm, "scan_reparam_seconds", seconds)
        return PassResult(gm, True)


class QuantizeScanStatePass(Pass):
    """Search per-step static scales of every scan's (reparameterized) hidden state (module
    docstring).

    Args:
        config: the :class:`~vmfx.config.ScanStateConfig` (bits, the candidate grid, samples).
    """

    needs_data = True
    requires_facts = ("mixers_detected",)
    ensures_facts = ("scan_state_quantized",)

    def __init__(self, config: ScanStateConfig | None = None):
        self.config = config or ScanStateConfig()

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if not scan_nodes(gm):
            raise self.fail("the graph has no annotated selective-scan node to quantize")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = self.config
        scans = scan_nodes(gm)
        probes = {node: _Probe(stats=False, keep=cfg.search_samples) for node in scans}
        _, seconds = _run_probes(gm, ctx, probes)
        start = time.perf_counter()
        for node in scans:
            probe = probes[node]
            if not probe.kept:
                raise self.fail("the calibration data never reached this scan", node)
            a = probe.inputs()
            if a["B"].dim() < 3 or a["C"].dim() < 3:
                raise self.fail("the scan's B and C are time-invariant; the per-step state search needs "
                                "time-varying (batch, N, L) B and C, as Mamba's", node)
            module = scan_state_of(node)
            if module is None or not module.quantize or module.bits != cfg.bits:
                dim, length = a["u"].shape[1:]
                old = module
                module = ScanStateQuant(dim, length, a["A"].shape[1], cfg.bits,
                                        reparameterized=old is not None and old.reparameterized, quantize=True)
                if old is not None and old.reparameterized:
                    for name in ("r_C", "r_L", "r_D"):
                        getattr(module, name).copy_(getattr(old, name))
                attach_scan_state(gm, node, module, _state_path(node))
            scales = search_state_scales(
                a["u"], a["delta"], a["A"], a["B"], a["C"], delta_bias=a.get("delta_bias"),
                delta_softplus=bool(a.get("delta_softplus", False)), factors=module.factors(),
                bits=cfg.bits, candidates=cfg.candidates, lo=cfg.lo, hi=cfg.hi, lookahead=cfg.lookahead,
                exhaustive=cfg.exhaustive)
            module.scales.copy_(scales)
        _record(gm, "scan_state_seconds", seconds + time.perf_counter() - start)
        return PassResult(gm, True)


def scan_state_passes(config) -> list[Pass]:
    """The passes a :class:`~vmfx.config.QuantConfig`'s ``scan_state`` asks for (none without
    one): ``ReparameterizeScanPass`` if ``reparameterize``, then ``QuantizeScanStatePass`` if
    ``quantize``."""
    sc = getattr(config, "scan_state", None)
    if sc is None:
        return []
    passes: list[Pass] = []
    if sc.reparameterize:
        passes.append(ReparameterizeScanPass(sc))
    if sc.quantize:
        passes.append(QuantizeScanStatePass(sc))
    return passes
