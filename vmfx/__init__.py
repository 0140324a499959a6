"""vmfx: a post-training quantization compiler for Vision Mamba models, built on torch.fx.

    import vmfx, vmfx.models
    qmodel = vmfx.compile(model, calib_images, config="minmax-w8a8")
    print(vmfx.inspect.table(qmodel))
    vmfx.inspect.compare(model, qmodel, images)

Models are traced into fx graphs; passes detect the Mamba patterns, insert observers, calibrate
and convert; see ``vmfx.passes`` for custom pipelines and ``vmfx.inspect`` for debugging.
"""

from . import inspect, ops
from .api import calibrate, compile, convert, prepare, trace
from .config import PRESETS, QuantConfig, QuantRule, preset, preset_names
from .errors import (
    CalibrationDataError,
    CalibrationDataWarning,
    CheckpointError,
    ConfigError,
    ConfigWarning,
    InputError,
    LayoutError,
    LoweringError,
    ModelStateWarning,
    PassError,
    SerializationError,
    TraceError,
    VmfxError,
)
from .passes import Pipeline
from .quant import QuantSpec
from .serialize import load, save
# issue 12 (unseen code, coverage): warnings of the tracing fallback and of partial quantization
from .coverage import CoverageWarning
from .frontends.fallback import FallbackWarning

__version__ = "0.1.0"

__all__ = [
    "compile",
    "trace",
    "prepare",
    "calibrate",
    "convert",
    "save",
    "load",
    "Pipeline",
    "QuantConfig",
    "QuantRule",
    "preset",
    "QuantSpec",
    "PRESETS",
    "preset_names",
    "inspect",
    "ops",
    "VmfxError",
    "TraceError",
    "ConfigError",
    "CalibrationDataError",
    "CalibrationDataWarning",
    "CheckpointError",
    "PassError",
    "SerializationError",
    "LoweringError",
    "InputError",
    "LayoutError",
    "CoverageWarning",
    "FallbackWarning",
    "ConfigWarning",
    "ModelStateWarning",
]

# k-scaled ViM PTQ (Shi et al.): the similarity search's config
from .config import SimilaritySearchConfig  # noqa: E402

__all__ += ["SimilaritySearchConfig"]

# -- the scan's quantized hidden state (issue 10 parts 3-5) --
from .config import ScanStateConfig  # noqa: E402

__all__ += ["ScanStateConfig"]
