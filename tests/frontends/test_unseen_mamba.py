"""Code vmfx has never seen (issue 12 part 4): a Mamba-style model written here from scratch, with
its own class names, parameter names and scan functions, is traced around its untraceable scan,
its mixer is recognised by structure, every linear is quantized, and the logits stay within the
minmax-w8a8 cosine floor of the canonical Vim measured in the same setting. A module whose own
forward cannot be traced stays float, the rest is quantized, and vmfx says so."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vmfx
from vmfx.annotations import annotation
from vmfx.config import QuantRule, preset
from vmfx.frontends import FallbackWarning, trace_with_fallback
from vmfx.passes.patterns import is_linear


# -- the model, written from scratch: its own names, its own scans --------------------------------


def loop_scan(u, dt, A, Bs, Cs, skip):
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t ; y_t = <C_t, h_t> + skip u_t. Token-major (b, l, d)."""
    b, l, d = u.shape
    h = u.new_zeros(b, d, A.shape[1])
    outs = []
    for t in range(l):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t, :, None] * u[:, t, :, None]) * Bs[:, t, None, :]
        outs.append((h * Cs[:, t, None, :]).sum(-1))
    return torch.stack(outs, dim=1) + u * skip


def cumsum_scan(u, dt, A, Bs, Cs, skip, chunk=64):
    """The same recurrence as a closed form with cumulative sums, in chunks of ``chunk`` steps."""
    if u.shape[1] > chunk:
        raise ValueError("sequence longer than one chunk")
    log_decay = torch.cumsum(dt[..., None] * A, dim=1)            # (b, l, d, n)
    inputs = (dt * u)[..., None] * Bs[:, :, None, :]
    h = torch.exp(log_decay) * torch.cumsum(torch.exp(-log_decay) * inputs, dim=1)
    return (h * Cs[:, :, None, :]).sum(-1) + u * skip


class SeqMixer(nn.Module):
    def __init__(self, width, state=8, kernel=4, scan=loop_scan):
        super().__init__()
        inner, rank = 2 * width, max(1, width // 8)
        self.widen = nn.Linear(width, 2 * inner, bias=False)
        self.local = nn.Conv1d(inner, inner, kernel, groups=inner, padding=kernel - 1)
        self.to_params = nn.Linear(inner, rank + 2 * state, bias=False)
        self.to_step = nn.Linear(rank, inner)
        self.log_rates = nn.Parameter(torch.log(torch.arange(1, state + 1).float()).repeat(inner, 1))
        self.skip = nn.Parameter(torch.ones(inner))
        self.narrow = nn.Linear(inner, width, bias=False)
        self.rank, self.state, self.inner, self.scan = rank, state, inner, scan
        with torch.no_grad():
            self.to_step.bias.copy_(torch.log(torch.expm1(torch.full((inner,), 0.05))))

    def forward(self, tokens):
        length = tokens.shape[1]
        a, gate = self.widen(tokens).split(self.inner, dim=-1)
        a = F.silu(self.local(a.transpose(1, 2))[..., :length]).transpose(1, 2)
        step, Bs, Cs = self.to_params(a).split([self.rank, self.state, self.state], dim=-1)
        step = F.softplus(self.to_step(step))
        y = self.scan(a, step, -torch.exp(self.log_rates), Bs, Cs, self.skip)
        return self.narrow(y * F.silu(gate))


class Layer(nn.Module):
    def __init__(self, width, scan):
        super().__init__()
        self.pre = nn.LayerNorm(width)
        self.mix = SeqMixer(width, scan=scan)

    def forward(self, x):
        return x + self.mix(self.pre(x))


class TinySSMNet(nn.Module):
    def __init__(self, scan=loop_scan, width=32, depth=2, classes=10, patch=4, channels=1, image=16):
        super().__init__()
        self.stem = nn.Conv2d(channels, width, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2, width) * 0.02)
        self.layers = nn.ModuleList(Layer(width, scan) for _ in range(depth))
        self.final = nn.LayerNorm(width)
        self.classify = nn.Linear(width, classes)

    def forward(self, images):
        x = self.stem(images).flatten(2).transpose(1, 2) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.classify(self.final(x).mean(1))


def inline_scan(u, dt, A, Bs, Cs, skip):
    """cumsum_scan without the length check: fully traceable, so it is traced op by op."""
    log_decay = torch.cumsum(dt[..., None] * A, dim=1)
    inputs = (dt * u)[..., None] * Bs[:, :, None, :]
    h = torch.exp(log_decay) * torch.cumsum(torch.exp(-log_decay) * inputs, dim=1)
    return (h * Cs[:, :, None, :]).sum(-1) + u * skip


class Moody(nn.Module):
    """A block whose own forward branches on a tensor value: untraceable, kept in float."""
    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        if x.mean() > 100:
            return x
        return x + self.lin(x)


# -- the setting shared by the from-scratch models and the canonical Vim ---------------------------

WIDTH, DEPTH, IMAGE, PATCH, CLASSES = 32, 2, 16, 4, 10


def _config():
    """minmax-w8a8, plus the classifier head, so that every linear of the model is quantized."""
    cfg = preset("minmax-w8a8")
    return cfg.replace(rules=(QuantRule("input", cfg.activation, role="head"),
                              QuantRule("weight", cfg.weight, role="head")))


def _images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 1, IMAGE, IMAGE, generator=g), torch.randn(16, 1, IMAGE, IMAGE, generator=g)


def _logits_cosine(model: nn.Module) -> tuple[float, torch.fx.GraphModule]:
    calib, test = _images()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        qmodel = vmfx.compile(model, calib, _config())
    with torch.no_grad():
        ref, out = model(test), qmodel(test)
    return F.cosine_similarity(ref.double(), out.double(), dim=-1).min().item(), qmodel


@pytest.fixture(scope="module")
def vim_floor() -> float:
    """The canonical Vim's minmax-w8a8 logits cosine (worst test image) in this very setting."""
    from vmfx.models.vim import vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2 as vim_t

    torch.manual_seed(0)
    vim = vim_t(img_size=IMAGE, patch_size=PATCH, stride=PATCH, embed_dim=WIDTH, depth=DEPTH, channels=1,
                num_classes=CLASSES).eval()
    cosine, _ = _logits_cosine(vim)
    print(f"canonical Vim, minmax-w8a8 (+head): worst logits cosine {cosine:.6f}")
    return cosine


@pytest.mark.parametrize("scan", [loop_scan, cumsum_scan, inline_scan], ids=["loop", "cumsum", "inline"])
def test_from_scratch_mamba_is_recognised_and_quantized(scan, vim_floor):
    torch.manual_seed(0)
    model = TinySSMNet(scan, width=WIDTH, depth=DEPTH, classes=CLASSES, patch=PATCH, image=IMAGE).eval()
    cosine, qmodel = _logits_cosine(model)
    print(f"{scan.__name__}: worst logits cosine {cosine:.6f} (Vim floor {vim_floor:.6f})")

    # the mixer, found by structure: one per layer, with the roles of the canonical mixer
    mixers = qmodel.meta["vmfx_mixers"]
    assert len(mixers) == DEPTH
    roles = {}
    for node in qmodel.graph.nodes:
        ann = annotation(node)
        if ann is not None:
            roles.setdefault(ann.role, []).append(node)
    for role in ("in_proj", "conv1d", "conv_act", "x_proj", "dt_proj", "scan", "gate", "out_proj"):
        assert len(roles.get(role, [])) == DEPTH * (2 if role == "gate" else 1), role
    for node in roles["scan"]:
        assert annotation(node).extra["structural"] == ("inline" if scan is inline_scan else "leaf")
        if scan is not inline_scan:
            assert node.target is scan  # the smallest untraceable callable is the leaf
    expected = {f"layers.{i}.mix.{n}" for i in range(DEPTH) for n in ("widen", "to_params", "to_step", "narrow")}
    by_role = {n.meta.get("vmfx_module"): annotation(n).role
               for n in qmodel.graph.nodes if is_linear(n)}
    assert {by_role[f"layers.{i}.mix.{n}"] for i in range(DEPTH) for n in ("widen",)} == {"in_proj"}
    assert {by_role[f"layers.{i}.mix.{n}"] for i in range(DEPTH) for n in ("narrow",)} == {"out_proj"}

    # every linear of the model is quantized (weights and inputs)
    report = vmfx.inspect.coverage(qmodel)
    linears = [layer for layer in report.layers if layer.kind == "linear"]
    assert {n.meta.get("vmfx_module") for n in qmodel.graph.nodes if is_linear(n)} == expected | {"classify"}
    assert len(linears) == sum(isinstance(m, nn.Linear) for m in model.modules())
    assert all(layer.quantized and layer.bits == "W8 A8" for layer in linears), str(report)
    assert not report.unsupported

    # and the logits stay within the canonical Vim's floor
    assert cosine >= vim_floor - 1e-4


def test_fallback_makes_the_scan_function_a_leaf_and_says_so():
    torch.manual_seed(0)
    model = TinySSMNet(loop_scan).eval()
    with pytest.warns(FallbackWarning, match="loop_scan"):
        gm = trace_with_fallback(model, (torch.randn(1, 1, 16, 16),))
    (decision,) = gm.meta["vmfx_fallback"]
    assert decision["kind"] == "leaf_function" and decision["target"].endswith("loop_scan")
    assert decision["module"] == "layers.0.mix" and "range(l)" in decision["source"]
    assert sum(n.target is loop_scan for n in gm.graph.nodes) == 2
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    assert model.layers[0].mix.scan is loop_scan  # the swapped attribute is restored


def test_untraceable_module_stays_float_and_the_rest_is_quantized():
    torch.manual_seed(0)
    model = TinySSMNet(cumsum_scan).eval()
    model.layers.append(Moody(32))
    calib, test = _images()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qmodel = vmfx.compile(model, calib, "minmax-w8a8")
    fallback = [w for w in caught if issubclass(w.category, FallbackWarning)]
    partial = [w for w in caught if issubclass(w.category, vmfx.CoverageWarning)]
    assert len(fallback) == 1 and "Moody" in str(fallback[0].message)
    assert len(partial) == 1 and "left 1 layer(s) in float" in str(partial[0].message)
    assert "layers.2.lin" in str(partial[0].message)
    kinds = [d["kind"] for d in qmodel.meta["vmfx_fallback"]]
    assert kinds == ["leaf_function", "float_module"]
    report = vmfx.inspect.coverage(qmodel)
    (moody,) = report.unsupported
    assert moody.name == "layers.2.lin" and "cannot be traced" in moody.reason
    assert len([layer for layer in report.quantized if layer.kind == "linear"]) == 8
    with torch.no_grad():
        cos = F.cosine_similarity(model(test), qmodel(test), dim=-1).min().item()
    assert cos > 0.999


class _RootBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # in the root's own forward: nothing smaller to isolate
            return self.lin(x)
        return x


def test_untraceable_root_forward_is_still_a_trace_error():
    with pytest.raises(vmfx.TraceError, match="control flow"):
        trace_with_fallback(_RootBranches())


def test_save_and_load_round_trip_with_the_leaf_scan(tmp_path):
    torch.manual_seed(0)
    model = TinySSMNet(loop_scan).eval()
    calib, test = _images()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        qmodel = vmfx.compile(model, calib, "minmax-w8a8")
        path = vmfx.save(qmodel, str(tmp_path / "scratch.safetensors"))
        loaded = vmfx.load(path, model=model)  # re-traced around the same leaf, edits replayed
    with torch.no_grad():
        torch.testing.assert_close(loaded(test), qmodel(test), rtol=0, atol=0)
