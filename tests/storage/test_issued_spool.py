"""Issued-card records while the store is down: on disk before the answer, written once it is back,
and not lost when the process that spooled them is killed."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

from service.storage.feedback import IssuedCard, SqliteFeedbackStore
from service.storage.issued_spool import IssuedCardRecorder
from tests.storage.test_feedback import issued

REPO = Path(__file__).resolve().parents[2]


class FlakyStore:
    """A real SQLite store behind a switch that makes it fail as an unreachable server does."""

    def __init__(self, path: Path) -> None:
        self.real = SqliteFeedbackStore(path)
        self.real.schema_version()  # created and migrated now, so it can be read at any time
        self.down = False

    def record_issued(self, cards: Sequence[IssuedCard]) -> None:
        if self.down:
            raise ConnectionError("store down")
        self.real.record_issued(cards)


def stored_uuids(path: Path) -> list[str]:
    import sqlite3

    with closing(sqlite3.connect(path)) as connection:
        return [row[0] for row in connection.execute("SELECT uuid FROM issued_cards ORDER BY 1")]


def recorder(store: Any, spool: Path, counts: Counter[str]) -> IssuedCardRecorder:
    return IssuedCardRecorder(lambda: store, spool, lambda result, n: counts.update({result: n}))


def test_records_go_straight_to_a_store_that_answers(tmp_path: Path) -> None:
    store, counts = FlakyStore(tmp_path / "db.sqlite3"), Counter[str]()
    recorder(store, tmp_path / "spool", counts).record([issued("card-1")])
    assert stored_uuids(tmp_path / "db.sqlite3") == ["card-1"] and counts == {"stored": 1}
    assert not (tmp_path / "spool").exists()


def test_while_the_store_is_down_records_are_spooled_then_written(tmp_path: Path) -> None:
    store, counts = FlakyStore(tmp_path / "db.sqlite3"), Counter[str]()
    store.down = True
    spooler = recorder(store, tmp_path / "spool", counts)
    spooler.record([issued("card-1"), issued("card-2")])
    spooler.record([issued("card-3")])  # a backlog exists: straight to the spool
    assert counts == {"spooled": 3} and spooler.pending()
    [spool] = (tmp_path / "spool").glob("issued-*.jsonl")
    assert spool.stat().st_mode & 0o077 == 0  # holds patient hashes: private
    store.down = False
    deadline = time.monotonic() + 10
    while spooler.pending() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stored_uuids(tmp_path / "db.sqlite3") == ["card-1", "card-2", "card-3"]
    assert counts["recovered"] == 3 and not list((tmp_path / "spool").iterdir())


def test_records_of_a_killed_process_are_written_by_the_next(tmp_path: Path) -> None:
    """The answer went out (the child printed "answered"), then the process died by SIGKILL
    with the store down: the spooled records reach the store from another process."""
    child = textwrap.dedent(
        f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from service.storage.issued_spool import IssuedCardRecorder
        from tests.storage.test_feedback import issued

        class Down:
            def record_issued(self, cards):
                raise ConnectionError("store down")

        spooler = IssuedCardRecorder(lambda: Down(), Path({str(tmp_path / "spool")!r}),
                                     lambda result, n: None)
        spooler.record([issued("card-a"), issued("card-b")])
        print("answered", flush=True)
        time.sleep(60)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "answered"
        store, counts = FlakyStore(tmp_path / "db.sqlite3"), Counter[str]()
        other = recorder(store, tmp_path / "spool", counts)
        # While the writer lives its file is locked: nobody else takes it.
        assert other.drain() is True and stored_uuids(tmp_path / "db.sqlite3") == []
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        assert other.drain() is True
        assert stored_uuids(tmp_path / "db.sqlite3") == ["card-a", "card-b"]
        assert counts == {"recovered": 2} and not list((tmp_path / "spool").iterdir())
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_record_that_neither_store_nor_disk_takes_is_counted_lost(tmp_path: Path) -> None:
    store, counts = FlakyStore(tmp_path / "db.sqlite3"), Counter[str]()
    store.down = True
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the spool folder should be")
    recorder(store, blocked, counts).record([issued("card-1")])
    assert counts == {"lost": 1}
