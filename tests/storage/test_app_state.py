"""The timeline app's shared state: one file for every worker, one-time launch records, expiry,
and sealed records that a reader of the database cannot open."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from service.app.sealed_state import SealedState
from service.storage.app_state import SqliteAppStateStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_two_stores_on_one_file_share_state_and_expire_it(tmp_path: Path) -> None:
    clock = Clock()
    first = SqliteAppStateStore(tmp_path / "s.sqlite3", clock=clock)
    second = SqliteAppStateStore(tmp_path / "s.sqlite3", clock=clock)  # another worker
    first.put("k", b"value", clock.now + 10)
    assert second.get("k") == b"value"
    clock.now += 10
    assert second.get("k") is None and second.take("k") is None


def test_take_hands_a_record_to_exactly_one_caller(tmp_path: Path) -> None:
    store = SqliteAppStateStore(tmp_path / "s.sqlite3")
    store.put("state", b"pending", 2e9)
    got: list[bytes | None] = []
    threads = [threading.Thread(target=lambda: got.append(store.take("state"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(got, key=bool) == [None] * 7 + [b"pending"]


def test_a_launch_needs_both_the_state_and_the_browser_secret(tmp_path: Path) -> None:
    sealed = SealedState(SqliteAppStateStore(tmp_path / "s.sqlite3"))
    state, browser = sealed.begin_launch({"verifier": "v" * 86}, 60)
    assert sealed.finish_launch(state, "another browser")[0] == "launch_cookie_mismatch"
    # The failed try used the state up: it cannot be retried with the right cookie.
    assert sealed.finish_launch(state, browser) == ("unknown_or_expired_state", None)
    state, browser = sealed.begin_launch({"verifier": "v" * 86}, 60)
    assert sealed.finish_launch(state, browser) == ("", {"verifier": "v" * 86})


def test_the_database_never_holds_a_readable_token_or_patient(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    sealed = SealedState(SqliteAppStateStore(path))
    secret = sealed.open_session(
        {"access_token": "tok-SECRET-123", "patient": "pat-456", "expires_at": 2e9}, 2e9
    )
    assert sealed.session(secret)["access_token"] == "tok-SECRET-123"
    assert sealed.session(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    raw = b"".join(
        row[0] + row[1].encode()
        for row in sqlite3.connect(path).execute("SELECT value, key FROM app_state")
    )
    for text in (b"tok-SECRET-123", b"pat-456", secret.encode()):
        assert text not in raw
    sealed.close_session(secret)
    assert sealed.session(secret) is None
