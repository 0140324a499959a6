"""Loading plug-in files: a method (its passes, options and presets) kept in one Python file.

``load_plugin("my_method.py")`` runs the file once as a module (named ``vmfx_plugin_<stem>``, kept
in ``sys.modules`` so its dataclasses and pickles resolve), which registers whatever it defines
(:func:`vmfx.register_method`, :func:`vmfx.register_preset`). Loading the same file again returns
the module already loaded. The CLI's ``--plugin FILE`` calls it before it reads any preset name.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

from .errors import ConfigError
from .sections import PLUGIN_MODULE_PREFIX

__all__ = ["load_plugin"]


def load_plugin(path: str) -> ModuleType:
    """Run the plug-in file ``path`` (once) and return it as a module.

    Raises:
        ConfigError: no such file, not a ``.py`` file, or the file fails when run (the error
            names the file and chains the cause).
    """
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise ConfigError(f"no plug-in file at {path!r}: give the path of a Python file that registers a method")
    path = os.path.abspath(os.fspath(path))
    if not path.endswith(".py"):
        raise ConfigError(f"a plug-in is a Python file (.py), got {path!r}")
    stem = os.path.splitext(os.path.basename(path))[0]
    name = PLUGIN_MODULE_PREFIX + ''.join(c if c.isalnum() else '_' for c in stem)
    loaded = sys.modules.get(name)
    if loaded is not None and os.path.abspath(getattr(loaded, "__file__", "") or "") == path:
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ConfigError(f"the plug-in {os.path.basename(path)} failed while loading: {type(exc).__name__}: {exc}") from exc
    return module
