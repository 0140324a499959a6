"""The coverage report (issue 12 part 5): every linear, conv and scan, quantized or float, and why;
``vmfx.compile`` warns once, with the count, when layers the method would quantize stay float;
``vmfx inspect --coverage`` prints the report."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import vmfx
from vmfx.annotations import LINEAR_ROLES
from vmfx.cli import main
from vmfx.config import preset


def _count(model: nn.Module, types) -> int:
    return sum(isinstance(m, types) for m in model.modules())


def test_every_layer_of_a_quantized_vim_is_listed(tiny_model, tiny_images):
    with warnings.catch_warnings():
        warnings.simplefilter("error", vmfx.CoverageWarning)  # a full quantization: no warning
        qmodel = vmfx.compile(tiny_model, tiny_images, "minmax-w8a8")
    report = vmfx.inspect.coverage(qmodel)
    counts = report.counts()
    assert counts["linear"] == {"quantized": _count(tiny_model, nn.Linear) - 1, "float": 1}
    assert counts["conv"] == {"quantized": 0, "float": _count(tiny_model, (nn.Conv1d, nn.Conv2d))}
    assert counts["scan"] == {"quantized": 0, "float": 4}  # two mixers, two directions each
    (head,) = [layer for layer in report.layers if layer.kind == "linear" and not layer.quantized]
    assert head.name == "head" and head.category == "config" and "QuantConfig.roles" in head.reason
    assert all(layer.bits == "W8 A8" for layer in report.quantized)
    assert not report.unsupported
    text = str(report)
    assert "mixers_0_in_proj" in text and "float (design)" in text
    assert text.splitlines()[-1] == "0/5 convs quantized, 12/13 linears quantized, 0/4 scans quantized"


def test_a_lowered_model_reports_what_it_was_lowered_from(tiny_model, tiny_images, tmp_path):
    qmodel = vmfx.compile(tiny_model, tiny_images, "minmax-w8a8")
    lowered = vmfx.lowering.lower(qmodel, "reference")
    assert str(vmfx.inspect.coverage(lowered)) == str(vmfx.inspect.coverage(qmodel))  # not "0/13 linears"
    loaded = vmfx.load(vmfx.save(lowered, str(tmp_path / "lowered.safetensors")), model=tiny_model)
    # loaded from a file it keeps no quantized graph: its kernels say what they quantize
    report, expected = vmfx.inspect.coverage(loaded), vmfx.inspect.coverage(qmodel)
    assert report.summary_line() == expected.summary_line() == "0/5 convs quantized, 12/13 linears quantized, 0/4 scans quantized"
    assert sorted((l.name, l.role, l.quantized, l.bits) for l in report.layers if l.kind == "linear") == \
        sorted((l.name, l.role, l.quantized, l.bits) for l in expected.layers if l.kind == "linear")


def test_the_plan_for_a_float_model_is_what_compile_does(tiny_model, tiny_images):
    cfg = preset("minmax-w4a8").replace(roles=("in_proj", "out_proj"))
    plan = vmfx.inspect.coverage(tiny_model, cfg, example_inputs=tiny_images[:1])
    done = vmfx.inspect.coverage(vmfx.compile(tiny_model, tiny_images, cfg))
    assert plan.planned and not done.planned
    assert [(l.name, l.quantized, l.category) for l in plan.layers] == [(l.name, l.quantized, l.category) for l in done.layers]
    x_proj = [l for l in done.layers if l.role == "x_proj"]
    assert len(x_proj) == 4 and all(l.category == "config" and "'x_proj' is not in QuantConfig.roles" in l.reason
                                    for l in x_proj)
    assert {l.bits for l in done.quantized} == {"W4 A8"}
    assert plan.summary_line().startswith("planned under minmax-w4a8")


class _Branchy(nn.Module):
    """Python control flow on a tensor value: cannot be traced, so it stays float."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.gate = nn.Linear(dim, dim)

    def forward(self, x):
        if bool(x.abs().max() > 1e6):
            return x
        return x + self.gate(torch.relu(self.fc(x)))


class _VimWithBranchyBlock(nn.Module):
    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.extra = _Branchy(32)

    def forward(self, x):
        b = self.base
        x = b.patch(x).flatten(2).transpose(1, 2)
        for norm, mixer in zip(b.norms, b.mixers):
            x = x + mixer(norm(x))
        x = self.extra(x)
        return b.head(b.norm_f(x).mean(1))


def test_compile_warns_once_with_the_count_when_layers_stay_float(tiny_model, tiny_images):
    model = _VimWithBranchyBlock(tiny_model).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qmodel = vmfx.compile(model, tiny_images, "minmax-w8a8")
    partial = [w for w in caught if issubclass(w.category, vmfx.CoverageWarning)]
    assert len(partial) == 1
    message = str(partial[0].message)
    assert "left 2 layer(s) in float" in message and "extra.fc" in message and "extra.gate" in message
    report = vmfx.inspect.coverage(qmodel)
    assert [l.name for l in report.unsupported] == ["extra.fc", "extra.gate"]
    assert all("cannot be traced" in l.reason for l in report.unsupported)
    assert len(report.quantized) == 12  # the two mixers are quantized all the same
    x = tiny_images[:4]
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(model(x), qmodel(x), dim=-1).min() > 0.99


def test_linears_outside_mixers_get_the_generic_role(tiny_images):
    class WithMlp(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            from tests.conftest import TinyVimLike

            self.base = TinyVimLike()
            self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

        def forward(self, x):
            b = self.base
            x = b.patch(x).flatten(2).transpose(1, 2)
            x = x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))  # an MLP before the mixers
            for norm, mixer in zip(b.norms, b.mixers):
                x = x + mixer(norm(x))
            return b.head(b.norm_f(x).mean(1))

    model = WithMlp().eval()
    report = vmfx.inspect.coverage(vmfx.compile(model, tiny_images, "pts-w8a8"))
    mlp = [l for l in report.layers if l.name in ("fc1", "fc2")]
    assert [(l.role, l.quantized) for l in mlp] == [("linear", True), ("linear", True)]
    left_float = vmfx.inspect.coverage(vmfx.compile(model, tiny_images, preset("pts-w8a8").replace(roles=LINEAR_ROLES)))
    assert [(l.role, l.quantized, l.category) for l in left_float.layers if l.name in ("fc1", "fc2")] == \
        [("linear", False, "config")] * 2


def test_cli_inspect_coverage(capsys):
    assert main(["inspect", "--coverage"]) == 0
    out = capsys.readouterr().out
    assert "planned under minmax-w8a8" in out and "layers_0_mixer_in_proj" in out and "float (design)" in out
    assert "node  " not in out.splitlines()[0]  # the per-node table is not printed unless --table


def test_coverage_rejects_other_objects():
    with pytest.raises(vmfx.ConfigError, match="coverage expects"):
        vmfx.inspect.coverage("model.pth")


# -- every backbone: the report lists every linear and conv call and every scan ----------------------


def _backbones():
    from vmfx.models import VSSM, LocalVim, LocalVSSM, VisionMamba

    dirs = [("h", "h_flip", "w2", "w2_flip"), ("v", "v_flip", "w2", "w7_flip")]
    return {  # name -> (model builder, image size, scans)
        "vim": (lambda: VisionMamba(img_size=32, patch_size=8, stride=8, embed_dim=16, depth=2, num_classes=5), 32, 2 * 2),
        "vmamba-v2": (lambda: VSSM(depths=[1, 1, 1], dims=16, num_classes=6, ssm_d_state=1, ssm_ratio=1.0,
                                   forward_type="v05_noz", mlp_ratio=2.0, norm_layer="ln2d", downsample_version="v3",
                                   patchembed_version="v2"), 32, 3 * 4),
        "vmamba-v0": (lambda: VSSM(depths=[1, 1, 1], dims=16, num_classes=6, ssm_d_state=4, forward_type="v0",
                                   mlp_ratio=0.0, norm_layer="ln", downsample_version="v1", patchembed_version="v1"),
                      32, 3 * 4),
        "local-vim": (lambda: LocalVim(img_size=32, patch_size=8, depth=2, embed_dim=16, num_classes=5, rms_norm=True,
                                       residual_in_fp32=True, fused_add_norm=True, final_pool_type="mean",
                                       if_abs_pos_embed=True, bimamba_type="v2", directions=[list(d) for d in dirs]),
                      32, 2 * 4),
        "local-vssm": (lambda: LocalVSSM(depths=[1, 1], dims=8, num_classes=5, ssm_d_state=4, img_size=32,
                                         directions=[list(d) for d in dirs]), 32, 2 * 4),
    }


@pytest.mark.parametrize("name", list(_backbones()))
def test_every_layer_of_every_backbone_is_listed(name):
    build, size, scans = _backbones()[name]
    torch.manual_seed(0)
    model = build().eval()
    calls = {nn.Linear: 0, nn.Conv1d: 0, nn.Conv2d: 0}

    def count(module, args, out):  # every call of a layer, counted outside vmfx's tracing
        calls[type(module)] += 1

    hooks = [m.register_forward_hook(count) for m in model.modules() if type(m) in calls]
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    report = vmfx.inspect.coverage(model, "minmax-w8a8", example_inputs=x)
    counts = report.counts()
    assert sum(counts["linear"].values()) == calls[nn.Linear]
    assert sum(counts["conv"].values()) == calls[nn.Conv1d] + calls[nn.Conv2d]
    assert counts["scan"] == {"quantized": 0, "float": scans}
    assert not report.unsupported
    float_linears = [layer for layer in report.float_layers if layer.kind == "linear"]
    assert len(float_linears) == 1 and float_linears[0].category == "config"  # only the classifier head
    assert all(layer.reason for layer in report.float_layers)  # every float layer says why
