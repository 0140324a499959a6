"""Code generation for vmfx's Triton kernels: source buffers, a hash-keyed kernel cache, shared
device helpers and the epilogue vocabulary.

vmfx does not hand-write one Triton kernel per layer. Each kernel family is a *template* (see
:mod:`vmfx.lowering.kernels`): its source written out as text with named slots
(:class:`vmfx.lowering.template.KernelTemplate`), filled by small functions from a few static
choices (which inputs exist, bit widths, the epilogue ops, where it came from). This module holds
what every template shares, in the manner of Inductor's ``codegen/triton.py``:

* :func:`render_preamble`: what every generated module starts with (header, helpers, autotune
  decorator), and :func:`kernel_cache`, the memoized loader of one template's kernels.
* :class:`IndentedBuffer` builds source line by line (``writeline``, ``with buf.indent():``,
  ``splice``); the preamble and the epilogue lines (:func:`epilogue_source`) are written with it.
* :func:`code_hash` (sha256 of the source) names a kernel; :func:`load_kernel` writes the source to
  ``<cache dir>/<hash>.py`` (``$VMFX_CACHE_DIR``, else ``~/.cache/vmfx/kernels``), imports it under
  a unique module name and memoizes it by hash, so one source is imported (and compiled by Triton)
  once per process, and a file already on disk is never rewritten.
* :func:`render_header` writes the comment block every generated kernel starts with: the template
  name, the FX nodes it was generated from (provenance, as Inductor's ``get_kernel_metadata``) and
  the render parameters, so that a kernel seen in a profiler or a cache directory can be traced
  back to the graph.
* :data:`HELPERS` / :func:`render_helpers`: small ``@triton.jit`` device functions shared by the
  templates: round-half-to-even (``_vmfx_rint``), softplus (``_vmfx_softplus``), SiLU
  (``_vmfx_silu``).
* :class:`Epilogue` / :func:`render_epilogue`: the elementwise ops a partition appends to a
  kernel's output tile (``silu``, ``softplus``, ``add``/``sub``/``mul``/``div`` and the reversed
  ``rsub``/``rdiv``, by a constant, by an extra tensor laid out like the output (M, N), or by a
  per-output-channel (N,) vector).

Backend selection. Triton decides at ``@triton.jit`` time whether a function runs compiled or in
its numpy interpreter (``TRITON_INTERPRET=1``). Before the first generated module is imported,
:func:`ensure_backend` sets ``TRITON_INTERPRET=1`` (``os.environ.setdefault``) when torch sees no
CUDA device, and raises a clear ``RuntimeError`` when the interpreter has been switched off
explicitly (there would be no driver to launch on).

Rounding. ``_vmfx_rint`` is round-half-to-even, bit-compatible with ``torch.round`` for every
finite float32 (Triton's interpreter has no ``libdevice.rint``). It avoids ``floor(v + 0.5)``,
whose sum is itself rounded (``0.49999997 + 0.5 == 1.0`` in float32; a tie fix testing
``r - v == 0.5`` happens to repair that case because ``r - v`` rounds too, but the argument then
rests on two roundings). Instead ``f = floor(v)``, ``d = v - f`` (exact for ``|v| >= 1`` by
Sterbenz's lemma; for ``-1 < v < 0`` it may round, but only towards a result on the correct side
of 0.5), and ``f + 1`` is taken when ``d > 0.5``, or ``d == 0.5`` and ``f`` is odd.
Kernels that quantize clamp ``v`` to the integer range first: the clamp (a min/max) sits between
the multiply that produces ``v`` and the subtraction in the helper, so no multiply-add can be
contracted into an FMA there; the launchers also pass ``enable_fp_fusion=False`` on the GPU so
that the float epilogues round like torch.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import keyword
import math
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

__all__ = [
    "IndentedBuffer",
    "code_hash",
    "cache_dir",
    "ensure_backend",
    "interpreting",
    "load_kernel",
    "clear_memo",
    "render_header",
    "HELPERS",
    "render_helpers",
    "EPILOGUE_OPS",
    "EPILOGUE_LAYOUTS",
    "Epilogue",
    "render_epilogue",
    "epilogue_source",
    "float_literal",
    "next_power_of_2",
    "launch_options",
    "check_tensor",
    "FLOAT_IO",
    "output_dtype",
    "store_value",
    "codes_epilogue_args",
    "render_autotune",
    "render_preamble",
    "kernel_cache",
]


# ------------------------------------------------------------------------------ source buffers


class IndentedBuffer:
    """A list of source lines with a current indentation level (Inductor's ``IndentedBuffer``).

    Example::

        buf = IndentedBuffer()
        buf.writeline("def f(x):")
        with buf.indent():
            buf.writeline("return x + 1")
        src = buf.getvalue()

    Args:
        initial_indent: starting indentation level (in units of ``tabwidth`` spaces).
        tabwidth: spaces per level.
    """

    def __init__(self, initial_indent: int = 0, tabwidth: int = 4):
        self._lines: list[str] = []
        self._indent = initial_indent
        self.tabwidth = tabwidth

    def prefix(self) -> str:
        """The whitespace of the current indentation level."""
        return " " * (self._indent * self.tabwidth)

    def writeline(self, line: str = "") -> None:
        """Append one line at the current indentation (an empty line stays empty)."""
        if "\n" in line:
            raise ValueError("writeline takes one line; use writelines or splice for several")
        self._lines.append(self.prefix() + line if line.strip() else "")

    def writelines(self, lines: Iterable[str]) -> None:
        """Append several lines at the current indentation."""
        for line in lines:
            self.writeline(line)

    def newline(self) -> None:
        """Append an empty line."""
        self._lines.append("")

    @contextlib.contextmanager
    def indent(self, offset: int = 1) -> Iterator[None]:
        """Context manager: lines written inside are indented by ``offset`` more levels."""
        self._indent += offset
        try:
            yield
        finally:
            self._indent -= offset

    def splice(self, other: "IndentedBuffer | str") -> None:
        """Append a block of source (another buffer or a string) at the current indentation.

        A string is dedented first (common leading whitespace removed), so triple-quoted snippets
        can be written indented in Python code; the block's relative indentation is kept.
        """
        if isinstance(other, IndentedBuffer):
            lines = other.getvalue().splitlines()
        else:
            import textwrap

            lines = textwrap.dedent(other).strip("\n").splitlines()
        for line in lines:
            self._lines.append(self.prefix() + line if line.strip() else "")

    def getvalue(self) -> str:
        """The source, newline-terminated."""
        return "\n".join(self._lines) + "\n"

    def __len__(self) -> int:
        return len(self._lines)


# ------------------------------------------------------------------------------ hashing, cache


def code_hash(source: str) -> str:
    """The cache key of a kernel source: the hex sha256 of its UTF-8 bytes."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def cache_dir() -> Path:
    """Where generated sources are written: ``$VMFX_CACHE_DIR``, else ``~/.cache/vmfx/kernels``
    (read at every call, so tests can redirect it)."""
    env = os.environ.get("VMFX_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "vmfx" / "kernels"


def interpreting() -> bool:
    """True when generated kernels run in Triton's CPU interpreter (``TRITON_INTERPRET`` on).

    Calls :func:`ensure_backend` first, so that on a machine without CUDA the answer is the one
    the next launch will see (the interpreter, switched on if nobody set it)."""
    ensure_backend()
    return _interpret_knob()


def _interpret_knob() -> bool:
    import triton

    return bool(triton.knobs.runtime.interpret)


def ensure_backend() -> None:
    """Make sure the next ``@triton.jit`` definition can be launched.

    With no CUDA device, switch Triton's interpreter on (``os.environ.setdefault``, so an explicit
    setting wins) before any generated kernel is defined.

    Raises:
        RuntimeError: no CUDA device and the interpreter is explicitly off (e.g.
            ``TRITON_INTERPRET=0`` or ``triton.knobs.runtime.interpret = False``): a kernel defined
            now would fail to launch with Triton's "0 active drivers".
    """
    if torch.cuda.is_available():
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if _library_compiled_for_gpu():
        raise RuntimeError(
            "vmfx: no CUDA device, and Triton was imported before its CPU interpreter was switched on "
            "(importing timm or torch._dynamo imports it), so Triton's own library functions (tl.zeros, "
            "...) cannot run in the interpreter. Set TRITON_INTERPRET=1 in the environment before "
            "Python starts (or before importing torch / timm), or use the CPU reference backend "
            "(backend='reference' or 'auto')."
        )
    if not _interpret_knob():
        raise RuntimeError(
            "vmfx: no CUDA device, and Triton's interpreter is switched off (TRITON_INTERPRET="
            f"{os.environ.get('TRITON_INTERPRET')!r}, or triton.knobs.runtime.interpret was set to "
            "False). Generated kernels could not be launched. Unset TRITON_INTERPRET (vmfx then "
            "sets it to 1) or set it to 1 before vmfx defines its first kernel, or use vmfx's CPU "
            "reference backend (vmfx.lowering.reference)."
        )


def _library_compiled_for_gpu() -> bool:
    """True when ``triton.language`` was imported with the interpreter off: its ``@triton.jit``
    library functions are then GPU ``JITFunction`` objects, which an interpreted kernel cannot call."""
    import sys

    lang = sys.modules.get("triton.language")
    if lang is None:
        return False
    from triton.runtime.jit import JITFunction

    return isinstance(getattr(lang, "zeros", None), JITFunction)


_MEMO: dict[str, object] = {}  # code hash -> imported module
_LOCK = threading.Lock()
_PROVENANCE: dict[str, list[str]] = {}  # code hash -> the provenance of every partition that loaded it

_PROVENANCE_START, _PROVENANCE_END = "# provenance (FX nodes):", "# parameters:"


def split_provenance(source: str) -> tuple[str, list[str]]:
    """``(source without its provenance lines, those lines)``: partitions of the same form (the
    same template and parameters, e.g. every block's ``in_proj``) share one compiled kernel, whatever
    layer they came from (:func:`load_kernel`)."""
    lines = source.split("\n")
    try:
        start, end = lines.index(_PROVENANCE_START), lines.index(_PROVENANCE_END)
    except ValueError:
        return source, []
    labels = [line[4:] if line.startswith("#   ") else line for line in lines[start + 1:end]]
    return "\n".join(lines[:start + 1] + ["#   (shared: see vmfx.lowering.codegen.kernel_provenance)"]
                      + lines[end:]), [label for label in labels if label != "(none given)"]


def kernel_provenance(key: str) -> list[str]:
    """The provenance of every partition that loaded the kernel with code hash ``key`` (the name of
    its file in the kernel cache), in load order, without repeats."""
    return list(_PROVENANCE.get(key, []))


def clear_memo() -> None:
    """Forget the kernels imported in this process (files on disk are kept). For tests."""
    with _LOCK:
        _MEMO.clear()


def load_kernel(source: str, name: str):
    """Import a generated kernel source and return the object called ``name`` in it.

    The provenance lines of the header are set aside first (:func:`split_provenance`; they are
    kept in a side table, :func:`kernel_provenance`), so that every partition of the same form
    loads one kernel, compiled and autotuned once, not one per layer. The rest is written once to
    ``<cache dir>/<hash>.py`` (atomically; an existing file with that name is never rewritten: its
    name is the hash of its content) and imported with importlib under the module name
    ``vmfx_kernel_<hash>``. Modules are memoized by hash, so the same source gives the same
    function object, compiled by Triton at most once per process.

    Args:
        source: the complete module source (``import triton`` etc. included).
        name: the attribute to return, usually the ``@triton.jit`` (or autotuned) kernel.

    Returns:
        The module attribute ``name``.

    Raises:
        RuntimeError: see :func:`ensure_backend`.
        AttributeError: the module defines no ``name``.
    """
    source, provenance = split_provenance(source)
    key = code_hash(source)
    with _LOCK:
        seen = _PROVENANCE.setdefault(key, [])
        seen.extend(p for p in provenance if p not in seen)
        module = _MEMO.get(key)
        if module is None:
            ensure_backend()
            path = _write_source(key, source)
            modname = f"vmfx_kernel_{key}"
            spec = importlib.util.spec_from_file_location(modname, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[modname] = module  # triton's jit reads the source through inspect
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(modname, None)
                raise
            _MEMO[key] = module
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"generated kernel module {key[:12]} defines no {name!r}") from None


def _write_source(key: str, source: str) -> Path:
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{key}.py"
    if path.exists() and path.read_text(encoding="utf-8") == source:
        return path
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{key[:16]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(source)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


# ------------------------------------------------------------------------------ header, helpers


def render_header(buf: IndentedBuffer, template: str, provenance: Sequence[str], params: dict) -> None:
    """Write the comment block and imports every generated kernel module starts with.

    Args:
        buf: the buffer (at indentation 0).
        template: the template name (``qlinear``, ``quantize``, ...).
        provenance: the FX nodes (or any labels) this kernel was generated from, one per line.
        params: the render parameters, written as ``# name = value`` lines.
    """
    buf.writeline(f"# vmfx generated kernel: template={template}")
    buf.writeline("# provenance (FX nodes):")
    if not provenance:
        buf.writeline("#   (none given)")
    for p in provenance:
        for line in str(p).splitlines() or [""]:
            buf.writeline(f"#   {line}")
    buf.writeline("# parameters:")
    for k, v in params.items():
        buf.writeline(f"#   {k} = {v!r}")
    buf.writeline("import triton")
    buf.writeline("import triton.language as tl")
    buf.newline()


#: Shared ``@triton.jit`` device helpers, by name; templates splice in those they call.
HELPERS: dict[str, str] = {
    "_vmfx_rint": '''
        @triton.jit
        def _vmfx_rint(v):
            """Round half to even (torch.round) of finite float32 v: f = floor(v), d = v - f (exact
            for |v| >= 1), f + 1 when d > 0.5 or (d == 0.5 and f odd)."""
            f = tl.floor(v)
            d = v - f
            odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
            up = (d > 0.5) | ((d == 0.5) & odd)
            return tl.where(up, f + 1.0, f)
    ''',
    "_vmfx_softplus": '''
        @triton.jit
        def _vmfx_softplus(x):
            """torch's softplus (threshold 20): log1p(exp(x)) with log1p(e) = log(1 + e) * e /
            ((1 + e) - 1) (Goldberg), e itself when 1 + e rounds to 1; x above 20."""
            e = tl.exp(tl.minimum(x, 20.0))
            w = e + 1.0
            m = w - 1.0
            r = tl.where(m == 0.0, e, tl.log(w) * (e / tl.where(m == 0.0, 1.0, m)))
            return tl.where(x > 20.0, x, r)
    ''',
    "_vmfx_silu": '''
        @triton.jit
        def _vmfx_silu(x):
            """x * sigmoid(x), as x / (1 + exp(-x))."""
            return x / (1.0 + tl.exp(-x))
    ''',
    "_vmfx_smooth_silu": '''
        @triton.jit
        def _vmfx_smooth_silu(x, s):
            """MambaQuant's Smooth-SiLU x * sigmoid(s x), as x / (1 + exp(-(s x)))."""
            return x / (1.0 + tl.exp(-(s * x)))
    ''',
    "_vmfx_quantize": '''
        @triton.jit
        def _vmfx_quantize(v, inv_sa, za, QMIN, QMAX, OFFSET):
            """Shifted int8 codes clamp(rint(v * inv_sa) + za, QMIN, QMAX) - OFFSET of an (already
            smoothed) float tile v. v is clamped to [QMIN - za, QMAX - za] before rounding (same
            result for integer za): rint's argument stays small, and the min/max separates the
            multiply from the rounding arithmetic, so no FMA can be formed across them."""
            v = v * inv_sa
            v = tl.minimum(tl.maximum(v, QMIN - za), QMAX - za)
            return (_vmfx_rint(v) + za - OFFSET).to(tl.int8)
    ''',
    "_vmfx_butterfly": '''
        @triton.jit
        def _vmfx_butterfly(t, BLOCK_M: tl.constexpr, P: tl.constexpr, HALF: tl.constexpr):
            """One Walsh-Hadamard stage over the last axis (P) of a (BLOCK_M, P) tile: entries a and
            a + HALF (bit log2(HALF) of a clear / set) become their sum and difference."""
            t = tl.reshape(t, (BLOCK_M, P // (2 * HALF), 2, HALF))
            lo, hi = tl.split(tl.permute(t, (0, 1, 3, 2)))
            t = tl.permute(tl.join(lo + hi, lo - hi), (0, 1, 3, 2))
            return tl.reshape(t, (BLOCK_M, P))
    ''',
}

#: Helpers that call other helpers.
_HELPER_DEPS: dict[str, tuple[str, ...]] = {"_vmfx_quantize": ("_vmfx_rint",)}


def render_helpers(buf: IndentedBuffer, names: Iterable[str]) -> None:
    """Splice the named :data:`HELPERS` into ``buf`` (each once, in a fixed order)."""
    wanted = set(names)
    for name in list(wanted):
        wanted.update(_HELPER_DEPS.get(name, ()))
    unknown = wanted - set(HELPERS)
    if unknown:
        raise KeyError(f"unknown helpers {sorted(unknown)}; known: {sorted(HELPERS)}")
    for name in HELPERS:
        if name in wanted:
            buf.splice(HELPERS[name])
            buf.newline()


def float_literal(value: float) -> str:
    """A float32-safe Triton source literal for a finite Python number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"epilogue constants must be finite, got {value!r}")
    return repr(v)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


# ------------------------------------------------------------------------------ epilogues

#: Epilogue op name -> number of operands.
EPILOGUE_OPS: dict[str, int] = {
    "silu": 0, "softplus": 0, "add": 1, "sub": 1, "mul": 1, "div": 1, "rsub": 1, "rdiv": 1,
}
#: ``acc = acc <op> operand``, or for the reversed ops ``acc = operand <op> acc``.
_BINARY = {"add": "+", "sub": "-", "mul": "*", "div": "/", "rsub": "-", "rdiv": "/"}
_REVERSED = ("rsub", "rdiv")
#: Layouts of tensor operands: like the output (M, N), or one value per output channel (N,).
EPILOGUE_LAYOUTS = ("full", "channel")


@dataclass(frozen=True)
class Epilogue:
    """A validated epilogue: the ops, the extra tensor inputs they read, and the helpers needed.

    Attributes:
        ops: the normalized ops, e.g. ``(("silu",), ("add", "residual"), ("mul", 0.5),
            ("mul", "gamma", "channel"))``.
        inputs: names of the extra tensor operands, in order of first use; each becomes a kernel
            argument ``ep_<name>_ptr``.
        layouts: ``(name, layout)`` pairs: ``"full"`` (laid out like the output, (M, N)
            contiguous) or ``"channel"`` ((N,), broadcast over rows).
        helpers: the :data:`HELPERS` the rendered lines call.
    """

    ops: tuple[tuple, ...]
    inputs: tuple[str, ...]
    layouts: tuple[tuple[str, str], ...]
    helpers: tuple[str, ...]

    @classmethod
    def parse(cls, ops: Sequence[Sequence] | None) -> "Epilogue":
        """Validate a list of ops (see :func:`render_epilogue`).

        Raises:
            ValueError: unknown op, wrong number of operands, bad operand name, constant or
                layout, or one tensor used with two layouts.
            TypeError: an operand that is neither a number nor a name.
        """
        norm, inputs, layouts, helpers = [], [], {}, []
        for op in ops or ():
            if isinstance(op, str):
                op = (op,)
            op = tuple(op)
            if not op or op[0] not in EPILOGUE_OPS:
                raise ValueError(f"unknown epilogue op {op!r}; known: {sorted(EPILOGUE_OPS)}")
            name, args = op[0], op[1:]
            arity = EPILOGUE_OPS[name]
            layout_given = arity == 1 and len(args) == 2 and isinstance(args[0], str)
            if len(args) != arity and not layout_given:
                raise ValueError(f"epilogue op {name!r} takes {arity} operand(s) (a tensor operand may add "
                                 f"a layout), got {op!r}")
            if arity == 0:
                helper = f"_vmfx_{name}"
                if helper not in helpers:
                    helpers.append(helper)
                norm.append((name,))
                continue
            operand = args[0]
            if isinstance(operand, str):
                if not operand.isidentifier() or keyword.iskeyword(operand):
                    raise ValueError(f"epilogue operand name {operand!r} is not a Python identifier")
                layout = args[1] if layout_given else "full"
                if layout not in EPILOGUE_LAYOUTS:
                    raise ValueError(f"epilogue operand layout {layout!r}; known: {EPILOGUE_LAYOUTS}")
                if layouts.setdefault(operand, layout) != layout:
                    raise ValueError(f"epilogue operand {operand!r} used with two layouts")
                if operand not in inputs:
                    inputs.append(operand)
                norm.append((name, operand) if layout == "full" else (name, operand, layout))
            else:
                float_literal(operand)  # validates
                norm.append((name, float(operand)))
        return cls(tuple(norm), tuple(inputs), tuple((n, layouts[n]) for n in inputs), tuple(helpers))

    def layout(self, name: str) -> str:
        """The layout of the tensor operand ``name``."""
        return dict(self.layouts)[name]

    def arg_names(self) -> list[str]:
        """The kernel pointer arguments of the extra inputs."""
        return [f"ep_{n}_ptr" for n in self.inputs]


def render_epilogue(
    buf: IndentedBuffer,
    epilogue: Epilogue,
    acc: str = "acc",
    offsets: str = "offs_out",
    mask: str = "mask_out",
    channel_offsets: str = "offs_n",
    channel_mask: str = "mask_n",
) -> None:
    """Write the lines applying ``epilogue`` to the float32 tile variable ``acc`` in place.

    Ops, applied in order:

    * ``("silu",)``; ``("softplus",)`` (threshold 20, as torch);
    * ``("add" | "sub" | "mul" | "div", operand)``: ``acc = acc <op> operand``;
    * ``("rsub" | "rdiv", operand)``: ``acc = operand <op> acc`` (e.g. ``1 - y``, ``c / y``);

    where the operand is a Python number (written as a float32 literal) or the name of an extra
    float tensor, optionally followed by its layout: ``"full"`` (default; laid out like the
    output, loaded as ``tl.load(ep_<name>_ptr + offsets, mask=mask, other=0.0)``) or
    ``"channel"`` (one value per output channel, (N,), e.g. a layer scale ``gamma``, loaded at
    ``channel_offsets`` and broadcast over the rows). Each extra input is loaded once, before the
    first op that uses it.

    Args:
        buf: the buffer, at the kernel body's indentation.
        epilogue: from :meth:`Epilogue.parse`.
        acc: the tile variable.
        offsets: a variable holding the output element offsets of the (rows, channels) tile.
        mask: a variable holding the tile's bounds mask.
        channel_offsets: a variable holding the tile's output channel indices (1-D).
        channel_mask: their bounds mask.
    """
    loaded: set[str] = set()
    for op in epilogue.ops:
        name = op[0]
        if name in ("silu", "softplus"):
            buf.writeline(f"{acc} = _vmfx_{name}({acc})  # epilogue: {name}")
            continue
        operand = op[1]
        if isinstance(operand, str):
            var = f"ep_{operand}"
            if operand not in loaded:
                if epilogue.layout(operand) == "channel":
                    buf.writeline(f"{var} = tl.load(ep_{operand}_ptr + {channel_offsets}, mask={channel_mask}, "
                                  "other=0.0).to(tl.float32)[None, :]")
                else:
                    buf.writeline(f"{var} = tl.load(ep_{operand}_ptr + {offsets}, mask={mask}, "
                                  "other=0.0).to(tl.float32)")
                loaded.add(operand)
            rhs = var
        else:
            rhs = float_literal(operand)
        expr = f"{rhs} {_BINARY[name]} {acc}" if name in _REVERSED else f"{acc} {_BINARY[name]} {rhs}"
        buf.writeline(f"{acc} = {expr}  # epilogue: {' '.join(map(repr, op))}")


def epilogue_source(epilogue: Epilogue, **names: str) -> str:
    """The lines of :func:`render_epilogue` as one block of source, without indentation (empty
    when there are no ops); ``names`` are its variable names (``acc``, ``offsets``, ...)."""
    buf = IndentedBuffer()
    render_epilogue(buf, epilogue, **names)
    return buf.getvalue().rstrip("\n") if len(buf) else ""


# ------------------------------------------------------------------------------ launch helpers


def launch_options(num_warps: int | None = None, num_stages: int | None = None) -> dict:
    """Keyword options for a kernel launch.

    On the GPU: ``enable_fp_fusion=False`` (no multiply-add contraction, so float epilogues round
    like torch's separate ops), plus ``num_warps`` / ``num_stages`` when given (fixed-config
    launches). Under the interpreter these are dropped (it ignores them anyway).
    """
    if interpreting():
        return {}
    opts: dict = {"enable_fp_fusion": False}
    if num_warps is not None:
        opts["num_warps"] = num_warps
    if num_stages is not None:
        opts["num_stages"] = num_stages
    return opts


#: The float dtypes kernels read and write, with their Triton names. Float inputs are converted to
#: float32 in registers (exact for all three); results are computed in float32 (or int32) and rounded
#: once, at the store, to the output's dtype.
FLOAT_IO: dict[torch.dtype, str] = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def output_dtype(out_dtype: torch.dtype | None, like: torch.dtype) -> torch.dtype:
    """The dtype a launcher writes: ``out_dtype`` if given, else ``like`` (its float input's dtype,
    the model's); ``ValueError`` naming the choices for any other dtype."""
    dtype = like if out_dtype is None else out_dtype
    if dtype not in FLOAT_IO:
        raise ValueError(f"out_dtype must be one of {list(FLOAT_IO)}, got {dtype}")
    return dtype


def store_value(value: str, out_dtype: str) -> str:
    """The expression a kernel stores: ``value`` (float32 in registers) rounded to ``out_dtype``
    (a :data:`FLOAT_IO` name)."""
    if out_dtype not in FLOAT_IO.values():
        raise ValueError(f"out_dtype must be one of {sorted(FLOAT_IO.values())}, got {out_dtype!r}")
    return value if out_dtype == "float32" else f"{value}.to(tl.{out_dtype})"


def check_tensor(t, name: str, dtype: torch.dtype | Sequence[torch.dtype], shape: Sequence[int] | None = None,
                 device: torch.device | None = None, contiguous: bool = False) -> torch.Tensor:
    """Validate a kernel argument; raise ``ValueError`` naming it and what was expected.

    Args:
        t: the tensor.
        name: its name in messages.
        dtype: the allowed dtype (or dtypes).
        shape: the expected shape, or None.
        device: the expected device, or None.
        contiguous: require a contiguous tensor.

    Returns:
        ``t``.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    dtypes = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous())")
    return t


def render_autotune(buf: IndentedBuffer, configs: Sequence[dict], key: Sequence[str]) -> None:
    """Write a ``@triton.autotune`` decorator.

    Args:
        buf: the buffer.
        configs: dicts of meta-parameters plus ``num_warps`` / ``num_stages``.
        key: argument names whose values select a tuned config.
    """
    buf.writeline("@triton.autotune(")
    with buf.indent():
        buf.writeline("configs=[")
        with buf.indent():
            for c in configs:
                meta = {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")}
                extra = ", ".join(f"{k}={c[k]}" for k in ("num_warps", "num_stages") if k in c)
                buf.writeline(f"triton.Config({meta!r}, {extra}),")
        buf.writeline("],")
        buf.writeline(f"key={list(key)!r},")
        buf.writeline("cache_results=True,  # timings kept on disk (Triton's cache): a new process does not re-tune")
    buf.writeline(")")


def codes_epilogue_args(act, bsz: int, length: int, channels: int, device, args: dict):
    """Check an upstream kernel's "next layer's quantize" parameters, allocate its codes and add
    their pointers to the launch ``args``.

    Args:
        act: the consuming linear's :class:`~vmfx.lowering.reference.ActQuant`, or None.
        bsz, length, channels: the (B, L, E) shape whose (B*L, E) codes are emitted.

    Returns:
        ``(codes or None, smooth, per_token, bits)``: the codes tensor and the render flags.
    """
    if act is None:
        return None, False, False, 8
    t = act.tokens
    if t not in (1, length):
        raise ValueError(f"per-token parameters for {t} tokens, but L={length}")
    for name in ("inv_scale", "zero_point"):
        check_tensor(getattr(act, name), f"act.{name}", torch.float32, (t,), device, True)
    smooth = act.inv_smooth is not None
    if smooth:
        check_tensor(act.inv_smooth, "act.inv_smooth", torch.float32, (channels,), device, True)
        args["inv_s_ptr"] = act.inv_smooth
    codes = torch.empty((bsz * length, channels), dtype=torch.int8, device=device)
    args.update(inv_sa_ptr=act.inv_scale, za_ptr=act.zero_point, codes_ptr=codes)
    return codes, smooth, t > 1, act.bits


# ------------------------------------------------------------------------------ module preamble, kernel cache


def render_preamble(template: str, provenance: Sequence[str], params: dict, helpers: Iterable[str] = (),
                    autotune: tuple[Sequence[dict], Sequence[str]] | None = None) -> str:
    """The source every generated kernel module starts with, up to its ``@triton.jit`` line: the
    header (:func:`render_header`), the device helpers it calls (:func:`render_helpers`) and, with
    ``autotune=(configs, key)``, the ``@triton.autotune`` decorator (:func:`render_autotune`).
    The kernel's own template text follows it unchanged (the result is newline-terminated)."""
    buf = IndentedBuffer()
    render_header(buf, template, provenance, params)
    render_helpers(buf, helpers)
    if autotune is not None:
        render_autotune(buf, *autotune)
    return buf.getvalue()


def kernel_cache(render: Callable[..., str], name: str) -> Callable[..., object]:
    """A memoized loader of one template's kernels: ``loader(**render_kwargs)`` renders the source
    with ``render(**render_kwargs)`` and returns :func:`load_kernel`'s ``name`` from it, once per
    distinct set of (hashable) arguments in this process."""

    @functools.lru_cache(maxsize=None)
    def loader(**render_kwargs):
        return load_kernel(render(**render_kwargs), name)

    loader.__doc__ = f"The compiled ``{name}`` kernel for these render arguments (memoized)."
    return loader
