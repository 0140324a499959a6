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
from .config import (
    PRESETS,
    InitConfig,
    JLSSConfig,
    OutlierConfig,
    QuantConfig,
    QuantRule,
    ScanStateConfig,
    Selector,
    SettingRule,
    SimilaritySearchConfig,
    SmoothingConfig,
    preset,
    preset_names,
    register_preset,
    register_section,
)
from .coverage import CoverageWarning
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
from .frontends.fallback import FallbackWarning
from .passes import Pipeline, register_method
from .quant import QuantSpec
from .plugins import load_plugin
from .serialize import load, save
from .version import __version__


__all__ = [
    # the one-liner and the staged API
    "compile",
    "trace",
    "prepare",
    "calibrate",
    "convert",
    "save",
    "load",
    "Pipeline",
    # configs: presets, specs, rules and per-method settings
    "QuantConfig",
    "QuantRule",
    "QuantSpec",
    "Selector",
    "SettingRule",
    "InitConfig",
    "SmoothingConfig",
    "JLSSConfig",
    "SimilaritySearchConfig",
    "OutlierConfig",
    "ScanStateConfig",
    "preset",
    "PRESETS",
    "preset_names",
    # plug-in methods
    "register_method",
    "register_preset",
    "register_section",
    "load_plugin",
    # debugging
    "inspect",
    "ops",
    # errors and warnings
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
