"""The HTTP machinery of the FHIR fetcher: guarded connections and cutting a query off.

Every connection checks the address it actually reached (a DNS answer may change after the
fhirServer check), and every socket a query uses is registered with its QueryScope, so the
fetcher can shut them down when the call's deadline passes: a read blocked on a server that
trickles its answer returns at once, with threads and with gevent alike.
"""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import certifi
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import NewConnectionError
from urllib3.util import Retry

from service.record.address_policy import Origin, forbidden_ip


class QueryScope:
    """The sockets one query is using, so the caller can cut them off at the deadline."""

    _current = threading.local()  # greenlet-local under gevent

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.cancelled = False

    @classmethod
    def current(cls) -> QueryScope | None:
        return getattr(cls._current, "scope", None)

    def __enter__(self) -> QueryScope:
        type(self)._current.scope = self
        return self

    def __exit__(self, *exc: object) -> None:
        type(self)._current.scope = None
        with self._lock:
            self._sockets.clear()

    def attach(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._sockets.append(sock)
            cancelled = self.cancelled
        if cancelled:
            _shut(sock)

    def detach(self, sock: socket.socket) -> bool:
        """Forget a socket handed back to the pool; False if the query was already cut off (the
        socket may be shut down)."""
        with self._lock:
            self._sockets = [s for s in self._sockets if s is not sock]
            return not self.cancelled

    def cancel(self) -> None:
        """Shut down every socket the query holds: a blocked read or write returns at once."""
        with self._lock:
            self.cancelled = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


def _attach(conn: HTTPConnection, sock: socket.socket | None) -> None:
    scope = QueryScope.current()
    if scope is not None:
        conn._query_scope = scope  # type: ignore[attr-defined]
        scope.attach(sock)


def _reusable(conn: HTTPConnection) -> bool:
    """Whether a connection handed back to the pool may serve another query.

    Its query forgets its socket first: cutting that query off later (its call's deadline)
    must not shut a socket that a query of another call has taken from the pool meanwhile.
    """
    scope = conn.__dict__.pop("_query_scope", None)
    return scope is None or conn.sock is None or scope.detach(conn.sock)


def _peer_forbidden(address: str) -> bool:  # separate so tests can exercise the connect guard
    return forbidden_ip(address)


class ForbiddenPeerError(NewConnectionError):
    """Raised at connect time, so a DNS answer that changed after the server check still cannot
    reach a metadata service."""


def _guard(conn: HTTPConnection, sock: socket.socket) -> socket.socket:
    if _peer_forbidden(str(sock.getpeername()[0])):
        sock.close()
        raise ForbiddenPeerError(conn, "refused to connect to a link-local or metadata address")
    return sock


class _GuardedConnection:
    """The connect guard and the query scope, mixed into urllib3's HTTP and HTTPS connections."""

    def _new_conn(self) -> socket.socket:
        sock = _guard(self, super()._new_conn())  # type: ignore[misc, arg-type]
        _attach(self, sock)  # type: ignore[arg-type]
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        # A pooled connection: this request is the sending query's.
        _attach(self, self.sock)  # type: ignore[arg-type, attr-defined]
        super().request(*args, **kwargs)  # type: ignore[misc]


class _GuardedHTTPConnection(_GuardedConnection, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_GuardedConnection, HTTPSConnection):
    pass


class _ScopedPool:
    def _put_conn(self, conn: Any) -> None:
        if conn is not None and not _reusable(conn):
            conn.close()  # pooled closed, it reconnects when next taken
        super()._put_conn(conn)  # type: ignore[misc]


class _GuardedHTTPPool(_ScopedPool, HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(_ScopedPool, HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


# One attempt: an error is raised as it is, a redirect answered as it is.
NO_RETRIES = Retry(total=False, redirect=False)


def new_origin_pool(origin: Origin, pool_size: int) -> HTTPConnectionPool:
    """Pooled, guarded connections to one FHIR origin, on urllib3 itself.

    Not requests: its session machinery (cookies, hooks, environment, URL re-quoting) cost
    about as much CPU per query as the HTTP exchange, and a FHIR query needs none of it. Not
    urllib3's PoolManager either: to find the pool again it parses each URL and builds a key of
    some thirty fields, about a sixth of a query's CPU, where the fetcher knows the origin. By
    construction there are no proxies or .netrc credentials from the environment (the target
    URL is client-supplied), no cookies to leak between users of one server, no retries that
    would blow the deadline; certificates are checked against certifi's CA bundle.
    """
    if origin.scheme == "https":
        return _GuardedHTTPSPool(
            origin.host,
            origin.port,
            maxsize=pool_size,
            retries=NO_RETRIES,
            cert_reqs="CERT_REQUIRED",
            ca_certs=certifi.where(),
        )
    return _GuardedHTTPPool(origin.host, origin.port, maxsize=pool_size, retries=NO_RETRIES)


def request_target(url: str) -> str:
    """The path and query of `url`, as sent on the request line to the origin's pool."""
    parts = urlsplit(url)
    return f"{parts.path or '/'}?{parts.query}" if parts.query else parts.path or "/"


@dataclass(frozen=True)
class OriginPools:
    """What one FHIR origin gets: bounded fetcher threads and its kept-open connections."""

    fetchers: ThreadPoolExecutor
    connections: HTTPConnectionPool

    def close(self) -> None:
        # Running queries still end at their deadlines; a connection they hand back is closed.
        self.fetchers.shutdown(wait=False, cancel_futures=True)
        self.connections.close()

    def let_go(self) -> None:
        """Past the number of origins kept: queries queued or running here still run; the
        connections go when the last of them lets go of the pool."""
        self.fetchers.shutdown(wait=False)
