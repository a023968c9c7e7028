"""The one error type the export pipeline raises for problems a user can fix, and the one-line
reason it quotes from an underlying exception."""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ExportError(Exception):
    """A clear, user-facing failure: the message says what is wrong and what to do."""


class SizeRefused(ExportError):
    """The model cannot take a free image size (``dynamic_hw``): the message says why, in one line.
    The export then keeps height and width static."""


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour codes (torch's exporter colours its messages)."""
    return _ANSI.sub("", text)


def first_line(e: BaseException) -> str:
    """A one-line reason: the exporter's "Exception summary" when it has one, else the first line."""
    text = [t.strip() for t in strip_ansi(str(e)).splitlines()]
    text = [t for t in text if t]
    if "## Exception summary" in text:
        after = text[text.index("## Exception summary") + 1 :]
        if after:
            return after[0][:400]
    return f"{type(e).__name__}: {text[0][:400]}" if text else type(e).__name__
