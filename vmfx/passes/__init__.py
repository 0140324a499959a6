"""Compiler passes over vmfx graphs, the pass manager, the method pipelines, and what a pass
author needs to write a pass of their own.

See ``vmfx/passes/README.md`` for the contract every pass keeps and a worked example.

* running passes: :class:`Pass`, :class:`PassContext`, :class:`PassResult`, :class:`PassManager`,
  :class:`Pipeline`, the ordering facts (:data:`FACTS`, :func:`graph_facts`), methods
  (:func:`register_method`, :func:`methods`, :func:`method_passes`, :func:`ptq_passes`);
* the built-in passes, in pipeline order;
* the kit: annotations and selectors (:func:`annotation`, :func:`annotate`, :func:`selector_facts`,
  :class:`~vmfx.config.Selector`), graph queries (:func:`module_of`, :func:`is_linear`,
  :func:`linear_edges`, :func:`quantized_linears`, :func:`detected_mixers`), logged edits
  (:func:`insert_module_on_edge`, :func:`insert_module_after`, :func:`replace_submodule`,
  :func:`unique_submodule_name`, :data:`QUANT_PREFIX`), observers and quantizer modules
  (:func:`make_observer`, :func:`edge_layout`, :func:`activation_observer`, the observer classes, ``FakeQuantize``,
  ``Smooth``), and :func:`quantization_disabled` (run a quantized graph in float).
"""

from ..annotations import annotate, annotation, selector_facts
from ..config import Selector
from ..quant.modules import FakeQuantize, Smooth
from ..quant.observers import AbsMaxObserver, LpObserver, MinMaxObserver, Observer
from .base import FACTS, Pass, PassContext, PassResult, graph_facts
from .bias_correction import BiasCorrectionPass
from .calibrate import CalibratePass
from .convert import ConvertPass
from .detect import DetectMambaMixersPass, detected_mixers
from .fold_smoothing import FoldSmoothingPass
from .graph_utils import insert_module_after, insert_module_on_edge, replace_submodule, unique_submodule_name
from .insert_observers import QUANT_PREFIX, InsertObserversPass, activation_observer, edge_layout, make_observer
from .jlss import JLSSPass, quantization_disabled
from .linear_edges import LinearEdges, linear_edges, quantized_linears
from .manager import PassManager
from .online_hadamard import OnlineHadamardPass
from .ouromamba import outlier_observer
from .patterns import is_linear, module_of
from .pipeline import Pipeline, method_passes, methods, ptq_passes, register_method
from .rotate import RotateResidualPass, RotationOptions, rotate_passes
from .scan_state_passes import QuantizeScanStatePass, ReparameterizeScanPass, scan_state_passes
from .similarity_search import SimilaritySearchPass
from .smooth_gate import SmoothFusedGatePass
from .smoothquant import SmoothQuantPass
from .split_softplus import SplitDeltaSoftplusPass

__all__ = [
    # running passes
    "Pass",
    "PassContext",
    "PassResult",
    "PassManager",
    "Pipeline",
    "FACTS",
    "graph_facts",
    "register_method",
    "methods",
    "method_passes",
    "ptq_passes",
    "scan_state_passes",
    "rotate_passes",
    "RotationOptions",
    # the built-in passes, in pipeline order
    "DetectMambaMixersPass",
    "SplitDeltaSoftplusPass",
    "RotateResidualPass",
    "SmoothFusedGatePass",
    "OnlineHadamardPass",
    "InsertObserversPass",
    "CalibratePass",
    "SmoothQuantPass",
    "ConvertPass",
    "SimilaritySearchPass",
    "JLSSPass",
    "FoldSmoothingPass",
    "ReparameterizeScanPass",
    "QuantizeScanStatePass",
    "BiasCorrectionPass",
    # the pass author's kit
    "annotation",
    "annotate",
    "selector_facts",
    "Selector",
    "module_of",
    "is_linear",
    "linear_edges",
    "LinearEdges",
    "quantized_linears",
    "detected_mixers",
    "insert_module_on_edge",
    "insert_module_after",
    "replace_submodule",
    "unique_submodule_name",
    "QUANT_PREFIX",
    "make_observer",
    "edge_layout",
    "activation_observer",
    "outlier_observer",
    "Observer",
    "MinMaxObserver",
    "AbsMaxObserver",
    "LpObserver",
    "FakeQuantize",
    "Smooth",
    "quantization_disabled",
]
