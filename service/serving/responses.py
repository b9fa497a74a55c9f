"""gunicorn's response, sending its head with the first piece of its body in one send.

gunicorn writes a response's status line and headers, then each piece of its body, each with a
send of its own. A hook answer is one piece, so that was two system calls and two trips through
the event loop per call, about a tenth of a served call's CPU. Bytes, order and framing
(Content-Length, chunked) are unchanged: what gunicorn would send during the first write is
collected and sent at once.
"""

from __future__ import annotations

from typing import Any

from gunicorn.http import wsgi


class _Collected:
    """Stands in for the socket while gunicorn writes the head and first piece."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.parts.append(data)


class OneSendResponse(wsgi.Response):  # type: ignore[misc]
    def write(self, arg: Any) -> None:
        if self.headers_sent:
            super().write(arg)
            return
        sock, collected = self.sock, _Collected()
        self.sock = collected
        try:
            super().write(arg)
        finally:
            # Sent even if gunicorn refused the piece: it had sent the head before refusing.
            self.sock = sock
            if collected.parts:
                sock.sendall(b"".join(collected.parts))


def install() -> None:
    """Make gunicorn build OneSendResponse for every request of this process (a worker)."""
    wsgi.Response = OneSendResponse
