"""The feedback report: how often each finding's cards were accepted or overridden, and why.

Rendered as an aligned table for a clinical lead, or as CSV/JSON for a spreadsheet or a script.
Override reasons are text sent by clients, so the renderers neutralise what could act on the reader:
terminal control characters in the table, spreadsheet formulas in the CSV.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import sys
from contextlib import closing
from datetime import datetime
from typing import Any, TextIO

import psycopg
from psycopg_pool import PoolTimeout

from service.settings import Settings
from service.storage.feedback import FeedbackStoreError, open_store, parse_timestamp
from service.storage.location import SQLITE, storage_location
from service.storage.report_queries import ReportRow

FORMATS = ("table", "csv", "json")
FIELDS = (
    "finding",
    "rule_version",
    "cards_issued",
    "accepted",
    "overridden",
    "override_rate",
    "suggestions_accepted",
    "top_override_reasons",
)
_HEADINGS = (
    "Finding",
    "Rule version",
    "Cards issued",
    "Accepted",
    "Overridden",
    "Override rate",
    "Suggestions accepted",
    "Top override reasons",
)
_NUMERIC = {"cards_issued", "accepted", "overridden", "override_rate", "suggestions_accepted"}
_EMPTY = "(no cards issued and no feedback received in this period)"


def render_report(rows: list[ReportRow], fmt: str) -> str:
    """The report as text in one of FORMATS; an empty report still has its header."""
    if fmt == "table":
        return _table(rows)
    if fmt == "csv":
        return _csv(rows)
    if fmt == "json":
        return json.dumps([_as_json(row) for row in rows], indent=2, ensure_ascii=False) + "\n"
    raise ValueError(f"unknown report format {fmt!r}; use one of {', '.join(FORMATS)}")


def parse_since(text: str | None) -> datetime | None:
    """--since as an ISO date (midnight UTC) or date-time (UTC when it names no offset)."""
    if text is None:
        return None
    try:
        return parse_timestamp(text)
    except ValueError:
        raise ValueError(
            f"--since {text!r} is not an ISO date (2025-01-31) or date-time (2025-01-31T08:00:00Z)"
        ) from None


def run_feedback_report(
    settings: Settings, since: str | None, fmt: str, out: TextIO, err: TextIO | None = None
) -> int:
    """`flare-cds feedback-report`: 0 when printed, 2 on bad arguments, 1 when unreadable."""
    err = sys.stderr if err is None else err
    if fmt not in FORMATS:
        print(f"feedback-report: --format must be one of {', '.join(FORMATS)}", file=err)
        return 2
    try:
        since_at = parse_since(since)
    except ValueError as exc:
        print(f"feedback-report: {exc}", file=err)
        return 2
    location = storage_location(settings.storage)
    rows: list[ReportRow] = []
    # A report must never create the database (or its directory) where the service has none yet.
    if location.backend != SQLITE or (location.path and location.path.exists()):
        try:
            with closing(open_store(settings.storage, read_only=True)) as store:
                rows = store.report(since_at)
        except (sqlite3.DatabaseError, FeedbackStoreError, psycopg.Error, PoolTimeout) as exc:
            where = location.path if location.backend == SQLITE else location.describe()
            print(f"feedback-report: cannot read {where}: {exc}", file=err)
            return 1
    out.write(render_report(rows, fmt))
    return 0


def _reasons_text(row: ReportRow) -> str:
    return "; ".join(f"{reason} ({count})" for reason, count in row.top_override_reasons)


def _cells(row: ReportRow) -> dict[str, str]:
    rate = "" if row.override_rate is None else f"{row.override_rate:.1%}"
    return {
        "finding": row.finding,
        "rule_version": row.rule_version,
        "cards_issued": str(row.cards_issued),
        "accepted": str(row.accepted),
        "overridden": str(row.overridden),
        "override_rate": rate,
        "suggestions_accepted": str(row.suggestions_accepted),
        "top_override_reasons": _reasons_text(row),
    }


def _printable(text: str) -> str:
    # A reason's display is client text: a newline or escape sequence must not redraw the terminal.
    return "".join(c if c.isprintable() else " " if c.isspace() else "?" for c in text) or "-"


def _table(rows: list[ReportRow]) -> str:
    lines = [dict(zip(FIELDS, _HEADINGS, strict=True))]
    lines += [{name: _printable(value) for name, value in _cells(row).items()} for row in rows]
    widths = {name: max(len(line[name]) for line in lines) for name in FIELDS}

    def format_line(line: dict[str, str]) -> str:
        cells = [
            line[name].rjust(widths[name]) if name in _NUMERIC else line[name].ljust(widths[name])
            for name in FIELDS
        ]
        return "  ".join(cells).rstrip()

    text = [format_line(lines[0]), "  ".join("-" * widths[name] for name in FIELDS)]
    text += [format_line(line) for line in lines[1:]] or [_EMPTY]
    return "\n".join(text) + "\n"


def _spreadsheet_safe(text: str) -> str:
    # A cell starting with = + - @ is run as a formula by spreadsheets (CSV injection).
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _csv(rows: list[ReportRow]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(FIELDS)
    for row in rows:
        cells = _cells(row)
        rate = "" if row.override_rate is None else f"{row.override_rate:.4f}"
        writer.writerow(
            rate if name == "override_rate" else _spreadsheet_safe(cells[name]) for name in FIELDS
        )
    return buffer.getvalue()


def _as_json(row: ReportRow) -> dict[str, Any]:
    return {
        "finding": row.finding,
        "rule_version": row.rule_version,
        "cards_issued": row.cards_issued,
        "accepted": row.accepted,
        "overridden": row.overridden,
        "override_rate": None if row.override_rate is None else round(row.override_rate, 4),
        "suggestions_accepted": row.suggestions_accepted,
        "top_override_reasons": [
            {"reason": reason, "count": count} for reason, count in row.top_override_reasons
        ],
    }
