"""A quantization method in one file, outside vmfx: min-max calibration, then every static
activation step size of the quantized linears multiplied by ``ratio`` (clipping the range's tails).

It uses only names that ``vmfx`` and ``vmfx.passes`` export: its options class, a config section
of its own (``clip_scope``: which linears are clipped; ``vmfx.register_section``), its pass, the
method (``vmfx.register_method``) and its presets (``vmfx.register_preset``). Importing this file
registers them; ``vmfx eval --plugin tests/plugins/clip_method.py --config clip-w8a8`` does so from
the command line.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch

import vmfx
from vmfx.passes import FakeQuantize, Pass, PassResult, ptq_passes, quantized_linears


@dataclass(frozen=True)
class ClipOptions:
    """The method's own options (saved with the config).

    Args:
        ratio: each static activation step size is multiplied by this, in (0, 1].
    """

    ratio: float = 0.9

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio <= 1:
            raise vmfx.ConfigError(f"ClipOptions.ratio must be a number in (0, 1], got {self.ratio!r}")


@dataclass(frozen=True)
class ClipScope:
    """A config section (``clip_scope``, saved with the config): the linears the clip method clips.

    Args:
        module: a shell-style pattern of the linears' module paths (``"layers.0.*"``).
    """

    module: str = "*"

    def __post_init__(self):
        if not isinstance(self.module, str) or not self.module:
            raise vmfx.ConfigError(f"ClipScope.module must be a non-empty module path pattern, got {self.module!r}")


vmfx.register_section("clip_scope", ClipScope)


class ClipActivationScalesPass(Pass):
    """Multiply the step size of every static input quantizer of a quantized linear whose module
    path matches ``module`` by ``ratio``.

    Invariants: the graph is unchanged; only those step sizes change.
    """

    requires_facts = ("quantizers_calibrated",)

    def __init__(self, ratio: float, module: str = "*"):
        self.ratio, self.module = ratio, module

    def call(self, gm, ctx):
        clipped = 0
        for edges in quantized_linears(gm):
            if edges.module is None or not fnmatch.fnmatchcase(edges.module, self.module):
                continue
            quantizer = edges.quantizer("input")
            if isinstance(quantizer, FakeQuantize) and quantizer.scale is not None:
                with torch.no_grad():
                    quantizer.scale.mul_(self.ratio)
                clipped += 1
        if not clipped:
            raise self.fail(f"no static input quantizer of a linear matching {self.module!r} to clip")
        return PassResult(gm, True)


@vmfx.register_method("clip", options=ClipOptions)
def clip_passes(config: vmfx.QuantConfig) -> list:
    """min-max's passes, then the clipping pass (on the linears ``config.clip_scope`` selects; all
    when the config has no such section)."""
    scope = config.clip_scope or ClipScope()
    return ptq_passes(config) + [ClipActivationScalesPass(config.options.ratio, scope.module)]


for _w, _a in ((8, 8), (4, 8)):
    vmfx.register_preset(f"clip-w{_w}a{_a}", vmfx.preset(f"minmax-w{_w}a{_a}").replace(method="clip"))
