"""The store in one PostgreSQL database, shared by every instance: feedback, issued cards, the
replay cache and the patient-hash key.

Each worker process has its own connection pool, opened on first use inside that process (pools
run threads, which do not survive gunicorn's fork). The SQL is the SQLite store's, with its
placeholders translated, so the two back ends answer the same questions the same way; the
database, never Python, decides uniqueness (a racing duplicate is a conflict, not a second row).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool

from service.storage import postgres_schema
from service.storage.errors import FeedbackStoreError, StoreClosed
from service.storage.feedback import (
    _INSERT_ISSUED,
    FeedbackResult,
    issued_rows,
    normalised_feedback,
    since_text,
    write_feedback,
)
from service.storage.patient_hash import KEY_BYTES
from service.storage.replay_cache import PURGE_INTERVAL_SECONDS
from service.storage.report_queries import ReportRow, read_report

log = logging.getLogger("service.storage.feedback")

_NAMED = re.compile(r"(?<![:\w]):(\w+)")
_HASH_KEY_NAME = "patient_hash_key"
# libpq waits this long for a server that does not answer a connect (2 s is its minimum).
_CONNECT_TIMEOUT_SECONDS = 2
_STATEMENT_TIMEOUT_MS = 5000


def pyformat(sql: str) -> str:
    """SQLite's ":name" and "?" placeholders as psycopg's "%(name)s" and "%s"."""
    return _NAMED.sub(r"%(\1)s", sql).replace("?", "%s")


def connection_string(url: str) -> str:
    """The URL with the service's defaults for what it leaves unset (the URL wins)."""
    given = conninfo_to_dict(url)
    defaults: dict[str, Any] = {
        "connect_timeout": _CONNECT_TIMEOUT_SECONDS,
        "application_name": "flare-cds",
        # A statement stuck behind a lock must not hold a clinician's call.
        "options": f"-c statement_timeout={_STATEMENT_TIMEOUT_MS}",
    }
    return make_conninfo(url, **{k: v for k, v in defaults.items() if k not in given})


def connect(url: str) -> psycopg.Connection[Any]:
    """One autocommit connection, for commands (`migrate`) rather than serving."""
    return psycopg.connect(connection_string(url), autocommit=True)


class PostgresStore:
    """FeedbackStore and ReplayCache over one PostgreSQL database."""

    def __init__(
        self,
        url: str,
        *,
        where: str,
        read_only: bool = False,
        pool_size: int = 4,
        timeout_seconds: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._conninfo = connection_string(url)
        self.where = where  # for messages: the URL without its password
        self.read_only = read_only
        self._pool_size = pool_size
        self._timeout = timeout_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._pool: ConnectionPool[Any] | None = None
        self._pool_pid = 0
        self._closed = False
        self._schema_version: int | None = None
        self._last_purge = clock()

    # -- connections ------------------------------------------------------------------------

    def _pool_here(self) -> ConnectionPool[Any]:
        with self._lock:
            if self._closed:
                raise StoreClosed("the store is closed")
            if self._pool is None or self._pool_pid != os.getpid():
                # A pool inherited through fork() is not used: its threads stayed in the parent.
                self._pool = ConnectionPool(
                    self._conninfo,
                    min_size=1,
                    max_size=self._pool_size,
                    kwargs={"autocommit": True},
                    timeout=self._timeout,
                    # A connection the server dropped (restart, failover) is replaced, not used.
                    check=ConnectionPool.check_connection,
                    name="flare-cds",
                    open=False,
                )
                self._pool.open(wait=False)
                self._pool_pid = os.getpid()
            return self._pool

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self._pool_here().connection() as connection:
            if self._schema_version is None:
                self._schema_version = (
                    postgres_schema.check_version(connection, self.where)
                    if self.read_only
                    else postgres_schema.migrate(connection, self.where)
                )
            yield connection

    def _writer(self) -> Any:
        if self.read_only:
            raise FeedbackStoreError(f"{self.where} is open read-only")
        return self._connection()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None and self._pool_pid == os.getpid():
            pool.close()

    def ping(self) -> None:
        """Raises unless the database answers within the pool timeout."""
        with self._connection() as connection:
            connection.execute("SELECT 1")

    def schema_version(self) -> int:
        with self._connection():
            return self._schema_version or 0

    # -- feedback and issued cards ----------------------------------------------------------

    def record_issued(self, cards: Sequence[Any]) -> None:
        rows = issued_rows(cards)
        if not rows:
            return
        with self._writer() as connection, connection.cursor() as cursor:
            cursor.executemany(pyformat(_INSERT_ISSUED), rows)

    def record_feedback(
        self, service_id: str, items: Sequence[Mapping[str, Any]], received_at: datetime
    ) -> FeedbackResult:
        rows = normalised_feedback(items)
        with self._writer() as connection, connection.transaction():

            def execute(sql: str, params: Any) -> Any:
                return connection.execute(pyformat(sql), params)

            return write_feedback(execute, service_id, rows, received_at)

    def report(self, since: datetime | None = None) -> list[ReportRow]:
        with self._connection() as connection:
            if not self._schema_version:
                return []  # never migrated: nothing was ever recorded
            with connection.transaction():  # one snapshot for all the report's queries
                connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")

                def fetch(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
                    return connection.execute(pyformat(sql), params).fetchall()

                return read_report(fetch, since_text(since))

    # -- replay cache and shared secrets ----------------------------------------------------

    def remember(self, key: str, expires_at: float) -> bool:
        """ReplayCache: True if `key` is new (or its entry expired), False if seen and live."""
        now = self._clock()
        with self._writer() as connection:
            # One statement: of two instances inserting the same key, the second waits for the
            # first to commit and then finds the live entry, so exactly one gets rowcount 1.
            cursor = connection.execute(
                "INSERT INTO seen_jti (key, expires_at) VALUES (%s, %s)"
                " ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at"
                " WHERE seen_jti.expires_at <= %s",
                (key, expires_at, now),
            )
            fresh = cursor.rowcount == 1
            if self._purge_due(now):
                connection.execute("DELETE FROM seen_jti WHERE expires_at <= %s", (now,))
        return fresh

    def _purge_due(self, now: float) -> bool:
        with self._lock:
            if now - self._last_purge < PURGE_INTERVAL_SECONDS:
                return False
            self._last_purge = now
            return True

    def seen_count(self) -> int:
        with self._connection() as connection:
            return int(connection.execute("SELECT count(*) FROM seen_jti").fetchone()[0])

    def patient_hash_key(self) -> bytes:
        """The key every instance hashes patient ids with: made once, by whichever came first."""
        with self._writer() as connection:
            connection.execute(
                "INSERT INTO store_secrets (name, value) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (_HASH_KEY_NAME, secrets.token_hex(KEY_BYTES)),
            )
            text = connection.execute(
                "SELECT value FROM store_secrets WHERE name = %s", (_HASH_KEY_NAME,)
            ).fetchone()[0]
        key = bytes.fromhex(text) if re.fullmatch(r"[0-9a-f]*", text) else b""
        if len(key) != KEY_BYTES:
            raise FeedbackStoreError(f"{self.where}: the stored patient-hash key is damaged")
        return key
