"""Issued-card records: on disk before the answer, in the store soon after, in shared writes; not
lost when the process that spooled them is killed or while the store is down; and in the store
before feedback that follows them is stored."""

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
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from service.storage import issued_spool
from service.storage.feedback import IssuedCard, SqliteFeedbackStore
from service.storage.issued_spool import IssuedCardRecorder
from tests.storage.test_feedback import issued

REPO = Path(__file__).resolve().parents[2]


class FlakyStore:
    """A real SQLite store behind a switch that makes it fail as an unreachable server does; it
    keeps the number of rows of every write it was asked for."""

    def __init__(self, path: Path) -> None:
        self.real = SqliteFeedbackStore(path)
        self.real.schema_version()  # created and migrated now, so it can be read at any time
        self.down = False
        self.writes: list[int] = []

    def record_issued(self, cards: Sequence[IssuedCard]) -> None:
        self.writes.append(len(cards))
        if self.down:
            raise ConnectionError("store down")
        self.real.record_issued(cards)


class HeldFirstWrite(FlakyStore):
    """A FlakyStore whose first write waits for `release`, as behind a slow fsync."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.entered, self.release = threading.Event(), threading.Event()

    def record_issued(self, cards: Sequence[IssuedCard]) -> None:
        if not self.writes:
            self.entered.set()
            assert self.release.wait(timeout=30)
        super().record_issued(cards)


def stored_uuids(path: Path) -> list[str]:
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


def wait_until(condition: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds  # only so that a broken writer fails, not hangs
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert condition()


def test_a_record_is_on_disk_when_record_returns_and_in_the_store_soon_after(
    tmp_path: Path,
) -> None:
    store, counts = HeldFirstWrite(tmp_path / "db.sqlite3"), Counter[str]()
    spooler = recorder(store, tmp_path / "spool", counts)
    spooler.record([issued("card-1"), issued("card-2")])  # the store is not written meanwhile
    assert spooled_uuids(tmp_path / "spool") == {"card-1", "card-2"} and spooler.pending()
    [spool] = (tmp_path / "spool").glob("issued-*.jsonl")
    assert spool.stat().st_mode & 0o077 == 0  # holds patient hashes: private
    assert store.entered.wait(timeout=10)  # the writer took the file
    store.release.set()
    wait_until(lambda: not spooler.pending())
    assert stored_uuids(tmp_path / "db.sqlite3") == ["card-1", "card-2"]
    assert store.writes == [2] and counts == {"stored": 2}
    assert not list((tmp_path / "spool").iterdir())


def test_calls_made_during_a_write_share_the_next_one(tmp_path: Path) -> None:
    store, counts = HeldFirstWrite(tmp_path / "db.sqlite3"), Counter[str]()
    spooler = recorder(store, tmp_path / "spool", counts)
    spooler.record([issued("card-000")])
    assert store.entered.wait(timeout=10)
    names = [f"card-{i:03d}" for i in range(1, 40)]
    threads = [threading.Thread(target=spooler.record, args=([issued(n)],)) for n in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)  # none waits for the held write
        assert not thread.is_alive()
    assert spooled_uuids(tmp_path / "spool") == {"card-000", *names}
    store.release.set()
    wait_until(lambda: not spooler.pending())
    assert stored_uuids(tmp_path / "db.sqlite3") == ["card-000", *names]
    assert store.writes == [1, 39] and counts == {"stored": 40}


def test_a_write_holds_at_most_500_rows(tmp_path: Path) -> None:
    store, counts = HeldFirstWrite(tmp_path / "db.sqlite3"), Counter[str]()
    spooler = recorder(store, tmp_path / "spool", counts)
    spooler.record([issued("card-first")])
    assert store.entered.wait(timeout=10)
    names = [f"card-{i:03d}-{j:03d}" for i in range(12) for j in range(100)]
    for start in range(0, len(names), 100):
        spooler.record([issued(n) for n in names[start : start + 100]])
    store.release.set()
    wait_until(lambda: not spooler.pending())
    assert store.writes == [1, 500, 500, 200]
    assert stored_uuids(tmp_path / "db.sqlite3") == sorted(["card-first", *names])
    assert counts == {"stored": 1201}


def test_while_the_store_is_down_records_stay_on_disk_then_are_written(tmp_path: Path) -> None:
    store, counts = FlakyStore(tmp_path / "db.sqlite3"), Counter[str]()
    store.down = True
    spooler = recorder(store, tmp_path / "spool", counts)
    spooler.record([issued("card-1"), issued("card-2")])
    spooler.record([issued("card-3")])
    wait_until(lambda: counts["spooled"] == 3)  # the writer tried, and the store refused
    assert spooler.pending() and stored_uuids(tmp_path / "db.sqlite3") == []
    assert spooled_uuids(tmp_path / "spool") == {"card-1", "card-2", "card-3"}
    store.down = False
    wait_until(lambda: not spooler.pending())
    assert stored_uuids(tmp_path / "db.sqlite3") == ["card-1", "card-2", "card-3"]
    assert counts == {"spooled": 3, "recovered": 3}
    assert not list((tmp_path / "spool").iterdir())
    spooler.record([issued("card-after")])  # the store is back: stored as usual
    wait_until(lambda: not spooler.pending())
    assert counts["stored"] == 1 and "card-after" in stored_uuids(tmp_path / "db.sqlite3")


def _killed_child(tmp_path: Path, store_code: str, flush_seconds: float) -> subprocess.Popen[str]:
    """A process that records two cards, prints "answered" (as its answer would go out), and
    then waits to be killed."""
    child = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from service.storage import issued_spool
        from service.storage.feedback import SqliteFeedbackStore
        from tests.storage.test_feedback import issued

        issued_spool.FLUSH_SECONDS = {flush_seconds!r}
        STORE_CODE
        spooler = issued_spool.IssuedCardRecorder(lambda: store, Path({str(tmp_path / "spool")!r}),
                                                  lambda result, n: None)
        spooler.record([issued("card-a"), issued("card-b")])
        print("answered", flush=True)
        time.sleep(120)
        """
    ).replace("STORE_CODE\n", store_code.strip() + "\n")
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "answered"
    return process


DOWN_STORE = """
class Down:
    def record_issued(self, cards):
        raise ConnectionError("store down")
store = Down()
"""


@pytest.mark.parametrize(
    ("store_code", "flush_seconds"),
    [
        pytest.param(DOWN_STORE, 0.05, id="store down"),
        # The store answers, but the process dies before its writer's turn: the records were
        # only on disk.
        pytest.param("store = None", 600.0, id="killed before its write"),
    ],
)
def test_records_of_a_killed_process_are_written_by_the_next(
    tmp_path: Path, store_code: str, flush_seconds: float
) -> None:
    process = _killed_child(tmp_path, store_code, flush_seconds)
    try:
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


def test_settle_writes_what_live_processes_have_spooled(tmp_path: Path) -> None:
    """Feedback may follow its card at once, from another worker: settle() puts the cards every
    process on the host has spooled into the store, and leaves their files to them."""
    process = _killed_child(tmp_path, "store = None", 600.0)
    try:
        store, counts = FlakyStore(tmp_path / "db.sqlite3"), Counter[str]()
        here = recorder(store, tmp_path / "spool", counts)
        here.record([issued("card-here")])
        here.settle()
        assert stored_uuids(tmp_path / "db.sqlite3") == ["card-a", "card-b", "card-here"]
        assert not here.pending() and counts == {"stored": 1}
        [theirs] = (tmp_path / "spool").glob("issued-*.jsonl")  # still the live process's
        assert spooled_uuids(tmp_path / "spool") == {"card-a", "card-b"} and theirs.exists()
    finally:
        process.kill()
        process.wait()


def test_settle_raises_what_the_store_raised(tmp_path: Path) -> None:
    store, counts = FlakyStore(tmp_path / "db.sqlite3"), Counter[str]()
    store.down = True
    spooler = recorder(store, tmp_path / "spool", counts)
    spooler.record([issued("card-1")])
    with pytest.raises(ConnectionError):
        spooler.settle()
    assert spooled_uuids(tmp_path / "spool") == {"card-1"}  # kept for the writer
    store.down = False
    wait_until(lambda: not spooler.pending())  # the writer retries, and stops once it is in


def test_a_record_the_disk_does_not_take_is_counted_lost(tmp_path: Path) -> None:
    store, counts = FlakyStore(tmp_path / "db.sqlite3"), Counter[str]()
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the spool folder should be")
    recorder(store, blocked, counts).record([issued("card-1")])
    assert counts == {"lost": 1}


def test_after_a_failed_append_later_records_go_to_a_new_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk can leave part of a line: no later line may be joined to it."""
    store, counts = FlakyStore(tmp_path / "db.sqlite3"), Counter[str]()
    spooler = recorder(store, tmp_path / "spool", counts)
    real_append = issued_spool._Spool.append

    def half_then_full(self: Any, lines: bytes) -> None:
        real_append(self, lines[: len(lines) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(issued_spool._Spool, "append", half_then_full)
    spooler.record([issued("card-cut")])
    monkeypatch.setattr(issued_spool._Spool, "append", real_append)
    spooler.record([issued("card-next")])
    wait_until(lambda: not spooler.pending())
    assert stored_uuids(tmp_path / "db.sqlite3") == ["card-next"]
    assert counts == {"lost": 1, "stored": 1}


def test_under_gevent_no_call_waits_for_the_stores_native_thread(tmp_path: Path) -> None:
    """As in a gevent worker: threading monkey-patched, the store behind off_loop. While the
    writer's first write holds the store's native thread, calls still record and return at
    once; then their records share the next write."""
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
        spooler.record([issued("card-00")])
        while not writes:
            gevent.sleep(0.01)
        calls = [gevent.spawn(spooler.record, [issued(f"card-{{i:02d}}")]) for i in range(1, 30)]
        assert len(gevent.joinall(calls, timeout=10, raise_error=True)) == 29
        hold.release()
        while spooler.pending():
            gevent.sleep(0.01)
        print(writes, flush=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[1, 29]"
    assert stored_uuids(tmp_path / "db.sqlite3") == [f"card-{i:02d}" for i in range(30)]


def test_a_closed_store_ends_the_writer_and_leaves_the_records_on_disk(tmp_path: Path) -> None:
    """Closed on purpose (the process is shutting down): no retries, nothing lost."""
    from service.storage.errors import StoreClosed

    class Closed:
        def record_issued(self, cards: Sequence[IssuedCard]) -> None:
            raise StoreClosed("the store is closed")

    spooler = recorder(Closed(), tmp_path / "spool", Counter[str]())
    before = set(threading.enumerate())
    spooler.record([issued("card-1")])
    [writer] = set(threading.enumerate()) - before
    writer.join(timeout=10)
    assert not writer.is_alive()
    assert spooled_uuids(tmp_path / "spool") == {"card-1"}


def test_a_new_spool_file_is_locked_before_any_worker_can_take_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker draining between the new file's creation and its lock must not take (and
    remove) it: its records would be on disk under no name, out of every other worker's reach."""
    import fcntl
    import types

    store = FlakyStore(tmp_path / "db.sqlite3")
    store.down = True  # nothing leaves the spool during the test
    spooler = recorder(store, tmp_path / "spool", Counter[str]())
    other = recorder(store, tmp_path / "spool", Counter[str]())
    real_flock = fcntl.flock
    raced = []

    def flock_after_another_drain(descriptor: int, operation: int) -> None:
        if not raced:
            raced.append(True)
            other.drain()  # between the file's creation and its lock
        real_flock(descriptor, operation)

    monkeypatch.setattr(
        issued_spool,
        "fcntl",
        types.SimpleNamespace(
            flock=flock_after_another_drain, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB
        ),
    )
    spooler.record([issued("card-1")])
    assert raced and spooled_uuids(tmp_path / "spool") == {"card-1"}
    store.down = False  # the writer stops retrying once the record is in
    wait_until(lambda: not spooler.pending())


def test_a_store_outage_fills_one_file_and_the_retries_back_off(tmp_path: Path) -> None:
    store, counts = FlakyStore(tmp_path / "db.sqlite3"), Counter[str]()
    store.down = True
    spooler = recorder(store, tmp_path / "spool", counts)
    names = [f"card-{i:02d}" for i in range(15)]
    files = set()
    for name in names:  # 1.5 s of calls while the store is down
        spooler.record([issued(name)])
        files |= {f.name for f in (tmp_path / "spool").glob("issued-*.jsonl")}
        time.sleep(0.1)
    # The first file the writer took, and the one the calls went on filling; a few attempts
    # (0.2 s, then backing off from 0.5 s), not one every 0.2 s.
    assert len(files) <= 2 and 1 <= len(store.writes) <= 4
    store.down = False
    wait_until(lambda: not spooler.pending())
    assert stored_uuids(tmp_path / "db.sqlite3") == names
    assert counts["recovered"] == counts["spooled"] > 0 and "lost" not in counts
    assert counts["recovered"] + counts["stored"] == 15
