"""Issued-card records while the store is down: on disk before the answer, written once it is back,
and not lost when the process that spooled them is killed; calls that overlap share one write."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
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


def spooled_uuids(folder: Path) -> set[str]:
    # Complete lines only: another call may be appending its own line while this one reads.
    lines = [
        line
        for f in folder.glob("issued-*.jsonl")
        for line in f.read_bytes().split(b"\n")[:-1]
        if line
    ]
    return {json.loads(line)["uuid"] for line in lines}


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


class HeldFirstWrite:
    """A real SQLite store whose first write waits for `release`, as behind a slow fsync, so the
    calls made meanwhile queue up; it keeps the number of rows of every write record() asked
    for (the spool's drainer thread aside), and fails each write as a read-only file does while
    `down` is set."""

    def __init__(self, path: Path) -> None:
        self.real = SqliteFeedbackStore(path)
        self.real.schema_version()
        self.entered, self.release = threading.Event(), threading.Event()
        self.writes: list[int] = []
        self.down = False

    def record_issued(self, cards: Sequence[IssuedCard]) -> None:
        if threading.current_thread().name != "issued-spool":
            self.writes.append(len(cards))
        if len(self.writes) == 1:
            self.entered.set()
            self.release.wait()
        if self.down:
            raise sqlite3.OperationalError("attempt to write a readonly database")
        self.real.record_issued(cards)


def overlapping_calls(
    store: HeldFirstWrite, spooler: IssuedCardRecorder, spool: Path, calls: int, per_call: int
) -> list[str]:
    """`calls` threads record at once: the first is held in its write until every other one has
    queued behind it. Each checks that its records are durable (in the store, or else in the
    spool) as soon as record() returns. Returns the uuids recorded, once every call has."""
    names = [[f"card-{i:03d}-{j:03d}" for j in range(per_call)] for i in range(calls)]
    not_durable: list[int] = []

    def call(index: int) -> None:
        spooler.record([issued(name) for name in names[index]])
        try:
            kept = set(stored_uuids(store.real.path)) | spooled_uuids(spool)
        except Exception:  # a check that cannot be made must fail the test, not vanish
            not_durable.append(index)
            raise
        if not kept.issuperset(names[index]):
            not_durable.append(index)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(calls)]
    threads[0].start()
    assert store.entered.wait(timeout=30)
    for thread in threads[1:]:
        thread.start()
    deadline = time.monotonic() + 30  # only so that a broken queue fails instead of hanging
    while spooler.waiting() < calls - 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert spooler.waiting() == calls - 1
    store.release.set()
    for thread in threads:
        thread.join()
    assert not_durable == []
    return sorted(name for group in names for name in group)


def test_calls_that_overlap_a_write_are_committed_together_in_the_next(tmp_path: Path) -> None:
    store, counts = HeldFirstWrite(tmp_path / "db.sqlite3"), Counter[str]()
    spooler = recorder(store, tmp_path / "spool", counts)
    expected = overlapping_calls(store, spooler, tmp_path / "spool", 40, 1)
    assert stored_uuids(tmp_path / "db.sqlite3") == expected
    # 40 calls, 2 writes: the held one, then the 39 that queued behind it.
    assert store.writes == [1, 39]
    assert counts == {"stored": 40} and not (tmp_path / "spool").exists()


def test_a_batch_holds_at_most_500_rows_and_whole_calls(tmp_path: Path) -> None:
    store, counts = HeldFirstWrite(tmp_path / "db.sqlite3"), Counter[str]()
    spooler = recorder(store, tmp_path / "spool", counts)
    expected = overlapping_calls(store, spooler, tmp_path / "spool", 12, 100)
    assert stored_uuids(tmp_path / "db.sqlite3") == expected
    assert store.writes == [100, 500, 500, 100]  # oldest first, no call split
    assert counts == {"stored": 1200}


def test_when_a_batch_fails_every_call_spools_its_own_then_they_are_written(
    tmp_path: Path,
) -> None:
    store, counts = HeldFirstWrite(tmp_path / "db.sqlite3"), Counter[str]()
    store.down = True
    spooler = recorder(store, tmp_path / "spool", counts)
    expected = overlapping_calls(store, spooler, tmp_path / "spool", 30, 2)
    assert store.writes == [2, 58]  # the held write failed, then the batch of the others
    assert stored_uuids(tmp_path / "db.sqlite3") == []
    assert counts == {"spooled": 60} and spooler.pending()
    # One file, or more if the drainer's first attempt came between two calls' appends.
    spooled = [f.read_bytes().splitlines() for f in (tmp_path / "spool").glob("issued-*.jsonl")]
    assert sum(map(len, spooled)) == 60
    store.down = False
    # The drainer has backed off after its failed attempts; a call spooled now wakes it.
    spooler.record([issued("card-late")])
    deadline = time.monotonic() + 10
    while spooler.pending() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stored_uuids(tmp_path / "db.sqlite3") == sorted([*expected, "card-late"])
    assert counts == {"spooled": 61, "recovered": 61}
    spooler.record([issued("card-after")])  # backlog gone: straight to the store again
    assert counts["stored"] == 1 and "card-after" in stored_uuids(tmp_path / "db.sqlite3")


def test_under_gevent_greenlets_share_a_write_on_the_stores_native_thread(
    tmp_path: Path,
) -> None:
    """As in a gevent worker: threading monkey-patched, the store behind off_loop. While one
    greenlet's write holds the store's native thread, the others queue and wait cooperatively
    (the loop keeps running them), then share the next write."""
    child = textwrap.dedent(
        f"""
        from gevent import monkey
        monkey.patch_all()
        import sys, threading
        sys.path.insert(0, {str(REPO)!r})
        import gevent
        from pathlib import Path
        from service.api.blocking import off_loop
        from service.storage.feedback import SqliteFeedbackStore
        from service.storage.issued_spool import IssuedCardRecorder
        from tests.storage.test_feedback import issued

        assert type(threading.Lock()).__module__ == "gevent.thread"  # cooperative locks
        native_lock = monkey.get_original("_thread", "allocate_lock")
        real = SqliteFeedbackStore(Path({str(tmp_path / "db.sqlite3")!r}))
        hold, writes = native_lock(), []
        hold.acquire()

        class Held:  # runs on the store's native thread: its first write blocks that only
            def record_issued(self, cards):
                writes.append(len(cards))
                if len(writes) == 1:
                    hold.acquire()
                real.record_issued(cards)

        store = off_loop(Held())
        assert type(store).__name__ == "_OnNativeThread"
        spooler = IssuedCardRecorder(lambda: store, Path({str(tmp_path / "spool")!r}),
                                     lambda result, n: None)
        calls = [gevent.spawn(spooler.record, [issued(f"card-{{i:02d}}")]) for i in range(30)]
        while spooler.waiting() < 29:
            gevent.sleep(0.01)
        hold.release()
        gevent.joinall(calls, raise_error=True)
        print(writes, flush=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[1, 29]"
    assert stored_uuids(tmp_path / "db.sqlite3") == [f"card-{i:02d}" for i in range(30)]
