"""Kernel source as template text with named slots.

A kernel family's Triton source is written once, as it will read, in a :class:`KernelTemplate`;
the parts that depend on the render choices are named slots (``$main_loop``, ``$epilogue``, ...)
that small functions fill. Two kinds of slot, told apart by where the placeholder stands:

* a *block* slot is alone on its line (only indentation before it, nothing after): its value is
  source text of any number of lines, each written at the placeholder's indentation (relative
  indentation kept); an empty value removes the line, so optional blocks leave no blank line;
* an *inline* slot is anywhere else on a line: its value replaces it as it is (one line).

Placeholders are :class:`string.Template`'s (``$name`` or ``${name}``; ``$$`` is a literal ``$``).
:meth:`KernelTemplate.fill` takes every slot by name and refuses a missing or unknown one, so a
template and the functions filling it cannot drift apart silently. Filled values are not scanned
for placeholders again.
"""

from __future__ import annotations

import re
import string
import textwrap
from typing import Iterable

__all__ = ["KernelTemplate", "lines"]

_BLOCK = re.compile(r"^(?P<indent>[ ]*)\$(?:(?P<bare>[_a-zA-Z][_a-zA-Z0-9]*)|\{(?P<braced>[_a-zA-Z][_a-zA-Z0-9]*)\})[ ]*$")


def lines(*parts: str | Iterable[str] | None) -> str:
    """Join source parts into one block: each part is a string (one or more lines; dedented, so a
    triple-quoted snippet may be indented in Python code) or an iterable of such strings; None and
    empty parts are left out."""
    out: list[str] = []
    for part in parts:
        if part is None:
            continue
        if not isinstance(part, str):
            text = lines(*part)
            if text:
                out.append(text)
            continue
        text = textwrap.dedent(part).strip("\n")
        if text:
            out.append(text)
    return "\n".join(out)


class KernelTemplate:
    """Source text with named slots; :meth:`fill` returns the source with every slot filled.

    Args:
        text: the template. It is dedented and stripped of leading and trailing blank lines, so it
            can be written as an indented triple-quoted string.

    Attributes:
        slots: the names of the slots, in order of first appearance.
    """

    def __init__(self, text: str):
        self.text = textwrap.dedent(text).strip("\n")
        self._lines = self.text.split("\n")
        names: list[str] = []
        for line in self._lines:
            for match in string.Template.pattern.finditer(line):
                if match.group("invalid") is not None:
                    raise ValueError(f"invalid placeholder in template line {line!r}")
                name = match.group("named") or match.group("braced")
                if name and name not in names:
                    names.append(name)
        self.slots: tuple[str, ...] = tuple(names)

    def fill(self, **values: str) -> str:
        """The source with every slot replaced by ``values[slot]`` (newline-terminated).

        Raises:
            KeyError: a slot without a value, or a value for no slot (both named in the message).
            ValueError: an inline slot given more than one line.
        """
        missing = [s for s in self.slots if s not in values]
        unknown = sorted(set(values) - set(self.slots))
        if missing or unknown:
            raise KeyError(f"template slots without a value: {missing}; values for no slot: {unknown} "
                           f"(the template's slots: {list(self.slots)})")
        out: list[str] = []
        for line in self._lines:
            block = _BLOCK.match(line)
            if block:
                value = values[block.group("bare") or block.group("braced")]
                indent = block.group("indent")
                out.extend(indent + piece if piece.strip() else "" for piece in value.split("\n") if value)
                continue
            for match in string.Template.pattern.finditer(line):
                name = match.group("named") or match.group("braced")
                if name and "\n" in values[name]:
                    raise ValueError(f"slot ${name} stands inside a line, but its value has several lines")
            out.append(string.Template(line).substitute(values))
        return "\n".join(out) + "\n"
