"""off_loop: under gevent, store calls run on one native thread of their own, results and errors
intact; without gevent the store is used as it is."""

from __future__ import annotations

import threading

import pytest

from service.api.blocking import gevent_active, off_loop


class Store:
    def __init__(self) -> None:
        self.threads: set[int] = set()
        self.path = "/data/store.sqlite3"

    def record(self, value: int, *, twice: bool = False) -> int:
        self.threads.add(threading.get_ident())
        return value * 2 if twice else value

    def fail(self) -> None:
        raise ValueError("disk full")


def test_without_gevent_the_object_is_used_as_it_is() -> None:
    store = Store()
    assert not gevent_active()  # the test process never patches threading
    assert off_loop(store) is store


def test_under_gevent_every_call_runs_on_the_same_native_thread() -> None:
    store = Store()
    proxy = off_loop(store, active=lambda: True)
    assert proxy is not store and proxy.path == store.path
    assert [proxy.record(3), proxy.record(4, twice=True)] == [3, 8]
    [thread] = store.threads  # one thread, so one SQLite connection, for every call
    assert thread != threading.get_ident()
    with pytest.raises(ValueError, match="disk full"):
        proxy.fail()
