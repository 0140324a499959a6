"""Compiler passes over vmfx graphs, the pass manager, and the method pipelines.

See ``vmfx/passes/README.md`` for the contract every pass keeps.
"""

from .base import Pass, PassContext, PassResult
from .calibrate import CalibratePass, iter_calibration_batches
from .convert import ConvertPass
from .detect import DetectMambaMixersPass, detected_mixers
from .fold_smoothing import FoldSmoothingPass
from .insert_observers import InsertObserversPass, activation_observer
from .jlss import JLSSPass, quantization_disabled
from .manager import PassManager
from .pipeline import (
    Pipeline,
    method_passes,
    methods,
    ptq_passes,
    register_method,
    split_stages,
    trace_for_quantization,
)
from .segments import SegmentRunner
from .smoothquant import SmoothQuantPass
from .scan_state import QuantizeScanStatePass, ReparameterizeScanPass, scan_state_passes

__all__ = [
    "Pass",
    "PassContext",
    "PassResult",
    "PassManager",
    "Pipeline",
    "DetectMambaMixersPass",
    "InsertObserversPass",
    "CalibratePass",
    "ConvertPass",
    "SmoothQuantPass",
    "JLSSPass",
    "FoldSmoothingPass",
    "SegmentRunner",
    "activation_observer",
    "quantization_disabled",
    "ptq_passes",
    "detected_mixers",
    "iter_calibration_batches",
    "method_passes",
    "methods",
    "register_method",
    "split_stages",
    "trace_for_quantization",
    "ReparameterizeScanPass",
    "QuantizeScanStatePass",
    "scan_state_passes",
]

# k-scaled ViM PTQ (Shi et al.): scales by cosine similarity of layer outputs
from .similarity_search import SimilaritySearchPass  # noqa: E402

__all__ += ["SimilaritySearchPass"]
# OuroMamba-Quant (issue 11)
from .ouromamba import outlier_observer  # noqa: E402

__all__ += ["outlier_observer"]
