"""Issued-card records that never hold back a card: written to the store when it answers, else
kept on this host's disk and written later by a background thread.

Durability: before a call's answer is sent, each of its cards' records is either committed in
the store or appended to a spool file and fsync'd, so a crash after the answer loses none. Spool
files live in `storage.spool_directory`; each is locked (flock) by the live process that writes
it, and any worker on the host that finds one unlocked (its writer died) adopts and drains it.
Writing a record twice is harmless (the store ignores a uuid it has). Records that neither the
store nor the spool could take (a full disk as well as a store down) are counted and logged as
lost, with counts only: the record holds a patient hash, which has no place in logs.

Group commit: calls that arrive while a write is in flight do not each commit (one fsync per
call on SQLite). A caller queues its records; if no write is in flight it leads: it takes the
queue (up to BATCH rows, whole calls only, oldest first), writes it in one store call, marks
those calls done or failed and wakes the rest; the others wait and join the next batch. A
caller returns only once its own records are committed, or, when the batch that held them
failed, once it has spooled them as above, so the durability promise is the same for each
call. The wait uses `threading` (monkey-patched into cooperative primitives under the gevent
worker, where the leader's store call runs on the store's native thread).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from service.storage.feedback import IssuedCard

log = logging.getLogger("service.storage.issued")

# Between attempts to drain the spool while the store is down: short first, then backing off.
FIRST_RETRY_SECONDS = 0.5
MAX_RETRY_SECONDS = 10.0
BATCH = 500

Count = Callable[[str, int], None]  # (stored | spooled | recovered | lost, number of cards)


class _Spool:
    """One open, locked spool file."""

    def __init__(self, path: Path, handle: Any) -> None:
        self.path = path
        self.handle = handle

    @classmethod
    def claim(cls, path: Path, *, create: bool) -> _Spool | None:
        """The file, locked by this process; None if another live process holds it."""
        flags = os.O_RDWR | os.O_APPEND | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            descriptor = os.open(path, flags, 0o600)
        except FileNotFoundError:
            return None  # drained and removed by another worker meanwhile
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return None
        if not create and not path.exists():  # unlinked between open and lock
            os.close(descriptor)
            return None
        return cls(path, os.fdopen(descriptor, "r+b", buffering=0))

    def append(self, lines: bytes) -> None:
        self.handle.write(lines)
        os.fsync(self.handle.fileno())

    def cards(self) -> list[IssuedCard]:
        self.handle.seek(0)
        found = []
        for line in self.handle.read().splitlines():
            try:
                row = json.loads(line)
                row["issued_at"] = datetime.fromisoformat(row["issued_at"])
                found.append(IssuedCard(**row))
            except (ValueError, TypeError, KeyError):
                # Only a line cut short by a crash: its call's answer was never sent.
                continue
        return found

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.handle.close()  # after the unlink: nobody can adopt it in between


class _Call:
    """One record() call's records, queued for the next batch."""

    __slots__ = ("cards", "done", "error")

    def __init__(self, cards: Sequence[IssuedCard]) -> None:
        self.cards = cards
        self.done = False
        self.error: Exception | None = None


class IssuedCardRecorder:
    def __init__(self, store: Callable[[], Any], directory: Path, count: Count) -> None:
        self._store = store
        self._directory = directory
        self._count = count
        self._commit = threading.Condition(threading.Lock())  # guards _queue and _writing
        self._queue: list[_Call] = []
        self._writing = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._active: _Spool | None = None
        self._draining: list[_Spool] = []
        self._backlog = False
        self._thread: threading.Thread | None = None
        self._pid = 0

    def record(self, cards: Sequence[IssuedCard]) -> None:
        """Durable when it returns (see the module's docstring); never raises."""
        if not self._backlog:
            error = self._write_in_batch(cards)
            if error is None:
                self._count("stored", len(cards))
                return
            log.warning(
                "store did not take %d issued-card records (%s); spooled for retry",
                len(cards),
                type(error).__name__,
            )
        try:
            self._append(cards)
        except Exception as exc:
            self._count("lost", len(cards))
            log.error("%d issued-card records lost: %s", len(cards), type(exc).__name__)
            return
        self._count("spooled", len(cards))
        self._start()
        self._wake.set()

    def waiting(self) -> int:
        """Calls whose records are queued for a write not yet started."""
        with self._commit:
            return len(self._queue)

    def _write_in_batch(self, cards: Sequence[IssuedCard]) -> Exception | None:
        """Once this call's records are committed, None; else what the store raised."""
        mine = _Call(cards)
        with self._commit:
            self._queue.append(mine)
            while not mine.done:
                if self._writing:
                    self._commit.wait()
                    continue
                batch = self._take_batch()
                self._writing = True
                self._commit.release()  # others queue while the store writes
                # Until the store returns, not written: a leader interrupted by a BaseException
                # (a greenlet killed) must not let its followers believe theirs were committed.
                error: Exception | None = InterruptedError("write interrupted")
                try:
                    self._store().record_issued([c for call in batch for c in call.cards])
                    error = None
                except Exception as exc:
                    error = exc
                finally:
                    self._commit.acquire()
                    self._writing = False
                    for call in batch:
                        call.done, call.error = True, error
                    self._commit.notify_all()
        return mine.error

    def _take_batch(self) -> list[_Call]:
        """The oldest queued calls, up to BATCH rows (always one call, whatever its size)."""
        rows, taken = len(self._queue[0].cards), 1
        while taken < len(self._queue) and rows + len(self._queue[taken].cards) <= BATCH:
            rows += len(self._queue[taken].cards)
            taken += 1
        batch, self._queue[:taken] = self._queue[:taken], []
        return batch

    def adopt_leftovers(self) -> None:
        """Start draining if dead processes left spool files (cheap when there are none)."""
        if self._directory.is_dir() and any(self._directory.glob("issued-*.jsonl")):
            self._start()
            self._wake.set()

    def _start(self) -> None:
        """The drainer thread of this process (after a fork, a new one)."""
        with self._lock:
            if self._thread is not None and self._pid == os.getpid():
                return
            if self._pid not in (0, os.getpid()):  # a fork: the parent's files are not ours
                self._active, self._draining = None, []
                self._backlog = False
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="issued-spool", daemon=True)
            self._thread.start()

    def pending(self) -> bool:
        return self._backlog

    def _append(self, cards: Sequence[IssuedCard]) -> None:
        lines = b"".join(
            json.dumps({**asdict(c), "issued_at": c.issued_at.isoformat()}).encode() + b"\n"
            for c in cards
        )
        with self._lock:
            self._backlog = True
            if self._active is None:
                self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                path = self._directory / f"issued-{uuid.uuid4().hex}.jsonl"
                self._active = _Spool.claim(path, create=True)
                if self._active is None:  # a fresh uuid name cannot be locked by another
                    raise OSError("spool file could not be locked")
                _sync_directory(self._directory)  # the new name itself must survive a crash
            self._active.append(lines)

    def _run(self) -> None:
        delay: float | None = None  # idle: sleep until records are spooled
        while True:
            self._wake.wait(timeout=delay)
            self._wake.clear()
            try:
                drained = self.drain()
            except Exception as exc:
                log.warning("issued-card spool not drained yet (%s)", type(exc).__name__)
                drained = False
            if drained:
                delay = None
            else:
                delay = min((delay or FIRST_RETRY_SECONDS / 2) * 2, MAX_RETRY_SECONDS)

    def drain(self) -> bool:
        """Write every spooled record to the store; True when nothing is left. Raises what the
        store raised (the files stay for the next attempt)."""
        with self._lock:
            if self._active is not None:  # new records go to a new file from now on
                self._draining.append(self._active)
                self._active = None
            self._draining += self._orphans()
        for spool in list(self._draining):
            cards = spool.cards()
            for start in range(0, len(cards), BATCH):
                self._store().record_issued(cards[start : start + BATCH])
            spool.remove()
            with self._lock:
                self._draining.remove(spool)
            if cards:
                self._count("recovered", len(cards))
                log.info("%d spooled issued-card records written to the store", len(cards))
        with self._lock:
            self._backlog = self._active is not None or bool(self._draining)
            return not self._backlog

    def _orphans(self) -> list[_Spool]:
        if not self._directory.is_dir():
            return []
        held = {s.path for s in self._draining}
        if self._active is not None:
            held.add(self._active.path)
        found = []
        for path in sorted(self._directory.glob("issued-*.jsonl")):
            if path not in held and (spool := _Spool.claim(path, create=False)) is not None:
                found.append(spool)
        return found


def _sync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
