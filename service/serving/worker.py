"""The gunicorn worker `flare-cds serve` runs: gevent, with the deadlines a hook service needs.

Each connection is a greenlet, so a client that sends its request a byte at a time, or keeps an
idle connection open, costs a few kilobytes and a wake-up per byte, never a thread. On top of
gunicorn's gevent worker this adds what it lacks:

- a deadline for the request headers (from the connection's accept) and one for the body (from
  the end of the headers), each answered with a JSON 408 and a closed connection;
- a bound on open connections per worker, beyond which a new one gets a JSON 503 at once;
- the documented JSON error body for what the HTTP parser refuses (bad request line, too many or
  too large headers, bad Content-Length, malformed chunked bodies) instead of gunicorn's HTML,
  logged as one line without a stack trace and without the header values it quotes.

The limits are read once in the master (`configure`) and inherited by every forked worker.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import gevent
from gunicorn.http import errors as http_errors
from gunicorn.workers.ggevent import GeventWorker
from werkzeug.exceptions import BadRequest, RequestTimeout

from service.serving import responses

log = logging.getLogger("flare_cds.server")


@dataclass(frozen=True)
class ServingLimits:
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0
    max_connections: int = 1000
    cors_any_origin: bool = True


_limits = ServingLimits()
# Connections past the bound still get a greenlet, only long enough to be told 503.
OVERFLOW_CONNECTIONS = 256
_REFUSAL_WRITE_SECONDS = 1.0
_DRAIN_BYTES = 1024 * 1024


def configure(limits: ServingLimits) -> None:
    """Set the limits every worker forked from this process uses."""
    global _limits
    _limits = limits


def limits() -> ServingLimits:
    return _limits


class _HeaderTimeout(Exception):
    """The request line and headers did not arrive before the header deadline."""


class _BodyUnreadable(Exception):
    """The body did not arrive before the body deadline."""


# What the parser refuses, as (status, error code, message); the first matching class wins.
_PARSE_ERRORS: tuple[tuple[type[BaseException], int, str, str], ...] = (
    (_HeaderTimeout, 408, "request_timeout", "the request headers did not arrive in time"),
    (http_errors.LimitRequestLine, 414, "uri_too_long", "the request line is too long"),
    (
        http_errors.LimitRequestHeaders,
        431,
        "header_fields_too_large",
        "too many request headers, or one too large",
    ),
    (
        http_errors.UnsupportedTransferCoding,
        501,
        "http_error",
        "the Transfer-Encoding is not supported",
    ),
    (http_errors.ExpectationFailed, 417, "http_error", "the Expect header is not supported"),
    (http_errors.ForbiddenProxyRequest, 403, "http_error", "proxy request not allowed"),
    (http_errors.InvalidHeader, 400, "invalid_request", "a request header is malformed"),
    (http_errors.InvalidHeaderName, 400, "invalid_request", "a request header name is malformed"),
    (
        http_errors.ObsoleteFolding,
        400,
        "invalid_request",
        "obsolete header line folding is not accepted",
    ),
    (http_errors.InvalidChunkSize, 400, "invalid_request", "the chunked body is malformed"),
    (http_errors.ChunkMissingTerminator, 400, "invalid_request", "the chunked body is malformed"),
    (http_errors.InvalidChunkExtension, 400, "invalid_request", "the chunked body is malformed"),
    (http_errors.ParseException, 400, "invalid_request", "the request is not valid HTTP/1.1"),
)
_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    408: "Request Timeout",
    414: "URI Too Long",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}


def error_response(
    status: int, error: str, message: str, extra_headers: Iterable[tuple[str, str]] = ()
) -> bytes:
    """A complete HTTP/1.1 response with the contract's Error body; the connection then closes."""
    body = json.dumps({"error": error, "message": message}).encode("utf-8")
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        *extra_headers,
    ]
    if _limits.cors_any_origin:
        # A browser client (the sandbox) can only read an error that carries CORS headers.
        headers.append(("Access-Control-Allow-Origin", "*"))
    head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
    return head.encode("latin-1") + body


def _send_and_close(client: socket.socket, response: bytes) -> None:
    """Send `response`, then close without losing it.

    Closing a socket with unread request bytes makes the kernel send a reset, which can destroy
    the answer before the client reads it; so the write side is closed first and what the client
    still sends is read and dropped, a second at most, whatever the client does.
    """
    with gevent.Timeout(_REFUSAL_WRITE_SECONDS, False):
        try:
            client.sendall(response)
            client.shutdown(socket.SHUT_WR)
            drained = 0
            while drained < _DRAIN_BYTES and (chunk := client.recv(16 * 1024)):
                drained += len(chunk)
        except OSError:
            pass
    try:
        client.close()
    except OSError:
        pass


class _DeadlineBody:
    """wsgi.input, read under the body deadline; parser errors become werkzeug 400/408s.

    Raising werkzeug's exceptions lets the app answer them with its own JSON error handler (with
    the request id and CORS headers); `broken` tells the worker to close the connection after.
    """

    def __init__(self, body: Any, seconds: float) -> None:
        self._body = body
        self._seconds = seconds
        self._deadline = time.monotonic() + seconds
        self.broken = False

    def _call(self, method: Callable[..., Any], *args: Any) -> Any:
        remaining = self._deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise _BodyUnreadable("deadline")
            with gevent.Timeout(remaining, _BodyUnreadable("deadline")):
                return method(*args)
        except _BodyUnreadable:
            self.broken = True
            raise RequestTimeout(
                f"the request body did not arrive within {self._seconds:g} s"
            ) from None
        except http_errors.NoMoreData:
            self.broken = True
            raise BadRequest("the request body ended before it was complete") from None
        except http_errors.ParseException:
            self.broken = True
            raise BadRequest("the chunked request body is malformed") from None

    def read(self, size: int | None = None) -> bytes:
        return self._call(self._body.read, size)  # type: ignore[no-any-return]

    def readline(self, size: int | None = None) -> bytes:
        return self._call(self._body.readline, size)  # type: ignore[no-any-return]

    def readlines(self, size: int | None = None) -> list[bytes]:
        return self._call(self._body.readlines, size)  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line


class FlareWorker(GeventWorker):  # type: ignore[misc]
    """gunicorn's gevent worker with header and body deadlines, a connection bound, JSON errors."""

    def init_process(self) -> None:
        self._open = 0
        self._last_refusal_log = 0.0
        # Greenlets whose connection has not yet finished a request: for them the header
        # deadline applies; afterwards an idle keep-alive connection is simply closed.
        self._first_request: set[Any] = set()
        responses.install()
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        app = self.wsgi
        body_seconds = _limits.body_timeout_seconds

        def with_body_deadline(environ: dict[str, Any], start_response: Any) -> Any:
            body = _DeadlineBody(environ["wsgi.input"], body_seconds)
            environ["wsgi.input"] = body

            def start(status: str, headers: Any, exc_info: Any = None) -> Any:
                if body.broken:
                    # The rest of a body that timed out or broke must not be read as the next
                    # request: gunicorn's response object closes the connection after this one.
                    owner = getattr(start_response, "__self__", None)
                    if hasattr(owner, "force_close"):
                        owner.force_close()
                return start_response(status, headers, exc_info)

            return app(environ, start)

        self.wsgi = with_body_deadline

    def timeout_ctx(self) -> gevent.Timeout:
        if gevent.getcurrent() in self._first_request:
            return gevent.Timeout(_limits.header_timeout_seconds, _HeaderTimeout())
        return gevent.Timeout(min(self.cfg.keepalive, _limits.header_timeout_seconds), False)

    def handle(self, listener: Any, client: socket.socket, addr: Any) -> None:
        if self._open >= _limits.max_connections:
            now = time.monotonic()
            if now - self._last_refusal_log >= 1.0:  # a flood must not flood the log too
                self._last_refusal_log = now
                log.warning("connections refused with 503: %d open", self._open)
            response = error_response(
                503,
                "service_unavailable",
                "too many open connections; retry shortly",
                [("Retry-After", "1")],
            )
            _send_and_close(client, response)
            return
        current = gevent.getcurrent()
        self._open += 1
        self._first_request.add(current)
        try:
            super().handle(listener, client, addr)
        finally:
            self._open -= 1
            self._first_request.discard(current)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> None:
        current = gevent.getcurrent()
        self._first_request.discard(current)
        # The header deadline covered the request's arrival; the app's own work is not timed here.
        super().handle_request(listener_name, req, sock, addr)

    def handle_error(self, req: Any, client: socket.socket, addr: Any, exc: BaseException) -> None:
        status, error, message = next(
            ((s, e, m) for kind, s, e, m in _PARSE_ERRORS if isinstance(exc, kind)),
            (500, "internal_error", "the service failed to handle this request"),
        )
        headers: list[tuple[str, str]] = []
        if status == 431:
            # The usual oversized header is a bearer token; say so the way a 401 would.
            headers.append(
                (
                    "WWW-Authenticate",
                    'Bearer realm="flare-cds", error="invalid_request", '
                    'error_description="request headers too large"',
                )
            )
        # The type only: parser messages quote the header or line they refused (a token, say).
        level = logging.ERROR if status >= 500 else logging.WARNING
        log.log(level, "refused request: %d %s (%s)", status, error, type(exc).__name__)
        _send_and_close(client, error_response(status, error, message, headers))
