"""Blocking calls (SQLite, a database driver) kept off gevent's event loop.

Under the gevent worker all connections of a process share one OS thread. A SQLite commit that
waits several milliseconds for the disk would stop every one of them, and a store that keeps one
connection per thread would keep one per greenlet instead, a new connection for every client
connection. `off_loop(obj)` gives `obj` back unchanged without gevent; under it, a proxy that
runs each method call on one native thread of its own, so the store keeps one connection and
the loop keeps serving while the call waits.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def gevent_active() -> bool:
    """True in a process whose threading gevent has patched (a gevent worker)."""
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey is not None and monkey.is_module_patched("threading"))


class _OnNativeThread:
    """Forwards attribute reads; method calls run on the pool's native thread."""

    def __init__(self, target: Any, pool: Any) -> None:
        self._target = target
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not callable(value):
            return value
        pool = self._pool

        def call(*args: Any, **kwargs: Any) -> Any:
            return pool.apply(value, args, kwargs)  # the calling greenlet waits cooperatively

        return call


def off_loop(target: Any, *, active: Callable[[], bool] = gevent_active) -> Any:
    if not active():
        return target
    from gevent.threadpool import ThreadPool

    return _OnNativeThread(target, ThreadPool(1))
