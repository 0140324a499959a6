"""Pipelines: a method is a list of passes.

``Pipeline([...])`` is the user-visible way to run passes: it traces a model (canonicalize ->
trace -> shape propagation on one calibration image) when given an ``nn.Module``, then runs the
passes through a :class:`~vmfx.passes.manager.PassManager`. Every published method is registered
here as a function from a :class:`~vmfx.config.QuantConfig` to its list of passes, readable top
to bottom (:func:`ptq_passes`)::

    minmax:   DetectMambaMixers -> InsertObservers -> Calibrate -> Convert
    ptq4vm:   DetectMambaMixers -> InsertObservers(|x| stats) -> Calibrate -> SmoothQuant
              -> Calibrate (Lp grid, 2 passes) -> Convert (Lp grid weights) -> JLSS -> FoldSmoothing

Every pass declares the facts it needs and establishes (:mod:`vmfx.passes.base`); a pipeline in an
impossible order fails before it runs.

Researchers reorder, swap or add passes by building their own ``Pipeline``.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..config import QuantConfig, register_options
from torch.fx.node import has_side_effect

from ..errors import CalibrationDataError, CheckpointError, ConfigError, InputError, ModelStateWarning
from ..frontends.adapters import canonicalize
from ..frontends.fallback import trace_with_fallback
from ..frontends.tracer import propagate_shapes
from ..quant.observers import AbsMaxObserver
from .base import Pass, PassContext
from .calibrate import CalibratePass, InputExpectation, check_example_batch, first_example, input_expectation
from .convert import ConvertPass
from .detect import DetectMambaMixersPass
from .fold_smoothing import FoldSmoothingPass
from .insert_observers import InsertObserversPass, activation_observer
from .jlss import JLSSPass
from .manager import PassManager
from .smoothquant import SmoothQuantPass
from .scan_state_passes import QuantizeScanStatePass, ReparameterizeScanPass, scan_state_passes

__all__ = [
    "Pipeline",
    "register_method",
    "methods",
    "method_passes",
    "split_stages",
    "trace_for_quantization",
    "warn_model_state",
    "model_spec",
    "ptq_passes",
]

MethodBuilder = Callable[[QuantConfig], list[Pass]]
_METHODS: dict[str, MethodBuilder] = {}


def register_method(name: str, options: type | None = None) -> Callable[[MethodBuilder], MethodBuilder]:
    """Register ``builder(config) -> list[Pass]`` as the method ``name`` (a decorator).

    ``options``: the method's own options, a frozen dataclass with defaults
    (:func:`vmfx.sections.register_options`): the config section named ``name``, which every
    ``QuantConfig(method=name)`` holds (``config.options``, the builder reads it) and ``vmfx.save``
    records with the config. A method configured by more than that registers other sections
    (:func:`vmfx.register_section`). A plug-in method registers itself this way, its presets with :func:`vmfx.register_preset`,
    and works with ``vmfx.compile``, the staged API and the CLI (``--plugin FILE``) as the built-in
    methods do.
    """
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ConfigError(f"a method name is a non-empty word, got {name!r}")
    if options is not None:
        register_options(name, options)

    def decorator(builder: MethodBuilder) -> MethodBuilder:
        if not callable(builder):
            raise ConfigError(f"register_method({name!r}) decorates a function config -> list of passes, got {builder!r}")
        _METHODS[name] = builder
        return builder

    return decorator


def methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(_METHODS)


def method_passes(config: QuantConfig) -> list[Pass]:
    """The passes of ``config.method``, configured by ``config``."""
    try:
        builder = _METHODS[config.method]
    except KeyError:
        raise ConfigError(f"unknown method {config.method!r}; known methods: {', '.join(methods())}") from None
    passes = builder(config)
    # config.scan_state is orthogonal to the method: any method's pipeline gets its passes (once)
    if not any(isinstance(p, (ReparameterizeScanPass, QuantizeScanStatePass)) for p in passes):
        passes = list(passes) + scan_state_passes(config)
    return passes


def split_stages(passes: Sequence[Pass]) -> tuple[list[Pass], list[Pass], list[Pass]]:
    """Split a method's passes into the stages of the staged API.

    ``prepare`` is every pass before the first one that needs data, ``calibrate`` runs from that
    pass through the last one that needs data, ``convert`` is the rest. A method without data
    passes is all ``prepare`` and ``convert``-free.
    """
    data_indices = [i for i, p in enumerate(passes) if p.needs_data]
    if not data_indices:
        return list(passes), [], []
    first, last = data_indices[0], data_indices[-1]
    return list(passes[:first]), list(passes[first : last + 1]), list(passes[last + 1 :])


def trace_for_quantization(
    model: nn.Module, calib_data: Any = None, example_inputs: tuple | None = None, *, what: str | None = None
) -> tuple[fx.GraphModule, tuple | None]:
    """Copy, canonicalize and trace ``model`` (in eval mode), then propagate shapes on one image.

    The example image is the first calibration image unless ``example_inputs`` is given; it is
    checked against the model's input first (type, rank, channels, dtype, finite values, the image
    size of a model that declares one (``img_size``), device), so bad input fails with one line
    naming the argument (``what``: default ``"example_inputs"`` or ``"the calibration data"``, the
    one it came from), the shape expected and the shape given: a
    :class:`~vmfx.errors.CalibrationDataError` for calibration data, an
    :class:`~vmfx.errors.InputError` for ``example_inputs``. torch.fx's shape propagation prints no
    traceback of its own.

    The model must hold materialised parameters (not on the ``meta`` device:
    :class:`~vmfx.errors.CheckpointError`). It is traced in eval mode whatever its mode (the
    public entry points say so: :func:`warn_model_state`). A model whose code branches on sizes in
    Python is traced specialised to the example's shape (:mod:`vmfx.frontends.concrete`); the input
    check inserted in the graph refuses other shapes.

    Returns:
        ``(graph_module, example_inputs)``; the user's model is never modified.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"vmfx quantizes a torch nn.Module, got {type(model).__name__}")
    _check_model_state(model)
    bad = [name for name, t in list(model.named_parameters()) + list(model.named_buffers())
           if torch.is_floating_point(t) and not t.is_meta and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(
            f"the model's {', '.join(bad[:5])}{' and more' if len(bad) > 5 else ''} hold NaN or Inf values: "
            "calibration would give non-finite scales; load a healthy checkpoint first"
        )
    from_data = example_inputs is None and calib_data is not None
    what = what or ("the calibration data" if from_data else "example_inputs")
    error = CalibrationDataError if from_data else InputError
    example_inputs = _as_example_tuple(example_inputs, what)
    spec = model_spec(model)
    model = canonicalize(copy.deepcopy(model)).eval()
    drawn: list[tuple] = []  # the example image, when specialising sizes needs it before the graph exists

    def sizes() -> tuple:
        if example_inputs is not None:
            return example_inputs
        drawn.append((first_example(calib_data, InputExpectation(dtype=_first_float_dtype(model))),))
        return drawn[0]

    # untraceable code: a leaf function, else sizes specialised to the example, else that module in float
    can_specialize = example_inputs is not None or calib_data is not None
    gm = trace_with_fallback(model, specialize_to=sizes if can_specialize else None)
    gm.meta["vmfx_model_spec"] = spec
    if example_inputs is None and drawn:  # the image drawn for the sizes, checked like any first example
        example_inputs = (first_example(drawn[0][0], input_expectation(gm)),)
    elif example_inputs is None and calib_data is not None:
        example_inputs = (first_example(calib_data, input_expectation(gm)),)
    if example_inputs is not None:
        if not from_data:
            check_example_batch(example_inputs[0], input_expectation(gm), what)
        _check_image_size(model, example_inputs[0], what, error)
        _check_device(model, example_inputs, what, error)
        try:
            _propagate_quietly(gm, example_inputs)
        except Exception as exc:
            shapes = ", ".join(str(tuple(t.shape)) for t in example_inputs if isinstance(t, torch.Tensor))
            raise error(f"the model fails on an input of shape {shapes} from {what}: {_root_cause(exc)}") from exc
        gm.meta["vmfx_input_shapes"] = [list(t.shape) for t in example_inputs]
        _insert_input_check(gm, example_inputs)
    return gm, example_inputs


def _as_example_tuple(example_inputs: Any, what: str) -> tuple | None:
    """``example_inputs`` as a tuple of tensors (a tensor becomes a one-tuple); anything else is
    refused by name."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(
            isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    got = type(example_inputs).__name__ if not isinstance(example_inputs, (tuple, list)) else \
        f"a {type(example_inputs).__name__} of {', '.join(type(t).__name__ for t in example_inputs) or 'nothing'}"
    raise ConfigError(f"{what} must be a tensor of images (N, C, H, W) or a tuple of tensors, e.g. (images[:1],); "
                      f"got {got}")


def expected_image_size(model: nn.Module) -> tuple[int, int] | None:
    """The ``(H, W)`` a model declares it takes (``img_size`` of the model or of its
    ``patch_embed``, as Vim / timm models do), or None when it declares none."""
    for owner in (model, getattr(model, "patch_embed", None)):
        size = getattr(owner, "img_size", None) if owner is not None else None
        if isinstance(size, int) and not isinstance(size, bool):
            return (size, size)
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(d, int) for d in size):
            return (int(size[0]), int(size[1]))
    return None


def _check_image_size(model: nn.Module, x: torch.Tensor, what: str, error: type) -> None:
    size = expected_image_size(model)
    if size is None or x.dim() != 4 or tuple(x.shape[-2:]) == size:
        return
    h, w = size
    got = f"images of shape (N, {', '.join(map(str, x.shape[1:]))})" if error is CalibrationDataError else \
        f"shape {tuple(x.shape)}"
    raise error(
        f"{what} has {got}, but the model expects (N, {x.shape[1]}, {h}, {w}) images "
        f"(its img_size): resize or crop the images to {h}x{w}, or build the model with img_size=({x.shape[-2]}, "
        f"{x.shape[-1]})"
    )


def _check_device(model: nn.Module, example_inputs: tuple, what: str, error: type) -> None:
    device = next((t.device for t in model.parameters()), None)
    if device is None:
        return
    for t in example_inputs:
        if isinstance(t, torch.Tensor) and t.device != device:
            raise error(f"{what} is on {t.device}, but the model's parameters are on {device}: move one to the "
                        f"other's device (images.to({str(device)!r}) or model.to({str(t.device)!r}))")


def _check_model_state(model: nn.Module) -> None:
    """Refuse a model whose parameters are not materialised (on the ``meta`` device)."""
    meta = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise CheckpointError(
            f"the model's parameters are on the meta device (not materialised), e.g. {', '.join(meta[:3])}: "
            "load its weights first (model.load_state_dict(state_dict, assign=True), or "
            "model.to_empty(device='cpu') then model.load_state_dict(state_dict))"
        )


def warn_model_state(model: Any, stacklevel: int = 3) -> None:
    """Warn (:class:`~vmfx.errors.ModelStateWarning`) about a user's model in training mode that
    holds modules computing differently in training (vmfx traces and quantizes a copy in eval
    mode) or with forward hooks (they run only where the
    traced graph still calls their module). Called by the public entry points that take the
    user's float model (``vmfx.compile``, ``prepare``, ``trace``), not by vmfx's own tracing of
    models it builds (``vmfx.load``)."""
    if not isinstance(model, nn.Module):
        return
    modal = [f"'{name}' ({type(m).__name__})" for name, m in model.named_modules()
             if m.training and _behaves_differently_in_training(m)]
    if modal:  # a model without dropout / batch norm / drop-path computes the same in either mode
        warnings.warn(
            f"the model is in training mode, in which {', '.join(modal[:3])}{' and more' if len(modal) > 3 else ''} "
            "compute differently: vmfx traces, calibrates and quantizes it in eval mode, on a copy, so your model "
            "stays as it is; call model.eval() first to silence this",
            ModelStateWarning, stacklevel=stacklevel,
        )
    hooked = [name or type(model).__name__ for name, m in model.named_modules()
              if m._forward_hooks or m._forward_pre_hooks]
    if hooked:
        warnings.warn(
            f"forward hooks are registered on {', '.join(repr(n) for n in hooked[:5])}"
            f"{' and more' if len(hooked) > 5 else ''}: vmfx copies them with the model, but once a layer is "
            "quantized (replaced by quantizer and linear nodes) its hooks no longer run; remove them "
            "(handle.remove()) before quantizing and register them on the result where you need them",
            ModelStateWarning, stacklevel=stacklevel,
        )


def _behaves_differently_in_training(m: nn.Module) -> bool:
    """Dropout, batch norm and drop-path (stochastic depth, by its class name: timm's and vmfx's)."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.dropout import _DropoutNd

    return isinstance(m, (_DropoutNd, _BatchNorm)) or "DropPath" in type(m).__name__


def _propagate_quietly(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """:func:`~vmfx.frontends.tracer.propagate_shapes` without torch.fx's ShapeProp printing the
    failing node's traceback to stderr (the caller turns the failure into one vmfx error)."""
    from torch.fx.passes import shape_prop

    original = shape_prop.traceback
    shape_prop.traceback = _SilentTraceback()
    try:
        propagate_shapes(gm, example_inputs)
    finally:
        shape_prop.traceback = original


class _SilentTraceback:
    """Stands in for the ``traceback`` module inside torch.fx's shape_prop while vmfx propagates
    shapes: ``print_exc`` prints nothing, everything else is the real module's."""

    def print_exc(self, *args, **kwargs) -> None:
        return None

    def __getattr__(self, name: str):
        import traceback

        return getattr(traceback, name)


def _root_cause(exc: BaseException) -> str:
    """``"<Type>: <first line>"`` of the innermost exception a failure was raised from (not
    torch.fx's "ShapeProp error for: node=..." wrapper)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


@has_side_effect
def check_input_shape(x: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Raise :class:`~vmfx.errors.InputError` unless ``x`` is a tensor shaped ``(N, *expected)``.

    The first op of every graph vmfx traces with an example input: per-token scales, positional
    embeddings and the patch grid all fix the image size, so another size is refused up front with
    the sizes named, not deep inside the model.

    Traced again (``torch.load`` of a pickled GraphModule re-traces its code), it records itself
    as the same node instead of running."""
    if isinstance(x, fx.Proxy):
        return x.tracer.create_proxy("call_function", check_input_shape, (x, tuple(expected)), {})
    if not isinstance(x, torch.Tensor):
        raise InputError(f"the model takes a tensor of images (N, {', '.join(map(str, expected))}), got {type(x).__name__}")
    if tuple(x.shape) == tuple(expected):
        raise InputError(
            f"the model takes a batch of images (N, {', '.join(map(str, expected))}), got one image of shape "
            f"{tuple(x.shape)}: add the batch dimension with x.unsqueeze(0)"
        )
    if tuple(x.shape[1:]) != tuple(expected):
        want = "x".join(map(str, expected))
        got = "x".join(map(str, x.shape[1:])) if x.dim() >= 1 else "a scalar"
        raise InputError(
            f"the model was traced (and quantized) for inputs of shape (N, {want}), got (N, {got}) "
            f"(full shape {tuple(x.shape)}): resize or crop the images to that size, or quantize again "
            "with calibration images of the new size"
        )


def _insert_input_check(gm: fx.GraphModule, example_inputs: tuple) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders or not isinstance(example_inputs[0], torch.Tensor):
        return
    first = placeholders[0]
    with gm.graph.inserting_after(placeholders[-1]):
        gm.graph.call_function(check_input_shape, (first, tuple(example_inputs[0].shape[1:])))
    gm.recompile()


def _first_float_dtype(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def model_spec(model: nn.Module) -> dict | None:
    """How to rebuild ``model``'s architecture without pickling code: its class's qualified name
    and JSON-serializable constructor arguments (``model.init_kwargs``), or None if it has none."""
    kwargs = getattr(model, "init_kwargs", None)
    if not isinstance(kwargs, dict):
        return None
    cls = type(model)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "kwargs": dict(kwargs)}


class Pipeline:
    """A list of passes run in order on a model or a traced graph.

    Args:
        passes: :class:`~vmfx.passes.base.Pass` instances.
        check: lint and run the graph after every pass (slower; names the pass that broke it).

    Example::

        pipe = vmfx.Pipeline([DetectMambaMixersPass(), InsertObserversPass(act, w),
                              CalibratePass(), ConvertPass()])
        qmodel = pipe(model, calib_images)
    """

    def __init__(self, passes: Sequence[Pass], *, check: bool | None = None):
        self.passes = list(passes)
        self.check = check
        PassManager(self.passes)  # validates the pass types now, not at run time

    def __call__(
        self,
        model: nn.Module,
        calib_data: Any = None,
        *,
        config: QuantConfig | None = None,
        example_inputs: tuple | None = None,
        progress: bool = False,
    ) -> fx.GraphModule:
        """Run the pipeline; returns the resulting GraphModule (the input model is not modified).

        Args:
            model: an ``nn.Module`` (traced first) or a ``GraphModule`` from an earlier stage
                (used as is, and modified in place).
            calib_data: calibration images, for the passes that need them.
            config: the config, for passes that read it from the context.
            example_inputs: inputs for shape propagation and checks (default: one calibration image).
            progress: show progress bars.
        """
        if isinstance(model, fx.GraphModule) and "vmfx_source_type" in model.meta:
            gm = model
            if example_inputs is None:
                example_inputs = model.meta.get("vmfx_example_inputs")
        else:
            gm, example_inputs = trace_for_quantization(model, calib_data, example_inputs)
        gm.meta["vmfx_example_inputs"] = example_inputs
        ctx = PassContext(
            calib_data=calib_data,
            calib_batch_size=config.calib_batch_size if config is not None else 32,
            example_inputs=example_inputs,
            config=config,
            progress=progress,
        )
        result = PassManager(self.passes, self.check)(gm, ctx)
        gm = result.graph_module
        if config is not None:
            gm.meta["vmfx_config"] = config.to_dict()
        gm.meta["vmfx_pass_seconds"] = dict(ctx.timings)
        return gm

    def __add__(self, other: "Pipeline | Iterable[Pass]") -> "Pipeline":
        more = other.passes if isinstance(other, Pipeline) else list(other)
        return Pipeline(self.passes + more, check=self.check)

    def __len__(self) -> int:
        return len(self.passes)

    def __getitem__(self, index):
        return self.passes[index]

    def __repr__(self) -> str:
        return "Pipeline([\n" + "".join(f"    {p!r},\n" for p in self.passes) + "])"


# -- methods ----------------------------------------------------------------------------------------


def ptq_passes(config: QuantConfig) -> list[Pass]:
    """The pass list of every built-in method, read top to bottom::

        DetectMambaMixers
        [SplitDeltaSoftplus]       config.split_softplus: the scan's softplus as a dt_act node
        InsertObservers            smoothing statistics (|x| per channel) if smoothing, else the
                                   activation observer of the init method (min-max or Lp grid)
        [Calibrate                 smoothing only: collect |x| per channel
         SmoothQuant(alpha)]       s per linear; observers re-armed to see x / s
        Calibrate                  ranges (one pass; two for the Lp grid search)
        Convert                    observers -> quantizer nodes; a quantizer node on every
                                   weight edge, by min-max or the per-channel Lp grid search
        [SimilaritySearch]         k-scaled: scales by cosine similarity of layer outputs
        [JLSS]                     PTQ4VM's block-wise learning of step sizes and smoothing
        [FoldSmoothing]            1/s into the preceding norm where exact

    With ``config.outliers`` (OuroMamba) the activation observers are
    :class:`~vmfx.quant.mixed.OutlierLpObserver` observers and convert to mixed-precision quantizers
    (:mod:`vmfx.passes.ouromamba`).
        [ReparameterizeScan]       config.scan_state: |h| statistics -> factors r_C, r_L, r_D
        [QuantizeScanState]        config.scan_state: per-step state scales, searched step by step
        [BiasCorrection]           config.bias_correction: biases absorb the weight quantization's mean error
    """
    init = config.init
    act_observer = activation_observer(init.method, init.p, init.candidates)
    if config.outliers is not None:  # OuroMamba: mixed-precision activation quantizers
        from .ouromamba import outlier_observer

        act_observer = outlier_observer(config.outliers, init.p, init.candidates)
    passes: list[Pass] = [DetectMambaMixersPass()]
    if config.split_softplus:  # the scan's fused softplus becomes a dt_act node an output rule can select
        from .split_softplus import SplitDeltaSoftplusPass

        passes.append(SplitDeltaSoftplusPass())
    if config.smoothing is not None:
        passes += [
            InsertObserversPass(observer=AbsMaxObserver, config=config),
            CalibratePass(),
            SmoothQuantPass(config.smoothing.alpha, observer=act_observer, settings=config.settings),
        ]
    else:
        passes.append(InsertObserversPass(observer=act_observer, config=config))
    static = _has_static_activations(config)
    if static:
        passes.append(CalibratePass())
    passes.append(ConvertPass(weight_init=init.method, p=init.p, candidates=init.candidates,
                              requires_calibration=static))
    if config.search is not None:  # k-scaled ViM PTQ: scales by cosine similarity
        from .similarity_search import SimilaritySearchPass

        passes.append(SimilaritySearchPass(config.search))
    if config.jlss is not None:
        passes.append(JLSSPass(config.jlss, settings=config.settings))
    if config.smoothing is not None and config.smoothing.fold:
        passes.append(FoldSmoothingPass())
    passes += scan_state_passes(config)  # [ReparameterizeScan] [QuantizeScanState] (config.scan_state)
    if config.bias_correction:
        from .bias_correction import BiasCorrectionPass

        passes.append(BiasCorrectionPass(config.bias_correction))
    return passes


def _has_static_activations(config: QuantConfig) -> bool:
    """Whether any activation edge the config can quantize is static (needs calibration); the scan
    operands A and D are quantized from their values and need none."""
    from ..config import SCAN_WEIGHT_OPERANDS

    specs = [config.activation] + [r.spec for r in config.rules if r.spec is not None and (
        r.edge in ("input", "output") or (r.operand is not None and r.operand not in SCAN_WEIGHT_OPERANDS))]
    return any(not s.dynamic for s in specs)


for _name in ("minmax", "smoothquant", "pts", "pts-smooth", "ptq4vm", "ptq4vm-official"):
    register_method(_name)(ptq_passes)

# k-scaled ViM PTQ (Shi et al.): min-max observers on layer outputs (clusters by k-means), then the
# similarity search; the config's rules and ``search`` say what (vmfx.config.kscaled_rules)
register_method("kscaled")(ptq_passes)
register_method("kscaled-official")(ptq_passes)
# OuroMamba-Quant: PTQ4VM's passes with mixed-precision activation observers
register_method("ouromamba")(ptq_passes)
# ... and as its official code runs it (the scan operands too, batch-wide trigger, 10 steps)
register_method("ouromamba-official")(ptq_passes)
