"""A response's head goes out with the first piece of its body, in one send, byte for byte what
gunicorn would have sent in two. Checked on a real socket pair against gunicorn's own response;
every served test (tests/serving, the bench) goes through it too."""

from __future__ import annotations

import socket
from types import SimpleNamespace
from typing import Any

import pytest
from gunicorn.config import Config
from gunicorn.http import wsgi

from service.serving.responses import OneSendResponse


class CountingSocket:
    """A real socket that counts the sends made on it."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.sends = 0

    def sendall(self, data: bytes) -> None:
        self.sends += 1
        self._sock.sendall(data)


def _serve(kind: type, headers: list[tuple[str, str]], pieces: list[Any]) -> tuple[bytes, int]:
    """What a client receives when `kind` answers with `headers` and `pieces`, and in how many
    sends."""
    request = SimpleNamespace(version=(1, 1), method="POST", should_close=lambda: True)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        counting = CountingSocket(ours)
        response = kind(request, counting, Config())
        response.start_response("200 OK", headers)
        try:
            for piece in pieces:
                response.write(piece)
        except TypeError:
            pass  # a piece that is not bytes: gunicorn refuses it once the head is out
        response.close()
        ours.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := theirs.recv(65536):
            received += chunk
    return received, counting.sends


CASES = {
    "one piece of known length": ([("Content-Length", "11")], [b'{"cards":[]'], 1),
    "several pieces of known length": ([("Content-Length", "6")], [b"ab", b"cd", b"ef"], 3),
    "chunked pieces": ([], [b"first", b"second"], 3),
    "no body": ([("Content-Length", "0")], [], 1),
    "a piece that is not bytes": ([("Content-Length", "4")], ["text"], 1),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_head_goes_with_the_first_piece_and_nothing_else_changes(name: str) -> None:
    headers, pieces, sends = CASES[name]
    stock, stock_sends = _serve(wsgi.Response, headers, pieces)
    ours, our_sends = _serve(OneSendResponse, headers, pieces)
    assert ours == stock
    assert ours.startswith(b"HTTP/1.1 200 OK\r\n")
    assert our_sends == sends
    # gunicorn sends the head on its own before the first piece.
    assert stock_sends == sends + (1 if pieces and isinstance(pieces[0], bytes) else 0)
