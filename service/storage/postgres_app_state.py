"""The timeline app's short-lived state in PostgreSQL, so every instance sees every launch.

Same interface as `SqliteAppStateStore` (see `app_state`); values are opaque sealed bytes. Launch
and session look-ups are a few per page, so each opens its own connection rather than keeping a
pool that would not survive gunicorn's fork.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from service.storage.postgres import connection_string

_CREATE = (
    "CREATE TABLE IF NOT EXISTS app_state ("
    " key TEXT PRIMARY KEY, value BYTEA NOT NULL, expires_at DOUBLE PRECISION NOT NULL)"
)


class PostgresAppStateStore:
    def __init__(self, url: str, *, clock: Callable[[], float] = time.time) -> None:
        self._conninfo = connection_string(url)  # with the store's connect and statement timeouts
        self._clock = clock
        self._ready = False

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        with psycopg.connect(self._conninfo, autocommit=True) as db:
            if not self._ready:
                db.execute(_CREATE)
                self._ready = True
            yield db

    def put(self, key: str, value: bytes, expires_at: float) -> None:
        with self._connection() as db:
            db.execute(
                "INSERT INTO app_state (key, value, expires_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
                " expires_at = excluded.expires_at",
                (key, value, expires_at),
            )
            db.execute("DELETE FROM app_state WHERE expires_at <= %s", (self._clock(),))

    def get(self, key: str) -> bytes | None:
        with self._connection() as db:
            row = db.execute(
                "SELECT value FROM app_state WHERE key = %s AND expires_at > %s",
                (key, self._clock()),
            ).fetchone()
        return bytes(row[0]) if row else None

    def take(self, key: str) -> bytes | None:
        with self._connection() as db:
            # One statement: of two instances racing for a launch state, one gets it.
            row = db.execute(
                "DELETE FROM app_state WHERE key = %s RETURNING value, expires_at", (key,)
            ).fetchone()
        if row is None or row[1] <= self._clock():
            return None
        return bytes(row[0])

    def delete(self, key: str) -> None:
        with self._connection() as db:
            db.execute("DELETE FROM app_state WHERE key = %s", (key,))
