"""Tests of :func:`vmfx.ops.selective_scan` (forward, last state and every gradient).

The oracle is :func:`scan_loop_ref` below: an independent float64 implementation that walks the
recurrence one time step at a time; its gradients come from autograd through that loop. Random
inputs are fresh for every example (never zeros). Tolerances:

* float64 vmfx vs the float64 loop: rtol 1e-11, atol 1e-11 * scale (same math, different order);
* float32 vmfx vs the float64 loop (and vs mamba-ssm's float32 ``selective_scan_ref``): rtol 2e-5,
  atol 2e-5 * scale for the output and last state, rtol 1e-4, atol 1e-4 * scale for the gradients
  (their sums run over batch and time),

where ``scale`` is the largest magnitude of the expected tensor (at least 1). Over 300 random cases
of the property test's shapes the largest errors / scale seen were 4e-7 (float32 output), 4e-6
(float32 gradients) and 4e-15 (float64), so the float32 bounds leave a margin of about 25x.
"""

from __future__ import annotations

import contextlib
import sys
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmfx.ops import selective_scan

# The submodule (the package re-exports the function under the same name).
scan_module = sys.modules["vmfx.ops.selective_scan"]

ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
FORMS = ("const", "shared", "grouped")  # B/C of shape (dim, N), (batch, N, L), (batch, G, N, L)


# ------------------------------------------------------------------------------------ oracle


def scan_loop_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                  state_fn=None, states=None):
    """float64, one time step at a time. Returns (out, last_state).

    ``state_fn(h, t)``, if given, replaces the state after step t (straight-through: the
    replacement's gradient is the identity); ``states``, a list, receives every state h[t]."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    batch, dim, length = u.shape
    n = A.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = torch.where(delta > 20, delta, torch.log1p(torch.exp(delta.clamp(max=20))))

    def at(M, t):
        """B or C at time t, broadcast to (batch, dim, N)."""
        if M.dim() == 2:
            return M.expand(batch, dim, n)
        if M.dim() == 3:
            return M[:, :, t].unsqueeze(1).expand(batch, dim, n)
        return M[:, :, :, t].repeat_interleave(dim // M.shape[1], dim=1)

    h = torch.zeros(batch, dim, n, dtype=torch.float64)
    ys = []
    for t in range(length):
        dt = delta[:, :, t].unsqueeze(-1)
        h = torch.exp(dt * A) * h + dt * at(B, t) * u[:, :, t].unsqueeze(-1)
        if state_fn is not None:
            h = h + (state_fn(h, t) - h).detach()
        if states is not None:
            states.append(h.detach())
        ys.append((h * at(C, t)).sum(-1))
    out = torch.stack(ys, dim=-1)
    if D is not None:
        out = out + D.double()[:, None] * u
    if z is not None:
        z = z.double()
        out = out * z * torch.sigmoid(z)
    return out, h


# --------------------------------------------------------------------------------- helpers


def make_inputs(seed, batch, dim, n, length, b_form="shared", c_form="shared", groups=1, *,
                with_D=True, with_z=True, with_bias=True, softplus=True, a_min=-3.0, a_max=-0.05,
                delta_max=0.6):
    """Fresh random float64 inputs (a dict of the tensor arguments, None for absent ones)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def bc(form):
        if form == "const":
            return randn(dim, n)
        if form == "shared":
            return randn(batch, n, length)
        return randn(batch, groups, n, length)

    if softplus:  # raw values mostly in (-3, 0.5) (softplus about 0.05 to 1), a few in (2, 24)
        delta = rand(batch, dim, length, lo=-3.0, hi=0.5)
        delta = torch.where(rand(batch, dim, length) > 0.9, rand(batch, dim, length, lo=2.0, hi=24.0),
                            delta)
    else:
        delta = rand(batch, dim, length, lo=0.01, hi=delta_max)
    return {
        "u": randn(batch, dim, length),
        "delta": delta,
        "A": rand(dim, n, lo=a_min, hi=a_max),
        "B": bc(b_form),
        "C": bc(c_form),
        "D": randn(dim) if with_D else None,
        "z": randn(batch, dim, length) if with_z else None,
        "delta_bias": rand(dim, lo=-0.3, hi=0.3) if with_bias else None,
    }


def run_with_grads(fn, inputs, dtype, cotangent_seed, softplus):
    """Call ``fn`` on copies of ``inputs`` in ``dtype``; backprop a random cotangent of both the
    output and the last state. Returns (out, last_state, {name: grad}) in float64."""
    leaves = {k: (v.detach().to(dtype).clone().requires_grad_() if v is not None else None)
              for k, v in inputs.items()}
    out, last = fn(**leaves, delta_softplus=softplus)
    g = torch.Generator().manual_seed(cotangent_seed)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    w_last = torch.randn(last.shape, generator=g, dtype=torch.float64)
    loss = (out.double() * w_out).sum() + (last.double() * w_last).sum()
    names = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return out.detach().double(), last.detach().double(), {k: gr.double() for k, gr in zip(names, grads)}


def vmfx_scan(**kw):
    return selective_scan(**kw, return_last_state=True)


def assert_close(actual, expected, tol, what):
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{what}: {m}")


def compare(inputs, softplus, dtype, out_tol, grad_tol, seed=0):
    ref_out, ref_last, ref_grads = run_with_grads(scan_loop_ref, inputs, torch.float64, seed, softplus)
    out, last, grads = run_with_grads(vmfx_scan, inputs, dtype, seed, softplus)
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    assert_close(out, ref_out, out_tol, f"{dtype} out")
    assert_close(last, ref_last, out_tol, f"{dtype} last_state")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name].shape == ref_grads[name].shape, name
        assert torch.isfinite(grads[name]).all(), name
        assert_close(grads[name], ref_grads[name], grad_tol, f"{dtype} grad of {name}")


@contextlib.contextmanager
def piece_bytes(value):
    """Temporarily change the work-piece size (to exercise batch pieces and time chunks)."""
    old = scan_module._PIECE_BYTES
    scan_module._PIECE_BYTES = value if value is not None else old
    try:
        yield
    finally:
        scan_module._PIECE_BYTES = old


# ------------------------------------------------------------------------ property-based tests


@st.composite
def scan_cases(draw):
    batch = draw(st.integers(1, 3))
    dim = draw(st.integers(1, 8))
    n = draw(st.integers(1, 8))
    length = draw(st.integers(1, 40))
    groups = draw(st.sampled_from([g for g in range(1, dim + 1) if dim % g == 0]))
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)), batch=batch, dim=dim, n=n, length=length,
        b_form=draw(st.sampled_from(FORMS)), c_form=draw(st.sampled_from(FORMS)), groups=groups,
        with_D=draw(st.booleans()), with_z=draw(st.booleans()), with_bias=draw(st.booleans()),
        softplus=draw(st.booleans()),
        # None: the default; 1: one time step per chunk; else a few steps / batch elements a piece
        piece=draw(st.sampled_from([None, 1, 8 * dim * n * 3, 8 * dim * n * length * 2])),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=scan_cases())
def test_matches_float64_loop_forward_last_state_and_gradients(case):
    piece = case.pop("piece")
    inputs = make_inputs(**case)
    with piece_bytes(piece):
        compare(inputs, case["softplus"], torch.float64, 1e-11, 1e-11, seed=case["seed"] + 1)
        compare(inputs, case["softplus"], torch.float32, 2e-5, 1e-4, seed=case["seed"] + 1)


# ------------------------------------------------------------------------------ fixed cases


@pytest.mark.parametrize("b_form", FORMS)
@pytest.mark.parametrize("c_form", FORMS)
@pytest.mark.parametrize("piece", [None, 8 * 4 * 3 * 2], ids=["whole", "time-chunks"])
def test_gradcheck_float64(b_form, c_form, piece):
    inputs = make_inputs(7, 2, 4, 3, 5, b_form, c_form, groups=2)
    tensors = tuple(inputs[k].clone().requires_grad_() for k in ARG_NAMES)

    def fn(*args):
        return selective_scan(*args, delta_softplus=True, return_last_state=True)

    with piece_bytes(piece):
        assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_strong_decay_stays_finite_and_correct():
    # |A| * delta up to 1000: exp(delta * A) underflows to 0 in float32 (and nearly in float64).
    inputs = make_inputs(3, 2, 6, 5, 64, "shared", "grouped", groups=3, softplus=False,
                         a_min=-200.0, a_max=-0.5, delta_max=5.0)
    assert float(-(inputs["A"].min() * inputs["delta"].max())) > 500
    for piece in (None, 8 * 6 * 5 * 10):
        with piece_bytes(piece):
            compare(inputs, False, torch.float64, 1e-11, 1e-11)
            compare(inputs, False, torch.float32, 2e-5, 1e-4)


def test_realistic_shape_float32_matches_float64_loop():
    inputs = make_inputs(11, 2, 32, 16, 197, "shared", "shared")
    compare(inputs, True, torch.float32, 2e-5, 1e-4)


def test_softplus_matches_torch_to_a_few_ulp():
    for dtype in (torch.float32, torch.float64):
        x = torch.cat([torch.linspace(-120, 120, 24001, dtype=dtype),
                       torch.randn(10000, generator=torch.Generator().manual_seed(0), dtype=dtype) * 10])
        expected = torch.nn.functional.softplus(x.double())
        got = scan_module._softplus(x).double()
        tiny = torch.finfo(dtype).tiny
        ok = expected > tiny * 1e3  # away from the denormal range, where both round to 0
        rel = ((got - expected).abs() / expected)[ok]
        assert float(rel.max()) < 4 * torch.finfo(dtype).eps, dtype
        assert torch.equal(got[x > 20], x[x > 20].double())


# ---------------------------------------------------------------------------- against upstream


def _selective_scan_ref():
    from tests.upstream import import_mamba_ssm

    return import_mamba_ssm()[1]


@pytest.mark.parametrize("batch,dim,length,b_form,c_form", [
    (2, 192, 197, "shared", "shared"),  # Vim-tiny-like: 14x14 patches + a class token, N=16
    (2, 32, 64, "grouped", "const"),  # the other forms (upstream's backward is slow on them)
])
def test_matches_mamba_ssm_selective_scan_ref(batch, dim, length, b_form, c_form):
    selective_scan_ref = _selective_scan_ref()
    inputs = make_inputs(5, batch, dim, 16, length, b_form, c_form, groups=2)
    ref_out, ref_last, ref_grads = run_with_grads(
        lambda **kw: selective_scan_ref(**kw, return_last_state=True), inputs, torch.float32, 1, True)
    out, last, grads = run_with_grads(vmfx_scan, inputs, torch.float32, 1, True)
    assert_close(out, ref_out, 2e-5, "out")
    assert_close(last, ref_last, 2e-5, "last_state")
    for name in ARG_NAMES:
        assert_close(grads[name], ref_grads[name], 1e-4, f"grad of {name}")


# ------------------------------------------------------------------------- modes and dtypes


def test_no_grad_and_requires_grad_false_match_the_autograd_path():
    inputs = {k: v.float() for k, v in make_inputs(1, 2, 8, 4, 30, "grouped", "shared", 4).items()}
    with_grad = selective_scan(**{k: v.clone().requires_grad_() for k, v in inputs.items()},
                               delta_softplus=True, return_last_state=True)
    plain = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    with torch.no_grad():
        no_grad = selective_scan(**{k: v.clone().requires_grad_() for k, v in inputs.items()},
                                 delta_softplus=True, return_last_state=True)
    for a, b in ((plain, with_grad), (no_grad, with_grad)):
        assert a[0].grad_fn is None and not a[0].requires_grad
        torch.testing.assert_close(a[0], b[0].detach(), rtol=0, atol=0)
        torch.testing.assert_close(a[1], b[1].detach(), rtol=0, atol=0)


@pytest.mark.parametrize("wanted", ARG_NAMES)
def test_gradient_of_a_subset_of_inputs(wanted):
    inputs = make_inputs(2, 2, 6, 3, 17, "shared", "grouped", groups=3)
    _, _, ref_grads = run_with_grads(scan_loop_ref, inputs, torch.float64, 0, True)
    leaves = {k: v.clone().requires_grad_(k == wanted) for k, v in inputs.items()}
    out, last = selective_scan(**leaves, delta_softplus=True, return_last_state=True)
    # Another call in between overwrites the reused work buffers.
    selective_scan(**make_inputs(3, 2, 6, 3, 17, "shared", "grouped", groups=3))
    g = torch.Generator().manual_seed(0)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum() + (
        last * torch.randn(last.shape, generator=g, dtype=torch.float64)).sum()
    (grad,) = torch.autograd.grad(loss, [leaves[wanted]])
    assert_close(grad, ref_grads[wanted], 1e-11, wanted)


def test_results_do_not_alias_the_reused_work_buffers():
    first = make_inputs(12, 2, 8, 4, 21, "shared", "shared")
    second = make_inputs(13, 2, 8, 4, 21, "shared", "shared")
    leaves = {k: v.clone().requires_grad_() for k, v in first.items()}
    out, last = selective_scan(**leaves, delta_softplus=True, return_last_state=True)
    out_ng, last_ng = selective_scan(**first, delta_softplus=True, return_last_state=True)
    kept = [t.detach().clone() for t in (out, last, out_ng, last_ng)]
    selective_scan(**second, delta_softplus=True, return_last_state=True)  # reuses the buffers
    for a, b in zip((out, last, out_ng, last_ng), kept):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)
    (grad_u,) = torch.autograd.grad(out.sum() + last.sum(), [leaves["u"]])
    ref = {k: v.clone().requires_grad_() for k, v in first.items()}
    ref_out, ref_last = scan_loop_ref(**ref, delta_softplus=True)
    (ref_grad_u,) = torch.autograd.grad(ref_out.sum() + ref_last.sum(), [ref["u"]])
    assert_close(grad_u, ref_grad_u, 1e-11, "grad of u after another call")


def test_concurrent_threads():
    cases = [make_inputs(20 + i, 2, 8, 4, 33, "grouped", "shared", groups=2) for i in range(4)]
    expected = [selective_scan(**c, delta_softplus=True) for c in cases]
    results = [None] * len(cases)

    def work(i):
        for _ in range(5):
            results[i] = selective_scan(**cases[i], delta_softplus=True)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_gradient_of_the_last_state_alone():
    inputs = make_inputs(4, 2, 5, 3, 9, "grouped", "const", groups=5)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    _, last = selective_scan(**leaves, delta_softplus=True, return_last_state=True)
    grads = torch.autograd.grad(last.sum(), [leaves["u"], leaves["A"], leaves["B"]])
    ref = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    _, ref_last = scan_loop_ref(**ref, delta_softplus=True)
    ref_grads = torch.autograd.grad(ref_last.sum(), [ref["u"], ref["A"], ref["B"]])
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, 1e-11, "grad through the last state")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_dtypes(dtype):
    inputs = make_inputs(6, 2, 4, 3, 11, "shared", "shared")
    inputs["u"] = inputs["u"].to(dtype)
    inputs["delta"] = inputs["delta"].to(dtype)
    for k in ("A", "B", "C", "D", "delta_bias"):
        inputs[k] = inputs[k].to(torch.float64 if dtype == torch.float64 else torch.float32)
    out, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    assert out.dtype == dtype and out.shape == inputs["u"].shape
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert last.dtype == compute and last.shape == (2, 4, 3)
    ref_out, _ = scan_loop_ref(**inputs, delta_softplus=True)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-5)
    assert_close(out.double(), ref_out.to(dtype).double(), tol, "out")


def test_autocast_does_not_lower_the_precision():
    inputs = make_inputs(14, 2, 16, 8, 25, "shared", "grouped", groups=4)
    inputs = {k: v.float() for k, v in inputs.items()}
    _, _, plain = run_with_grads(vmfx_scan, inputs, torch.float32, 0, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, autocast = run_with_grads(vmfx_scan, inputs, torch.float32, 0, True)
    for name in ARG_NAMES:
        torch.testing.assert_close(autocast[name], plain[name], rtol=0, atol=0)


def test_non_contiguous_inputs():
    inputs = make_inputs(8, 2, 6, 4, 13, "shared", "grouped", groups=2)
    strided = {k: (v.transpose(-1, -2).contiguous().transpose(-1, -2) if v.dim() >= 2 else v)
               for k, v in inputs.items()}
    assert not strided["u"].is_contiguous()
    a = selective_scan(**inputs, delta_softplus=True)
    b = selective_scan(**strided, delta_softplus=True)
    # Not bit-identical: torch's vectorized and scalar elementwise kernels may round differently.
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_return_last_state_flag():
    inputs = make_inputs(9, 1, 3, 2, 4, "const", "const")
    out = selective_scan(**inputs)
    assert isinstance(out, torch.Tensor)
    out2, last = selective_scan(**inputs, return_last_state=True)
    torch.testing.assert_close(out, out2, rtol=0, atol=0)
    assert last.shape == (1, 3, 2)


def test_double_backward_is_refused():
    inputs = {k: v.clone().requires_grad_() for k, v in make_inputs(10, 1, 2, 2, 3).items()}
    out = selective_scan(**inputs, delta_softplus=True)
    (gu,) = torch.autograd.grad(out.sum(), [inputs["u"]], create_graph=True)
    with pytest.raises(RuntimeError):
        gu.sum().backward()


# ------------------------------------------------------------------------------- bad inputs


def test_complex_A_is_rejected():
    inputs = make_inputs(0, 1, 2, 2, 3)
    inputs["A"] = torch.complex(inputs["A"], inputs["A"])
    with pytest.raises(ValueError, match="only real A is supported"):
        selective_scan(**inputs)


@pytest.mark.parametrize("name,bad_shape,expected", [
    ("delta", (2, 4, 6), r"delta must have shape \(batch, dim, L\)=\(2, 4, 5\)"),
    ("z", (2, 5, 5), r"z must have shape \(batch, dim, L\)=\(2, 4, 5\)"),
    ("A", (3, 3), r"A must have shape \(dim, N\) with dim=4"),
    ("B", (2, 3, 4), r"B must have shape \(dim, N\)=\(4, 3\), \(batch, N, L\)=\(2, 3, 5\)"),
    ("C", (2, 3, 3, 5), r"C must have shape .*\(batch, G, N, L\)=\(2, G, 3, 5\) with G dividing dim=4"),
    ("C", (4, 2), r"C must have shape \(dim, N\)=\(4, 3\)"),
    ("D", (5,), r"D must have shape \(dim,\)=\(4,\)"),
    ("delta_bias", (4, 1), r"delta_bias must have shape \(dim,\)=\(4,\)"),
])
def test_mismatched_shapes_name_the_argument_and_the_expected_shape(name, bad_shape, expected):
    inputs = make_inputs(0, 2, 4, 3, 5)
    inputs[name] = torch.randn(bad_shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=expected) as info:
        selective_scan(**inputs)
    assert str(tuple(bad_shape)) in str(info.value)


def test_bad_u_and_empty_sequence():
    inputs = make_inputs(0, 2, 4, 3, 5)
    with pytest.raises(ValueError, match=r"u must be a tensor of shape \(batch, dim, L\)"):
        selective_scan(**{**inputs, "u": inputs["u"][0]})
    empty = make_inputs(0, 2, 4, 3, 0)
    with pytest.raises(ValueError, match="L .* must be >= 1"):
        selective_scan(**empty)


# ----------------------------------------------------------------------------- state hooks


def fake_quant_state(h, t, steps):
    """Symmetric int8 fake-quantization of a (.., dim, N) state with a per-(step, channel) scale
    ``steps[t % len(steps)]`` of shape (dim,): coarse enough to round and clip."""
    s = steps[t % len(steps)].to(h.dtype).unsqueeze(-1)
    return torch.clamp(torch.round(h / s), -127, 127) * s


def make_steps(seed, dim, count=3):
    g = torch.Generator().manual_seed(seed)
    return 1e-3 * 10 ** (2 * torch.rand(count, dim, generator=g, dtype=torch.float64))  # 1e-3 .. 1e-1


class FakeQuantHook:
    """The vmfx state hook of :func:`fake_quant_state`; checks the piece it is given."""

    def __init__(self, steps, batch, in_place=False):
        self.steps, self.batch, self.in_place = steps, batch, in_place
        self.calls = 0
        self.covered = set()

    def __call__(self, h, t0, t1, b0, b1):
        assert t1 == t0 + 1 and h.shape[0] == 1 and h.shape[1] == b1 - b0 and 0 <= b0 < b1 <= self.batch
        self.calls += 1
        self.covered.update((b, t0) for b in range(b0, b1))
        q = fake_quant_state(h, t0, self.steps)
        if self.in_place:
            h.copy_(q)
            return None
        return q


def hooked(hook=None, reader=None):
    def fn(**kw):
        return selective_scan(**kw, return_last_state=True, state_hook=hook, state_reader=reader)
    return fn


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=scan_cases(), kind=st.sampled_from(["same", "none", "clone"]))
def test_identity_state_hook_is_bit_for_bit_no_hook(case, kind):
    piece = case.pop("piece")
    inputs = make_inputs(**case)
    identity = {"same": lambda h, *_: h, "none": lambda h, *_: None, "clone": lambda h, *_: h.clone()}[kind]
    with piece_bytes(piece):
        for dtype in (torch.float64, torch.float32):
            plain = run_with_grads(vmfx_scan, inputs, dtype, case["seed"], case["softplus"])
            hook = run_with_grads(hooked(identity), inputs, dtype, case["seed"], case["softplus"])
            assert torch.equal(plain[0], hook[0]) and torch.equal(plain[1], hook[1])
            assert plain[2].keys() == hook[2].keys()
            for name in plain[2]:
                assert torch.equal(plain[2][name], hook[2][name]), name


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=scan_cases(), in_place=st.booleans())
def test_per_step_fake_quantized_state_matches_a_per_step_loop_with_straight_through_gradients(case, in_place):
    piece = case.pop("piece")
    inputs = make_inputs(**case)
    steps = make_steps(case["seed"], case["dim"])
    hook = FakeQuantHook(steps, case["batch"], in_place)

    def ref(**kw):
        return scan_loop_ref(**kw, state_fn=lambda h, t: fake_quant_state(h, t, steps))

    ref_out, ref_last, ref_grads = run_with_grads(ref, inputs, torch.float64, case["seed"] + 1, case["softplus"])
    with piece_bytes(piece):
        out, last, grads = run_with_grads(hooked(hook), inputs, torch.float64, case["seed"] + 1,
                                          case["softplus"])
    # called on every step of every sequence
    assert hook.covered == {(b, t) for b in range(case["batch"]) for t in range(case["length"])}
    # the state is on the quantization grid at every step: the hook's result fed the next step
    assert_close(out, ref_out, 1e-11, "out")
    assert_close(last, ref_last, 1e-11, "last_state")
    grid = last / steps[(case["length"] - 1) % len(steps)].unsqueeze(-1)
    assert torch.allclose(grid, grid.round(), atol=1e-6)
    for name in grads:
        assert_close(grads[name], ref_grads[name], 1e-10, f"grad of {name}")


def test_quantized_state_differs_from_the_float_scan():
    """The hook is not a no-op in the fixtures above: coarse steps change the output."""
    inputs = make_inputs(3, 2, 4, 3, 30)
    hook = FakeQuantHook(make_steps(3, 4) * 20, 2)
    plain = selective_scan(**inputs, delta_softplus=True)
    quant = selective_scan(**inputs, delta_softplus=True, state_hook=hook)
    assert float((plain - quant).abs().max()) > 1e-3


@pytest.mark.parametrize("piece", [None, 1, 8 * 4 * 3 * 3], ids=["whole", "one-step", "time-chunks"])
def test_state_reader_sees_every_state_once_in_the_forward_only(piece):
    inputs = make_inputs(5, 3, 4, 3, 11, "grouped", "shared", groups=2)
    steps = make_steps(5, 4)
    for hook in (None, FakeQuantHook(steps, 3)):
        expected = []
        scan_loop_ref(**inputs, delta_softplus=True, states=expected,
                      state_fn=None if hook is None else (lambda h, t: fake_quant_state(h, t, steps)))
        expected = torch.stack(expected, dim=2)  # (batch, dim, L, N)
        rec = scan_module.StateRecorder()
        calls = []

        def reader(h, t0, t1, b0, b1):
            calls.append((t0, t1, b0, b1))
            assert h.shape[:2] == (t1 - t0, b1 - b0)
            rec(h, t0, t1, b0, b1)

        leaves = {k: v.clone().requires_grad_() if v is not None else None for k, v in inputs.items()}
        with piece_bytes(piece):
            out = selective_scan(**leaves, delta_softplus=True, state_hook=hook, state_reader=reader)
            n_forward = len(calls)
            out.sum().backward()
        assert len(calls) == n_forward  # not called again by the backward
        covered = sorted((b, t) for t0, t1, b0, b1 in calls for b in range(b0, b1) for t in range(t0, t1))
        assert covered == [(b, t) for b in range(3) for t in range(11)]
        assert rec.states.shape == (3, 4, 11, 3)
        assert_close(rec.states, expected, 1e-11, "recorded states")


def test_bad_state_hooks_are_refused():
    inputs = make_inputs(1, 1, 2, 2, 4)
    with pytest.raises(ValueError, match="state_hook must be callable"):
        selective_scan(**inputs, state_hook=3)
    with pytest.raises(ValueError, match=r"state_hook must return None or a tensor of the state's shape \(1, 1, 2, 2\)"):
        selective_scan(**inputs, state_hook=lambda h, *_: h[..., :1])
    with pytest.raises(ValueError, match="recorded nothing"):
        scan_module.StateRecorder().states
