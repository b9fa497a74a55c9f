"""Small Markdown helpers for card detail: tables whose cells cannot break the layout."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from service.clinical.observations import Reading


def cell(value: object) -> str:
    """Text safe inside a GitHub-flavoured Markdown table cell (FHIR text is untrusted)."""
    return "" if value is None else inline(value)


def inline(value: object) -> str:
    """Untrusted text (a diagnosis display, a unit) safe in running Markdown: no links, images,
    HTML or emphasis can be formed from it."""
    text = " ".join(str(value).split())
    # With brackets escaped no link or image can form, so "(" and "!" may stay readable.
    for char in "\\`*_[]<>|":
        text = text.replace(char, "\\" + char)
    return text


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = [
        "| " + " | ".join(cell(h) for h in headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def day(when: datetime | None) -> str:
    return when.strftime("%Y-%m-%d") if when is not None else "no date"


def mg_dl(value: float) -> str:
    return f"{value:,.0f}"


def reading_mg_dl(reading: Reading) -> str:
    """An IgM in mg/dL with its bound, if the laboratory gave one ("<4,000")."""
    return f"{reading.comparator}{mg_dl(reading.normalised)}"
