"""Small Markdown helpers for card detail: tables whose cells cannot break the layout."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime


def cell(value: object) -> str:
    """Text safe inside a GitHub-flavoured Markdown table cell (FHIR text is untrusted)."""
    text = "" if value is None else str(value)
    text = " ".join(text.split())
    for char, escaped in (("\\", "\\\\"), ("|", "\\|"), ("<", "&lt;"), (">", "&gt;")):
        text = text.replace(char, escaped)
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
