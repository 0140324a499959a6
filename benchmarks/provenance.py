"""How the benchmark scripts name what they used in the files they write: sources by repository and
commit (``owner/repo@commit``), files inside this repository by their relative path, and nothing by
a local absolute path (``tests/test_benchmark_tables.py`` checks the recorded files).
"""

from __future__ import annotations

import os
import subprocess
from typing import Iterable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: What a path outside this repository becomes in a recorded command or message.
LOCAL = "<local>"


def portable_path(path: str) -> str:
    """``path`` relative to the repository root when it lies inside it, else ``<local>/<its name>``
    (a folder of this machine: its absolute path is not recorded)."""
    full = os.path.realpath(path)
    if full == ROOT or full.startswith(ROOT + os.sep):
        return os.path.relpath(full, ROOT)
    return f"{LOCAL}/{os.path.basename(full.rstrip(os.sep))}"


def _portable_token(token: str) -> str:
    if token.startswith("--") and "=" in token:
        option, value = token.split("=", 1)
        return f"{option}={_portable_token(value)}"
    if os.path.isabs(token) or (os.sep in token and os.path.exists(token)):
        return portable_path(token)
    return token


def portable_command(script: str, argv: Iterable[str]) -> str:
    """``python <script> <argv>`` with every path argument made portable (:func:`portable_path`)."""
    return " ".join(["python", script, *(_portable_token(a) for a in argv)])


def git_commit(rev: str = "HEAD", repo: Optional[str] = None) -> str:
    """The full commit of ``rev`` in ``repo`` (a checkout or a bare git directory; default this one)."""
    repo = repo or ROOT
    git = ["git", "-C", repo] if os.path.exists(os.path.join(repo, ".git")) else ["git", "--git-dir", repo]
    return subprocess.run(git + ["rev-parse", "--verify", f"{rev}^{{commit}}"], check=True, capture_output=True,
                          text=True).stdout.strip()
