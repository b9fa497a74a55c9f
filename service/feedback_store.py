"""Durable record of the cards the service issued and of the CDS Hooks feedback about them.

Feedback is the only signal of whether clinicians find a card useful, so an item must survive a
crash from the moment the HTTP 200 goes out: SQLite in WAL mode with synchronous=FULL, one
transaction per request. Several gunicorn workers and their threads write at once, so uniqueness is
enforced by the database (a UNIQUE constraint), never by a check-then-insert in Python.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
import weakref
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from service.settings import StorageSettings

log = logging.getLogger(__name__)

BUSY_TIMEOUT_SECONDS = 5.0
KEY_BYTES = 32
TOP_REASONS = 3
UNKNOWN_CARD = "unknown-card"
OUTCOMES = ("accepted", "overridden")
_HASH_PATTERN = re.compile(r"[0-9a-f]{64}")


class FeedbackStoreError(RuntimeError):
    """The store cannot be used as asked (closed, read-only, schema newer than this code)."""


class InvalidFeedback(ValueError):
    """A feedback item lacks the CDS Hooks 2.0 shape; nothing from its request was stored.

    `location` and `problem` let the HTTP layer name the field in an `ErrorDetail`."""

    def __init__(self, location: str, problem: str) -> None:
        super().__init__(f"{location} {problem}")
        self.location = location
        self.problem = problem


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


@dataclass(frozen=True)
class FeedbackResult:
    received: int
    duplicates: int
    unknown_cards: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReportRow:
    """One finding and rule version. Each card counts once, with its latest outcome; the rate is
    overridden / (accepted + overridden), None without feedback; reasons are (display or code,
    cards), most frequent first; suggestions are distinct ids accepted on accepted cards."""

    finding: str
    rule_version: str
    cards_issued: int
    accepted: int
    overridden: int
    override_rate: float | None
    top_override_reasons: list[tuple[str, int]] = field(default_factory=list)
    suggestions_accepted: int = 0


class FeedbackStore(Protocol):
    def record_issued(self, cards: Sequence[IssuedCard]) -> None: ...

    def record_feedback(
        self, service_id: str, items: Sequence[Mapping[str, Any]], received_at: datetime
    ) -> FeedbackResult: ...

    def report(self, since: datetime | None = None) -> list[ReportRow]: ...

    def close(self) -> None: ...


def patient_hash(key: bytes, patient_id: str) -> str:
    """Keyed hash of a patient id: lets cards of one patient be linked without storing who it is."""
    if not key:
        raise ValueError("the patient hash key is empty")
    return hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()


def load_or_create_hash_key(settings: StorageSettings) -> bytes:
    """The configured key, else a random one kept in `<database>.key` (created once, mode 0600)."""
    if settings.patient_hash_key:
        return settings.patient_hash_key.encode("utf-8")
    path = Path(settings.database + ".key")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        _create_key_file(path)
    text = path.read_text(encoding="ascii").strip()
    key = bytes.fromhex(text) if re.fullmatch(r"[0-9a-f]*", text) else b""
    if len(key) != KEY_BYTES:
        # A new key would silently unlink every stored hash from its patient: refuse instead.
        raise FeedbackStoreError(f"{path} is damaged: expected {KEY_BYTES * 2} hex digits")
    return key


def _create_key_file(path: Path) -> None:
    # Workers starting together each write a whole key to a private file; os.link publishes one
    # only if none exists yet, so every worker then reads the same, never half-written, key.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as handle:
            handle.write(secrets.token_hex(KEY_BYTES) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the link itself must outlive a crash, or the key changes on restart
    finally:
        os.close(directory)


def open_store(settings: StorageSettings, *, read_only: bool = False) -> SqliteFeedbackStore:
    return SqliteFeedbackStore(settings.database, read_only=read_only)


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
# Each card's outcome counts once: its latest outcomeTimestamp wins (then the latest received).
# Callers may append a WHERE clause on `f`.
_LATEST = """
    SELECT f.service_id, f.card_uuid, f.outcome,
           COALESCE(f.reason_display, f.reason_code) AS reason,
           ROW_NUMBER() OVER (PARTITION BY f.service_id, f.card_uuid
                              ORDER BY f.outcome_at DESC, f.id DESC) AS position
    FROM feedback AS f"""
_KNOWN_CARDS = f"""
    WITH latest AS ({_LATEST})
    SELECT c.finding, c.rule_version, c.service_id, c.uuid, l.outcome, l.reason
    FROM issued_cards AS c
    LEFT JOIN latest AS l
        ON l.card_uuid = c.uuid AND l.service_id = c.service_id AND l.position = 1
    WHERE c.issued_at >= ?"""  # noqa: S608 - composed from constants only
# Joined rather than read from feedback.unknown_card, so a card recorded late is still attributed.
_UNKNOWN_CARDS = f"""
    WITH latest AS ({_LATEST} WHERE f.received_at >= ? AND NOT EXISTS (
        SELECT 1 FROM issued_cards AS c WHERE c.uuid = f.card_uuid AND c.service_id = f.service_id))
    SELECT NULL, NULL, service_id, card_uuid, outcome, reason FROM latest WHERE position = 1
"""  # noqa: S608 - composed from constants only
_ACCEPTED = "SELECT service_id, card_uuid, accepted_suggestions FROM feedback WHERE outcome = ?"

# Connections must not cross fork() (gunicorn may fork after the app opened its store).
_STORES: weakref.WeakSet[SqliteFeedbackStore] = weakref.WeakSet()


def _forget_connections_after_fork() -> None:
    for store in list(_STORES):
        store._forget_connections()


os.register_at_fork(after_in_child=_forget_connections_after_fork)


@contextmanager
def _transaction(connection: sqlite3.Connection, *, write: bool) -> Iterator[sqlite3.Connection]:
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
        self._connections: list[sqlite3.Connection] = []

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()

    def schema_version(self) -> int:
        self._connection()
        return self._schema_version or 0

    def record_issued(self, cards: Sequence[IssuedCard]) -> None:
        rows = []
        for card in cards:
            if not _HASH_PATTERN.fullmatch(card.patient_hash):
                raise ValueError("IssuedCard.patient_hash must come from patient_hash()")
            rows.append({**asdict(card), "issued_at": _utc_text(card.issued_at)})
        if len(rows) == 1:
            # One statement in autocommit mode: lock, insert, commit and unlock happen in one
            # SQLite call made without the GIL, so the write lock is never held by a thread that
            # waits for the GIL, which under load sent every other writer into SQLite's back-off.
            self._writer().execute(_INSERT_ISSUED, rows[0])
        elif rows:
            with _transaction(self._writer(), write=True) as connection:
                connection.executemany(_INSERT_ISSUED, rows)

    def record_feedback(
        self, service_id: str, items: Sequence[Mapping[str, Any]], received_at: datetime
    ) -> FeedbackResult:
        received_text = _utc_text(received_at)
        rows = [_normalise(item, index) for index, item in enumerate(items)]  # all, before writing
        received = 0
        unknown: dict[str, None] = {}  # an ordered set of card uuids
        with _transaction(self._writer(), write=True) as connection:
            for row in rows:
                # A card issued under another service id is unknown to the service posted to.
                known = connection.execute(
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
                received += connection.execute(_INSERT_FEEDBACK, params).rowcount
        # Counts and ids only: userComment is clinician free text and must never reach the logs.
        log.info("feedback for %s: %d new, %d repeated", service_id, received, len(rows) - received)
        if unknown:
            log.warning("feedback for %s on cards it never issued: %s", service_id, list(unknown))
        return FeedbackResult(received, len(rows) - received, tuple(unknown))

    def report(self, since: datetime | None = None) -> list[ReportRow]:
        since_text = "" if since is None else _utc_text(since)  # "" sorts before every instant
        connection = self._connection()
        if not self._schema_version:
            return []  # an empty file opened read-only: nothing was ever recorded
        with _transaction(connection, write=False):  # one snapshot for all three queries
            cards = connection.execute(_KNOWN_CARDS, (since_text,)).fetchall()
            cards += connection.execute(_UNKNOWN_CARDS, (since_text,)).fetchall()
            accepted = connection.execute(_ACCEPTED, ("accepted",)).fetchall()
        suggestions: dict[tuple[str, str], set[str]] = {}
        for service_id, card, ids in accepted:
            suggestions.setdefault((service_id, card), set()).update(json.loads(ids))
        return _aggregate(cards, suggestions)

    def _writer(self) -> sqlite3.Connection:
        if self.read_only:
            raise FeedbackStoreError(f"{self.path} is open read-only")
        return self._connection()

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise FeedbackStoreError("the feedback store is closed")
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            with self._lock:
                connection = self._connect()
                self._connections.append(connection)
            self._local.connection = connection
        return connection

    def _connect(self) -> sqlite3.Connection:
        # check_same_thread=False only so close() can close every thread's connection; each
        # connection is otherwise used by the one thread that opened it.
        options: dict[str, Any] = {
            "timeout": BUSY_TIMEOUT_SECONDS,
            "isolation_level": None,
            "check_same_thread": False,
        }
        if self.read_only:
            uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
            connection = sqlite3.connect(uri, uri=True, **options)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Feedback holds clinicians' free-text comments: a new file is for its owner only.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            connection = sqlite3.connect(self.path, **options)
        try:
            if not self.read_only:
                _enable_wal(connection)
            connection.execute("PRAGMA synchronous = FULL")  # a commit is on disk when it returns
            if self._schema_version is None:
                self._schema_version = self._migrate(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    def _migrate(self, connection: sqlite3.Connection) -> int:
        version: int = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise FeedbackStoreError(
                f"{self.path} has schema version {version}; this code knows up to {SCHEMA_VERSION}"
            )
        if version == SCHEMA_VERSION or (self.read_only and version == 0):
            return version
        if self.read_only:
            raise FeedbackStoreError(f"{self.path} has an old schema: start the service once")
        with _transaction(connection, write=True):
            # Read again under the write lock: another worker may have migrated meanwhile.
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            for number in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[number - 1]:
                    connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {number:d}")
                log.info("feedback store %s migrated to schema version %d", self.path, number)
        return SCHEMA_VERSION


def _aggregate(
    cards: list[tuple[Any, ...]], suggestions: Mapping[tuple[str, str], set[str]]
) -> list[ReportRow]:
    """cards: (finding, or NULL when unknown, rule_version, service_id, uuid, outcome, reason)."""
    issued: Counter[tuple[str, str]] = Counter()
    outcomes: Counter[tuple[str, str, str]] = Counter()
    reasons: defaultdict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    suggestion_counts: Counter[tuple[str, str]] = Counter()
    for finding, rule_version, service_id, card, outcome, reason in cards:
        key = (UNKNOWN_CARD, "") if finding is None else (finding, rule_version)
        issued[key] += finding is not None  # adds the key even for unknown cards (+0)
        outcomes[(*key, outcome)] += 1
        if outcome == "overridden" and reason:
            reasons[key][reason] += 1
        if outcome == "accepted":
            suggestion_counts[key] += len(suggestions.get((service_id, card), ()))
    rows = []
    for key in sorted(issued, key=lambda group: (group[0] == UNKNOWN_CARD, group)):
        accepted, overridden = outcomes[(*key, "accepted")], outcomes[(*key, "overridden")]
        rate = overridden / (accepted + overridden) if accepted + overridden else None
        top = sorted(reasons[key].items(), key=lambda pair: (-pair[1], pair[0]))[:TOP_REASONS]
        rows.append(
            ReportRow(*key, issued[key], accepted, overridden, rate, top, suggestion_counts[key])
        )
    return rows
