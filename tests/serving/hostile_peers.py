"""Misbehaving peers on loopback, for the availability tests: slow clients and bad key hosts.

SlowClients holds many connections that each send a request a byte at a time, from one thread,
and records when and how the server answered each. StallingKeyHost is a JWK Set host that either
sleeps before answering or answers 200 and then trickles its body.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import socketserver
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class SlowAnswer:
    opened: float
    answered: float | None = None
    data: bytes = b""

    @property
    def status(self) -> int | None:
        parts = self.data.split(b" ", 2)
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None

    @property
    def body(self) -> bytes:
        return self.data.partition(b"\r\n\r\n")[2]


@dataclass
class SlowClients:
    """Connections that send `start`, then one more byte every `interval` seconds."""

    port: int
    start: bytes
    count: int
    interval: float = 0.5
    answers: list[SlowAnswer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def __enter__(self) -> SlowClients:
        self._thread.start()
        self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def wait_answered(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(a.answered is None for a in self.answers):
            time.sleep(0.05)

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        for _ in range(self.count):
            sock = socket.create_connection(("127.0.0.1", self.port))
            answer = SlowAnswer(time.monotonic())
            sock.sendall(self.start)
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, answer)
            self.answers.append(answer)
        self._ready.set()
        next_byte = time.monotonic() + self.interval
        while not self._stop.is_set() and selector.get_map():
            for key, _ in selector.select(timeout=0.05):
                sock, answer = key.fileobj, key.data
                try:
                    chunk = sock.recv(65536)  # type: ignore[union-attr]
                except OSError:
                    chunk = b""
                if answer.answered is None:
                    answer.answered = time.monotonic()
                answer.data += chunk
                if not chunk:
                    selector.unregister(sock)
                    sock.close()  # type: ignore[union-attr]
            if time.monotonic() >= next_byte:
                next_byte += self.interval
                for key in list(selector.get_map().values()):
                    with contextlib.suppress(OSError):  # the server may have closed it already
                        key.fileobj.send(b" ")  # type: ignore[union-attr]
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]


class StallingKeyHost:
    """A key host that sleeps `sleep` seconds before answering, or trickles a JWK Set body."""

    def __init__(self, *, sleep: float = 0.0, trickle: float = 0.0) -> None:
        stopping = self._stopping = threading.Event()

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.recv(65536)
                if sleep:
                    stopping.wait(sleep)
                    return
                body = b'{"keys": [' + b" " * 10_000 + b"]}"
                head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n"
                self.request.sendall(head.encode())
                for index in range(len(body)):
                    if stopping.wait(trickle):
                        return
                    with contextlib.suppress(OSError):
                        self.request.sendall(body[index : index + 1])

        socketserver.ThreadingTCPServer.daemon_threads = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/jwks.json"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,))
        self._thread.daemon = True

    def __enter__(self) -> StallingKeyHost:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()


def timings(call: Callable[[], object], times: int = 5) -> Iterator[float]:
    for _ in range(times):
        started = time.monotonic()
        call()
        yield time.monotonic() - started


def median_seconds(call: Callable[[], object], times: int = 5) -> float:
    """The median of several timed calls: one hiccup of a shared machine does not decide."""
    return statistics.median(timings(call, times))
