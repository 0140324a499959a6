"""VMamba (vmfx.models.VSSM) against the OFFICIAL code (MzeroMiko/VMamba ``classification/models``):
the same weights, built and randomised by the official ``VSSM`` and loaded strictly into vmfx's,
give the official logits; an official checkpoint file loads through ``load_checkpoint``; the
official entry points' arguments are vmfx's. The official code runs on the CPU through its own
pure-torch paths (``selective_scan_torch``, ``CrossScanF`` / ``CrossMergeF``; see
``official_vmamba.py``), in float32 like vmfx.

"Relative difference" below is ``max |ours - official| / max |official|`` over a batch's logits.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import vmfx.models
from vmfx.models import VSSM, VMAMBA_VARIANTS

from .official_vmamba import import_official_vmamba

# The generations vmfx builds, as in the official entry points (vmamba.py: vanilla_vmamba_*,
# vmamba_*_s2l*, vmamba_*_s1l*), written out here rather than taken from vmfx's table:
V0 = dict(ssm_d_state=16, ssm_ratio=2.0, ssm_conv_bias=True, forward_type="v0", mlp_ratio=0.0,
          norm_layer="ln", downsample_version="v1", patchembed_version="v1")
V2 = dict(ssm_d_state=1, ssm_ratio=2.0, ssm_conv_bias=False, forward_type="v05_noz", mlp_ratio=4.0,
          norm_layer="ln2d", downsample_version="v3", patchembed_version="v2")
GENERATIONS = {
    "v0": V0,  # Vanilla-VMamba: z gate, d_state 16, PatchMerging2D, channel-last
    "v2": V2,  # s2lX: ssm_ratio 2, v05_noz (grouped conv1d projections), ln2d
    "v2v": dict(V2, ssm_ratio=1.0),  # s1lX (vmamba_tiny_s1l8, PTQ4VM's model): ssm_ratio 1
    "v2v-ln": dict(V2, ssm_ratio=1.0, norm_layer="ln"),  # the entry points' channel_first=False
    "v2-v3_noz": dict(V2, forward_type="v3_noz"),  # the configs' twin: einsum projections, "oflex" scan
}
TINY = dict(depths=[1, 2, 1], dims=16, num_classes=7, drop_path_rate=0.0)
# non-square, odd grids: v1 36x52 -> 9x13 -> 5x7 -> 3x4 (PatchMerging pads); v2 -> 9x13 -> 5x7 -> 3x4
SIZES = ((36, 52), (32, 32))

# Measured (these weights and images, float32, one thread; the worse of the two image sizes): relative
# differences 9.1e-7 (v0), 6.1e-7 (v2), 3.1e-7 (v2v), 2.8e-7 (v2v-ln), 6.1e-7 (v2-v3_noz), with
# logits of std 0.3 to 0.8. The bound is the 1e-4.
RTOL = 1e-4


def images(n: int, seed: int, size) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def randomize(state: dict, seed: int) -> dict:
    """Fresh random values so that every parameter matters: norms, Ds near 1; A_logs in Mamba's range;
    dt biases for steps of 0.05 to 1 (wider than the init's 0.001 to 0.1, so that the recurrence, not
    only the D skip, shapes the scan's output); weights of fan-in scale (the official init leaves the
    mixers' out_proj and the head at 0.02 and every bias at 0)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        r = torch.randn(v.shape, generator=g)
        if k.endswith("A_logs"):
            r = torch.log(torch.rand(v.shape, generator=g) * 8 + 1)
        elif k.endswith("dt_projs_bias"):  # softplus(bias) log-uniform in [0.05, 1]
            r = torch.log(torch.expm1(0.05 * 20 ** torch.rand(v.shape, generator=g)))
        elif k.endswith("Ds") or k.endswith("norm.weight") or k.endswith("norm2.weight"):
            r = 1 + 0.2 * r
        elif k.endswith(("x_proj_weight", "dt_projs_weight")):  # (K, out, in): K stacked linears
            r = r / math.sqrt(v.shape[-1])
        elif v.dim() >= 2:  # linears (out, in), convs (out, in / groups, kh, kw)
            r = r / math.sqrt(v[0].numel())
        else:
            r = 0.1 * r
        out[k] = r.to(v.dtype)
    return out


def relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        yield import_official_vmamba(tmp_path_factory.mktemp("vmamba_official"), mp)
    finally:
        mp.undo()


def official_pair(official, generation: str, seed: int = 1):
    """(official VSSM, its randomised state dict), both eval."""
    args = dict(GENERATIONS[generation], **TINY)
    torch.manual_seed(0)
    theirs = official.VSSM(**args).eval()
    state = randomize(theirs.state_dict(), seed)
    theirs.load_state_dict(state)
    return theirs, state, args


@pytest.mark.parametrize("generation", sorted(GENERATIONS))
def test_logits_equal_the_official_code_on_the_same_weights(official, generation):
    theirs, state, args = official_pair(official, generation)
    ours = VSSM(**args).eval()
    ours.load_state_dict(state, strict=True)  # the official keys and shapes, as they are
    for i, size in enumerate(SIZES):
        x = images(2, 10 + i, size)
        with torch.no_grad():
            want, got = theirs(x), ours(x)
        assert want.shape == got.shape == (2, TINY["num_classes"])
        assert float(want.std()) > 0.1  # logits of order 1, not a near-constant output
        rel = relative_difference(got, want)
        assert rel <= RTOL, f"{generation} {size}: relative difference {rel:.2e}"
    back = ours.state_dict()  # and vmfx's state dict is the official one again
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("generation", ["v0", "v2v"])
def test_the_comparison_sees_a_wrong_scan_direction(official, generation):
    """The check can fail: the column-major and reversed row-major directions' projections swapped
    (a plausible port error) move the logits beyond the bound (measured: 0.16 for v0, 0.013 for
    v2v, whose d_state is 1)."""
    theirs, state, args = official_pair(official, generation)
    wrong = dict(state)
    for key in [k for k in state if k.endswith(("op.x_proj_weight", "op.dt_projs_weight", "op.dt_projs_bias"))]:
        wrong[key] = state[key][[0, 2, 1, 3]].clone()
    ours = VSSM(**args).eval()
    ours.load_state_dict(wrong, strict=True)
    x = images(2, 10, SIZES[0])
    with torch.no_grad():
        assert relative_difference(ours(x), theirs(x)) > 10 * RTOL


def test_an_official_checkpoint_file_loads_through_load_checkpoint(official, tmp_path):
    theirs, state, args = official_pair(official, "v2v", seed=3)
    # the release's dict: "model" (official VSSM.state_dict()), "model_ema", training records
    torch.save({"model": theirs.state_dict(), "model_ema": state, "epoch": 264, "max_accuracy": 82.6},
               tmp_path / "vssm1_tiny.pth")
    with torch.device("meta"):
        ours = VSSM(**args)
    record = vmfx.models.load_checkpoint(ours, tmp_path / "vssm1_tiny.pth")
    assert record.key == "model" and not record.missing_keys and not record.unexpected_keys
    x = images(2, 12, SIZES[0])
    with torch.no_grad():
        assert relative_difference(ours.eval()(x), theirs(x)) <= RTOL


def test_the_official_entry_points_arguments_are_vmfx_variants(official, monkeypatch):
    monkeypatch.setattr(official, "VSSM", lambda **kw: kw)  # the entry points' arguments, no model built
    defaults = {k: p.default for k, p in inspect.signature(VSSM).parameters.items()
                if p.default is not inspect.Parameter.empty}
    for name, (args, *_) in VMAMBA_VARIANTS.items():
        theirs = getattr(official, name)()
        ours = {**defaults, **args}
        differ = {k: (v, ours.get(k)) for k, v in theirs.items() if ours.get(k) != v}
        assert differ == {}, name
