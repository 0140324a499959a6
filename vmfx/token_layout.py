"""``TokenLayout``: where the tokens of one activation tensor sit, and in which order.

Vision Mambas move tokens around: Vim's backward scan reads the sequence reversed, VMamba's
cross-scan reads a ``(B, H, W, C)`` grid in four orders, MambaVision merges batch and tokens in a
``(b l) d`` reshape. A per-token statistic is only meaningful if it knows which dims index tokens
and which token each position holds. Detection (:mod:`vmfx.passes.propagate_layouts`) records a
:class:`TokenLayout` for every activation edge of a mixer, from ``in_proj`` to ``out_proj``; per-token
observers and quantizers take it (``layout=``) instead of guessing an axis.

Conventions
-----------
* ``token_dims`` are sorted; the *positions* of a tensor are its token dims flattened row-major
  (``(1, 2)`` of a ``(B, H, W, C)`` tensor: position ``h * W + w``).
* The *canonical* token order is the order of the mixer's input sequence as ``in_proj`` sees it:
  raster order, with the class token where the model put it.
* ``order[p]`` is the canonical index of the token held at position ``p``: the identity for a
  forward scan, ``(L-1, ..., 0)`` for Vim's backward scan, any permutation for other scan orders
  (so 1, 2, 4 or 8 directions are the same code). ``-1`` marks a position that holds no token (the
  padded tail of a causal conv1d's output, before the ``[..., :L]`` slice).
* ``merged_batch``: the single token dim holds ``batch * tokens`` rows (a ``(b l) d`` reshape); row
  ``r`` is sample ``r // tokens``, position ``r % tokens``. Dynamic per-token statistics work on it
  (one per row); static per-token scales cannot broadcast over a batch of another size, and ask
  for a :class:`~vmfx.errors.LayoutError`.

A layout is a frozen, validated value; the node's layout lives in ``node.meta[LAYOUT_META]`` (every
node of a mixer, transposes and slices included) and, for annotated nodes, in
``annotation(node).layout``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod

import torch
import torch.fx as fx

from .errors import LayoutError

__all__ = [
    "LAYOUT_META",
    "LAYOUT_WHY_META",
    "PRESERVES_LAYOUT",
    "TokenLayout",
    "layout_of",
    "layout_from_probes",
    "token_kept_dims",
]

#: ``node.meta`` key of a node's output :class:`TokenLayout` (absent or None: unknown).
LAYOUT_META = "vmfx_layout"
#: ``node.meta`` key of the reason a mixer node's layout is unknown.
LAYOUT_WHY_META = "vmfx_layout_why"
#: Class attribute of a module that maps a tensor to one of the same shape element by element (a
#: quantizer, a smoothing node): set it True and detection walks through the module and layouts
#: propagate through it (observers and ``FakeQuantize`` are treated so already).
PRESERVES_LAYOUT = "vmfx_preserves_layout"


@dataclass(frozen=True)
class TokenLayout:
    """The token structure of one activation tensor (see the module docstring).

    Attributes:
        ndim: rank of the tensor.
        token_dims: sorted dims indexing tokens, e.g. ``(1,)`` for ``(B, L, C)``, ``(2,)`` for
            ``(B, E, L)``, ``(1, 2)`` for ``(B, H, W, C)``, ``(0,)`` for a merged ``(B*L, C)``.
        channel_dim: the dim holding channels (None: none, e.g. a channel dim squeezed away).
        tokens: number of token positions (the product of the token dims' sizes; per sample for
            a merged dim).
        order: ``order[p]`` = canonical token index held at position ``p`` (``-1``: padding).
        batch_dim: the dim holding samples (None: none, or merged into the token dim).
        merged_batch: the token dim holds ``batch * tokens`` rows, position ``row % tokens``.
    """

    ndim: int
    token_dims: tuple[int, ...]
    channel_dim: int | None
    tokens: int
    order: tuple[int, ...]
    batch_dim: int | None = 0
    merged_batch: bool = False

    def __post_init__(self):
        object.__setattr__(self, "token_dims", tuple(int(d) for d in self.token_dims))
        object.__setattr__(self, "order", tuple(int(i) for i in self.order))
        dims = self.token_dims
        if not dims or list(dims) != sorted(set(dims)) or dims[0] < 0 or dims[-1] >= self.ndim:
            raise LayoutError(f"TokenLayout.token_dims must be distinct sorted dims of a rank-{self.ndim} "
                              f"tensor, got {dims}")
        for name, d in (("channel_dim", self.channel_dim), ("batch_dim", self.batch_dim)):
            if d is not None and (not 0 <= d < self.ndim or d in dims):
                raise LayoutError(f"TokenLayout.{name}={d} must be a dim of a rank-{self.ndim} tensor "
                                  f"other than the token dims {dims}")
        if self.channel_dim is not None and self.channel_dim == self.batch_dim:
            raise LayoutError("TokenLayout.channel_dim and batch_dim must differ")
        if len(self.order) != self.tokens or self.tokens < 1:
            raise LayoutError(f"TokenLayout.order must list one canonical index per position "
                              f"({self.tokens}), got {len(self.order)}")
        held = [i for i in self.order if i != -1]
        if any(i < -1 for i in self.order) or len(set(held)) != len(held):
            raise LayoutError("TokenLayout.order must hold distinct canonical indices (or -1 for padding)")
        if self.merged_batch and (len(dims) != 1 or self.batch_dim is not None):
            raise LayoutError("a merged (batch * tokens) layout has one token dim and no separate batch dim")

    # -- constructors -----------------------------------------------------------------------

    @classmethod
    def token_major(cls, shape: tuple[int, ...] | torch.Size) -> "TokenLayout":
        """The canonical layout of a ``(B, *tokens, C)`` tensor (``in_proj``'s output): batch
        first, channels last, every dim between them a token dim, identity order."""
        ndim = len(shape)
        if ndim < 3:
            raise LayoutError(f"a token-major layout needs (batch, tokens..., channels), got shape {tuple(shape)}")
        tokens = prod(int(s) for s in shape[1:-1])
        return cls(ndim, tuple(range(1, ndim - 1)), ndim - 1, tokens, tuple(range(tokens)))

    def with_order(self, order) -> "TokenLayout":
        return replace(self, order=tuple(order))

    # -- reading ----------------------------------------------------------------------------

    @property
    def is_identity(self) -> bool:
        return self.order == tuple(range(self.tokens))

    @property
    def is_reversed(self) -> bool:
        return self.order == tuple(range(self.tokens - 1, -1, -1))

    @property
    def direction(self) -> str | None:
        """"forward" (identity order), "backward" (reversed) or None (any other order)."""
        if self.is_identity:
            return "forward"
        if self.is_reversed:
            return "backward"
        return None

    def positions_of_tokens(self) -> tuple[int, ...]:
        """Inverse of ``order``: the position of canonical token ``i`` (``-1``: not held)."""
        size = max(self.order) + 1 if self.order else 0
        inverse = [-1] * size
        for p, i in enumerate(self.order):
            if i >= 0:
                inverse[i] = p
        return tuple(inverse)

    def order_tensor(self, device=None) -> torch.Tensor:
        """``order`` as a long tensor (index per-position statistics with it)."""
        return torch.tensor(self.order, dtype=torch.long, device=device)

    def describe(self) -> str:
        """A short form, e.g. ``"tokens (1,)x197 reversed, channels 2"``."""
        held = tuple(i for i in self.order if i >= 0)
        kind = ("identity" if held == tuple(range(len(held))) else
                "reversed" if held == tuple(range(len(held) - 1, -1, -1)) else "permuted")
        if len(held) < self.tokens:
            kind += f" + {self.tokens - len(held)} padding"
        merged = " merged with batch" if self.merged_batch else ""
        return f"tokens {self.token_dims}x{self.tokens}{merged} {kind}, channels {self.channel_dim}"

    def check_shape(self, shape, what: str = "a tensor") -> None:
        """Raise :class:`LayoutError` unless a tensor of ``shape`` fits this layout (same rank,
        token dims spanning ``tokens`` positions, or ``k * tokens`` rows when merged)."""
        shape = tuple(int(s) for s in shape)
        if f"of shape {shape}" not in what:
            what = f"{what} of shape {shape}"
        if len(shape) != self.ndim:
            raise LayoutError(f"{what} has rank {len(shape)}, but its token layout "
                              f"({self.describe()}) is for rank {self.ndim}")
        positions = prod(shape[d] for d in self.token_dims)
        if self.merged_batch:
            if positions % self.tokens:
                raise LayoutError(f"{what}: dim {self.token_dims[0]} should hold "
                                  f"batch x {self.tokens} tokens, but {positions} is not a multiple")
        elif positions != self.tokens:
            raise LayoutError(
                f"{what} has {positions} positions on its token dims {self.token_dims}, "
                f"but its token layout was recorded for {self.tokens} tokens. If dim {self.token_dims[0]} "
                "merges batch and tokens (a '(b l) d' reshape traced with batch 1), trace with a batch "
                "of at least 2 so that detection can see it; otherwise run at the traced token count"
            )


def layout_of(node) -> TokenLayout | None:
    """The recorded output layout of ``node`` (an ``fx.Node``), or None when unknown."""
    return node.meta.get(LAYOUT_META) if isinstance(node, fx.Node) else None


def token_kept_dims(layout: TokenLayout, ndim: int, *, dynamic: bool, what: str = "a tensor") -> tuple[int, ...]:
    """The dims a per-token spec keeps on a tensor of rank ``ndim`` with ``layout``.

    Static: the token dims (one scale per position, shared by samples and channels). Dynamic:
    every dim but the channel dim (one scale per sample and position). Raises
    :class:`LayoutError` for a rank that does not match, and for static scales on a merged
    ``(batch * tokens)`` dim.
    """
    if layout.ndim != ndim:
        raise LayoutError(f"{what} has rank {ndim}, but its token layout ({layout.describe()}) is for "
                          f"rank {layout.ndim}")
    if dynamic:
        return tuple(d for d in range(ndim) if d != layout.channel_dim)
    if layout.merged_batch:
        raise LayoutError(
            f"static per-token scales on {what}, whose dim {layout.token_dims[0]} merges batch and "
            f"{layout.tokens} tokens ('(b l) d'), cannot broadcast over a batch of another size. Way out: "
            "quantize the edge before the reshape (where tokens have their own dim), or use a dynamic "
            "per-token spec here"
        )
    return layout.token_dims


# -- inference from probes ------------------------------------------------------------------------


def _varying_dims(p: torch.Tensor) -> tuple[int, ...]:
    """The dims along which ``p`` takes more than one value (a stride-0, i.e. expanded, dim never does)."""
    return tuple(d for d in range(p.dim())
                 if p.shape[d] > 1 and p.stride(d) != 0 and not bool((p == p.narrow(d, 0, 1)).all()))


def layout_from_probes(batch: torch.Tensor, token: torch.Tensor, channel: torch.Tensor) -> TokenLayout | str:
    """The layout of a tensor from three integer *probes* of its shape, holding at every element
    its sample index, canonical token index (``-1``: padding) and channel index. Probes are built
    at ``in_proj`` and carried through the mixer's shape ops by running the same ops on them
    (:mod:`vmfx.passes.propagate_layouts`). Returns a reason string when the probes do not describe a layout
    (tokens and channels mixed in one dim, duplicated tokens, ...).

    A dim of size 1 carries no information: with batch 1 the batch dim, and with one channel the
    channel dim, are placed by convention (the first, resp. last, size-1 dim that is left).
    """
    ndim = token.dim()
    tdims, bdims, cdims = _varying_dims(token), _varying_dims(batch), _varying_dims(channel)
    if not tdims:
        return f"no dim of shape {tuple(token.shape)} indexes tokens"
    if len(cdims) > 1 or set(cdims) & set(tdims):
        return f"channels and tokens are mixed in the dims of shape {tuple(token.shape)}"
    if len(bdims) > 1 or set(bdims) & set(cdims):
        return f"the batch is mixed with other dims in shape {tuple(token.shape)}"
    merged = bool(set(bdims) & set(tdims))
    rest = [d for d in range(ndim) if d not in tdims and d not in bdims and d not in cdims and token.shape[d] == 1]
    channel_dim = cdims[0] if cdims else (rest.pop() if rest else None)
    batch_dim = None if merged else (bdims[0] if bdims else (rest[0] if rest else None))
    # the order: index every other dim at 0
    index = [slice(None) if d in tdims else 0 for d in range(ndim)]
    t = token[tuple(index)].reshape(-1)
    if merged:
        if len(tdims) != 1:
            return f"batch and tokens are merged across several dims of shape {tuple(token.shape)}"
        b = batch[tuple(index)].reshape(-1)
        samples = int(b.max()) + 1
        rows = t.numel()
        if rows % samples:
            return f"dim {tdims[0]} of shape {tuple(token.shape)} mixes batch and tokens irregularly"
        per = rows // samples
        expected_b = torch.arange(samples).repeat_interleave(per)
        if not torch.equal(b.long(), expected_b) or not torch.equal(t.view(samples, per),
                                                                      t[:per].expand(samples, per)):
            return (f"dim {tdims[0]} of shape {tuple(token.shape)} merges batch and tokens, but not as "
                    "row = sample * tokens + position")
        t = t[:per]
    order = t.tolist()
    held = [i for i in order if i >= 0]
    if len(set(held)) != len(held):
        return f"a token appears at several positions of shape {tuple(token.shape)}"
    return TokenLayout(ndim, tdims, channel_dim, len(order), tuple(order), batch_dim, merged)
