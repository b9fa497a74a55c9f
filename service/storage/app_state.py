"""Short-lived state of the timeline app (pending SMART launches, signed-in sessions), shared by
every worker process.

Values are opaque bytes: the app encrypts them before they get here, with a key that only the
user's browser holds, so this table never holds a readable access token. `AppStateStore` is the
whole interface; `SqliteAppStateStore` is one implementation, and a server database can give
another without the app changing.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

# Expired rows are useless but take space; sweeping at most this often keeps the cost tiny.
PURGE_INTERVAL_SECONDS = 60.0
BUSY_TIMEOUT_MS = 5000


class AppStateStore(Protocol):
    def put(self, key: str, value: bytes, expires_at: float) -> None:
        """Store `value` under `key` until `expires_at` (epoch seconds), replacing any value."""
        ...

    def get(self, key: str) -> bytes | None:
        """The unexpired value under `key`, or None."""
        ...

    def take(self, key: str) -> bytes | None:
        """The unexpired value under `key`, removed in the same step: only one caller gets it."""
        ...

    def delete(self, key: str) -> None: ...


class SqliteAppStateStore:
    """One SQLite file for every worker; a connection per call, since none may cross a fork."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._purge_lock = threading.Lock()
        self._last_purge = clock()
        db = self._connect()
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS app_state ("
                " key TEXT PRIMARY KEY,"
                " value BLOB NOT NULL,"
                " expires_at REAL NOT NULL"
                ") WITHOUT ROWID"
            )
        finally:
            db.close()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return db

    def put(self, key: str, value: bytes, expires_at: float) -> None:
        db = self._connect()
        try:
            db.execute(
                "INSERT INTO app_state (key, value, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
                " expires_at = excluded.expires_at",
                (key, value, expires_at),
            )
            self._purge(db)
        finally:
            db.close()

    def get(self, key: str) -> bytes | None:
        db = self._connect()
        try:
            row = db.execute(
                "SELECT value FROM app_state WHERE key = ? AND expires_at > ?",
                (key, self._clock()),
            ).fetchone()
        finally:
            db.close()
        return bytes(row[0]) if row else None

    def take(self, key: str) -> bytes | None:
        db = self._connect()
        try:
            # DELETE ... RETURNING is one statement: of two racing callers, one gets the row.
            row = db.execute(
                "DELETE FROM app_state WHERE key = ? RETURNING value, expires_at", (key,)
            ).fetchone()
        finally:
            db.close()
        if row is None or row[1] <= self._clock():
            return None
        return bytes(row[0])

    def delete(self, key: str) -> None:
        db = self._connect()
        try:
            db.execute("DELETE FROM app_state WHERE key = ?", (key,))
        finally:
            db.close()

    def _purge(self, db: sqlite3.Connection) -> None:
        now = self._clock()
        with self._purge_lock:
            if now - self._last_purge < PURGE_INTERVAL_SECONDS:
                return
            self._last_purge = now
        db.execute("DELETE FROM app_state WHERE expires_at <= ?", (now,))
