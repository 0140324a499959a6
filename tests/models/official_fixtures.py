"""Recorded outputs of the official code (tests only): what the comparisons with the official
VMamba, LocalMamba and k-scaled code check against when no copy of that code is at hand.

``tests/models/fixtures/official/<name>.safetensors`` holds the tensors (the official models' state
dicts, the inputs, the official logits) and ``<name>.json`` says where they come from: the
repository and commit, the configurations and seeds, the torch version and the command of
``tests/models/make_official_fixtures.py`` that wrote them.

A test that compares vmfx with the official code runs on :func:`sources`: ``"recorded"`` (these
files; always) and ``"live"`` (the official code itself, imported on the CPU) when the repository
is at the path in its environment variable. Live, the same reference is computed afresh, and
``test_the_recorded_fixture_is_what_the_official_code_gives`` (one per repository) checks the files
against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

FIXTURES = Path(__file__).parent / "fixtures" / "official"


def source_path(env: str) -> Optional[str]:
    """The official checkout (or bare git directory) named by ``$env``, or None when unset / absent."""
    path = os.environ.get(env)
    return path if path and os.path.exists(path) else None


def sources(env: str) -> list:
    """``["recorded"]``, plus ``"live"`` when ``$env`` names a copy of the official repository."""
    return ["recorded"] + (["live"] if source_path(env) else [])


def git_commit(src: str) -> str:
    """HEAD of a checkout or of a bare git directory (a copy without its git data has no commit to
    name: ValueError)."""
    git = ["git", "-C", src] if os.path.exists(os.path.join(src, ".git")) else ["git", "--git-dir", src]
    done = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError(f"{src} is neither a git checkout nor a bare git directory: its commit is unknown "
                         f"({done.stderr.strip()})")
    return done.stdout.strip()


def save(name: str, tensors: Dict[str, torch.Tensor], meta: dict, folder: Path = FIXTURES) -> Tuple[Path, Path]:
    """Write ``<name>.safetensors`` and ``<name>.json``. A tensor equal (same shape, dtype, values) to
    one already written is stored once: ``meta["aliases"]`` maps its name to the stored one."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    stored: Dict[str, torch.Tensor] = {}
    by_digest: Dict[str, str] = {}
    aliases = {}
    for key, t in tensors.items():
        t = t.detach().contiguous().cpu()
        digest = hashlib.sha256(str((t.dtype, tuple(t.shape))).encode() + t.numpy().tobytes()).hexdigest()
        if digest in by_digest:
            aliases[key] = by_digest[digest]
        else:
            by_digest[digest] = key
            stored[key] = t
    meta = dict(meta, aliases=aliases)
    tensor_path, meta_path = folder / f"{name}.safetensors", folder / f"{name}.json"
    save_file(stored, str(tensor_path))
    tensor_path.chmod(0o644)  # (safetensors writes its files owner-only)
    meta_path.write_text(_dumps(meta) + "\n")
    return tensor_path, meta_path


def _dumps(value, depth: int = 0) -> str:
    """JSON with the first two levels of dicts one entry a line and anything deeper on one line."""
    if not isinstance(value, dict) or not value or depth == 2:
        return json.dumps(value, separators=(", ", ": "))
    pad = " " * (depth + 1)
    items = [f"{pad}{json.dumps(k)}: {_dumps(v, depth + 1)}" for k, v in value.items()]
    return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"


def load(name: str, folder: Path = FIXTURES) -> Tuple[Dict[str, torch.Tensor], dict]:
    """The tensors (aliases resolved) and the metadata of a fixture written by :func:`save`."""
    from safetensors.torch import load_file

    meta = json.loads((folder / f"{name}.json").read_text())
    tensors = load_file(str(folder / f"{name}.safetensors"))
    for key, target in meta.get("aliases", {}).items():
        tensors[key] = tensors[target]
    return tensors, meta


def prefixed(tensors: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The entries under ``prefix + "/"``, with the prefix removed (e.g. one case's state dict)."""
    p = prefix + "/"
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def as_official_checkpoint(state: Dict[str, torch.Tensor], path: Path, **extra) -> Path:
    """``state`` written as the official releases write theirs (``{"model": state_dict, ...}``), for
    :func:`vmfx.models.load_checkpoint` (the path a user's official file takes)."""
    torch.save({"model": state, **extra}, path)
    return path


def relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want| / max |want|``."""
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())
