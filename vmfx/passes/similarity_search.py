"""``SimilaritySearchPass``: k-scaled ViM PTQ's search of static scales by cosine similarity.

After :class:`~vmfx.passes.convert.ConvertPass` every static quantizer holds a max-based scale
``s0`` (per tensor, channel, token, or per k-means cluster for "cluster" specs). This pass refines
them as the k-scaled ViM PTQ code does (PTQ4ViT's search, re-derived from the notes on
Access-IC-Lab/PTQ_for_ViM, not copied):

* the *coordinates* of a quantizer are its clusters ("cluster" specs), else the positions of its
  scale (one for per-tensor);
* each coordinate ``j`` gets ``m * s0[j]`` for the ``m`` among ``candidates`` multipliers evenly
  spaced from ``low`` to ``high`` (official: 101, 0.01 to 1.2) that maximises the mean cosine
  similarity between the float layer output and the quantized one, along the layout's channel
  dim (the official ``dim=-1`` of its ``(B, L, C)`` linear outputs and the channel dim of its
  ``(B, D, L)`` conv/SiLU outputs), over rows (sample x token) that hold a token;
* ``rounds`` rounds (official: 3) alternate a *weight* phase (every static symmetric weight
  quantizer of a linear; the layer output is ``Q_out(F.linear(Q_in(x), Q_w(W), b))`` with the
  linear's other quantizers at their current scales) and an *output* phase (every static symmetric
  quantizer on an ``output`` edge; for a linear the quantized output is computed from the
  quantized weight); after an output phase, ``pow2`` cluster specs are re-rounded to the first
  cluster's scale times powers of two (:func:`~vmfx.quant.kscaled.round_pow2_ratios`).

A quantizer shared by several nodes (an ``output`` rule with ``shared="mixer"``) is one set of
coordinates scored on all of their outputs together.

Scores are exact for every coordinate taken alone with the others at their current scales, all
coordinates of all quantizers scored in one pass over the search images per phase (the official
code searches clusters one after the other, each seeing the ones already updated in that round:
vmfx updates them together, so ``rounds`` passes of one-coordinate improvements). Every layer
reads float inputs (quantizers disabled): the official calibration's raw inputs. A coordinate whose
score does not depend on its scale (it holds no valid row) keeps its scale.

The score of candidate ``m`` for coordinate ``j`` is built from per-row partial sums, so no
calibration tensor is kept: memory is O(rows x coordinates) per batch, and the candidates are
evaluated in chunks.

Requires: calibrated quantizers. Ensures: ``scales_searched``. Invariants: the graph is not edited
(only quantizer scales change, in place); asymmetric, dynamic or non-quantizer edges are left as
they are and listed in ``gm.meta["vmfx_search"]["skipped"]`` with the reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..annotations import annotation
from ..config import SimilaritySearchConfig
from ..errors import CalibrationDataError, ConfigError
from ..quant.kscaled import round_pow2_ratios
from ..quant.modules import FakeQuantize
from .base import Pass, PassContext, PassResult
from .calibrate import _is_one_shot, input_expectation, iter_calibration_batches
from .jlss import quantization_disabled
from .linear_edges import linear_edges
from .patterns import module_of

__all__ = ["SimilaritySearchPass", "coordinate_cosine_scores", "candidate_multipliers"]

#: Elements of the candidate outputs evaluated at once: as many candidates as fit (at least one).
#: Large layer outputs go one candidate at a time, so the temporaries stay near the cache
#: (kscaled-official-w8a8 on 32 proxy images: 200 CPU-s against 372 with 8 candidates at once, the
#: same scales to the bit); small ones go several at a time, so a search on a few images does not
#: pay the overhead of thousands of small ops (a 4-image test search took 134 s wall one candidate at
#: a time against 3 s eight at a time, on 2 cores busy with other work).
_CHUNK_ELEMENTS = 2**21


def _per_chunk(elements: int) -> int:
    """Candidates per chunk for candidate outputs of ``elements`` elements."""
    return max(1, _CHUNK_ELEMENTS // max(1, elements))


_EPS = 1e-12


def candidate_multipliers(cfg: SimilaritySearchConfig) -> torch.Tensor:
    """``candidates`` multipliers evenly spaced from ``low`` to ``high`` (both included)."""
    if cfg.candidates == 1:
        return torch.tensor([float(cfg.high)])
    return torch.linspace(float(cfg.low), float(cfg.high), cfg.candidates, dtype=torch.float64).float()


def _segment(v: torch.Tensor, ids: "_Ids") -> torch.Tensor:
    """Per-row sums of ``v`` (..., R, C) over the elements of each coordinate: (..., R, k)."""
    if ids.kind == "tensor":
        return v.sum(-1, keepdim=True)
    if ids.kind == "row":  # each row belongs to one coordinate
        return v.sum(-1, keepdim=True) * ids.onehot
    if ids.kind == "identity":  # coordinate = column
        return v
    return v @ ids.onehot  # columns grouped into coordinates


@dataclass
class _Ids:
    """Which coordinate every element of an (R, C) view belongs to."""

    kind: str  # "tensor" (k=1), "row" (R, k) one-hot, "col" (C, k) one-hot, "identity" (k = C)
    k: int
    onehot: torch.Tensor | None = None
    per_col: torch.Tensor | None = None  # (C,) coordinate of each column ("col"/"identity")
    per_row: torch.Tensor | None = None  # (R,) coordinate of each row ("row")


def coordinate_cosine_scores(ref: torch.Tensor, current: torch.Tensor, candidates, ids: _Ids,
                             valid: torch.Tensor | None, *, sums: bool = False) -> torch.Tensor:
    """Sum over rows of the cosine similarity of ``ref`` and the quantized output when one
    coordinate takes a candidate and the others keep their current quantization.

    Args:
        ref: (R, C) float reference rows.
        current: (R, C) the output with every coordinate at its current scale.
        candidates: iterable of (n, R, C) chunks: the output with *every* coordinate at candidate i
            (a coordinate's elements only depend on its own scale, so coordinate j's elements of
            chunk i are what they would be if only j changed); each chunk is consumed (overwritten
            in place); with ``sums=True``, iterable of
            ``(dot, sq)`` pairs of (n, R, k) per-row sums over each coordinate's elements of
            ``ref * out`` and ``out * out`` instead.
        ids: the coordinate of every element.
        valid: (R,) float mask of the rows that count (None: all).

    Returns:
        (k, n_candidates) float64 sums of cosine similarities.
    """
    ref_norm = ref.norm(dim=-1, keepdim=True)  # (R, 1)
    d_cur = _segment(ref * current, ids)  # (R, k)
    n_cur = _segment(current * current, ids)
    base_d = (ref * current).sum(-1, keepdim=True) - d_cur
    base_n = (current * current).sum(-1, keepdim=True) - n_cur
    out = []
    for chunk in candidates:
        if sums:
            d, n = chunk
        else:
            d = _segment(ref.unsqueeze(0) * chunk, ids)  # (n, R, k)
            n = _segment(chunk.square_(), ids)  # the chunk is consumed
        cos = (base_d + d) / (ref_norm * torch.sqrt((base_n + n).clamp_min(0.0))).clamp_min(_EPS)
        if valid is not None:
            cos = cos * valid[:, None]
        out.append(cos.sum(-2).double().t())  # (k, n)
    return torch.cat(out, dim=1)


def _output_candidate_sums(ref2: torch.Tensor, y2: torch.Tensor, base2: torch.Tensor, ids: _Ids,
                           mults: torch.Tensor, qmin: int, qmax: int):
    """``(dot, sq)`` sums of every candidate chunk of a symmetric output quantizer whose scale is
    ``base2 * m`` ((R, C) per-element starting scales, constant along rows or along columns), with
    the scale factored out of the integer codes (fewer passes over the data)."""
    by_row = ids.kind in ("tensor", "row")
    per = _per_chunk(y2.numel())
    for i in range(0, mults.numel(), per):
        m = mults[i:i + per].reshape(-1, 1, 1)
        if by_row:
            s = base2[:, :1].unsqueeze(0) * m  # (n, R, 1)
            codes = torch.div(y2.unsqueeze(0), s).round_().clamp_(qmin, qmax)
            d = (codes * ref2).sum(-1, keepdim=True) * s
            sq = codes.pow_(2).sum(-1, keepdim=True) * (s * s)
            if ids.kind == "row":
                d, sq = d * ids.onehot, sq * ids.onehot
        else:
            s = base2[:1, :].unsqueeze(0) * m  # (n, 1, C)
            q = torch.div(y2.unsqueeze(0), s).round_().clamp_(qmin, qmax).mul_(s)
            d = _segment(q * ref2, ids)
            sq = _segment(q.pow_(2), ids)
        yield d, sq


def _fq(x: torch.Tensor, scale, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(x / scale), qmin, qmax) * scale`` in one new tensor (the steps after the
    division run in place: the same values, no temporaries)."""
    return torch.div(x, scale).round_().clamp_(qmin, qmax).mul_(scale)


# -- targets --------------------------------------------------------------------------------------


@dataclass
class _Quantizer:
    """One quantizer under search, with its starting point and its scores."""

    fq: FakeQuantize
    node: fx.Node
    coords: int
    base: torch.Tensor  # (coords,) the max-based scale s0 of each coordinate
    scores: torch.Tensor | None = None

    def coordinate_scales(self) -> torch.Tensor:
        if self.fq.cluster_ids is not None:
            return self.fq.cluster_scales()
        return self.fq.scale.detach().reshape(-1).float().clone()

    def ids_full(self, shape) -> torch.Tensor:
        """The coordinate of every element of a tensor of ``shape``."""
        s = self.fq.scale
        ids = self.fq.cluster_ids if self.fq.cluster_ids is not None else torch.arange(s.numel()).reshape(s.shape)
        return ids.expand(shape)

    def set(self, coord_scales: torch.Tensor) -> None:
        with torch.no_grad():
            if self.fq.cluster_ids is not None:
                self.fq.set_cluster_scales(coord_scales)
            else:
                self.fq.scale.copy_(coord_scales.reshape(self.fq.scale.shape).to(self.fq.scale))


@dataclass
class _Target:
    """A node whose output quantizer and/or (for a linear) weight quantizer is searched."""

    node: fx.Node
    channel_dim: int
    valid_tokens: torch.Tensor | None  # (tokens,) 1/0: positions holding a token (None: all)
    token_dims: tuple[int, ...] | None
    out: _Quantizer | None = None
    weight: _Quantizer | None = None


def _searchable(fq, weight: bool) -> str | None:
    """Why ``fq`` cannot be searched (None: it can)."""
    if not isinstance(fq, FakeQuantize):
        return "not a quantizer"
    if fq.spec.dynamic:
        return "dynamic"
    if not fq.spec.symmetric or bool((fq.zero_point != 0).any()):
        return "asymmetric (the search scales symmetric quantizers)"
    if weight and fq.spec.granularity not in ("tensor", "channel"):
        return f"weight granularity {fq.spec.granularity}"
    return None


def _quantizer(fq: FakeQuantize, node: fx.Node) -> _Quantizer:
    q = _Quantizer(fq, node, 0, torch.empty(0))
    q.base = q.coordinate_scales()
    q.coords = q.base.numel()
    return q


def find_targets(gm: fx.GraphModule, search_weights: bool = True, keep_roles: tuple[str, ...] = ()
                 ) -> tuple[dict, list]:
    """``({node: _Target}, [(quantizer node name, why skipped)])``; the output quantizers of nodes
    whose role is in ``keep_roles`` are skipped (they keep their min-max scales)."""
    targets: dict[fx.Node, _Target] = {}
    skipped: list[tuple[str, str]] = []

    def target(node: fx.Node) -> _Target:
        if node not in targets:
            layout = annotation(node).layout if annotation(node) is not None else None
            meta = node.meta.get("tensor_meta")
            ndim = len(meta.shape) if meta is not None and hasattr(meta, "shape") else None
            cd = layout.channel_dim if layout is not None and layout.channel_dim is not None else -1
            valid = None
            tdims = None
            if layout is not None and not layout.merged_batch and any(i < 0 for i in layout.order):
                valid = torch.tensor([1.0 if i >= 0 else 0.0 for i in layout.order])
                tdims = layout.token_dims
            targets[node] = _Target(node, cd if cd >= 0 or ndim is None else ndim - 1, valid, tdims)
        return targets[node]

    for qnode in gm.graph.nodes:
        ann = annotation(qnode)
        fq = module_of(qnode)
        if not isinstance(fq, FakeQuantize) or ann is None or ann.extra.get("edge") != "output":
            continue
        why = _searchable(fq, weight=False)
        if why is not None:
            skipped.append((qnode.name, why))
            continue
        producer = qnode.args[0]
        role = annotation(producer).role if annotation(producer) is not None else None
        if role in keep_roles:
            skipped.append((qnode.name, f"role {role!r} keeps its min-max scale (SimilaritySearchConfig.keep_roles)"))
            continue
        shared = next((t.out for t in targets.values() if t.out is not None and t.out.fq is fq), None)
        target(producer).out = shared or _quantizer(fq, qnode)  # a shared quantizer: one set of scores
    if search_weights:
        for node in gm.graph.nodes:
            if not (node.op == "call_function" and node.target is F.linear):
                continue
            edges = linear_edges(node)
            if edges.weight_quant is None:
                continue
            why = _searchable(module_of(edges.weight_quant), weight=True)
            if why is not None:
                skipped.append((edges.weight_quant.name, why))
                continue
            t = target(node)
            t.weight = _quantizer(module_of(edges.weight_quant), edges.weight_quant)
    return targets, skipped


# -- scoring one node ---------------------------------------------------------------------------


def _rows(t: torch.Tensor, cd: int) -> torch.Tensor:
    """(…) -> (R, C) with the channel dim ``cd`` last."""
    return t.movedim(cd, -1).reshape(-1, t.shape[cd])


def _ids_view(q: _Quantizer, shape, cd: int) -> _Ids:
    if q.coords == 1:
        return _Ids("tensor", 1)
    full = _rows(q.ids_full(shape), cd)  # (R, C)
    col = full[0]
    if bool((full == col).all()):
        if q.coords == full.shape[1] and torch.equal(col, torch.arange(full.shape[1])):
            return _Ids("identity", q.coords, per_col=col)
        return _Ids("col", q.coords, F.one_hot(col, q.coords).float(), per_col=col)
    row = full[:, 0]
    if bool((full == row[:, None]).all()):
        return _Ids("row", q.coords, F.one_hot(row, q.coords).float(), per_row=row)
    raise ConfigError(
        f"SimilaritySearchPass searches scales that vary along the tokens or along the channels, not both "
        f"(a {tuple(shape)} tensor's scale varies along both); give this edge a per-tensor, per-token, "
        f"per-channel or cluster spec, or turn the search off (QuantConfig(search=None))")


def _valid_rows(t: _Target, y: torch.Tensor) -> torch.Tensor | None:
    if t.valid_tokens is None:
        return None
    shape = [1] * y.dim()
    for d in t.token_dims:
        shape[d] = y.shape[d]
    mask = t.valid_tokens.reshape(shape).expand(y.shape)
    return _rows(mask, t.channel_dim)[:, 0].contiguous()


def _scale_rows(fq: FakeQuantize, shape, cd: int) -> torch.Tensor:
    return _rows(fq.scale.detach().float().expand(shape), cd)


def _to_rows(y: torch.Tensor, ref: torch.Tensor, cd: int) -> torch.Tensor:
    """A tensor of ``ref``'s shape -> (R, C); with a leading candidate dim -> (n, R, C)."""
    if y.dim() == ref.dim():
        return _rows(y, cd)
    d = cd + 1 if cd >= 0 else cd  # the channel dim behind y's leading candidate dim
    return y.movedim(d, -1).reshape(y.shape[0], -1, y.shape[d])


def _fq_with(fq: FakeQuantize, x: torch.Tensor) -> torch.Tensor:
    qp = fq.qparams(x)
    return (torch.clamp(torch.round(x / qp.scale) + qp.zero_point, qp.qmin, qp.qmax) - qp.zero_point) * qp.scale


def _linear_inputs(node: fx.Node, args, kwargs):
    """(x as the quantized linear reads it, W before its quantizer, bias, weight quantizer or None)."""
    edges = linear_edges(node)
    x = args[0]
    iq = edges.quantizer("input")
    if isinstance(iq, FakeQuantize):
        x = _fq_with(iq, x)
    w = args[1] if len(args) > 1 else kwargs["weight"]
    b = args[2] if len(args) > 2 else kwargs.get("bias")
    wq = edges.quantizer("weight")
    return x, w, b, (wq if isinstance(wq, FakeQuantize) else None)


def _is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is F.linear


def _score_weight(t: _Target, args, kwargs, ref: torch.Tensor, mults: torch.Tensor) -> None:
    q = t.weight
    x, w, b, wq = _linear_inputs(t.node, args, kwargs)
    cd = t.channel_dim
    out = t.out
    out_scale = _scale_rows(out.fq, ref.shape, cd) if out is not None else None

    def finish(y: torch.Tensor) -> torch.Tensor:
        y2 = _to_rows(y, ref, cd)
        return y2 if out is None else _fq(y2, out_scale, out.fq.qmin, out.fq.qmax)

    ref2 = _rows(ref, cd)
    current = finish(F.linear(x, _fq(w, wq.scale.detach(), wq.qmin, wq.qmax), b))
    w_base = q.base.reshape(-1, *([1] * (w.dim() - 1))) if q.coords > 1 else q.base.reshape(())

    def chunks():
        per = _per_chunk(max(ref.numel(), w.numel()))
        for i in range(0, mults.numel(), per):
            m = mults[i:i + per]
            s = m.reshape(-1, *([1] * w.dim())) * w_base  # (n, N|1, 1)
            wc = _fq(w.unsqueeze(0), s, wq.qmin, wq.qmax)  # (n, N, K)
            yield finish(torch.stack([F.linear(x, wc[j], b) for j in range(wc.shape[0])]))

    # the coordinates of a per-channel weight are the output channels: the columns of the (R, C) view
    ids = _Ids("tensor", 1) if q.coords == 1 else _Ids("identity", q.coords, per_col=torch.arange(q.coords))
    scores = coordinate_cosine_scores(ref2, current, chunks(), ids, _valid_rows(t, ref))
    q.scores = scores if q.scores is None else q.scores + scores


def _score_output(t: _Target, args, kwargs, ref: torch.Tensor, mults: torch.Tensor) -> None:
    q = t.out
    cd = t.channel_dim
    y = ref
    if _is_linear(t.node):  # the output of the quantized linear
        x, w, b, wq = _linear_inputs(t.node, args, kwargs)
        if wq is not None:
            y = F.linear(x, _fq_with(wq, w), b)
        elif x is not args[0]:
            y = F.linear(x, w, b)
    ref2, y2 = _rows(ref, cd), _rows(y, cd)
    ids = _ids_view(q, ref.shape, cd)
    base = _rows(q.base[q.ids_full(ref.shape)], cd)
    current = _fq(y2, _scale_rows(q.fq, ref.shape, cd), q.fq.qmin, q.fq.qmax)

    sums = _output_candidate_sums(ref2, y2, base, ids, mults, q.fq.qmin, q.fq.qmax)
    scores = coordinate_cosine_scores(ref2, current, sums, ids, _valid_rows(t, ref), sums=True)
    q.scores = scores if q.scores is None else q.scores + scores


class _Scorer(fx.Interpreter):
    """Runs the (float) graph and scores the candidates of the targets of one phase."""

    def __init__(self, gm: fx.GraphModule, targets: dict, phase: str, mults: torch.Tensor):
        super().__init__(gm)
        self.targets, self.phase, self.mults = targets, phase, mults

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        t = self.targets.get(n)
        if t is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            ref = result.detach().float()
            if self.phase == "weight" and t.weight is not None:
                _score_weight(t, args, kwargs, ref, self.mults)
            elif self.phase == "output" and t.out is not None:
                _score_output(t, args, kwargs, ref, self.mults)
        return result


def _apply(q: _Quantizer, mults: torch.Tensor) -> None:
    """Each coordinate takes its best candidate (ties: the first); flat scores keep the scale."""
    scores = q.scores
    current = q.coordinate_scales()
    best = scores.argmax(dim=1)
    flat = (scores.max(dim=1).values - scores.min(dim=1).values) <= 1e-12 * scores.abs().max(dim=1).values.clamp_min(1)
    chosen = torch.where(flat, current, q.base * mults[best])
    if q.fq.spec.granularity == "cluster" and q.fq.spec.pow2:
        chosen = round_pow2_ratios(chosen)
    q.set(chosen)
    q.scores = None


class SimilaritySearchPass(Pass):
    """Refine static symmetric scales by cosine similarity (see the module docstring).

    Args:
        config: the search's settings (:class:`~vmfx.config.SimilaritySearchConfig`).
    """

    needs_data = True
    requires_facts = ("quantizers_calibrated",)
    ensures_facts = ("scales_searched",)

    def __init__(self, config: SimilaritySearchConfig | None = None):
        self.config = config or SimilaritySearchConfig()

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        if ctx.calib_data is None:
            raise CalibrationDataError("the similarity search needs calibration data (calib_data)")
        if self.config.rounds > 1 and _is_one_shot(ctx.calib_data):
            raise CalibrationDataError(
                f"the similarity search passes over the data {2 * self.config.rounds} times; pass a tensor, "
                "a list of batches or a DataLoader, not a one-shot iterator"
            )

    def _batches(self, gm, ctx):
        left = self.config.images
        for x in iter_calibration_batches(ctx.calib_data, ctx.calib_batch_size, input_expectation(gm), check_scale=False):
            if left is not None:
                if left <= 0:
                    return
                x = x[:left]
                left -= x.shape[0]
            yield x

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        start = time.perf_counter()
        targets, skipped = find_targets(gm, self.config.weights, self.config.keep_roles)
        mults = candidate_multipliers(self.config)
        phases = [p for p in ("weight", "output")
                  if any((t.weight if p == "weight" else t.out) is not None for t in targets.values())]
        was_training = gm.training
        gm.eval()
        images = 0
        with torch.no_grad(), quantization_disabled(gm):
            for _ in range(self.config.rounds):
                for phase in phases:
                    scorer = _Scorer(gm, targets, phase, mults)
                    images = 0
                    for x in self._batches(gm, ctx):
                        scorer.run(x)
                        images += x.shape[0]
                    for t in targets.values():
                        q = t.weight if phase == "weight" else t.out
                        if q is not None and q.scores is not None:
                            _apply(q, mults)
        gm.train(was_training)
        gm.meta["vmfx_search"] = {
            "rounds": self.config.rounds, "candidates": self.config.candidates, "images": images,
            "outputs": sorted(t.out.node.name for t in targets.values() if t.out is not None),
            "weights": sorted(t.weight.node.name for t in targets.values() if t.weight is not None),
            "skipped": skipped, "seconds": time.perf_counter() - start,
        }
        return PassResult(gm, bool(targets))
