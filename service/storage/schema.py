"""The feedback database's schema and how a connection to it is opened.

Durability settings (WAL, synchronous=FULL), the ordered migrations recorded in PRAGMA
user_version, and the transaction helper every reader and writer of the store goes through.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from service.storage.errors import FeedbackStoreError

# The store's logger, as before this module was split out of it: log searches keep matching.
log = logging.getLogger("service.storage.feedback")

BUSY_TIMEOUT_SECONDS = 5.0

# Ordered migrations; PRAGMA user_version records how many have been applied.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE issued_cards (
            uuid TEXT PRIMARY KEY, service_id TEXT NOT NULL, hook TEXT NOT NULL,
            hook_instance TEXT NOT NULL, finding TEXT NOT NULL, rule_version TEXT NOT NULL,
            indicator TEXT NOT NULL, issued_at TEXT NOT NULL, patient_hash TEXT NOT NULL)""",
        "CREATE INDEX issued_cards_by_time ON issued_cards (issued_at)",
        "CREATE INDEX issued_cards_by_finding ON issued_cards (finding, rule_version)",
        # outcome_timestamp as sent; outcome_at normalised to UTC for ordering and for the key.
        # accepted_suggestions and override_reason are canonical JSON (part of the natural key);
        # the reason's coding and userComment are copied out for reading.
        """CREATE TABLE feedback (
            id INTEGER PRIMARY KEY, service_id TEXT NOT NULL, card_uuid TEXT NOT NULL,
            outcome TEXT NOT NULL CHECK (outcome IN ('accepted', 'overridden')),
            outcome_timestamp TEXT NOT NULL, outcome_at TEXT NOT NULL,
            accepted_suggestions TEXT NOT NULL, override_reason TEXT NOT NULL,
            reason_system TEXT, reason_code TEXT, reason_display TEXT, user_comment TEXT,
            unknown_card INTEGER NOT NULL CHECK (unknown_card IN (0, 1)),
            received_at TEXT NOT NULL,
            UNIQUE (service_id, card_uuid, outcome, outcome_at,
                    accepted_suggestions, override_reason))""",
        "CREATE INDEX feedback_by_received ON feedback (received_at)",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)


@contextmanager
def transaction(connection: sqlite3.Connection, *, write: bool) -> Iterator[sqlite3.Connection]:
    # A writer takes the write lock at BEGIN: a deferred transaction that reads, then writes, can
    # fail with SQLITE_BUSY at once in WAL mode, without waiting out busy_timeout.
    connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield connection
        # Inside the try: a COMMIT that fails (disk full, I/O error) would otherwise leave the
        # transaction open on this thread's connection, and its every later BEGIN would fail.
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.rollback()
        raise


def _enable_wal(connection: sqlite3.Connection) -> None:
    # Switching a new file to WAL needs an exclusive lock that SQLite does not wait for with its
    # busy handler, so workers creating the database together would fail with "locked": wait here.
    deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
    while True:
        try:
            connection.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def connect(path: Path, *, read_only: bool) -> sqlite3.Connection:
    """A new connection in autocommit mode, set up for durability; the schema is not checked."""
    # check_same_thread=False only so close() can close every thread's connection; each
    # connection is otherwise used by the one thread that opened it.
    options: dict[str, Any] = {
        "timeout": BUSY_TIMEOUT_SECONDS,
        "isolation_level": None,
        "check_same_thread": False,
    }
    if read_only:
        uri = f"file:{quote(str(path.resolve()))}?mode=ro"
        connection = sqlite3.connect(uri, uri=True, **options)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Feedback holds clinicians' free-text comments: a new file is for its owner only.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        connection = sqlite3.connect(path, **options)
    try:
        if not read_only:
            _enable_wal(connection)
        connection.execute("PRAGMA synchronous = FULL")  # a commit is on disk when it returns
    except BaseException:
        connection.close()
        raise
    return connection


def migrate(connection: sqlite3.Connection, path: Path, *, read_only: bool) -> int:
    """Bring the schema to SCHEMA_VERSION and return the version now in use (0: an empty file
    opened read-only)."""
    version: int = connection.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise FeedbackStoreError(
            f"{path} has schema version {version}; this code knows up to {SCHEMA_VERSION}"
        )
    if version == SCHEMA_VERSION or (read_only and version == 0):
        return version
    if read_only:
        raise FeedbackStoreError(f"{path} has an old schema: start the service once")
    with transaction(connection, write=True):
        # Read again under the write lock: another worker may have migrated meanwhile.
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        for number in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[number - 1]:
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {number:d}")
            log.info("feedback store %s migrated to schema version %d", path, number)
    return SCHEMA_VERSION
