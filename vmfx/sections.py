"""Config sections: a method's settings, registered by name.

A :class:`~vmfx.config.QuantConfig` holds what its methods are configured with in one field,
``sections``: an immutable mapping from a section's name to an instance of the frozen, validated
dataclass registered under that name (:func:`register_section`). A section that is absent is off.
The built-in methods' settings are sections that :mod:`vmfx.config` registers with the same call
(``smoothing``, ``jlss``, ``search``, ``outliers``, ``scan_state``, ``split_softplus``,
``bias_correction``); a plug-in registers its own without touching vmfx::

    @dataclass(frozen=True)
    class ClipScope:
        module: str = "*"

    vmfx.register_section("clip_scope", ClipScope)
    cfg = vmfx.preset("minmax-w8a8").replace(clip_scope=ClipScope("layers.0.*"))
    cfg.section("clip_scope")            # or cfg.clip_scope, cfg.sections["clip_scope"]

A section's name is also its keyword in ``QuantConfig(...)`` and ``config.replace(...)`` (None
removes it) and its key in a saved config (``QuantConfig.to_dict()["sections"]``, written by the
class's ``to_dict`` when it has one, else as its fields; read back by its ``from_dict`` or its
constructor). A method's own options (:func:`register_options`, which
``vmfx.register_method(name, options=cls)`` calls) are the section named after the method: every
config of that method holds one (the class's defaults when none is given), no other config may.

A section class may translate a plainer keyword value: a classmethod ``from_keyword(value)``
(returning an instance, or None for "absent") and a classmethod ``keyword_value(section)`` (what
``config.<name>`` reads, given the instance or None); ``split_softplus`` reads as a bool that way and
``bias_correction`` as a tuple of roles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import ConfigError

__all__ = [
    "Sections",
    "SectionInfo",
    "register_section",
    "register_options",
    "section_info",
    "section_names",
    "method_section",
    "method_options",
    "section_to_dict",
    "section_from_dict",
    "fields_to_dict",
    "fields_from_dict",
]

#: The prefix of the modules :func:`vmfx.load_plugin` runs plug-in files as.
PLUGIN_MODULE_PREFIX = "vmfx_plugin_"


@dataclass(frozen=True)
class SectionInfo:
    """One registered section.

    Args:
        name: its key in ``QuantConfig.sections``, its keyword and its key in a saved config.
        cls: its frozen dataclass.
        method: for a method's own options, that method (the section is in exactly its configs).
        builtin: one of vmfx's own sections (it cannot be registered again).
    """

    name: str
    cls: type
    method: str | None = None
    builtin: bool = False

    def to_section(self, value: Any, where: str) -> Any:
        """``value`` given for this section (``where``: how the user wrote it, e.g.
        ``"QuantConfig.jlss"``) as an instance of its class, or None (absent)."""
        translate = getattr(self.cls, "from_keyword", None)
        if translate is not None and not isinstance(value, self.cls):
            value = translate(value)
        if value is not None and not isinstance(value, self.cls):
            raise ConfigError(f"{where} must be a {self.cls.__name__} or None, got {type(value).__name__}")
        return value

    def keyword_value(self, section: Any) -> Any:
        """What ``config.<name>`` reads for the held instance (None: absent)."""
        translate = getattr(self.cls, "keyword_value", None)
        return translate(section) if translate is not None else section


#: section name -> its registration, in registration order.
_SECTIONS: dict[str, SectionInfo] = {}
#: Names a section cannot take: QuantConfig's own fields and attributes (:func:`reserve_names`).
_RESERVED: set[str] = {"options", "sections", "version", "section_modules"}


def reserve_names(names: Iterable[str]) -> None:
    """Keep ``names`` (a config's own fields and attributes) from being taken by a section."""
    _RESERVED.update(n for n in names if n not in _SECTIONS)


def register_section(name: str, cls: type, *, method: str | None = None, builtin: bool = False) -> type:
    """Register the frozen dataclass ``cls`` as the config section ``name``.

    ``cls`` validates its fields in ``__post_init__`` (raising :class:`~vmfx.errors.ConfigError`)
    and holds JSON values (or tuples of them), or has ``to_dict`` / classmethod ``from_dict``.
    ``method``: the section holds that method's own options (:func:`register_options`). ``builtin``
    is for vmfx's own sections. Registering a plug-in's name again replaces that registration;
    a built-in section's name, or one of QuantConfig's own fields, cannot be taken.
    """
    if not isinstance(name, str) or not name or any(c.isspace() for c in name) or name.startswith("_"):
        raise ConfigError(f"a config section's name is a non-empty word not starting with '_', got {name!r}")
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):
        raise ConfigError(f"a config section is a frozen dataclass (@dataclass(frozen=True)), got {cls!r}")
    known = _SECTIONS.get(name)
    if known is not None and known.builtin:
        raise ConfigError(f"{name!r} is a built-in config section ({known.cls.__name__}): give yours another name")
    if name in _RESERVED:
        raise ConfigError(f"{name!r} is a field or attribute of QuantConfig: give the section another name")
    _SECTIONS[name] = SectionInfo(name, cls, method, builtin)
    return cls


def register_options(method: str, options_class: type) -> type:
    """Declare ``options_class`` (a frozen dataclass with a default for every field) as the options
    of ``method``: the section named ``method``, held by every :class:`~vmfx.config.QuantConfig` of
    that method (the class's defaults when none is given) and read as ``config.options``. Usually
    called by :func:`vmfx.passes.register_method` (``options=``)."""
    if not (isinstance(options_class, type) and dataclasses.is_dataclass(options_class)
            and options_class.__dataclass_params__.frozen):
        raise ConfigError(f"a method's options are a frozen dataclass (@dataclass(frozen=True)), got {options_class!r}")
    try:
        options_class()
    except TypeError as exc:
        raise ConfigError(f"{options_class.__name__} needs a default for every field (the options of a preset "
                          f"that names none): {exc}") from exc
    return register_section(method, options_class, method=method)


def section_info(name: str) -> SectionInfo | None:
    """The registration of section ``name`` (None: not registered)."""
    return _SECTIONS.get(name)


def section_names() -> list[str]:
    """The registered sections' names, sorted."""
    return sorted(_SECTIONS)


def method_section(method: str) -> SectionInfo | None:
    """The section holding ``method``'s own options (None: the method has none)."""
    info = _SECTIONS.get(method)
    return info if info is not None and info.method == method else None


def method_options(method: str) -> type | None:
    """The options class registered for ``method`` (None: the method has none)."""
    info = method_section(method)
    return info.cls if info is not None else None


class Sections(Mapping):
    """An immutable mapping from section name to section instance, kept in name order.

    Two are equal when they hold equal instances under the same names (a plain dict with the same
    items compares equal too); the hash is that of the ordered pairs, so configs holding them
    compare and hash by value. Entries are not validated here: :class:`~vmfx.config.QuantConfig`
    does that when it is built.
    """

    __slots__ = ("_items", "_index")

    def __init__(self, items: Mapping | Iterable[tuple[str, Any]] = ()):
        pairs = dict(items.items() if isinstance(items, Mapping) else items)
        object.__setattr__(self, "_items", tuple(sorted(pairs.items(), key=lambda kv: kv[0])))
        object.__setattr__(self, "_index", dict(self._items))

    def __setattr__(self, name, value):
        raise AttributeError("Sections is immutable: build a new config with config.replace(<section>=...)")

    def __reduce__(self):
        return (Sections, (self._items,))

    def __getitem__(self, name: str) -> Any:
        return self._index[name]

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other) -> bool:
        if isinstance(other, Sections):
            return self._items == other._items
        return isinstance(other, Mapping) and self._index == dict(other.items())

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        return "Sections({" + ", ".join(f"{name!r}: {value!r}" for name, value in self._items) + "})"


def fields_to_dict(value: Any) -> dict:
    """A frozen dataclass as a dict of its fields (tuples as lists); the fields its class lists in
    ``WRITTEN_WHEN_SET`` are left out while they hold their defaults, so configs that do not use
    them read back in older vmfx versions."""
    d = asdict(value)
    for name in getattr(type(value), "WRITTEN_WHEN_SET", ()):
        if d[name] == next(f.default for f in fields(value) if f.name == name):
            del d[name]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def fields_from_dict(cls: type, d: Any) -> Any:
    """``cls`` built from a dict written by :func:`fields_to_dict` (lists back to tuples); unknown
    fields are refused by name."""
    if not isinstance(d, dict):
        raise ConfigError(f"{cls.__name__} must be read from a dict, got {type(d).__name__}")
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def section_to_dict(value: Any) -> dict:
    """A section instance as saved: its class's ``to_dict()`` when it has one, else its fields."""
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if callable(to_dict) else fields_to_dict(value)


def section_from_dict(name: str, d: Any, module: str | None = None) -> Any:
    """Read section ``name`` from its saved dict. An unregistered name is a
    :class:`~vmfx.errors.ConfigError` that says what to import: ``module`` (the one the saving
    process had registered it from, when the file records it), or the plug-in file it came from."""
    info = _SECTIONS.get(name)
    if info is None:
        raise ConfigError(f"the config has a section {name!r}, which is not registered here "
                          f"(registered: {', '.join(section_names())}): {_what_to_import(module)}")
    from_dict = getattr(info.cls, "from_dict", None)
    return from_dict(d) if callable(from_dict) else fields_from_dict(info.cls, d)


def _what_to_import(module: str | None) -> str:
    if module is None:
        return ("import the module that registers it first (vmfx.register_section, or "
                "vmfx.register_method(name, options=...))")
    if module.startswith(PLUGIN_MODULE_PREFIX):
        stem = module[len(PLUGIN_MODULE_PREFIX):]
        return (f"it was registered by the plug-in file {stem}.py: load it first (vmfx.load_plugin('{stem}.py'), "
                f"or the CLI's --plugin {stem}.py)")
    return f"it was registered by the module {module}: import {module} first"
