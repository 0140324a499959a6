"""KernelTemplate: block slots take the placeholder's indentation (an empty value drops the line),
inline slots are replaced as they are, and a missing or unknown slot is refused by name."""

from __future__ import annotations

import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmfx.lowering.codegen import IndentedBuffer
from vmfx.lowering.template import KernelTemplate, lines

TEMPLATE = KernelTemplate("""
    def $name(x):
        $body
        for i in range(3):
            $loop
        return ${result}_out
""")

_code_line = st.text(alphabet="abxyz_=+*() 0123456789", min_size=0, max_size=12)


def _by_buffer(name: str, body: list[str], loop: list[str], result: str) -> str:
    """The same source written line by line with IndentedBuffer (the reference)."""
    buf = IndentedBuffer()
    buf.writeline(f"def {name}(x):")
    with buf.indent():
        buf.writelines(body)
        buf.writeline("for i in range(3):")
        with buf.indent():
            buf.writelines(loop)
        buf.writeline(f"return {result}_out")
    return buf.getvalue()


@settings(max_examples=60, deadline=None)
@given(body=st.lists(_code_line, max_size=4), loop=st.lists(_code_line, max_size=4))
def test_fill_matches_line_by_line_writing(body, loop):
    body = [b for b in body if b.strip()] or []
    loop = [b for b in loop if b.strip()] or []
    filled = TEMPLATE.fill(name="f", body="\n".join(body), loop="\n".join(loop), result="y")
    assert filled == _by_buffer("f", body, loop, "y")


def test_block_keeps_relative_indentation_and_blank_lines():
    block = lines("""
        if x:
            y = 1

        z = 2
    """)
    out = TEMPLATE.fill(name="g", body=block, loop="", result="z")
    assert out == textwrap.dedent("""\
        def g(x):
            if x:
                y = 1

            z = 2
            for i in range(3):
            return z_out
    """)


def test_slots_in_order_and_refusals():
    assert TEMPLATE.slots == ("name", "body", "loop", "result")
    with pytest.raises(KeyError, match=r"without a value: \['loop'\]"):
        TEMPLATE.fill(name="f", body="", result="y")
    with pytest.raises(KeyError, match=r"values for no slot: \['extra'\]"):
        TEMPLATE.fill(name="f", body="", loop="", result="y", extra="")
    with pytest.raises(ValueError, match=r"\$result stands inside a line"):
        TEMPLATE.fill(name="f", body="", loop="", result="a\nb")
    with pytest.raises(ValueError, match="invalid placeholder"):
        KernelTemplate("x = $ 1")


def test_lines_skips_none_and_empty_parts():
    assert lines("a", None, "", ["b", None, "  c"], "\n    d\n        e\n") == "a\nb\nc\nd\n    e"
