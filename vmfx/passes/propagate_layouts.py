"""Token layouts of a mixer's edges, by running its shape ops on integer probes.

:func:`propagate_token_layouts` starts at ``in_proj``'s output, whose layout is canonical (``(B,
*tokens, C)``, identity order, :meth:`TokenLayout.token_major`), and walks the nodes that depend on
it, in graph order, up to ``out_proj``. Each node gets three *probes*: integer tensors of its
output's shape (from ``meta["tensor_meta"]``) holding, at every element, its sample index, its
canonical token index and its channel index. A shape op (transpose, permute, flip, slice, view,
reshape, flatten, split, cat, index_select with a constant index, ...) is simply run on the probes of its input, so any composition of
them is understood without a rule per combination; a Linear keeps batch and tokens and gives fresh
channels; a depthwise conv1d keeps them (its padded tail holds no token), and so does a constant
``F.pad`` and a depthwise Conv2d over a (B, C, H, W) token grid with stride 1 and "same" padding; a
norm over the last dim (LayerNorm, RMSNorm) keeps them when that dim holds the channels; elementwise ops
(observers, ``FakeQuantize`` and any module whose class sets ``vmfx_preserves_layout = True`` count
as elementwise) keep them and check that their tensor inputs agree in token order (a direction merge
of a branch left un-flipped is found here); the selective scan keeps ``u``'s and checks ``delta``,
``B``, ``C`` and ``z`` against it. :func:`vmfx.token_layout.layout_from_probes` then reads the layout off
the probes.

Shape arguments that are computed in the graph (``h.shape[1]``, ``x.size(0) * L``) are evaluated
from ``tensor_meta``. A node no rule covers gets no layout and a reason
(``node.meta[LAYOUT_WHY_META]``); nothing is guessed. Probes are int32 and freed per mixer.

Invariants: the graph is not modified; every node between ``in_proj`` and ``out_proj`` that
depends on ``in_proj`` gets ``node.meta[LAYOUT_META]`` (a layout or None), and so does
``in_proj``'s input (the same tokens as its output).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..token_layout import LAYOUT_META, LAYOUT_WHY_META, PRESERVES_LAYOUT, TokenLayout, _varying_dims, layout_from_probes
from ..ops.selective_scan import selective_scan
from ..quant.modules import FakeQuantize
from ..quant.observers import Observer
from .matches import bind_scan
from .patterns import is_depthwise_conv, is_depthwise_conv1d, is_linear, is_norm, module_of

__all__ = ["propagate_token_layouts"]

_ELEMENTWISE_FUNCTIONS = {
    F.silu, F.softplus, F.gelu, F.relu, torch.sigmoid, torch.exp, torch.neg, torch.tanh, torch.abs,
    torch.nn.functional.sigmoid, torch._C._nn.softplus, torch.nn.functional.silu,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div,
}
_ELEMENTWISE_METHODS = {
    "silu", "sigmoid", "exp", "neg", "tanh", "abs", "add", "sub", "mul", "div", "float", "half",
    "bfloat16", "double", "to", "type_as", "clone", "contiguous", "__add__", "__mul__", "__sub__",
    "__truediv__",
}
_ELEMENTWISE_MODULES = (nn.SiLU, nn.Softplus, nn.GELU, nn.ReLU, nn.Sigmoid, nn.Identity, nn.Dropout)
_SHAPE_METHODS = {
    "transpose", "permute", "view", "reshape", "flip", "squeeze", "unsqueeze", "flatten", "unflatten",
    "chunk", "split", "expand", "narrow", "movedim", "repeat_interleave", "__getitem__",
}
_SHAPE_FUNCTIONS = {
    operator.getitem, torch.transpose, torch.permute, torch.reshape, torch.flip, torch.flatten,
    torch.squeeze, torch.unsqueeze, torch.chunk, torch.split, torch.movedim, torch.narrow,
    torch.cat, torch.concat, torch.stack, torch.unflatten,
}
# Token gathers with a constant index (LocalMamba's scan orders); the index is a get_attr buffer.
_SHAPE_METHODS |= {"index_select"}
_SHAPE_FUNCTIONS |= {torch.index_select}
_SIZE_OPS = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.neg}

_Probes = tuple  # (batch, token, channel): int32 tensors of the node's shape, or tuples of them


class _Unknown(Exception):
    """This node's layout cannot be inferred; the message says why."""


def propagate_token_layouts(gm: fx.GraphModule, in_proj: fx.Node, out_proj: fx.Node) -> dict:
    """Record the token layout of every node from ``in_proj`` to ``out_proj`` (see the module
    docstring). Returns ``{node: TokenLayout | reason string}`` for the nodes it visited."""
    start = _shape(in_proj)
    results: dict[fx.Node, TokenLayout | str] = {}
    if start is None or len(start) < 3:
        why = ("shapes were not propagated (trace with example inputs)" if start is None
               else f"in_proj's output {tuple(start)} is not (batch, tokens..., channels)")
        for node in _region(in_proj, out_proj):
            _record(node, why, results)
        return results
    probes: dict[fx.Node, _Probes] = {in_proj: _token_major_probes(start)}
    _record(in_proj, TokenLayout.token_major(start), results)
    source = in_proj.args[0] if in_proj.args else None
    if isinstance(source, fx.Node) and _shape(source) is not None and len(_shape(source)) == len(start) \
            and tuple(_shape(source)[:-1]) == tuple(start[:-1]) and source.meta.get(LAYOUT_META) is None:
        _record(source, TokenLayout.token_major(_shape(source)), results)
    for node in _region(in_proj, out_proj):
        if node is in_proj or node.meta.get("tensor_meta") is None:
            continue  # sizes (x.shape[1]) are evaluated where they are used
        try:
            probes[node] = _propagate(node, probes)
            if _shape(node) is None:
                continue  # a tuple (split, chunk): its getitem users get layouts
            layout = _read_layout(node, probes[node])
        except _Unknown as why:
            layout = str(why)
        except Exception as exc:  # a shape op that refuses the probes: unknown, never a guess
            layout = f"running {node.format_node()} on probes failed ({type(exc).__name__}: {exc})"
        _record(node, layout, results)
    return results


def _record(node, layout, results):
    results[node] = layout
    if isinstance(layout, TokenLayout):
        node.meta[LAYOUT_META] = layout
        node.meta.pop(LAYOUT_WHY_META, None)
    else:
        node.meta[LAYOUT_META] = None
        node.meta[LAYOUT_WHY_META] = layout


def _region(in_proj: fx.Node, out_proj: fx.Node) -> list[fx.Node]:
    """in_proj, out_proj and every node in between that depends on in_proj, in graph order."""
    seen = {in_proj}
    stack = [in_proj]
    while stack:
        node = stack.pop()
        if node is out_proj:
            continue
        for user in node.users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return [n for n in in_proj.graph.nodes if n in seen]


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


def _token_major_probes(shape) -> _Probes:
    ndim = len(shape)
    view = [1] * ndim
    b = torch.arange(shape[0], dtype=torch.int32).view([shape[0]] + view[1:]).expand(shape)
    tok = torch.arange(int(torch.tensor(shape[1:-1]).prod()), dtype=torch.int32).view([1, *shape[1:-1], 1])
    c = torch.arange(shape[-1], dtype=torch.int32).view(view[:-1] + [shape[-1]]).expand(shape)
    return b, tok.expand(shape), c


def _read_layout(node, p: _Probes) -> TokenLayout | str:
    if not all(isinstance(x, torch.Tensor) for x in p):
        return "the node's value is not a tensor"
    shape = _shape(node)
    if shape is not None and tuple(p[1].shape) != shape:
        return f"probe shape {tuple(p[1].shape)} differs from the propagated shape {shape}"
    return layout_from_probes(*p)


# -- rules ------------------------------------------------------------------------------------


def _propagate(node: fx.Node, probes: dict) -> _Probes:
    if node.op == "call_function" and node.target is selective_scan:
        return _scan(node, probes)
    if node.meta.get("vmfx_structural"):  # a scan vmfx does not know: holds its u's tokens
        from .structural import structural_scan_input

        u = structural_scan_input(node)
        if u is None:
            raise _Unknown("a scan vmfx does not know, with no input shaped like its output")
        return _probes_of(u, probes)
    if is_linear(node):
        return _linear(node, probes)
    if is_depthwise_conv1d(node):
        return _conv1d(node, probes)
    if node.op == "call_function" and node.target is F.pad:
        return _pad(node, probes)
    if is_depthwise_conv(node):
        return _conv2d(node, probes)
    if is_norm(node):
        return _norm(node, probes)
    if _is_elementwise(node):
        return _elementwise(node, probes)
    if _is_shape_op(node):
        return _run_on_probes(node, probes)
    raise _Unknown(f"no token-layout rule for {node.op} {getattr(node.target, '__name__', node.target)}")


def _is_elementwise(node) -> bool:
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _ELEMENTWISE_METHODS
    m = module_of(node)
    return isinstance(m, _ELEMENTWISE_MODULES + (Observer, FakeQuantize)) or getattr(m, PRESERVES_LAYOUT, False)


def _is_shape_op(node) -> bool:
    if node.op == "call_function":
        return node.target in _SHAPE_FUNCTIONS
    return node.op == "call_method" and node.target in _SHAPE_METHODS


def _probes_of(arg, probes) -> _Probes:
    if arg not in probes:
        raise _Unknown(f"its input {arg.name} has no token layout")
    return probes[arg]


def _static(arg, probes):
    """A non-tensor argument's value: constants as they are, sizes evaluated from tensor_meta."""
    if isinstance(arg, (list, tuple)):
        return type(arg)(_static(a, probes) for a in arg)
    if isinstance(arg, dict):
        return {k: _static(v, probes) for k, v in arg.items()}
    if isinstance(arg, slice):
        return slice(_static(arg.start, probes), _static(arg.stop, probes), _static(arg.step, probes))
    if not isinstance(arg, fx.Node):
        return arg
    if arg.op == "get_attr":  # a constant of the model (e.g. a gather's index buffer)
        value = arg.graph.owning_module
        for part in arg.target.split("."):
            value = getattr(value, part)
        return value
    if arg.op == "call_function" and arg.target is getattr and arg.args[1] == "shape":
        shape = _shape(arg.args[0])
        if shape is not None:
            return torch.Size(shape)
    if arg.op == "call_method" and arg.target == "size":
        shape = _shape(arg.args[0])
        if shape is not None:
            dims = [_static(a, probes) for a in arg.args[1:]] + ([_static(arg.kwargs["dim"], probes)]
                                                                 if "dim" in arg.kwargs else [])
            return shape[dims[0]] if dims else torch.Size(shape)
    if arg.op == "call_function" and arg.target is operator.getitem:
        base = arg.args[0]
        if isinstance(base, fx.Node) and base not in probes:
            return _static(base, probes)[_static(arg.args[1], probes)]
    if arg.op == "call_function" and arg.target in _SIZE_OPS:
        values = [_static(a, probes) for a in arg.args]
        return arg.target(*values)
    raise _Unknown(f"the argument {arg.name} is neither a probed tensor nor a size computable from shapes")


def _run_on_probes(node, probes) -> _Probes:
    """Run the node's op once per probe, tensor arguments replaced by that probe."""
    out = []
    for k in range(3):
        def sub(a):
            if isinstance(a, fx.Node) and a in probes:
                return probes[a][k]
            if isinstance(a, (list, tuple)) and any(isinstance(x, fx.Node) and x in probes for x in a):
                return type(a)(sub(x) for x in a)
            return _static(a, probes)

        args = [sub(a) for a in node.args]
        kwargs = {key: sub(v) for key, v in node.kwargs.items()}
        if node.op == "call_method":
            self_arg, *rest = args
            if not isinstance(self_arg, (torch.Tensor, tuple, list)):
                raise _Unknown(f"its input {node.args[0]} has no token layout")
            out.append(getattr(self_arg, node.target)(*rest, **kwargs))
        else:
            if not any(isinstance(a, (torch.Tensor, tuple, list)) for a in args):
                raise _Unknown("none of its inputs has a token layout")
            out.append(node.target(*args, **kwargs))
    return tuple(out)


def _linear(node, probes) -> _Probes:
    b, t, c = _probes_of(node.args[0], probes)
    shape = _shape(node)
    if shape is None:
        raise _Unknown("shapes were not propagated")
    if any(d != c.dim() - 1 for d in _varying(c)):
        raise _Unknown("the Linear's input does not hold its channels in the last dim")
    out = torch.arange(shape[-1], dtype=torch.int32)
    return (b[..., :1].expand(shape), t[..., :1].expand(shape), out.expand(shape))


def _conv1d(node, probes) -> _Probes:
    """A depthwise conv1d on (B, C, L): stride 1, no dilation, padding k-1 (causal) or (k-1)/2
    (same): output position t is aligned with input position t; positions >= L are padding."""
    b, t, c = _probes_of(node.args[0], probes)
    m = module_of(node)
    if m is None:
        raise _Unknown("only nn.Conv1d modules are understood as token convolutions")
    k, s, dil, pad = m.kernel_size[0], m.stride[0], m.dilation[0], m.padding
    pad = pad[0] if isinstance(pad, tuple) else pad
    if pad == "same":
        pad = (k - 1) // 2
    if s != 1 or dil != 1 or not isinstance(pad, int) or pad not in (k - 1, (k - 1) / 2):
        raise _Unknown(f"conv1d with kernel {k}, stride {s}, dilation {dil}, padding {pad} does not keep "
                       "token positions aligned")
    if t.dim() != 3 or _varying(t) not in ((2,), ()) or any(d != 1 for d in _varying(c)):
        raise _Unknown("the conv1d input is not (batch, channels, tokens)")
    shape = _shape(node)
    if shape is None:
        raise _Unknown("shapes were not propagated")
    length = shape[2]
    tok = torch.full(shape, -1, dtype=torch.int32)
    keep = min(length, t.shape[2])
    tok[..., :keep] = t[..., :keep]
    return b[..., :1].expand(shape), tok, c[..., :1].expand(shape)


def _pad(node, probes) -> _Probes:
    """Constant ``F.pad``: padded positions hold no token (token probe ``-1``); the batch and
    channel probes must not vary along a padded dim and are extended along it."""
    b, t, c = _probes_of(node.args[0], probes)
    pad = _static(node.args[1] if len(node.args) > 1 else node.kwargs["pad"], probes)
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    if mode != "constant":
        raise _Unknown(f"F.pad with mode {mode!r} copies tokens into the padding")
    padded = [t.dim() - 1 - i // 2 for i in range(len(pad)) if pad[i]]
    token = F.pad(t, tuple(pad), value=-1)
    out = [None, token, None]
    for k, p in ((0, b), (2, c)):
        if any(d in _varying(p) for d in padded):
            raise _Unknown("F.pad pads a dim that holds the batch or the channels")
        index = tuple(slice(0, 1) if d in padded else slice(None) for d in range(p.dim()))
        out[k] = p[index].expand(token.shape)
    return tuple(out)


def _conv2d(node, probes) -> _Probes:
    """A depthwise Conv2d on (B, C, H, W) with stride 1, no dilation and "same" padding: output
    pixel (h, w) is aligned with input pixel (h, w), so token positions are kept."""
    b, t, c = _probes_of(node.args[0], probes)
    m = module_of(node)
    pad = m.padding
    same = pad == "same" or (isinstance(pad, tuple) and all(p == (k - 1) // 2 and k % 2 == 1
                                                           for p, k in zip(pad, m.kernel_size)))
    if m.stride != (1, 1) or m.dilation != (1, 1) or not same or m.padding_mode != "zeros":
        raise _Unknown(f"conv2d with kernel {m.kernel_size}, stride {m.stride}, dilation {m.dilation}, "
                       f"padding {pad} does not keep token positions aligned")
    if t.dim() != 4 or any(d not in (2, 3) for d in _varying(t)) or any(d != 1 for d in _varying(c)):
        raise _Unknown("the conv2d input is not (batch, channels, height, width) with tokens on the grid")
    shape = _shape(node)
    if shape is None or tuple(shape) != tuple(t.shape):
        raise _Unknown("the conv2d output shape differs from its input's")
    return b[:, :1].expand(shape), t[:, :1].expand(shape), c


def _norm(node, probes) -> _Probes:
    """A norm over the last dim keeps positions when the last dim holds the channels (and only
    they)."""
    b, t, c = _probes_of(node.args[0], probes)
    if _varying(c) not in ((c.dim() - 1,), ()) or (c.dim() - 1) in _varying(t) or (c.dim() - 1) in _varying(b):
        raise _Unknown("the norm's input does not hold its channels (only) in the last dim")
    if node.op == "call_function":  # F.layer_norm(x, normalized_shape, ...): over the last dim only
        normalized = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        normalized = _static(normalized, probes)
        if len(tuple(normalized)) != 1:
            raise _Unknown(f"a norm over {len(tuple(normalized))} trailing dims mixes tokens")
    return b, t, c


def _elementwise(node, probes) -> _Probes:
    """Elementwise ops keep positions; tensor inputs that vary over tokens must agree."""
    shape = _shape(node)
    if shape is None:
        raise _Unknown("shapes were not propagated")
    tensors = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
    known = [a for a in tensors if a in probes]
    if not known:
        raise _Unknown("none of its inputs has a token layout")
    first = None
    for a in known:
        p = tuple(x.expand(shape) if x.dim() == len(shape) else x for x in probes[a])
        if tuple(p[1].shape) != shape:
            raise _Unknown(f"input {a.name} of shape {tuple(p[1].shape)} does not broadcast to {shape}")
        if first is None:
            first = (a, p)
        elif not torch.equal(first[1][1], p[1]):
            raise _Unknown(f"its inputs {first[0].name} and {a.name} hold their tokens in different orders "
                           "(a direction merged without being flipped or permuted back?)")
    token_dims = _varying(first[1][1])
    for a in tensors:
        if a in probes:
            continue
        other = _shape(a)
        offset = len(shape) - len(other) if other is not None else 0
        if other is None or any(d >= offset and other[d - offset] != 1 for d in token_dims):
            raise _Unknown(f"its input {a.name} has no token layout and may vary over tokens")
    return first[1]


def _scan(node, probes) -> _Probes:
    """The scan's output holds ``u``'s tokens; ``delta``, ``z``, ``B``, ``C`` (time last) must hold
    them in the same order."""

    args = bind_scan(node)
    u = _probes_of(args["u"], probes)
    order = u[1].flatten(0, -2)[0]
    for name in ("delta", "z", "B", "C"):
        a = args.get(name)
        if not isinstance(a, fx.Node) or a not in probes:
            continue
        t = probes[a][1]
        if t.dim() < 3 or not torch.equal(t.flatten(0, -2)[0], order):
            raise _Unknown(f"the scan's {name} holds its tokens in another order than its u")
    if not isinstance(getattr(node.meta.get("tensor_meta"), "shape", None), torch.Size):
        return tuple((x, None) for x in u)  # (out, last_state): the last state holds no tokens
    return u


def _varying(p: torch.Tensor) -> tuple[int, ...]:
    return _varying_dims(p)
