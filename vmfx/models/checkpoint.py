"""Load official (and plain) checkpoints into vmfx models, safely and with readable errors.

:func:`load_checkpoint` reads a file with ``torch.load(path, map_location="cpu", weights_only=True)``.
The only pickled global it allows beyond torch's defaults is ``argparse.Namespace`` (the ``args``
entry of the official Vim training checkpoints), and only inside a ``safe_globals`` context, so
nothing is allow-listed process-wide. It never falls back to ``weights_only=False``: a file that
pickles any other global is refused with :class:`vmfx.errors.CheckpointError` naming the global,
because unpickling it could run code shipped in a downloaded file.

Accepted layouts:

* the official Vim file ``{"model", "model_ema", "optimizer", "lr_scheduler", "epoch", "scaler",
  "args"}``: ``"model"`` is loaded unless ``key`` says otherwise (e.g. ``key="model_ema"``);
* ``{"state_dict": ...}``;
* a bare state dict (every value a tensor).

Keys and shapes are checked before anything is copied: a mismatch raises ``CheckpointError``
listing the missing, unexpected and wrong-shape keys (expected and found shapes), with a hint for the
usual mistakes (a stride-8 "+" checkpoint in a stride-16 model and the reverse, another model
width, a ``module.`` prefix).
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..errors import CheckpointError

__all__ = ["load_checkpoint", "LoadedCheckpoint", "CheckpointNotFoundError"]

#: Keys tried, in order, when ``key`` is None and the file is not a bare state dict.
_STATE_DICT_KEYS = ("model", "state_dict")
#: How many names each list in an error message shows before "... and N more".
_MAX_LISTED = 10
#: Pickled globals allowed on top of torch's weights-only defaults.
_ALLOWED_GLOBALS = (argparse.Namespace,)
_ALLOWED_GLOBAL_NAMES = {"argparse.Namespace"}
# vmamba: the official VMamba files pickle their yacs training config (``config``, a dict subclass).
# It is read as a plain ``collections.OrderedDict`` (its keys, and its attributes in ``__dict__``):
# yacs is not imported and no code from the file runs.
from collections import OrderedDict as _OrderedDict  # noqa: E402

_ALLOWED_GLOBALS = _ALLOWED_GLOBALS + ((_OrderedDict, "yacs.config.CfgNode"),)
_ALLOWED_GLOBAL_NAMES = _ALLOWED_GLOBAL_NAMES | {"yacs.config.CfgNode"}

_OFFICIAL_FILES = (
    "vim_t_midclstok_76p1acc.pth, vim_t_midclstok_ft_78p3acc.pth (stride 8), "
    "vim_s_midclstok_80p5acc.pth, vim_s_midclstok_ft_81p6acc.pth (stride 8), "
    "vim_b_midclstok_81p9acc.pth; from https://huggingface.co/hustvl/Vim-{tiny,small,base}-midclstok"
)
_VIM_WIDTHS = {192: "Vim-T", 384: "Vim-S", 768: "Vim-B"}


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist (a CheckpointError and a FileNotFoundError)."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What :func:`load_checkpoint` loaded.

    Attributes:
        path: the file.
        key: the file's top-level key that held the state dict (``"model"``, ``"state_dict"``,
            ...), or None for a bare state dict.
        num_tensors: number of tensors in that state dict.
        file_keys: the file's top-level keys (empty for a bare state dict).
        missing_keys: model keys the file did not provide (only possible with ``strict=False``).
        unexpected_keys: file keys the model does not have (only possible with ``strict=False``).
        model_name: ``args.model`` of an official training checkpoint, when present.
        epoch: ``epoch`` of an official training checkpoint, when present.
    """

    path: str
    key: Optional[str]
    num_tensors: int
    file_keys: Tuple[str, ...] = ()
    missing_keys: Tuple[str, ...] = ()
    unexpected_keys: Tuple[str, ...] = ()
    model_name: Optional[str] = None
    epoch: Optional[int] = None


def load_checkpoint(
    model: nn.Module,
    path: Union[str, "os.PathLike[str]"],
    *,
    key: Optional[str] = None,
    strict: bool = True,
) -> LoadedCheckpoint:
    """Load a checkpoint file into ``model`` (in place).

    Args:
        model: the model, e.g. ``timm.create_model("vim_tiny_patch16_224_...")``. A model built on
            the ``meta`` device receives the file's tensors themselves (``assign=True``).
        path: the checkpoint file (official ``.pth``, ``{"state_dict": ...}`` or a bare state dict).
        key: which top-level entry holds the state dict (e.g. ``"model_ema"``); by default
            ``"model"``, then ``"state_dict"``, then the file itself if it is a bare state dict.
        strict: require the file's keys to match the model's exactly. Shapes must always match.

    Returns:
        A :class:`LoadedCheckpoint` record.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist.
        CheckpointError: the file cannot be read safely (a disallowed pickled global, or not a
            torch checkpoint), holds no state dict under ``key``, does not fit the model, or holds
            NaN / Inf values.
    """
    path = os.fspath(path)
    obj = _safe_load(path)
    state_dict, used_key = _select_state_dict(obj, key, path)
    file_keys = tuple(str(k) for k in obj) if used_key is not None else ()
    model_name, epoch = _training_info(obj) if used_key is not None else (None, None)

    missing, unexpected, wrong = _compare(model, state_dict)
    if wrong or (strict and (missing or unexpected)):
        raise CheckpointError(
            _mismatch_message(model, path, used_key, state_dict, missing, unexpected, wrong,
                              model_name, strict)
        )

    bad = [k for k, t in state_dict.items()
           if isinstance(t, torch.Tensor) and torch.is_floating_point(t) and not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(
            f"{path}: {len(bad)} tensor(s) hold NaN or Inf values ({shown}); the checkpoint is damaged or "
            "from a diverged run: use another checkpoint"
        )
    assign = any(t.is_meta for t in chain(model.parameters(), model.buffers()))
    model.load_state_dict(state_dict, strict=strict, assign=assign)
    return LoadedCheckpoint(
        path=path, key=used_key, num_tensors=len(state_dict), file_keys=file_keys,
        missing_keys=tuple(missing), unexpected_keys=tuple(unexpected),
        model_name=model_name, epoch=epoch,
    )


# ------------------------------------------------------------------------------------------------
# Reading the file
# ------------------------------------------------------------------------------------------------


def _safe_load(path: str) -> Any:
    """``torch.load(weights_only=True)`` with only ``argparse.Namespace`` allowed on top."""
    if not os.path.exists(path):
        raise CheckpointNotFoundError(
            f"Checkpoint file not found: {path!r}. The official Vim checkpoints are downloaded by "
            f"hand: {_OFFICIAL_FILES}."
        )
    if os.path.isdir(path):
        raise CheckpointError(f"{path!r} is a directory; pass the checkpoint file (.pth) itself")
    try:
        with torch.serialization.safe_globals(list(_ALLOWED_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised as CheckpointError with the cause chained
        disallowed = _disallowed_globals(path, exc)
        if disallowed:
            raise CheckpointError(
                f"Refusing to load {path!r}: it pickles {_join(disallowed)}, which vmfx does not "
                "allow. vmfx reads checkpoints with torch.load(weights_only=True) and allows only "
                "argparse.Namespace (the 'args' of official Vim files) and yacs CfgNode (the 'config' "
                "of official VMamba files, read as a plain dict), because unpickling any "
                "other global would run code from the downloaded file, and vmfx will not run code "
                "from a downloaded file. Way out: if you trust the file, extract its state dict "
                "with a trusted tool in a separate process (for example "
                "torch.save(torch.load(path, weights_only=False)['model'], 'clean.pth')) and load "
                "the bare state dict it saves."
            ) from exc
        raise CheckpointError(_unreadable_message(path, exc)) from exc


def _unreadable_message(path: str, exc: BaseException) -> str:
    """Why ``path`` could not be read, without torch's advice to retry with ``weights_only=False``
    (unsafe for a file of unknown origin, and useless for a damaged one): torch gives that advice
    for every weights-only failure, a corrupt file included."""
    text = str(exc)
    if "weights_only" in text:  # torch's "Weights only load failed ... Re-running with weights_only=False ..."
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|Check the documentation|$)", text, re.S)
        reason = f" (the reader stopped at: {detail.group(1).strip()})" if detail else ""
        return (f"Could not read {path!r} as a torch checkpoint{reason}: the file is damaged, truncated or not "
                "written by torch.save. Download or save it again; vmfx reads checkpoints only with "
                "torch.load(weights_only=True), so it never runs code from the file")
    if isinstance(exc, EOFError):
        return f"Could not read {path!r}: the file is empty or truncated; download or save the checkpoint again"
    return (f"Could not read {path!r} as a torch checkpoint with weights_only=True: "
            f"{type(exc).__name__}: {_first_line(exc)}")


def _disallowed_globals(path: str, exc: BaseException) -> List[str]:
    """Names of the pickled globals that made the weights-only load fail (never executes them)."""
    names: List[str] = []
    try:  # scans the pickle opcodes of a zip-format file without unpickling anything
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - legacy format or unreadable: fall back to the message
        names = []
    if not names and isinstance(exc, Exception):
        names = re.findall(r"GLOBAL ([A-Za-z_][\w.]*)", str(exc))
    seen: Dict[str, None] = {}
    for n in names:
        if n not in _ALLOWED_GLOBAL_NAMES:
            seen.setdefault(n.rstrip("."), None)
    return list(seen)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _select_state_dict(obj: Any, key: Optional[str], path: str) -> Tuple[Mapping, Optional[str]]:
    """Pick the state dict inside the loaded object; returns (state_dict, key or None if bare)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path!r} holds a {type(obj).__name__}, not a dict: expected a state dict, "
            "{'model': state_dict, ...} (official Vim) or {'state_dict': state_dict}"
        )
    if key is not None:
        if key not in obj:
            raise CheckpointError(
                f"{path!r} has no key {key!r}; its top-level keys are: {_join(map(repr, obj))}"
            )
        candidate, used = obj[key], key
    elif _is_state_dict(obj) and obj:
        return obj, None
    else:
        used = next((k for k in _STATE_DICT_KEYS if k in obj), None)
        if used is None:
            raise CheckpointError(
                f"{path!r} is neither a state dict nor has a {' or '.join(map(repr, _STATE_DICT_KEYS))}"
                f" entry; its top-level keys are: {_join(map(repr, obj))}. Pass key=... to choose one."
            )
        candidate = obj[used]
    if not _is_state_dict(candidate):
        raise CheckpointError(
            f"{path!r}[{used!r}] is not a state dict (a mapping of names to tensors); it is a "
            f"{type(candidate).__name__}"
        )
    return candidate, used


def _training_info(obj: Mapping) -> Tuple[Optional[str], Optional[int]]:
    """(args.model, epoch) of an official training checkpoint, where present."""
    args = obj.get("args")
    model_name = getattr(args, "model", None)
    epoch = obj.get("epoch")
    return (
        model_name if isinstance(model_name, str) else None,
        epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None,
    )


# ------------------------------------------------------------------------------------------------
# Comparing with the model
# ------------------------------------------------------------------------------------------------

_Shape = Tuple[int, ...]


def _compare(model: nn.Module, state_dict: Mapping) -> Tuple[List[str], List[str], List[Tuple[str, _Shape, _Shape]]]:
    """(missing, unexpected, [(key, expected shape, found shape)]), in model / file order."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        (k, expected[k], tuple(v.shape))
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    return missing, unexpected, wrong


def _mismatch_message(model, path, key, state_dict, missing, unexpected, wrong, model_name, strict) -> str:
    where = f"{path!r}" + (f"[{key!r}]" if key is not None else "")
    lines = [
        f"Checkpoint {where} ({len(state_dict)} tensors) does not fit {type(model).__name__}"
        + ("" if strict else " (strict=False still requires matching shapes)") + ":"
    ]
    if missing:
        lines.append(f"  missing keys (in the model, not in the file) [{len(missing)}]: {_join(missing)}")
    if unexpected:
        lines.append(
            f"  unexpected keys (in the file, not in the model) [{len(unexpected)}]: {_join(unexpected)}"
        )
    if wrong:
        shown = [f"{k}: model expects {tuple(e)}, file has {tuple(f)}" for k, e, f in wrong]
        lines.append(f"  wrong shapes [{len(wrong)}]:")
        lines.append("    " + _join(shown, sep="\n    "))
    lines += [f"Hint: {h}" for h in _hints(model, state_dict, missing, unexpected, wrong, model_name)]
    return "\n".join(lines)


def _hints(model, state_dict, missing, unexpected, wrong, model_name) -> List[str]:
    hints: List[str] = []
    wrong_by_key = {k: (e, f) for k, e, f in wrong}
    if "pos_embed" in wrong_by_key:
        want, got = wrong_by_key["pos_embed"]
        if len(want) == 3 and len(got) == 3:  # (1, tokens, D)
            hints.append(_pos_embed_hint(model, want[1], got[1]))
    width_key = next((k for k in ("norm_f.weight", "cls_token") if k in wrong_by_key), None)
    if width_key is not None:
        want_d, got_d = wrong_by_key[width_key][0][-1], wrong_by_key[width_key][1][-1]
        hints.append(
            f"the file's model width is D={got_d}{_vim_name(got_d)} but the model's is "
            f"D={want_d}{_vim_name(want_d)}: build the model of the checkpoint's size"
        )
    missing_set = set(missing)
    if unexpected and all(
        k.startswith("module.") and k[len("module."):] in missing_set for k in unexpected
    ):
        hints.append(
            "every file key starts with 'module.' (saved from a DistributedDataParallel wrapper): "
            "strip the prefix and save the state dict again"
        )
    if model_name:
        hints.append(f"the file was trained as args.model = {model_name!r}")
    return hints


def _pos_embed_hint(model: nn.Module, want_tokens: int, got_tokens: int) -> str:
    extra = getattr(model, "num_tokens", 1)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    side = math.isqrt(max(got_tokens - extra, 0))
    tokens = "class token" if extra == 1 else "class tokens"
    file_grid = f"{side}x{side} patches + {extra} {tokens}" if side * side == got_tokens - extra else None
    model_grid = f"{grid[0]}x{grid[1]} patches + {extra}" if grid else f"{want_tokens} tokens"
    if got_tokens == 730 and want_tokens == 197:
        return (
            "pos_embed has 730 tokens (27x27 patches + 1 class token): this is a stride-8 '+' "
            "checkpoint (vim_t_midclstok_ft_78p3acc.pth / vim_s_midclstok_ft_81p6acc.pth), and the "
            "model has stride 16 (14x14 + 1 = 197). Build the stride-8 model: "
            "timm.create_model('vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_"
            "with_midclstok_div2') (or the small one), or VisionMamba(..., stride=8)."
        )
    if got_tokens == 197 and want_tokens == 730:
        return (
            "pos_embed has 197 tokens (14x14 patches + 1 class token): this is a stride-16 "
            "checkpoint, and the model has stride 8 (27x27 + 1 = 730). Build the model with "
            "stride=16 (the timm names without 'stride8')."
        )
    return (
        f"pos_embed has {got_tokens} tokens in the file"
        + (f" ({file_grid})" if file_grid else "")
        + f" but the model expects {want_tokens} ({model_grid}): the checkpoint was trained with "
        "another img_size, patch_size or stride"
    )


# ------------------------------------------------------------------------------------------------
# Formatting helpers
# ------------------------------------------------------------------------------------------------


def _vim_name(d: int) -> str:
    return f" ({_VIM_WIDTHS[d]})" if d in _VIM_WIDTHS else ""


def _join(items, sep: str = ", ") -> str:
    items = list(items)
    shown = sep.join(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f"{sep}... and {len(items) - _MAX_LISTED} more"
    return shown


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
