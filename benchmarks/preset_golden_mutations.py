"""How far small changes of a preset's quantization move the logits that tests/test_preset_golden.py
compares: the check that its tolerance (1e-5 of the logit scale) cannot pass such a change.

For each preset of that test, compiled exactly as the test compiles it, prints the largest
difference from the stored golden logits, relative to their largest magnitude, for

* ``none``: the code as it is (the test's own comparison);
* ``round->floor``: ``vmfx.ops.quantize.round_ste`` (the rounding of every fake quantizer)
  replaced by ``floor`` during calibration and inference;
* ``one-scale``: the scale of one quantizer (the first ``FakeQuantize`` of the graph that has a
  scale) multiplied by 1 + 2^-10 after compiling;
* ``all-scales``: every quantizer's scale multiplied by 1 + 2^-12 after compiling.

Run from the repository root::

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/preset_golden_mutations.py
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch

import vmfx
import vmfx.ops.quantize as quantize_ops
from tests.test_preset_golden import (CALIB_IMAGES, GOLDEN_PATH, PRESETS, TEST_IMAGES, compare, preset_logits,
                                      short_config)
from vmfx.data import load_digits, load_proxy_model
from vmfx.quant.modules import FakeQuantize


@contextlib.contextmanager
def floor_rounding():
    """Replace the fake quantizers' round (``round_ste``) by floor, straight-through."""
    original = quantize_ops.round_ste
    quantize_ops.round_ste = lambda x: x + (torch.floor(x) - x).detach()
    try:
        yield
    finally:
        quantize_ops.round_ste = original


def scaled_logits(qmodel, test: torch.Tensor, factor: float, first_only: bool) -> torch.Tensor:
    """``qmodel``'s logits after multiplying its quantizers' scales (or only the first's) by ``factor``."""
    with torch.no_grad():
        for module in qmodel.modules():
            if isinstance(module, FakeQuantize) and isinstance(module.scale, torch.Tensor):
                module.scale.mul_(factor)
                if first_only:
                    break
        return qmodel(test).float()


def main() -> None:
    golden = torch.load(GOLDEN_PATH)
    model = load_proxy_model()
    calib = load_digits("train")[0][:CALIB_IMAGES]
    test = load_digits("test")[0][:TEST_IMAGES]
    print(f"{'preset':18s} {'none':>10s} {'round->floor':>13s} {'one-scale':>10s} {'all-scales':>10s}")
    for name in PRESETS:
        torch.manual_seed(0)  # as preset_logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qmodel = vmfx.compile(model, calib, short_config(name))
        with torch.no_grad():
            row = [compare(name, qmodel(test).float(), golden[name])[1]]
        with floor_rounding():
            row.append(compare(name, preset_logits(name, model, calib, test), golden[name])[1])
        for factor, first_only in ((1 + 2**-10, True), (1 + 2**-12, False)):
            mutated = copy.deepcopy(qmodel)
            row.append(compare(name, scaled_logits(mutated, test, factor, first_only), golden[name])[1])
        print(f"{name:18s} " + " ".join(f"{v:>{w}.3g}" for v, w in zip(row, (10, 13, 10, 10))), flush=True)


if __name__ == "__main__":
    main()
