"""Structured JSON logs on stderr: one object per line, fields an operator can query.

Only fields passed explicitly are written; request bodies, tokens and patient identifiers are
never passed, so they cannot appear.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    """Install the JSON handler on the root logger once (idempotent across app instances)."""
    root = logging.getLogger()
    if not any(getattr(h, "_flare_cds", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler._flare_cds = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level.upper())
    # The thread and multiprocessing names a record looks up are never written (only the fields
    # passed explicitly are), and under gevent finding the current thread is a greenlet lookup
    # for every line; the process id stays, for gunicorn's own log lines.
    logging.logThreads = False
    logging.logMultiprocessing = False
    # Werkzeug's access log repeats the request line; ours carries the request id instead.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # Its debug and warning lines may name a FHIR query, and a query names the patient.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
