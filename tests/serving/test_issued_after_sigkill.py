"""A card whose answer was received is on record even when the server dies right after: the real
`flare-cds serve` (gunicorn, gevent workers, SQLite) killed by SIGKILL, master and workers, while
calls that share group-committed writes are in flight."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import requests

from service.storage.feedback import SqliteFeedbackStore
from service.storage.issued_spool import IssuedCardRecorder
from tests.conftest import as_of_today, load_fixture

pytestmark = pytest.mark.server

HOOK = "/cds-services/rituximab-flare-order-sign"
CALLERS = 16
KILLS = 3
CALLS_BEFORE_KILL = 300


def test_every_card_received_is_stored_after_a_sigkill_of_master_and_workers(
    tmp_path: Path, serve_process: Any
) -> None:
    server = serve_process('[storage]\ndatabase = "data/flare.sqlite3"\n', workers=2)
    body = as_of_today(load_fixture("order-sign/wm-igm-4500-rituximab"))
    received: list[str] = []
    for kill in range(KILLS):  # the window between commit and answer is short: several tries
        if kill:
            server.start()  # the same database and spool folder, as after a host restart
        cut_short = _calls_until_killed(server, body, received, CALLS_BEFORE_KILL * (kill + 1))
        assert cut_short  # calls were in flight, or sent to the dead server, when it was killed
    assert len(received) >= KILLS * CALLS_BEFORE_KILL and len(set(received)) == len(received)

    database = tmp_path / "data" / "flare.sqlite3"
    # Records a worker spooled because the store failed are durable too: drain them as the
    # restarted server would (the files of dead processes are unlocked).
    with closing(SqliteFeedbackStore(database)) as store:
        spooler = IssuedCardRecorder(lambda: store, tmp_path / "var" / "issued-spool", _no_count)
        assert spooler.drain() is True
    with closing(sqlite3.connect(database)) as connection:
        stored = {row[0] for row in connection.execute("SELECT uuid FROM issued_cards")}
    missing = set(received) - stored
    assert not missing, f"{len(missing)} of {len(received)} answered cards not on record"


def _calls_until_killed(server: Any, body: Any, received: list[str], enough: int) -> list[str]:
    """CALLERS threads call the hook until `received` holds `enough` card uuids, then the
    server's master and workers are killed under them; returns why each call that was cut
    short failed."""
    cut_short: list[str] = []
    stop = threading.Event()

    def call_until_stopped(_: int) -> None:
        with requests.Session() as http:
            http.trust_env = False
            while not stop.is_set():
                try:
                    answer = http.post(server.url + HOOK, json=body, timeout=30)
                    # The whole body, or an exception: requests checks its Content-Length.
                    content = answer.content
                except requests.RequestException as exc:
                    cut_short.append(type(exc).__name__)  # refused, reset or cut by the kill
                    return
                assert answer.status_code == 200, content
                [card] = answer.json()["cards"]
                received.append(card["uuid"])

    with ThreadPoolExecutor(CALLERS) as pool:
        callers = [pool.submit(call_until_stopped, i) for i in range(CALLERS)]
        while len(received) < enough and not any(c.done() for c in callers):
            time.sleep(0.01)
        server.stop(signal.SIGKILL)  # no graceful shutdown: every process dies at once
        stop.set()
        for caller in callers:
            caller.result()
    return cut_short


def _no_count(result: str, number: int) -> None:
    pass
