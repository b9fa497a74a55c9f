"""Card detail is CommonMark with GitHub's extensions: values put into it must render as written.

Text from the client or the laboratory (a diagnosis display, a unit, a value as reported) is
escaped by `inline`, so it renders as exactly those characters: no emphasis, link, autolink, HTML,
table break, heading, list or block quote can be formed from it. Text that is already Markdown (a
table, a filled fragment of a card template) is marked `Markdown` and inserted as it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache

from service.clinical.observations import Reading


class Markdown(str):
    """Text already written as Markdown; the card builder inserts it without escaping."""


# Inline punctuation with a meaning in CommonMark or GFM: emphasis, code, links and footnotes,
# HTML and autolinks, tables, strikethrough, entities, and headings.
_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&#])")
# GFM turns bare URLs, www. addresses and e-mail addresses into links; an escape inside breaks it.
_AUTOLINK = re.compile(r"(?<=[A-Za-z0-9])(:)(?=//)|(?<=www)(\.)|(@)", re.IGNORECASE)
# At the start of a line: a list item, a numbered item, a thematic break or setext underline
# ("-5" or "4.2" start no list: a marker must be followed by a space).
_LINE_START = re.compile(r"^([-+=])(?=\s|$|[-+=])|^(\d{1,9})([.)])(?=\s|$)")
# Text none of the three can change: letters, digits, spaces and harmless punctuation, not opening
# as _LINE_START would escape, with no "www." and no "://" in it. Most cells (dates, values such
# as "+10%" or "2.9", units, names, "Dose 1: ...") are such text, and telling so costs a fifth of
# the three. The characters are one class, with "_" (a word character) and the two strings as
# plain tests: a class alternation and a look-ahead over the whole text cost three times as much.
_UNCHANGED = re.compile(r"(?![-+=](?:\s|$|[-+=])|\d{1,9}[.)](?:\s|$))[\w ,;:/()%'\"\-+=.]*")


# Texts up to this long have their escaped form remembered (_remembered_inline): a card's tables
# repeat the same cells ("baseline", units, the chart's dates and ids) in row after row and call
# after call, and escaping one costs about 0.5 us where looking it up costs a fifth of that.
_REMEMBERED_CHARS = 64


def inline(value: object) -> str:
    """Untrusted text, on one line, that renders in running Markdown as exactly that text."""
    if type(value) is str and len(value) <= _REMEMBERED_CHARS:
        return _remembered_inline(value)
    return _inline(value)


def _inline(value: object) -> str:
    text = " ".join(str(value).split())
    if (
        "_" not in text
        and "://" not in text
        and "www." not in text.lower()
        and _UNCHANGED.fullmatch(text)
    ):
        return text
    return _escaped(text)


_remembered_inline = lru_cache(maxsize=4096)(_inline)


def _escaped(text: str) -> str:
    text = _SPECIAL.sub(r"\\\1", text)
    text = _AUTOLINK.sub(lambda m: "\\" + m.group(0), text)
    return _LINE_START.sub(
        lambda m: f"\\{m.group(1)}" if m.group(1) else rf"{m.group(2)}\{m.group(3)}", text
    )


def one_line(text: str, limit: int = 40) -> str:
    """Client text shortened for a summary: plain text there, escaped by the builder in detail."""
    return " ".join(text.split())[:limit]


def cell(value: object) -> str:
    """Text safe inside a GitHub-flavoured Markdown table cell (FHIR text is untrusted)."""
    return "" if value is None else inline(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> Markdown:
    lines = [
        "| " + " | ".join(cell(h) for h in headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return Markdown("\n".join(lines))


def day(when: datetime | None) -> str:
    # The ISO date: four-digit years, as FHIR writes them, at a sixth of strftime's cost.
    return when.date().isoformat() if when is not None else "no date"


def mg_dl(value: float) -> str:
    return f"{value:,.0f}"


def reading_mg_dl(reading: Reading) -> str:
    """An IgM in mg/dL with its bound, if the laboratory gave one ("<4,000")."""
    return f"{reading.comparator}{mg_dl(reading.normalised)}"
