"""Durable record of the cards the service issued and of the CDS Hooks feedback about them.

Feedback is the only signal of whether clinicians find a card useful, so an item must survive a
crash from the moment the HTTP 200 goes out: SQLite in WAL mode with synchronous=FULL, one
transaction per request. Several gunicorn workers and their threads write at once, so uniqueness is
enforced by the database (a UNIQUE constraint), never by a check-then-insert in Python.

The schema and connection setup are in `feedback_schema`, the report query in `feedback_queries`,
patient-id hashing in `patient_hash`; callers import all the public names from here.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from service.settings import StorageSettings
from service.storage.errors import FeedbackStoreError, InvalidFeedback, StoreClosed
from service.storage.location import POSTGRESQL, storage_location
from service.storage.patient_hash import (
    HASH_PATTERN,
    KEY_BYTES,
    load_or_create_hash_key,
    patient_hash,
)
from service.storage.report_queries import TOP_REASONS, UNKNOWN_CARD, ReportRow, read_report
from service.storage.schema import BUSY_TIMEOUT_SECONDS, SCHEMA_VERSION, connect, migrate
from service.storage.schema import transaction as _transaction

# The store's public names, wherever they now live: callers import them all from here.
__all__ = [
    "BUSY_TIMEOUT_SECONDS",
    "KEY_BYTES",
    "OUTCOMES",
    "SCHEMA_VERSION",
    "TOP_REASONS",
    "UNKNOWN_CARD",
    "FeedbackResult",
    "FeedbackStore",
    "FeedbackStoreError",
    "InvalidFeedback",
    "IssuedCard",
    "ReportRow",
    "SqliteFeedbackStore",
    "load_or_create_hash_key",
    "open_store",
    "parse_timestamp",
    "patient_hash",
]

log = logging.getLogger(__name__)

OUTCOMES = ("accepted", "overridden")


@dataclass(frozen=True)
class IssuedCard:
    uuid: str
    service_id: str
    hook: str
    hook_instance: str
    finding: str
    rule_version: str
    indicator: str
    issued_at: datetime
    patient_hash: str  # from patient_hash(); the raw patient id never reaches the store

    def by_name(self) -> dict[str, Any]:
        """Each field's value, as it is: not through asdict(), which deep-copies every value
        (about 19 us a card, most of the writer thread's work per record)."""
        return {name: getattr(self, name) for name in _ISSUED_FIELDS}


_ISSUED_FIELDS = tuple(f.name for f in fields(IssuedCard))


@dataclass(frozen=True)
class FeedbackResult:
    received: int
    duplicates: int
    unknown_cards: tuple[str, ...] = ()


class FeedbackStore(Protocol):
    def record_issued(self, cards: Sequence[IssuedCard]) -> None: ...

    def record_feedback(
        self, service_id: str, items: Sequence[Mapping[str, Any]], received_at: datetime
    ) -> FeedbackResult: ...

    def report(self, since: datetime | None = None) -> list[ReportRow]: ...

    def schema_version(self) -> int: ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


def open_store(settings: StorageSettings, *, read_only: bool = False) -> FeedbackStore:
    """The store `storage.url` names: SqliteFeedbackStore or PostgresStore (same interface)."""
    location = storage_location(settings)
    if location.backend == POSTGRESQL:
        from service.storage.postgres import PostgresStore

        return PostgresStore(
            location.conninfo or "",
            where=location.describe(),
            read_only=read_only,
            pool_size=settings.pool_size,
            timeout_seconds=settings.timeout_seconds,
        )
    return SqliteFeedbackStore(location.path or settings.database, read_only=read_only)


def since_text(since: datetime | None) -> str:
    """A report's lower bound as the stored UTC text; "" (before every instant) for all time."""
    return "" if since is None else _utc_text(since)


def parse_timestamp(text: str) -> datetime:
    """An ISO 8601 date or date-time as aware UTC; no offset means UTC, as CDS Hooks sends."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("not a date-time")
    # RFC 3339 allows a lower-case "t" and "z" (the contract's pattern does too); Python 3.11's
    # fromisoformat does not, and an ISO date or time holds no other letter worth keeping.
    value = datetime.fromisoformat(text.strip().upper())
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        # 0001-01-01T00:00:00+01:00 is well formed but has no UTC datetime: refuse it, not crash.
        raise ValueError("outside the years 1-9999 in UTC") from None


def _utc_text(value: datetime) -> str:
    # One fixed-width UTC form, so that comparing the text in SQL compares the instants.
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{value!r} has no time zone")
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _optional_text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _normalise(item: Mapping[str, Any], index: int) -> dict[str, Any]:
    """Column values for one item. The HTTP layer checks the shape against the contract first;
    this refuses only what would store a wrong row, and never echoes an item (it may hold a
    clinician's comment)."""
    where = f"feedback[{index}]"
    try:
        stamp = item["outcomeTimestamp"]
    except (KeyError, TypeError):
        raise InvalidFeedback(where, "has no outcomeTimestamp") from None
    try:
        outcome_at = _utc_text(parse_timestamp(stamp))
    except ValueError:
        # The contract's pattern lets through impossible values (2025-02-30, hour 25): name them.
        raise InvalidFeedback(
            f"{where}.outcomeTimestamp", "is not a valid date-time such as 2025-01-31T08:00:00Z"
        ) from None
    try:
        reason = item.get("overrideReason") or {}
        coding = reason.get("reason") or {}
        suggestion_ids = {suggestion["id"] for suggestion in item.get("acceptedSuggestions") or []}
        row = {
            "card": item["card"],
            "outcome": item["outcome"],
            "stamp": stamp,
            "outcome_at": outcome_at,
            # Sorted ids and keys: the same feedback re-sent in another order is a duplicate.
            "suggestions": _canonical(sorted(suggestion_ids)),
            "reason": _canonical(reason),
            "system": _optional_text(coding.get("system")),
            "code": _optional_text(coding.get("code")),
            "display": _optional_text(coding.get("display")),
            "comment": _optional_text(reason.get("userComment")),
        }
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise InvalidFeedback(where, "is not a CDS Hooks feedback item") from exc
    if not isinstance(row["card"], str) or not row["card"] or row["outcome"] not in OUTCOMES:
        raise InvalidFeedback(where, f"needs a card uuid and an outcome of {OUTCOMES}")
    return row


_INSERT_ISSUED = """
    INSERT INTO issued_cards (uuid, service_id, hook, hook_instance, finding, rule_version,
                              indicator, issued_at, patient_hash)
    VALUES (:uuid, :service_id, :hook, :hook_instance, :finding, :rule_version,
            :indicator, :issued_at, :patient_hash)
    ON CONFLICT (uuid) DO NOTHING"""
# ON CONFLICT DO NOTHING rather than INSERT OR IGNORE: only a duplicate is skipped; a row breaking
# NOT NULL or CHECK still fails loudly instead of being counted as a duplicate and lost.
_INSERT_FEEDBACK = """
    INSERT INTO feedback (service_id, card_uuid, outcome, outcome_timestamp, outcome_at,
                          accepted_suggestions, override_reason, reason_system, reason_code,
                          reason_display, user_comment, unknown_card, received_at)
    VALUES (:service_id, :card, :outcome, :stamp, :outcome_at, :suggestions, :reason, :system,
            :code, :display, :comment, :unknown, :received_at)
    ON CONFLICT DO NOTHING"""


def issued_rows(cards: Sequence[IssuedCard]) -> list[dict[str, Any]]:
    """Column values for `_INSERT_ISSUED`; refuses a patient id that was not hashed."""
    rows = []
    for card in cards:
        if not HASH_PATTERN.fullmatch(card.patient_hash):
            raise ValueError("IssuedCard.patient_hash must come from patient_hash()")
        row = card.by_name()
        row["issued_at"] = _utc_text(card.issued_at)
        rows.append(row)
    return rows


def normalised_feedback(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every item's column values, or InvalidFeedback before anything is written."""
    return [_normalise(item, index) for index, item in enumerate(items)]


def write_feedback(
    execute: Any, service_id: str, rows: Sequence[Mapping[str, Any]], received_at: datetime
) -> FeedbackResult:
    """Store normalised rows inside the caller's transaction; `execute(sql, params)` runs one
    statement written for SQLite (the PostgreSQL store translates the placeholders)."""
    received_text = _utc_text(received_at)
    received = 0
    unknown: dict[str, None] = {}  # an ordered set of card uuids
    for row in rows:
        # A card issued under another service id is unknown to the service posted to.
        known = execute(
            "SELECT 1 FROM issued_cards WHERE uuid = ? AND service_id = ?",
            (row["card"], service_id),
        ).fetchone()
        if known is None:
            unknown[row["card"]] = None
        params = {
            **row,
            "service_id": service_id,
            "received_at": received_text,
            "unknown": int(known is None),
        }
        received += execute(_INSERT_FEEDBACK, params).rowcount
    # Counts and ids only: userComment is clinician free text and must never reach the logs.
    log.info("feedback for %s: %d new, %d repeated", service_id, received, len(rows) - received)
    if unknown:
        log.warning("feedback for %s on cards it never issued: %s", service_id, list(unknown))
    return FeedbackResult(received, len(rows) - received, tuple(unknown))


# Connections must not cross fork() (gunicorn may fork after the app opened its store).
_STORES: weakref.WeakSet[SqliteFeedbackStore] = weakref.WeakSet()


def _forget_connections_after_fork() -> None:
    for store in list(_STORES):
        store._forget_connections()


os.register_at_fork(after_in_child=_forget_connections_after_fork)


class SqliteFeedbackStore(FeedbackStore):
    """A SQLite file shared by processes; each thread gets its own connection on first use."""

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False) -> None:
        if str(path) == ":memory:" or str(path).startswith("file:"):
            raise ValueError("the feedback store needs a file path (each thread opens it anew)")
        self.path = Path(path)
        self.read_only = read_only
        self._closed = False
        self._schema_version: int | None = None
        self._forget_connections()
        _STORES.add(self)

    def _forget_connections(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._connections: list[_Held] = []

    def close(self) -> None:
        """Closes every thread's connection, each once its thread is done with it: closing one
        another thread is inside (without the GIL) frees memory SQLite is still using."""
        with self._lock:
            self._closed = True
            held, self._connections = self._connections, []
        for entry in held:
            with entry.lock:
                entry.connection.close()

    def schema_version(self) -> int:
        with self._use():
            return self._schema_version or 0

    def ping(self) -> None:
        """Raises unless the file can be read (readiness)."""
        with self._use() as connection:
            connection.execute("SELECT count(*) FROM sqlite_master").fetchone()

    def record_issued(self, cards: Sequence[IssuedCard]) -> None:
        rows = issued_rows(cards)
        if not rows:
            return
        with self._use(write=True) as connection:
            if len(rows) == 1:
                # One statement in autocommit mode: lock, insert, commit and unlock happen in one
                # SQLite call made without the GIL, so the write lock is never held by a thread
                # that waits for the GIL, which under load sent every other writer into SQLite's
                # back-off.
                connection.execute(_INSERT_ISSUED, rows[0])
            else:
                with _transaction(connection, write=True):
                    connection.executemany(_INSERT_ISSUED, rows)

    def record_feedback(
        self, service_id: str, items: Sequence[Mapping[str, Any]], received_at: datetime
    ) -> FeedbackResult:
        rows = normalised_feedback(items)
        with self._use(write=True) as connection, _transaction(connection, write=True):
            return write_feedback(connection.execute, service_id, rows, received_at)

    def report(self, since: datetime | None = None) -> list[ReportRow]:
        lower = since_text(since)
        with self._use() as connection:
            if not self._schema_version:
                return []  # an empty file opened read-only: nothing was ever recorded
            with _transaction(connection, write=False):  # one snapshot for all its queries
                return read_report(
                    lambda sql, params: connection.execute(sql, params).fetchall(), lower
                )

    @contextmanager
    def _use(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        """This thread's connection, held so that close() waits until the caller is done."""
        if write and self.read_only:
            raise FeedbackStoreError(f"{self.path} is open read-only")
        entry: _Held | None = getattr(self._local, "held", None)
        if entry is None:
            with self._lock:
                if self._closed:
                    raise StoreClosed("the feedback store is closed")
                entry = _Held(threading.RLock(), self._connect())
                self._connections.append(entry)
            self._local.held = entry
        with entry.lock:
            if self._closed:
                raise StoreClosed("the feedback store is closed")
            yield entry.connection

    def _connect(self) -> sqlite3.Connection:
        connection = connect(self.path, read_only=self.read_only)
        try:  # the first connection checks (and migrates) the schema for all the others
            if self._schema_version is None:
                self._schema_version = migrate(connection, self.path, read_only=self.read_only)
        except BaseException:
            connection.close()
            raise
        return connection


@dataclass(frozen=True, slots=True)
class _Held:
    """A thread's connection and the lock it holds while using it."""

    lock: threading.RLock
    connection: sqlite3.Connection
