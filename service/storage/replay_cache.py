"""Remembers the `jti` of accepted client JWTs until they expire, so captured tokens cannot replay.

CDS Hooks 2.0 ("Trusting CDS Clients") makes `jti` a nonce "used to protect against replay attacks".
Under gunicorn every worker process must see the same set of nonces, otherwise a token replayed to
another worker would pass; `SqliteReplayCache` gives them one shared file and lets SQLite's primary
key decide which of two racing requests saw the nonce first.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

# Expired entries are harmless but take space; sweeping at most this often keeps the cost tiny.
PURGE_INTERVAL_SECONDS = 60.0
# Workers contend briefly on the write lock; waiting is better than failing a clinician's request.
BUSY_TIMEOUT_MS = 5000


class ReplayCache(Protocol):
    def remember(self, key: str, expires_at: float) -> bool:
        """Record `key` until `expires_at` (epoch s); True if new, False if seen and unexpired."""
        ...


class InMemoryReplayCache:
    """Per-process cache: right for a single worker and for tests."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._entries: dict[str, float] = {}
        self._lock = threading.Lock()
        self._last_purge = clock()

    def remember(self, key: str, expires_at: float) -> bool:
        now = self._clock()
        with self._lock:
            if now - self._last_purge >= PURGE_INTERVAL_SECONDS:
                self._entries = {k: exp for k, exp in self._entries.items() if exp > now}
                self._last_purge = now
            seen_until = self._entries.get(key)
            if seen_until is not None and seen_until > now:
                return False
            self._entries[key] = expires_at
            return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class SqliteReplayCache:
    """Cache shared by every process that opens the same file.

    A connection is opened per call: connections must not cross a fork (gunicorn forks workers after
    the app is built) and opening a local SQLite file costs far less than the request it guards.
    """

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._purge_lock = threading.Lock()
        self._last_purge = clock()
        with self._connect() as db:
            # WAL lets readers and the one writer proceed together; the setting sticks to the file.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS seen_jti ("
                " key TEXT PRIMARY KEY,"  # "iss|jti": a nonce is only unique per issuer
                " expires_at REAL NOT NULL"
                ") WITHOUT ROWID"
            )

    def _connect(self) -> _Connection:
        return _Connection(self._path)

    def remember(self, key: str, expires_at: float) -> bool:
        now = self._clock()
        with self._connect() as db:
            # One statement, so the database arbitrates races: a new key inserts; an existing key
            # is overwritten only if its entry expired. rowcount is 0 exactly when it was live.
            cursor = db.execute(
                "INSERT INTO seen_jti (key, expires_at) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at"
                " WHERE seen_jti.expires_at <= ?",
                (key, expires_at, now),
            )
            fresh = cursor.rowcount == 1
            if self._purge_due(now):
                db.execute("DELETE FROM seen_jti WHERE expires_at <= ?", (now,))
        return fresh

    def _purge_due(self, now: float) -> bool:
        with self._purge_lock:
            if now - self._last_purge < PURGE_INTERVAL_SECONDS:
                return False
            self._last_purge = now
            return True

    def __len__(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT count(*) FROM seen_jti").fetchone()[0])


class _Connection:
    """Autocommit connection with a busy timeout, closed on exit (sqlite3's `with` only commits)."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    def __enter__(self) -> sqlite3.Connection:
        return self._db

    def __exit__(self, *exc_info: object) -> None:
        self._db.close()
