"""A hook body of known length is read whole into one buffer, by the real `flare-cds serve`.

The chart a long-treated patient's EHR sends is several MB; holding it twice while it arrives
was the peak of a worker's memory. Here: the body arrives in pieces and is answered as sent, a
body cut short is a JSON 400 (never a silent "no data"), and reading one costs one copy of it.
"""

from __future__ import annotations

import io
import json
import socket
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from werkzeug.test import EnvironBuilder

from service.api.bodies import BoundedRequest
from tests.conftest import ServeProcess, as_of_today, load_fixture

pytestmark = pytest.mark.server

HOOK = "/cds-services/rituximab-flare-order-sign"
SCENARIO = "order-sign/wm-igm-4500-rituximab"


def _send(port: int, head: bytes, pieces: list[bytes], close_early: bool = False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(0.02)  # separate reads on the server's side
        if close_early:
            sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):  # the server closes after its answer
            data += chunk
    return data


def _head(length: int) -> bytes:
    return (
        f"POST {HOOK} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
    ).encode()


def test_a_body_arriving_in_pieces_is_read_whole_and_one_cut_short_is_a_400(
    serve_process: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    server = serve_process(f"[storage]\ndatabase = {json.dumps(str(tmp_path / 'db.sqlite3'))}\n")
    body = json.dumps(as_of_today(load_fixture(SCENARIO))).encode()
    pieces = [body[i : i + 7000] for i in range(0, len(body), 7000)]
    answer = _send(server.port, _head(len(body)), pieces)
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"200", answer[:300]
    [card] = json.loads(payload)["cards"]
    assert card["indicator"] == "warning" and "4,500 mg/dL" in card["summary"]

    cut = _send(server.port, _head(len(body)), pieces[:-1], close_early=True)
    head, _, payload = cut.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"400", cut[:300]
    assert b"content-type: application/json" in head.lower()
    error = json.loads(payload)
    assert error["error"] and error["message"] and "cards" not in error
    assert "Traceback" not in server.log()


def test_reading_a_large_body_holds_it_about_once() -> None:
    size = 8 * 1024 * 1024
    environ = EnvironBuilder(
        method="POST", path=HOOK, content_type="application/json", content_length=size
    ).get_environ()
    environ["wsgi.input"] = io.BytesIO(b" " * size)
    environ["wsgi.input_terminated"] = True  # gunicorn ends a body of known length itself
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024 * 1024
    with app.request_context(environ):
        request = BoundedRequest(environ)
        tracemalloc.start()
        try:
            data = request.get_data(cache=True)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert len(data) == size and data.count(b" ") == size
    # Werkzeug's own reading held a growing copy and the final one: at least twice the body.
    assert peak < 1.3 * size, peak / size


class _Trickle(io.RawIOBase):
    """A server's body stream that hands over at most `piece` bytes per read."""

    def __init__(self, data: bytes, piece: int) -> None:
        self._data, self._piece, self._at = data, piece, 0

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        size = len(self._data) if size is None or size < 0 else size
        chunk = self._data[self._at : self._at + min(size, self._piece)]
        self._at += len(chunk)
        return chunk


@pytest.mark.parametrize("size", [1, 125_000, 3 * 1024 * 1024 + 7])
@pytest.mark.parametrize("piece", [None, 4096])
def test_a_body_is_read_whole_whether_it_comes_at_once_or_in_pieces(
    size: int, piece: int | None
) -> None:
    sent = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    environ = EnvironBuilder(
        method="POST", path=HOOK, content_type="application/json", content_length=size
    ).get_environ()
    environ["wsgi.input"] = _Trickle(sent, piece or size)
    environ["wsgi.input_terminated"] = True
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024 * 1024
    with app.request_context(environ):
        data = BoundedRequest(environ).get_data(cache=False)
    assert bytes(data) == sent
