"""The selective scan (S6) of Mamba, as one op with a fast, hand-written CPU backward.

:func:`selective_scan` has the semantics, shapes and dtype behaviour of mamba-ssm's
``selective_scan_fn`` / ``selective_scan_ref`` for a real ``A``. It is written for, tuned on and
tested on the CPU; the code uses only device-agnostic torch ops, but it has not been run on a GPU.

The math
--------
For every batch element ``b``, channel ``d`` and state index ``n``::

    delta   = softplus(delta + delta_bias)          (bias and softplus both optional;
                                                      softplus has torch's default threshold 20)
    h[t]    = exp(delta[t] * A[d, n]) * h[t-1] + delta[t] * B[t, n] * u[t],     h[-1] = 0
    y[t]    = sum_n h[t, n] * C[t, n]
    out[t]  = (y[t] + D[d] * u[t]) * silu(z[t])     (the D and z terms are optional)

Shapes
------
``u``, ``delta``, ``z``: (batch, dim, L). ``A``: (dim, N), real. ``D``, ``delta_bias``: (dim,).
``B`` and ``C`` each independently one of: (dim, N), time-invariant; (batch, N, L), shared by every
channel; (batch, G, N, L), grouped, the channels ``g*dim/G ... (g+1)*dim/G - 1`` sharing group ``g``.
``out`` has ``u``'s shape and dtype; the optional last state ``h[L-1]`` is (batch, dim, N).

Precision
---------
Everything is computed in float32 (half and bfloat16 inputs are upcast, as mamba-ssm does), or in
float64 when any of ``u``, ``delta``, ``A``, ``B``, ``C`` is float64 (so that
``torch.autograd.gradcheck`` works). ``out`` is cast back to ``u``'s dtype; the last state stays in
the compute dtype (as in mamba-ssm's reference, where it has ``A``'s float32 dtype); gradients come
back in the dtype of the input they belong to. In float32, ``exp(delta A)`` is computed as
``exp2(delta * (A log2 e))`` and the softplus with its own formula: both agree with torch's to a few
ulp (relative 1e-7 to 1e-6 for |delta A| up to about 30); float64 uses ``torch.exp``. Outputs and
gradients match mamba-ssm's ``selective_scan_ref`` to within about 1e-6 of their largest magnitude
in float32 (not bit for bit). Autocast is switched off inside (the ``torch.bmm`` contractions would
otherwise run in half precision).

How it runs
-----------
The expensive tensors have (batch, dim, L, N) elements; everything else has at most the size of
``u``. The work is cut into pieces of ``p`` batch elements and ``T`` time steps (see Memory), and for
each piece the big tensors live in three preallocated work buffers laid out time-major,
(T, p, dim, N), so that one time step is one contiguous slab:

* ``E = exp(delta A)`` and ``H = delta B u`` are written with ``out=`` into two buffers (in float32
  the exponential is ``exp2(delta * (A log2 e))``, 4x faster than ``torch.exp`` on the CPU);
* the recurrence runs in place in ``H``, one ``addcmul_`` per time step (``H[t] += E[t] H[t-1]``):
  the only Python loop;
* the contractions (``y = sum_n H C``; in the backward the gradients of ``B``, ``C``, ``A`` and of
  ``delta u``) are an elementwise product into the free buffer and a ``sum``, or a ``torch.bmm``.

The (batch, dim, L) inputs are cut into (T, p, dim) slabs and the outputs written back piece by
piece, so the small elementwise work (bias, softplus, ``D``, the ``silu(z)`` gate) also stays in
cache and allocates no large temporaries.

Choices measured at batch 8, L 197, dim 384, N 16 on 2 CPU cores (``benchmarks/scan.py``; about
30 ms forward + backward in all): one-sequence pieces beat whole-batch buffers by 1.5x (they stay in
the L2/L3 caches); multiply + sum beats ``torch.bmm`` for the N-contractions by 1.7x; ``exp2`` beats
``torch.exp`` by 4x and the softplus below beats ``F.softplus`` by 3x; per-piece slabs beat
whole-tensor transposes to a time-major layout by about 10%. Keeping the forward's states for the
backward instead of recomputing them (about 5 ms) would mean 2 x 39 MB of fresh memory a call;
page-faulting that much in costs about 0.25 ms/MB, so about 19 ms, here.

Memory
------
Each work buffer holds at most ``_PIECE_BYTES`` (8 MiB): a piece is as many whole sequences as fit,
or, when one sequence does not fit, one batch element and a chunk of time steps, with the state
carried from chunk to chunk (at least one time step of one sequence is always taken). Peak extra
memory is therefore about 3 x 8 MiB plus a few (T, p, dim) slabs, whatever the input size, besides
the outputs. On the CPU the three buffers are kept between calls (per thread): freshly allocated
multi-MiB tensors are page-faulted in on every call, which costs about as much as the arithmetic.

State hooks
-----------
Two optional callables see the hidden states ``h`` (in the compute dtype, time-major pieces of
the work buffer, each call's ``t0:t1`` global time steps and ``b0:b1`` batch elements):

* ``state_hook(h, t0, t1, b0, b1) -> Tensor | None`` may read *and replace* states: it is called
  once per time step (``h`` is (1, p, dim, N), ``t1 = t0 + 1``) right after ``h[t]`` is computed
  and before ``h[t+1] = exp(delta A) h[t] + delta B u`` reads it, so that the state every later
  step and ``y[t] = sum_n h[t] C[t]`` use is the one the hook returned (or wrote in place):
  quantizing the state at every step is exact, as in a per-step loop. This costs one Python call
  per step (the no-hook path is unchanged: the recurrence loop is the only per-step Python work).
  The hook must be a pure function of its arguments: the backward recomputes the states and calls
  it again (an observer belongs in ``state_reader``). Gradients are straight-through: the
  hook's replacement is treated as the identity (``dh_hooked / dh = I``), every gradient is read
  off the replaced states (``dC[t] = sum_d h_hooked[t] dy[t]``, ``q[t] = g[t] exp(delta A)
  h_hooked[t-1]``, ...), and no gradient reaches tensors the hook uses (e.g. learned step sizes).
* ``state_reader(h, t0, t1, b0, b1) -> None`` only reads: it is called once per work piece with its
  (T, p, dim, N) states (after the hook), in the forward only, so it stays vectorized. The buffer
  is reused after the call: copy what you keep. :class:`StateRecorder` assembles the full
  (batch, dim, L, N) states (data-free calibration); a reduction (say a running per-channel
  max of ``|h|``) is a one-line reader.

Reparameterization and a quantized state
----------------------------------------
``step_scale`` (L,) multiplies ``exp(delta[t] A)`` at step ``t``; ``out_scale`` (dim,) multiplies
``y + D u`` before the gate; together with :func:`reparameterize` (which folds factors ``r_C``,
``r_L``, ``r_D`` into ``u``, ``B``, ``C``) the scan carries ``h / (r_C r_L r_D)`` and computes the
same output (Shi et al.'s hidden-state reparameterization). ``state_scales`` (L,) fake-quantizes
the state symmetrically at every step, inline in the recurrence loop (three more in-place ops
per step on a (p, dim, N) slab, no Python call), with straight-through gradients exactly like a
``state_hook`` doing the same. ``state_quant`` (a :class:`vmfx.quant.state_quantizer.ScanStateQuant`)
sets all of them from its factors and scales: it is how a graph's scan node carries its
quantized state. Without these arguments the code path is the plain one above.

Backward
--------
The forward saves only its inputs, ``y + D u`` when ``z`` is given, and, when time is cut into
chunks, the state at the start of every chunk: never (batch, dim, L, N) states. The backward
recomputes the states of one piece at a time (one more forward recurrence, which is cheap), then runs
the adjoint recurrence backwards in time, again one in-place ``addcmul_`` per step::

    g[t] = C[t] dy[t] + exp(delta[t+1] A) g[t+1]          (g = dLoss/dh; g[L-1] also receives the
                                                            gradient of the returned last state)

and reads every gradient off ``g`` and the states ``h``:
``dC[t] = sum_d h[t] dy[t]``, ``dB[t] = sum_d g[t] delta[t] u[t]``,
``d(delta u)[t] = sum_n g[t] B[t]``, and, with ``q[t] = g[t] exp(delta[t] A) h[t-1]``,
``dA = sum_{b,t} q[t] delta[t]`` and ``ddelta[t] = sum_n q[t] A + d(delta u)[t] u[t]``, then through
the softplus and the bias. The ``D`` and ``z`` terms are elementwise. Only the gradients that are
needed are computed. Unlike mamba-ssm's ``selective_scan_fn`` the gradient of the returned last state
is taken into account. The backward is not itself differentiable (double backward raises).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["selective_scan", "StateRecorder", "reparameterize"]

# Upper bound, in bytes, of each of the (at most three) big (T, p, dim, N) work buffers of a piece.
_PIECE_BYTES = 8 * 2**20

# torch.nn.functional.softplus's default threshold: above it softplus(x) is x.
_SOFTPLUS_THRESHOLD = 20.0

_LOG2_E = 1.4426950408889634  # 1 / ln 2


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, state_hook=None, state_reader=None, *, step_scale=None,
                   out_scale=None, state_scales=None, state_bits=8, state_quant=None):
    """Run the selective scan of Mamba (the S6 recurrence), as mamba-ssm's ``selective_scan_fn``.

    Differentiable with respect to every tensor argument (hand-written backward); under
    ``torch.no_grad()`` or when no argument requires grad, nothing is saved for backward.

    Args:
        u: input, (batch, dim, L), floating point.
        delta: time steps, (batch, dim, L).
        A: state matrix, (dim, N), real (a complex ``A`` raises ``ValueError``).
        B: input matrix: (dim, N), (batch, N, L) or (batch, G, N, L) with G dividing dim.
        C: output matrix, same choice of forms as ``B``.
        D: optional skip connection, (dim,).
        z: optional gate, (batch, dim, L); the output is multiplied by ``silu(z)``.
        delta_bias: optional bias added to ``delta``, (dim,).
        delta_softplus: apply softplus (threshold 20) to ``delta`` (after the bias).
        return_last_state: also return the state after the last time step.
        state_hook: optional ``state_hook(h, t0, t1, b0, b1) -> Tensor | None`` that may read and
            replace the hidden states (e.g. fake-quantize them), see "State hooks" in the module
            docstring. Called once per time step with the state ``h[t]`` of batch elements
            ``b0:b1`` as a (1, p, dim, N) time-major tensor (``t1 = t0 + 1``), before ``h[t+1]`` is
            computed from it; what it returns (or writes into ``h``) is the state ``y[t]`` and
            ``h[t+1]`` use. Gradients pass straight through it.
        state_reader: optional read-only ``state_reader(h, t0, t1, b0, b1) -> None`` called once per
            work piece with the (T, p, dim, N) time-major states of time steps ``t0:t1`` and batch
            elements ``b0:b1`` (after ``state_hook``), in the forward only (see
            :class:`StateRecorder` for the full (batch, dim, L, N) states).
        step_scale: optional (L,) factors multiplying ``exp(delta[t] A)`` at step ``t`` (the step
            ratio ``r_L[t-1] / r_L[t]`` of a reparameterized scan, see :func:`reparameterize`).
        out_scale: optional (dim,) factors multiplying ``y + D u`` (before the gate).
        state_scales: optional (L,) positive static step sizes: the state ``h[t]`` is
            fake-quantized symmetrically to ``state_bits`` bits (``round(h / s[t])`` clamped to
            ``[-(2^(b-1) - 1), 2^(b-1) - 1]``, times ``s[t]``; round half to even) right after it
            is computed, before ``y[t]`` and ``h[t+1]`` read it, with straight-through gradients
            (like a ``state_hook``, but inline: no Python call per step).
        state_bits: bit width of the state quantization (2..16).
        state_quant: optional quantized-state description (a
            :class:`vmfx.quant.state_quantizer.ScanStateQuant`, or any object with ``factors()`` ->
            ``(r_C, r_L, r_D)`` or None, ``state_scales()`` -> (L,) tensor or None and ``bits``):
            the scan is reparameterized by the factors (:func:`reparameterize`) and its state
            quantized with the scales; exclusive with ``step_scale``, ``out_scale`` and
            ``state_scales``. No gradient reaches ``step_scale``, ``out_scale``, ``state_scales``
            or the factors.

    Returns:
        ``out`` of shape (batch, dim, L) in ``u``'s dtype, or, if ``return_last_state``, the tuple
        ``(out, last_state)`` with ``last_state`` of shape (batch, dim, N) in the compute dtype
        (float32, or float64 for float64 inputs); in a reparameterized scan it is the
        reparameterized state ``h / (r_C r_L[L-1] r_D)``.

    Raises:
        ValueError: ``A`` is complex, an argument has the wrong number of dimensions or a shape
            inconsistent with the others (the message names the argument and the expected shape),
            or L is 0.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    for name, fn in (("state_hook", state_hook), ("state_reader", state_reader)):
        if fn is not None and not callable(fn):
            raise ValueError(f"selective_scan: {name} must be callable (h, t0, t1, b0, b1), got "
                             f"{type(fn).__name__}")
    hooks = _Hooks(state_hook, state_reader) if state_hook is not None or state_reader is not None else None
    extras = None
    if state_quant is not None or step_scale is not None or out_scale is not None or state_scales is not None:
        u, B, C, extras = _extras(u, B, C, step_scale, out_scale, state_scales, state_bits, state_quant)
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out, last_state = _SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias,
                                                 bool(delta_softplus), hooks, extras)
    else:
        out, last_state, _, _ = _forward(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                         save=False, hooks=hooks, extras=extras)
    return (out, last_state) if return_last_state else out


class StateRecorder:
    """A ``state_reader`` that keeps every hidden state of one call.

    Example::

        rec = StateRecorder()
        out = selective_scan(u, delta, A, B, C, state_reader=rec)
        rec.states  # (batch, dim, L, N), h[b, d, t, n], in the compute dtype

    Memory is batch x dim x L x N elements: meant for calibration batches, not for inference.
    Reusing the recorder for another call replaces what it holds.
    """

    def __init__(self):
        self._pieces: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, h, t0, t1, b0, b1):
        if (b0, t0) == (0, 0):  # the first piece of a call: forget the previous call
            self._pieces = {}
        self._pieces[(b0, t0)] = h.permute(1, 2, 0, 3).clone()  # (p, dim, T, N)

    @property
    def states(self) -> torch.Tensor:
        """The recorded states, (batch, dim, L, N)."""
        if not self._pieces:
            raise ValueError("StateRecorder has recorded nothing: pass it as selective_scan(..., state_reader=rec)")
        rows = {}
        for (b0, t0) in sorted(self._pieces):
            rows.setdefault(b0, []).append(self._pieces[(b0, t0)])
        return torch.cat([torch.cat(chunks, dim=2) for _, chunks in sorted(rows.items())], dim=0)


def reparameterize(u, B, C, r_C, r_L, r_D):
    """Fold hidden-state factors into the scan's inputs (Shi et al.'s reparameterization).

    The reparameterized scan carries ``h'[t, d, n] = h[t, d, n] / (r_C[d] r_L[t] r_D[n])``: with
    ``u' = u / r_C``, ``B'[t, n] = B[t, n] / (r_D[n] r_L[t])``, ``C'[t, n] = C[t, n] r_D[n] r_L[t]``,
    ``exp(delta[t] A)`` times ``step[t] = r_L[t-1] / r_L[t]`` (``step[0] = 1``: ``h[-1] = 0``) and
    the output ``(y' + D u')`` times ``r_C``,
    ``selective_scan(u', delta, A, B', C', D, z, ..., step_scale=step, out_scale=r_C)`` equals
    ``selective_scan(u, delta, A, B, C, D, z, ...)`` in exact arithmetic (up to rounding in float).

    Args:
        u: (batch, dim, L). B, C: (batch, N, L) or (batch, G, N, L) (time-varying: a
            time-invariant (dim, N) B or C cannot take the per-step factor ``r_L``).
        r_C: (dim,), r_L: (L,), r_D: (N,): positive factors.

    Returns:
        ``(u', B', C', step_scale, out_scale)``.
    """
    for name, t in (("B", B), ("C", C)):
        if t.dim() < 3:
            raise ValueError(f"reparameterize: {name} must be time-varying, (batch, N, L) or (batch, G, N, L), "
                             f"to take the per-step factor r_L; got {tuple(t.shape)}")
    dim, length, n = u.shape[1], u.shape[2], B.shape[-2]
    for name, t, size in (("r_C", r_C, dim), ("r_L", r_L, length), ("r_D", r_D, n)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (size,):
            raise ValueError(f"reparameterize: {name} must be a ({size},) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    f = r_D.to(B.dtype)[:, None] * r_L.to(B.dtype)[None, :]  # (N, L)
    step = torch.cat([r_L.new_ones(1), r_L[:-1] / r_L[1:]])
    return u / r_C.to(u.dtype)[:, None], B / f, C * f.to(C.dtype), step, r_C


class _Extras:
    """The inline extras of one call: per-step factor on exp(delta A), output factor, per-step
    state quantization (see :func:`selective_scan`)."""

    def __init__(self, step_scale, out_scale, state_scales, state_bits):
        self.step_scale = step_scale
        self.out_scale = out_scale
        self.state_scales = state_scales
        self.qmax = 2 ** (state_bits - 1) - 1


def _extras(u, B, C, step_scale, out_scale, state_scales, state_bits, state_quant):
    """Validate the extras; with ``state_quant`` fold its factors into u, B, C. Returns
    (u, B, C, _Extras)."""
    if state_quant is not None:
        if step_scale is not None or out_scale is not None or state_scales is not None:
            raise ValueError("selective_scan: state_quant already sets step_scale, out_scale and state_scales; "
                             "pass either state_quant or those")
        factors = state_quant.factors()
        if factors is not None:
            u, B, C, step_scale, out_scale = reparameterize(u, B, C, *factors)
        state_scales = state_quant.state_scales()
        state_bits = state_quant.bits
    if isinstance(state_bits, bool) or not isinstance(state_bits, int) or not 2 <= state_bits <= 16:
        raise ValueError(f"selective_scan: state_bits must be an integer in 2..16, got {state_bits!r}")
    dim, length = u.shape[1], u.shape[2]
    for name, t, size in (("step_scale", step_scale, length), ("out_scale", out_scale, dim),
                          ("state_scales", state_scales, length)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (size,)):
            raise ValueError(f"selective_scan: {name} must be a ({size},) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if state_scales is not None and not bool((state_scales > 0).all() and torch.isfinite(state_scales).all()):
        raise ValueError("selective_scan: state_scales must be positive and finite (calibrate the scan's state "
                         "quantizer first)")
    return u, B, C, _Extras(step_scale, out_scale, state_scales, state_bits)


# --------------------------------------------------------------------------------------- checks


def _shape_error(name, expected, got):
    return ValueError(f"selective_scan: {name} must have shape {expected}, got {tuple(got.shape)}")


def _check_inputs(u, delta, A, B, C, D, z, delta_bias):
    """Raise ``ValueError`` naming the argument and the expected shape on any inconsistency."""
    if not isinstance(u, torch.Tensor) or u.dim() != 3:
        raise ValueError("selective_scan: u must be a tensor of shape (batch, dim, L), got "
                         f"{tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__}")
    batch, dim, length = u.shape
    if length == 0:
        raise ValueError("selective_scan: the sequence length L (last dimension of u) must be >= 1")
    if A.is_complex():
        raise ValueError("selective_scan: only real A is supported (got a complex A of dtype "
                         f"{A.dtype}); mamba-ssm's complex variant is not implemented")
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias)):
        if t is not None and (t.is_complex() or not t.is_floating_point()):
            raise ValueError(f"selective_scan: {name} must be a real floating-point tensor, got "
                             f"dtype {t.dtype}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise _shape_error("A", f"(dim, N) with dim={dim}", A)
    n = A.shape[1]
    if tuple(delta.shape) != (batch, dim, length):
        raise _shape_error("delta", f"(batch, dim, L)=({batch}, {dim}, {length}) like u", delta)
    if z is not None and tuple(z.shape) != (batch, dim, length):
        raise _shape_error("z", f"(batch, dim, L)=({batch}, {dim}, {length}) like u", z)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise _shape_error(name, f"(dim,)=({dim},)", t)
    for name, t in (("B", B), ("C", C)):
        expected = (f"(dim, N)=({dim}, {n}), (batch, N, L)=({batch}, {n}, {length}) or "
                    f"(batch, G, N, L)=({batch}, G, {n}, {length}) with G dividing dim={dim}")
        if t.dim() == 2:
            ok = tuple(t.shape) == (dim, n)
        elif t.dim() == 3:
            ok = tuple(t.shape) == (batch, n, length)
        elif t.dim() == 4:
            ok = (t.shape[0] == batch and tuple(t.shape[2:]) == (n, length) and t.shape[1] >= 1
                  and dim % t.shape[1] == 0)
        else:
            ok = False
        if not ok:
            raise _shape_error(name, expected, t)


# ------------------------------------------------------------------------------------- helpers


def _compute_dtype(u, delta, A, B, C):
    if any(t.dtype == torch.float64 for t in (u, delta, A, B, C)):
        return torch.float64
    return torch.float32


def _plan(batch, dim, length, n, itemsize):
    """Cut (batch, L) into pieces: returns (p batch elements a piece, T time steps a chunk)."""
    per_sequence = dim * n * length * itemsize
    if batch == 0 or per_sequence == 0:
        return max(batch, 1), length
    if per_sequence <= _PIECE_BYTES:
        p = max(1, min(batch, _PIECE_BYTES // per_sequence))
        pieces = -(-batch // p)
        return -(-batch // pieces), length
    steps = max(1, _PIECE_BYTES // (dim * n * itemsize))
    chunks = -(-length // steps)
    return 1, -(-length // chunks)


def _bc_layout(M, dtype):
    """B or C in compute layout: (dim, N) stays, (batch, N, L) and (batch, G, N, L) become
    contiguous (L, batch, G, N). Returns (tensor, is_variable)."""
    if M.dim() == 2:
        return M.to(dtype).contiguous(), False
    if M.dim() == 3:
        M = M.unsqueeze(1)
    return M.to(dtype).permute(3, 0, 1, 2).contiguous(), True


def _bc_restore(g, like):
    """Inverse of :func:`_bc_layout` for a gradient: back to ``like``'s shape and dtype."""
    if like.dim() == 2:
        return g.to(like.dtype)
    g = g.permute(1, 2, 3, 0)
    if like.dim() == 3:
        g = g.squeeze(1)
    return g.contiguous().to(like.dtype)


def _expand_mul(w, V, var, out):
    """out[t, p, d, n] = w[t, p, d] * V[.., n] (V: (T, p, G, N) if var else (dim, N))."""
    if var:
        T, p, G, n = V.shape
        d = w.shape[2]
        torch.mul(w.view(T, p, G, d // G, 1), V.view(T, p, G, 1, n),
                  out=out.view(T, p, G, d // G, n))
    else:
        torch.mul(w.unsqueeze(-1), V, out=out)


def _contract_n(X, V, var, scratch):
    """sum_n X[t, p, d, n] * V[.., n] -> (T, p, dim); ``scratch`` is a buffer shaped like X.
    (An elementwise product and a sum beat ``torch.bmm`` with N-long rows by 1.7x here.)"""
    if var:
        T, p, G, n = V.shape
        d = X.shape[2]
        torch.mul(X.view(T, p, G, d // G, n), V.view(T, p, G, 1, n),
                  out=scratch.view(T, p, G, d // G, n))
    else:
        torch.mul(X, V, out=scratch)
    return scratch.sum(-1)


def _contract_d(X, w, var, G, scratch):
    """The gradient of V in :func:`_expand_mul`: sum over the channels sharing V[.., n] of
    X[t, p, d, n] * w[t, p, d] -> (T, p, G, N) if var, else summed over (t, p) -> (dim, N)."""
    T, p, d, n = X.shape
    if var:  # a (1, dim/G) x (dim/G, N) product per (t, p, g)
        r = torch.bmm(w.reshape(T * p * G, 1, d // G), X.view(T * p * G, d // G, n))
        return r.view(T, p, G, n)
    torch.mul(X, w.unsqueeze(-1), out=scratch)
    return scratch.sum((0, 1))


def _softplus(x):
    """torch's softplus (threshold 20) within 2 ulp, about 3x faster on the CPU, where
    ``F.softplus`` evaluates a scalar log1p: log1p(e) is computed as log(1+e) * e / ((1+e) - 1)
    (Goldberg's trick, accurate to a few ulp), and as e itself when 1+e rounds to 1."""
    e = torch.exp(x)  # inf above ~88: only used where x <= 20 below
    w = e + 1
    r = torch.log(w).mul_(e)
    w.sub_(1)
    r.div_(w)
    torch.where(w == 0, e, r, out=r)
    return torch.where(x > _SOFTPLUS_THRESHOLD, x, r, out=r)


def _softplus_grad(raw):
    """d softplus(raw) / d raw with torch's default threshold."""
    return torch.sigmoid(raw).masked_fill_(raw > _SOFTPLUS_THRESHOLD, 1.0)


class _Scan:
    """One call's constants: compute dtype, shapes, ``A``, ``B``/``C`` in compute layout (small),
    ``D`` and ``delta_bias`` in compute dtype, the piece plan, and how to cut (T, p, dim) slabs
    out of, and back into, the (batch, dim, L) tensors."""

    def __init__(self, u, delta, A, B, C, D, delta_bias, softplus, extras=None):
        self.ct = ct = _compute_dtype(u, delta, A, B, C)
        self.batch, self.dim, self.length = u.shape
        self.n = A.shape[1]
        self.device = u.device
        self.softplus = softplus
        self.A = A.to(ct).contiguous()
        # float32: exp(delta A) is evaluated as exp2(delta (A log2 e)), 4x faster than torch.exp
        # on the CPU and as accurate up to the rounding of the product (a few 1e-7 relative).
        self.use_exp2 = ct == torch.float32
        self.A_exp = self.A * _LOG2_E if self.use_exp2 else self.A
        self.B, self.B_var = _bc_layout(B, ct)
        self.C, self.C_var = _bc_layout(C, ct)
        self.GB = self.B.shape[2] if self.B_var else 1
        self.GC = self.C.shape[2] if self.C_var else 1
        self.D = D.to(ct) if D is not None else None
        self.delta_bias = delta_bias.to(ct) if delta_bias is not None else None
        self.p, self.T = _plan(self.batch, self.dim, self.length, self.n, torch.finfo(ct).bits // 8)
        # extras: a per-step factor on exp(delta A), an output factor, per-step state step sizes
        self.step_scale = self.out_scale = self.state_scales = None
        if extras is not None:
            if extras.step_scale is not None:
                self.step_scale = extras.step_scale.detach().to(ct)
            if extras.out_scale is not None:
                self.out_scale = extras.out_scale.detach().to(ct)
            if extras.state_scales is not None:
                # Python numbers of the compute dtype's values: one in-place op per step each
                self.state_scales = extras.state_scales.detach().to(ct).tolist()
                self.qmax = extras.qmax

    def pieces(self):
        """[(b0, b1, [(t0, t1), ...])] in forward order."""
        out = []
        for b0 in range(0, self.batch, self.p):
            b1 = min(self.batch, b0 + self.p)
            out.append((b0, b1, [(t0, min(self.length, t0 + self.T))
                                 for t0 in range(0, self.length, self.T)]))
        return out

    def buffers(self, count):
        numel = self.T * self.p * self.dim * self.n
        return [_Buffer(flat, self.dim, self.n)
                for flat in _workspace(count, numel, self.ct, self.device)]

    def slab(self, x, b0, b1, t0, t1):
        """x[b0:b1, :, t0:t1] of a (batch, dim, L) tensor as a contiguous (T, p, dim) in the
        compute dtype (one transposing copy)."""
        out = torch.empty(t1 - t0, b1 - b0, self.dim, dtype=self.ct, device=self.device)
        return out.copy_(x[b0:b1, :, t0:t1].permute(2, 0, 1))

    @staticmethod
    def put(dst, src, b0, b1, t0, t1):
        """Write a (T, p, dim) slab into dst[b0:b1, :, t0:t1] (dst: (batch, dim, L))."""
        dst[b0:b1, :, t0:t1].permute(2, 0, 1).copy_(src)

    def bc_slab(self, M, var, b0, b1, t0, t1):
        return M[t0:t1, b0:b1].contiguous() if var else M

    def piece_inputs(self, u, delta, b0, b1, t0, t1):
        """(u, delta + bias, delta after the softplus) of a piece, each (T, p, dim)."""
        u_s = self.slab(u, b0, b1, t0, t1)
        raw = self.slab(delta, b0, b1, t0, t1)
        if self.delta_bias is not None:
            raw.add_(self.delta_bias)
        return u_s, raw, (_softplus(raw) if self.softplus else raw)


_WORKSPACE = threading.local()


def _workspace(count, numel, dtype, device):
    """``count`` flat work buffers of ``numel`` elements. On the CPU they are kept between calls
    (per thread, at most 3 x _PIECE_BYTES): freshly allocated multi-MiB buffers are page-faulted in
    on every call, which costs about as much as the arithmetic done in them."""
    if device.type != "cpu":
        return [torch.empty(numel, dtype=dtype, device=device) for _ in range(count)]
    cache = getattr(_WORKSPACE, "buffers", None)
    if cache is None:
        cache = _WORKSPACE.buffers = {}
    bufs = cache.get(dtype, [])
    if len(bufs) < count or bufs[0].numel() < numel:
        size = max(numel, bufs[0].numel() if bufs else 0)
        bufs = cache[dtype] = [torch.empty(size, dtype=dtype) for _ in range(max(count, len(bufs)))]
    return [b[:numel] for b in bufs[:count]]


class _Buffer:
    """A flat work buffer; its (T, p, dim, N) views and their per-step slabs are cached by shape
    (making the T slab views costs about as much as a whole-tensor op, and pieces repeat)."""

    def __init__(self, flat, dim, n):
        self.flat = flat
        self.dim, self.n = dim, n
        self._views = {}

    def get(self, T, p):
        """Returns (view of shape (T, p, dim, N), tuple of its T slabs of shape (p, dim, N))."""
        v = self._views.get((T, p))
        if v is None:
            x = self.flat[: T * p * self.dim * self.n].view(T, p, self.dim, self.n)
            v = self._views[(T, p)] = (x, x.unbind(0))
        return v


def _states(P, d_s, du_s, B_s, h0, E, es, H, hs, hook=None, where=(0, 0, 0)):
    """Fill E with exp(delta A) and H with the states of one piece (T, p, dim, N), starting from
    the state h0 (None: zeros). With a ``hook`` (a :class:`_Hooks` with a state hook), it is
    applied to every ``H[t]`` before ``H[t+1]`` is computed; ``where`` = (t0, b0, b1) of the piece."""
    torch.mul(d_s.unsqueeze(-1), P.A_exp, out=E)
    if P.use_exp2:
        E.exp2_()
    else:
        E.exp_()
    t0, b0, b1 = where
    if P.step_scale is not None:  # exp(delta[t] A) step[t]
        E.mul_(P.step_scale[t0 : t0 + E.shape[0]].view(-1, 1, 1, 1))
    _expand_mul(du_s, B_s, P.B_var, H)  # H[t] = delta B u, then the recurrence in place:
    if h0 is not None:
        hs[0].addcmul_(es[0], h0)
    quant = P.state_scales is not None
    if not quant and (hook is None or hook.state_hook is None):
        for t in range(1, len(hs)):
            hs[t].addcmul_(es[t], hs[t - 1])
        return
    if quant:
        scales, q = P.state_scales, P.qmax
        hs[0].div_(scales[t0]).round_().clamp_(-q, q).mul_(scales[t0])
    if hook is None or hook.state_hook is None:
        for t in range(1, len(hs)):
            s = scales[t0 + t]
            hs[t].addcmul_(es[t], hs[t - 1]).div_(s).round_().clamp_(-q, q).mul_(s)
        return
    hook.apply(H, 0, t0, b0, b1)
    for t in range(1, len(hs)):
        hs[t].addcmul_(es[t], hs[t - 1])
        if quant:
            s = scales[t0 + t]
            hs[t].div_(s).round_().clamp_(-q, q).mul_(s)
        hook.apply(H, t, t0, b0, b1)


class _Hooks:
    """The state hook and the state reader of one call (see :func:`selective_scan`)."""

    def __init__(self, state_hook, state_reader):
        self.state_hook = state_hook
        self.state_reader = state_reader

    def apply(self, H, t, t0, b0, b1):
        """Run the state hook on ``H[t]`` (global step ``t0 + t``) and store what it returns."""
        h = H[t : t + 1]
        with torch.no_grad():
            r = self.state_hook(h, t0 + t, t0 + t + 1, b0, b1)
        if r is not None and r is not h:
            if not isinstance(r, torch.Tensor) or tuple(r.shape) != tuple(h.shape):
                raise ValueError(
                    f"selective_scan: state_hook must return None or a tensor of the state's shape "
                    f"{tuple(h.shape)}, got {tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__}"
                )
            h.copy_(r)

    def read(self, H, t0, t1, b0, b1):
        if self.state_reader is not None:
            with torch.no_grad():
                self.state_reader(H, t0, t1, b0, b1)


def _no_autocast(device):
    """Autocast would run the ``torch.bmm`` contractions in half precision: the scan computes in
    float32 (or float64) whatever the autocast state, as mamba-ssm's kernel does."""
    return torch.autocast(device_type=device.type, enabled=False)


def _forward(u, delta, A, B, C, D, z, delta_bias, softplus, save, hooks=None, extras=None):
    """Returns (out, last_state, checkpoints, pre_gate); see :func:`selective_scan`. With
    ``save``, ``checkpoints`` holds the state before every time chunk but the first (keyed by
    (b0, t0)) and ``pre_gate`` is ``y + D u`` when ``z`` is given (else None)."""
    with _no_autocast(u.device):
        return _forward_impl(u, delta, A, B, C, D, z, delta_bias, softplus, save, hooks, extras)


def _forward_impl(u, delta, A, B, C, D, z, delta_bias, softplus, save, hooks, extras):
    P = _Scan(u, delta, A, B, C, D, delta_bias, softplus, extras)
    d, n, L, ct = P.dim, P.n, P.length, P.ct
    out = torch.empty(P.batch, d, L, dtype=u.dtype, device=P.device)
    last = torch.empty(P.batch, d, n, dtype=ct, device=P.device)
    pre_gate = torch.empty(P.batch, d, L, dtype=ct, device=P.device) if save and z is not None else None
    E_buf, H_buf = P.buffers(2)
    checkpoints = {}
    for b0, b1, chunks in P.pieces():
        h0 = None
        for t0, t1 in chunks:
            if h0 is not None and save:
                checkpoints[(b0, t0)] = h0
            E, es = E_buf.get(t1 - t0, b1 - b0)
            H, hs = H_buf.get(t1 - t0, b1 - b0)
            u_s, _, d_s = P.piece_inputs(u, delta, b0, b1, t0, t1)
            _states(P, d_s, d_s * u_s, P.bc_slab(P.B, P.B_var, b0, b1, t0, t1), h0, E, es, H, hs,
                    hooks, (t0, b0, b1))
            if hooks is not None:
                hooks.read(H, t0, t1, b0, b1)
            y = _contract_n(H, P.bc_slab(P.C, P.C_var, b0, b1, t0, t1), P.C_var, E)  # E is free
            if P.D is not None:
                y.addcmul_(u_s, P.D)
            if P.out_scale is not None:
                y.mul_(P.out_scale)
            if pre_gate is not None:
                P.put(pre_gate, y, b0, b1, t0, t1)
            if z is not None:
                y.mul_(F.silu(P.slab(z, b0, b1, t0, t1)))
            P.put(out, y, b0, b1, t0, t1)
            h0 = H[-1].clone() if len(chunks) > 1 else H[-1]
        last[b0:b1] = h0
    return out, last, checkpoints, pre_gate


class _SelectiveScanFn(torch.autograd.Function):
    """autograd wrapper: saves the inputs (and chunk checkpoints), recomputes states in backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, hooks, extras):
        out, last, checkpoints, pre_gate = _forward(u, delta, A, B, C, D, z, delta_bias, softplus,
                                                    save=True, hooks=hooks, extras=extras)
        keys = list(checkpoints)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, pre_gate,
                              *(checkpoints[k] for k in keys))
        ctx.checkpoint_keys = keys
        ctx.softplus = softplus
        ctx.hooks = hooks
        ctx.extras = extras
        ctx.set_materialize_grads(False)
        return out, last

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlast):
        with _no_autocast(ctx.saved_tensors[0].device):
            return _backward(ctx, dout, dlast)


def _backward(ctx, dout, dlast):
    """The backward of :class:`_SelectiveScanFn` (see the module docstring)."""
    u, delta, A, B, C, D, z, delta_bias, pre_gate, *saved_states = ctx.saved_tensors
    checkpoints = dict(zip(ctx.checkpoint_keys, saved_states))
    P = _Scan(u, delta, A, B, C, D, delta_bias, ctx.softplus, ctx.extras)
    ct, d, n, dev = P.ct, P.dim, P.n, P.device
    need = ctx.needs_input_grad
    need_u, need_delta, need_A, need_B, need_C, need_D, need_z, need_bias = need[:8]
    need_ddelta = need_delta or need_bias
    need_q = need_A or need_ddelta  # q = dLoss/d(delta A)
    need_g = need_q or need_u or need_B  # g = dLoss/dh, the adjoint recurrence
    need_h = need_g or need_C  # the states

    def empty_like(x):
        return torch.empty(x.shape, dtype=x.dtype, device=dev)

    du = empty_like(u) if need_u else None
    ddelta = empty_like(delta) if need_delta else None
    dz = empty_like(z) if need_z else None
    dA = torch.zeros(d, n, dtype=ct, device=dev) if need_A else None
    dB = torch.zeros_like(P.B) if need_B else None
    dC = torch.zeros_like(P.C) if need_C else None
    dD = torch.zeros(d, dtype=ct, device=dev) if need_D else None
    dbias = torch.zeros(d, dtype=ct, device=dev) if need_bias else None

    E_buf, H_buf, G_buf = P.buffers(3)
    for b0, b1, chunks in P.pieces():
        carry = None if dlast is None else dlast[b0:b1].to(ct)
        for t0, t1 in reversed(chunks):
            T, p = t1 - t0, b1 - b0
            E, es = E_buf.get(T, p)
            H, hs = H_buf.get(T, p)
            Gr, gs = G_buf.get(T, p)
            h0 = checkpoints.get((b0, t0))
            u_s, raw_s, d_s = P.piece_inputs(u, delta, b0, b1, t0, t1)
            du_s = d_s * u_s
            B_s = P.bc_slab(P.B, P.B_var, b0, b1, t0, t1)
            if need_h:  # the states as the forward used them: the state hook runs again
                _states(P, d_s, du_s, B_s, h0, E, es, H, hs, ctx.hooks, (t0, b0, b1))

            # The gate and D: out = (y + D u) silu(z).
            if dout is None:
                dy = torch.zeros(T, p, d, dtype=ct, device=dev)
            else:
                dy = P.slab(dout, b0, b1, t0, t1)
            if z is not None:
                z_s = P.slab(z, b0, b1, t0, t1)
                sz = torch.sigmoid(z_s)
                silu = z_s * sz
                if need_z:  # d silu(z) / dz = sigmoid(z) (1 + z - silu(z))
                    g_z = z_s.sub_(silu).add_(1).mul_(sz).mul_(dy)
                    P.put(dz, g_z.mul_(P.slab(pre_gate, b0, b1, t0, t1)), b0, b1, t0, t1)
                dy.mul_(silu)
            if P.out_scale is not None:  # out = out_scale (y + D u) silu(z)
                dy.mul_(P.out_scale)
            if need_D:
                dD += (dy * u_s).sum((0, 1))

            if need_C:  # dC[t] = sum_d h[t] dy[t]  (G is free: scratch)
                gC = _contract_d(H, dy, P.C_var, P.GC, Gr)
                if P.C_var:
                    dC[t0:t1, b0:b1] = gC
                else:
                    dC += gC
            if not need_g:
                continue
            # Adjoint recurrence, g = dLoss/dh: g[t] = C[t] dy[t] + exp(delta[t+1] A) g[t+1].
            _expand_mul(dy, P.bc_slab(P.C, P.C_var, b0, b1, t0, t1), P.C_var, Gr)
            if carry is not None:
                gs[-1].add_(carry)
            for t in range(T - 2, -1, -1):
                gs[t].addcmul_(es[t + 1], gs[t + 1])
            if h0 is not None:
                carry = es[0] * gs[0]  # the gradient of the state before this chunk
            if need_q:
                # q[t] = g[t] exp(delta[t] A) h[t-1] = dLoss/d(delta[t] A), written over E.
                if T > 1:
                    E[1:].mul_(H[:-1])
                if h0 is not None:
                    E[0].mul_(h0)
                else:
                    E[0].zero_()
                E.mul_(Gr)
            # From here on H is free: scratch.
            if need_B:  # dB[t] = sum_d g[t] delta[t] u[t]
                gB = _contract_d(Gr, du_s, P.B_var, P.GB, H)
                if P.B_var:
                    dB[t0:t1, b0:b1] = gB
                else:
                    dB += gB
            if need_A:  # dA = sum_{b,t} q[t] delta[t]
                dA += _contract_d(E, d_s, False, 1, H)
            if not (need_u or need_ddelta):
                continue
            d_du = _contract_n(Gr, B_s, P.B_var, H)  # d(delta u)[t] = sum_n g[t] B[t]
            if need_ddelta:  # ddelta = sum_n q A + d(delta u) u, then through the softplus
                g_d = _contract_n(E, P.A, False, H).addcmul_(d_du, u_s)
                if P.softplus:
                    g_d.mul_(_softplus_grad(raw_s))
                if need_bias:
                    dbias += g_d.sum((0, 1))
                if need_delta:
                    P.put(ddelta, g_d, b0, b1, t0, t1)
            if need_u:  # du = d(delta u) delta + dy D
                d_du.mul_(d_s)
                if P.D is not None:
                    d_du.addcmul_(dy, P.D)
                P.put(du, d_du, b0, b1, t0, t1)

    return (du, ddelta,
            dA.to(A.dtype) if need_A else None,
            _bc_restore(dB, B) if need_B else None,
            _bc_restore(dC, C) if need_C else None,
            dD.to(D.dtype) if need_D else None,
            dz,
            dbias.to(delta_bias.dtype) if need_bias else None,
            None, None, None)
