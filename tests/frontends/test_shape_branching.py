"""Third-party code whose Python branches on sizes (issue 23 part 2): a pure-PyTorch Vim-like model
whose mixer reads sizes as Python ints (``int(x.size(-1))``, ``if L % 2``, ``for t in range(L)``,
a chunked or a looped scan chosen by ``if L == next_power_of_two(L)``) is traced specialised to the
example's shape (vmfx.frontends.concrete), its mixers are detected in every block, every linear is
quantized, and the logits stay close to float. Control flow on tensor *values* still fails to trace:
only the function holding it stays opaque (its mixer's linears are quantized), and a Python loop
over the batch is refused rather than frozen to the example's batch size."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import vmfx
from vmfx.annotations import annotation
from vmfx.config import QuantRule, preset
from vmfx.frontends import FallbackWarning, trace, trace_with_fallback
from vmfx.passes.patterns import is_linear

WIDTH, DEPTH, PATCH, CLASSES = 32, 2, 4, 10


def next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


# -- the model: sizes read as Python ints all over its mixer ----------------------------------------


class ShapeMixer(nn.Module):
    """in_proj -> causal depthwise conv1d -> SiLU -> x_proj -> dt_proj -> selective scan (a method:
    chunked closed form when the length is a power of two, a loop over time steps otherwise) ->
    gate -> out_proj. ``value_scan`` replaces the method by a module-level function."""

    def __init__(self, width: int, state: int = 8, kernel: int = 4, value_scan=None):
        super().__init__()
        inner, rank = 2 * width, max(1, width // 8)
        self.in_proj = nn.Linear(width, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(inner, inner, kernel, groups=inner, padding=kernel - 1)
        self.x_proj = nn.Linear(inner, rank + 2 * state, bias=False)
        self.dt_proj = nn.Linear(rank, inner)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state + 1).float()).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, width, bias=False)
        self.rank, self.state, self.value_scan = rank, state, value_scan
        with torch.no_grad():
            self.dt_proj.bias.copy_(torch.log(torch.expm1(torch.full((inner,), 0.05))))

    def forward(self, x):
        batch, length, _ = x.shape
        inner = int(x.size(-1)) * 2          # a size as a Python int
        assert x.dim() == 3, "tokens must be (B, L, D)"
        xz = self.in_proj(x)
        u, z = xz.split(inner, dim=-1)
        u = self.conv1d(u.transpose(1, 2))[..., :length]
        if length % 2:                        # Python control flow on a size
            u = u.contiguous()
        u = F.silu(u).transpose(1, 2)
        dt, B, C = self.x_proj(u).split([self.rank, self.state, self.state], dim=-1)
        dt = F.softplus(self.dt_proj(dt))
        A = -torch.exp(self.A_log)
        scan = self.value_scan if self.value_scan is not None else self.selective_scan
        y = scan(u, dt, A, B, C, self.D)
        return self.out_proj(y * F.silu(z))

    def selective_scan(self, u, dt, A, B, C, D):
        L = u.shape[1]
        if L == next_power_of_two(L):
            return self.chunked_scan(u, dt, A, B, C, D, chunk=min(L, 8))
        return self.loop_scan(u, dt, A, B, C, D)

    @staticmethod
    def loop_scan(u, dt, A, B, C, D):
        """h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t ; y_t = <C_t, h_t> + D u_t, one step at a time."""
        h = torch.zeros(u.shape[0], u.shape[2], A.shape[1], dtype=u.dtype)
        ys = []
        for t in range(u.shape[1]):
            h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t, :, None] * u[:, t, :, None]) * B[:, t, None, :]
            ys.append((h * C[:, t, None, :]).sum(-1))
        return torch.stack(ys, dim=1) + u * D

    @staticmethod
    def chunked_scan(u, dt, A, B, C, D, chunk):
        """The same recurrence in closed form (cumulative sums) within chunks of ``chunk`` steps,
        the state carried from chunk to chunk."""
        batch, length, inner = u.shape
        h = u.new_zeros(batch, inner, A.shape[1])
        ys = []
        for start in range(0, length, chunk):
            d, x = dt[:, start:start + chunk], u[:, start:start + chunk]
            log_decay = torch.cumsum(d[..., None] * A, dim=1)                       # (b, c, d, n)
            inputs = (d * x)[..., None] * B[:, start:start + chunk, None, :]
            states = torch.exp(log_decay) * (h[:, None] + torch.cumsum(torch.exp(-log_decay) * inputs, dim=1))
            ys.append((states * C[:, start:start + chunk, None, :]).sum(-1))
            h = states[:, -1]
        return torch.cat(ys, dim=1) + u * D


def value_branch_scan(u, dt, A, B, C, D):
    """A scan that branches on a tensor's values: never traceable, kept as one opaque call."""
    if dt.max() > 1e3:
        raise ValueError("diverging step sizes")
    return ShapeMixer.loop_scan(u, dt, A, B, C, D)


class Block(nn.Module):
    def __init__(self, width, value_scan=None):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mixer = ShapeMixer(width, value_scan=value_scan)

    def forward(self, x):
        return x + self.mixer(self.norm(x))


class ShapeVim(nn.Module):
    """Patch conv -> (class token) -> blocks -> norm -> mean -> head, sizes read as ints too."""

    def __init__(self, image=16, cls_token=False, value_scan=None):
        super().__init__()
        self.patch_embed = nn.Conv2d(1, WIDTH, PATCH, PATCH)
        tokens = (image // PATCH) ** 2 + int(cls_token)
        self.cls_token = nn.Parameter(torch.randn(1, 1, WIDTH) * 0.02) if cls_token else None
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, WIDTH) * 0.02)
        self.blocks = nn.ModuleList(Block(WIDTH, value_scan) for _ in range(DEPTH))
        self.norm_f = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if x.shape[1] != self.pos_embed.shape[1]:  # size check in the root's own forward
            raise ValueError(f"{x.shape[1]} tokens, the position embedding has {self.pos_embed.shape[1]}")
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm_f(x).mean(1))


def _images(image=16, calib=16, test=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(calib, 1, image, image, generator=g), torch.randn(test, 1, image, image, generator=g)


def _config():
    """minmax-w8a8, plus the classifier head, so that every linear of the model is quantized."""
    cfg = preset("minmax-w8a8")
    return cfg.replace(rules=(QuantRule("input", cfg.activation, role="head"),
                              QuantRule("weight", cfg.weight, role="head")))


def _roles(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    roles: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        ann = annotation(node)
        if ann is not None:
            roles.setdefault(ann.role, []).append(node)
    return roles


def _mixer_linears(prefix="blocks") -> set[str]:
    return {f"{prefix}.{i}.mixer.{n}" for i in range(DEPTH) for n in ("in_proj", "x_proj", "dt_proj", "out_proj")}


# -- tests ------------------------------------------------------------------------------------------


def test_symbolic_tracing_fails_and_specialised_tracing_matches_eager():
    torch.manual_seed(0)
    model = ShapeVim().eval()
    with pytest.raises(vmfx.TraceError, match="control flow"):
        trace(model)  # symbolic: a size is a graph value, not a Python int
    gm = trace(model, specialize_to=torch.randn(1, 1, 16, 16))
    assert gm.meta["vmfx_specialized"]["input_shapes"] == [[1, 16, 16]]
    x = torch.randn(5, 1, 16, 16)  # another batch size than the example's: the batch stays free
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)
    # the decided branches left no size arithmetic behind, and the scan ran its chunked form
    code = gm.code
    assert "bit_length" not in code and "cumsum" in code


@pytest.mark.parametrize("cls_token", [False, True], ids=["16-tokens-chunked", "17-tokens-loop"])
def test_shape_branching_vim_compiles_with_every_mixer_detected(cls_token):
    torch.manual_seed(0)
    model = ShapeVim(cls_token=cls_token).eval()
    calib, test = _images()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)  # nothing is kept opaque
        qmodel = vmfx.compile(model, calib, _config())
    assert qmodel.meta["vmfx_fallback"] == []
    assert "x.shape[1] != self.pos_embed.shape[1]" in qmodel.meta["vmfx_specialized"]["source"]

    mixers = qmodel.meta["vmfx_mixers"]
    assert len(mixers) == DEPTH and [m["tokens"] for m in mixers] == [16 + int(cls_token)] * DEPTH
    roles = _roles(qmodel)
    for role in ("in_proj", "conv1d", "conv_act", "x_proj", "dt_proj", "scan", "gate", "out_proj"):
        assert len(roles.get(role, [])) == DEPTH * (2 if role == "gate" else 1), role
    for node in roles["scan"]:
        assert annotation(node).extra["structural"] == "inline"  # the scan is traced op by op
    by_module = {n.meta.get("vmfx_module"): annotation(n).role for n in qmodel.graph.nodes if is_linear(n)}
    assert {by_module[f"blocks.{i}.mixer.in_proj"] for i in range(DEPTH)} == {"in_proj"}
    assert {by_module[f"blocks.{i}.mixer.out_proj"] for i in range(DEPTH)} == {"out_proj"}

    report = vmfx.inspect.coverage(qmodel)
    linears = [layer for layer in report.layers if layer.kind == "linear"]
    assert len(linears) == sum(isinstance(m, nn.Linear) for m in model.modules())
    assert all(layer.quantized and layer.bits == "W8 A8" for layer in linears), str(report)
    assert not report.unsupported

    with torch.no_grad():
        ref, out = model(test), qmodel(test)
    cosine = F.cosine_similarity(ref.double(), out.double(), dim=-1).min().item()
    print(f"{16 + int(cls_token)} tokens: worst logits cosine {cosine:.6f}")
    assert cosine > 0.99, cosine
    assert not torch.equal(ref, out)  # quantized, not float


def test_specialised_model_refuses_other_image_sizes():
    torch.manual_seed(0)
    model = ShapeVim().eval()
    calib, _ = _images()
    qmodel = vmfx.compile(model, calib, "minmax-w8a8")
    with pytest.raises(vmfx.InputError, match=r"traced \(and quantized\) for inputs of shape \(N, 1x16x16\)"):
        qmodel(torch.randn(2, 1, 32, 32))


def test_value_branch_in_the_scan_keeps_only_that_function_opaque():
    torch.manual_seed(0)
    model = ShapeVim(value_scan=value_branch_scan).eval()
    calib, test = _images()
    with pytest.warns(FallbackWarning, match="value_branch_scan"):
        qmodel = vmfx.compile(model, calib, _config())
    (decision,) = qmodel.meta["vmfx_fallback"]
    assert decision["kind"] == "leaf_function" and decision["target"].endswith("value_branch_scan")
    assert "dt.max()" in decision["source"]
    assert "vmfx_specialized" in qmodel.meta  # the mixer's own size reads are specialised

    roles = _roles(qmodel)
    assert len(qmodel.meta["vmfx_mixers"]) == DEPTH
    assert [n.target for n in roles["scan"]] == [value_branch_scan] * DEPTH
    assert all(annotation(n).extra["structural"] == "leaf" for n in roles["scan"])
    report = vmfx.inspect.coverage(qmodel)
    quantized = {layer.name for layer in report.quantized if layer.kind == "linear"}
    names = {n.name: n.meta.get("vmfx_module") for n in qmodel.graph.nodes}
    assert _mixer_linears() <= {names.get(q, q) for q in quantized}
    assert not report.unsupported
    with torch.no_grad():
        cosine = F.cosine_similarity(model(test).double(), qmodel(test).double(), dim=-1).min().item()
    print(f"value-branching scan kept opaque: worst logits cosine {cosine:.6f}")
    assert cosine > 0.99, cosine


class PerSampleLoop(nn.Module):
    """Loops over the batch in Python: freezing the example's batch size would be wrong."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.stack([self.lin(x[i]) for i in range(x.shape[0])])


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = PerSampleLoop()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.inner(x))


def test_python_loop_over_the_batch_is_refused_not_frozen():
    model = Outer().eval()
    with pytest.raises(vmfx.TraceError, match="batch size"):
        trace(model, specialize_to=torch.randn(1, 3, 4))
    with pytest.warns(FallbackWarning, match="PerSampleLoop"):
        gm = trace_with_fallback(model, (torch.randn(1, 3, 4),))
    assert [d["kind"] for d in gm.meta["vmfx_fallback"]] == ["float_module"]
    x = torch.randn(6, 3, 4)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


class ValueGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[-1] == 4 and x.mean() > 100:  # a size (decided) and a value (refused)
            return x
        return self.lin(x)


def test_control_flow_on_values_still_fails_to_trace():
    with pytest.raises(vmfx.TraceError, match="tensor's elements"):
        trace(ValueGate(), specialize_to=torch.randn(1, 4))


def test_save_and_load_round_trip_of_a_specialised_model(tmp_path):
    torch.manual_seed(0)
    model = ShapeVim(cls_token=True).eval()
    calib, test = _images()
    qmodel = vmfx.compile(model, calib, "minmax-w8a8")
    path = vmfx.save(qmodel, str(tmp_path / "shape.safetensors"))
    loaded = vmfx.load(path, model=model)  # re-traced, specialised to the recorded shape, edits replayed
    with torch.no_grad():
        torch.testing.assert_close(loaded(test), qmodel(test), rtol=0, atol=0)


def test_models_that_trace_symbolically_are_not_specialised(tiny_model, tiny_images):
    from vmfx.passes.pipeline import check_input_shape, trace_for_quantization

    gm, _ = trace_for_quantization(tiny_model, tiny_images)
    assert "vmfx_specialized" not in gm.meta  # symbolic first: the graphs of known models are unchanged
    def nodes(nodes):
        return [(n.op, n.name, str(n.target), str(n.args)) for n in nodes if n.target is not check_input_shape]

    assert nodes(gm.graph.nodes) == nodes(trace(tiny_model).graph.nodes)
