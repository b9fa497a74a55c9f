"""Reading a request body: whole, once, and never past the size limit.

Flask's request class with two streams of its own: a chunked body (no Content-Length) that
fails with 413 past the limit instead of arriving truncated, and a body of known length read
into one buffer of that length.
"""

from __future__ import annotations

import io
from typing import IO, Any

from flask import Request
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge
from werkzeug.utils import cached_property
from werkzeug.wsgi import LimitedStream


class _CappedBody(io.RawIOBase):
    """A streamed body that fails with 413 once it is larger than `limit` bytes.

    Werkzeug caps a chunked body (no Content-Length) at the limit by stopping to read, so an
    oversized body arrives silently truncated and is answered as invalid JSON. Reading one byte
    past the limit tells "exactly the limit" from "too large".
    """

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        super().__init__()
        self._stream = stream
        self._limit = limit
        self._seen = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        if self._seen > self._limit:
            raise RequestEntityTooLarge()
        wanted = min(len(buffer), self._limit + 1 - self._seen)
        data = self._stream.read(wanted)
        if not data:
            return 0
        self._seen += len(data)
        if self._seen > self._limit:
            raise RequestEntityTooLarge()
        buffer[: len(data)] = data
        return len(data)


# How much of a body is asked of the server at a time when reading it whole.
_READ_STEP_BYTES = 1024 * 1024


class _LengthBody(LimitedStream):
    """A body of known length that the server ends itself, read whole into one buffer.

    Werkzeug reads a whole body 64 kB at a time into a growing buffer and then copies it out: a
    6.6 MB chart was held twice as it arrived, at the peak of the worker's memory. Here it goes
    into a buffer of its length, which is then the body (a bytearray: every reader of it takes
    any bytes-like value); a body that arrives in one piece is kept as the bytes it came in.
    """

    def readall(self) -> bytes:
        remaining = self.limit - self._pos
        if remaining <= 0:
            return super().readall()
        # A body that fits one read is asked for in one, which the server fills whole: kept as
        # the bytes it returns. No copy, and bytes.translate (the nesting pre-scan) runs about
        # a third faster on bytes than on a bytearray.
        data = self._read_step(remaining) if remaining <= _READ_STEP_BYTES else b""
        if len(data) == remaining:
            self._pos += remaining
            return data
        # Otherwise it is gathered in a buffer of its length; for a larger body that buffer is
        # made before the first piece is read (made after it, the worker's peak for a 6.5 MB
        # chart was 2 MB higher).
        body = bytearray(remaining)
        body[: len(data)] = data
        got = len(data)
        del data
        while got < remaining:
            data = self._read_step(remaining - got)
            body[got : got + len(data)] = data
            got += len(data)
        self._pos += got
        return body  # type: ignore[return-value]

    def _read_step(self, wanted: int) -> bytes:
        """The next piece of the body, at most `wanted` bytes and at most _READ_STEP_BYTES."""
        try:
            data = self._stream.read(min(wanted, _READ_STEP_BYTES))
        except (OSError, ValueError) as exc:
            self.on_disconnect(error=exc)  # raises ClientDisconnected
            raise
        if not data:
            self.on_disconnect()  # the client left before sending all it announced
            raise ClientDisconnected()
        return data  # type: ignore[no-any-return]


# BoundedRequest.checked_json until the body check has read the body.
UNREAD = object()


class BoundedRequest(Request):
    """Flask's request, with a chunked body over MAX_CONTENT_LENGTH a 413 and a body of known
    length read into one buffer."""

    # The body's JSON value, when the body check (service.api.middleware) read it whole and found
    # it within the limits: the route takes it instead of decoding the body a second time.
    checked_json: Any = UNREAD

    @cached_property
    def stream(self) -> IO[bytes]:
        # Only servers that terminate the stream themselves (gunicorn, werkzeug for chunked
        # bodies) set wsgi.input_terminated; without it Werkzeug's own guard is the right one.
        if not self.environ.get("wsgi.input_terminated") or self.shallow:
            return super().stream
        limit = self.max_content_length
        length = self.content_length
        if length is None:
            return (
                super().stream if limit is None else _CappedBody(self.environ["wsgi.input"], limit)
            )
        if limit is not None and length > limit:
            raise RequestEntityTooLarge()
        return _LengthBody(self.environ["wsgi.input"], length)
