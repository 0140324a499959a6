"""The exceptions vmfx raises.

Every error a user can cause names the problem and the way out. They live here, at the bottom of the
import graph, so that every layer can raise them and users can catch them from ``vmfx`` directly.
"""

from __future__ import annotations

__all__ = [
    "VmfxError",
    "TraceError",
    "ConfigError",
    "CalibrationDataError",
    "CheckpointError",
    "PassError",
    "SerializationError",
    "LoweringError",
    "InputError",
    "CalibrationDataWarning",
    "LayoutError",
    "ModelStateWarning",
    "ConfigWarning",
]


class VmfxError(Exception):
    """Base class of every error vmfx raises on purpose."""


class TraceError(VmfxError):
    """A model could not be traced into a torch.fx graph.

    The message names the module being traced, the source line that failed and the way out
    (register a leaf module or an adapter). The original exception is chained as ``__cause__``.

    Attributes:
        module_path: qualified name of the innermost module being traced ("" for the root).
        module_type: the class name of that module.
        source: ``"file:line: code"`` of the failing line in user code, when it could be found.
    """

    def __init__(self, message: str, module_path: str = "", module_type: str = "", source: str = ""):
        super().__init__(message)
        self.module_path = module_path
        self.module_type = module_type
        self.source = source


class ConfigError(VmfxError, ValueError):
    """An invalid quantization config, spec, preset name or argument."""


class CalibrationDataError(VmfxError, ValueError):
    """Calibration (or evaluation) data that cannot be used: empty, wrong shape, NaN/Inf."""


class CheckpointError(VmfxError, ValueError):
    """A checkpoint that does not fit the model (missing, unexpected or wrong-shape keys) or
    that cannot be read safely."""


class PassError(VmfxError):
    """A pass failed, or its requirements did not hold. The message names the pass, the node
    (where there is one) and the passes that ran before it."""


class SerializationError(VmfxError, ValueError):
    """A saved quantized model that is truncated, tampered with or of an unknown version."""


class LoweringError(VmfxError):
    """Lowering could not take part of a quantized graph (raised in ``strict`` mode; otherwise a
    warning lists the quantized nodes left in float)."""


class InputError(VmfxError, ValueError):
    """An input a (quantized) model cannot take: e.g. another image size than the one it was
    traced and calibrated for."""


class CalibrationDataWarning(UserWarning):
    """Calibration data that can be used but probably should not be: values far outside what a
    normalized image holds (see :data:`vmfx.passes.calibrate.NORMALIZED_ABS_LIMIT`), or constant images."""


class ModelStateWarning(UserWarning):
    """A model in a state vmfx works around but the user may not expect: in training mode (it is
    quantized in eval mode), or with forward hooks (they stop running on quantized layers)."""


class ConfigWarning(UserWarning):
    """A config that works but probably does not do what was meant: e.g. a rule selecting a role
    the model does not have (a config shared across model families may mean it)."""


class LayoutError(VmfxError, ValueError):
    """The token layout of a tensor is unknown or does not fit what was asked of it: a per-token
    spec on an edge whose token dims detection could not infer, a tensor whose shape does not match
    its recorded :class:`vmfx.token_layout.TokenLayout`, or static per-token scales on a merged
    ``(batch * tokens)`` dim. The message names the tensor (node or shape) and the way out."""
