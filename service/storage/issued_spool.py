"""Issued-card records that never hold back a card: appended to this process's spool file on the
answer path, and written to the store in batches by a background thread.

Durability: before a call's answer is sent, its cards' records are appended to a spool file in
`storage.spool_directory` with one write(2). From then on they survive the death of the process
(SIGKILL, the OOM killer, a crash): the kernel holds the bytes whether or not the process lives
on. The background writer wakes FLUSH_SECONDS after a record it has not written, takes the whole
file (new records go to a new one from then on), writes it to the store in transactions of up to
BATCH rows (SQLite: synchronous=FULL, on disk at commit) and removes the file only once the store
has every record in it. A power failure of the host itself can lose what was appended since the
last write, about FLUSH_SECONDS of records; a crash of the service loses none.

Committing each call's records before answering (as this module once did, with group commit)
cost about a quarter of a hook call's CPU in the served worker: a transaction, an fsync and the
hand-off to the store's native thread for every call.

Each spool file is locked (flock) by the live process that writes it; any worker on the host that
finds one unlocked (its writer died) adopts and drains it. Writing a record twice is harmless
(the store ignores a uuid it has). While the store is down the files stay and the writer retries,
backing off; new records go on filling the one file being appended to. Records that the disk did
not take (a full disk, a missing folder) are counted and logged as lost, with counts only: a
record holds a patient hash, which has no place in logs.

Feedback may be posted right after its card: `settle()` writes every record spooled on this host
so far (this process's and other live processes', whose files stay theirs) before the feedback is
stored, so the card is known to it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from service.storage.errors import StoreClosed
from service.storage.feedback import IssuedCard

log = logging.getLogger("service.storage.issued")

# How long the writer waits after the first record it has not written, so that the calls that
# follow share its transaction; also what a power failure of the host can cost.
FLUSH_SECONDS = 0.2
# Between attempts to write the spool while the store is down: short first, then backing off.
FIRST_RETRY_SECONDS = 0.5
MAX_RETRY_SECONDS = 10.0
BATCH = 500
SPOOL_GLOB = "issued-*.jsonl"

Count = Callable[[str, int], None]  # (stored | spooled | recovered | lost, number of cards)


def encode(cards: Sequence[IssuedCard]) -> bytes:
    """One JSON line per card, each ending in a newline."""
    return b"".join(orjson.dumps(card.by_name()) + b"\n" for card in cards)


def decode(data: bytes) -> list[IssuedCard]:
    """The cards of every complete line in `data`. The last piece, without its newline, is a line
    still being appended (another process's file) or cut short by a crash: its call was never
    answered, or its records are counted lost."""
    found = []
    for line in data.split(b"\n")[:-1]:
        try:
            row = orjson.loads(line)
            row["issued_at"] = datetime.fromisoformat(row["issued_at"])
            found.append(IssuedCard(**row))
        except (ValueError, TypeError, KeyError):
            continue  # a piece of a line a failed write left, followed by a whole one
    return found


class _Spool:
    """One open spool file, locked by this process."""

    def __init__(self, path: Path, descriptor: int, *, adopted: bool) -> None:
        self.path = path
        self.descriptor = descriptor
        self.adopted = adopted  # a dead process's file
        self.counted = 0  # of its records, those already counted as spooled

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
        return cls(path, descriptor, adopted=not create)

    def append(self, lines: bytes) -> None:
        """All of `lines`, or none: a write cut short (a full disk) is taken back, so no record
        of a call counted lost reaches the store, and no later line is joined to a piece."""
        size = os.fstat(self.descriptor).st_size
        view = memoryview(lines)
        try:
            while view:  # a regular file takes it all at once but for a full disk, which raises
                view = view[os.write(self.descriptor, view) :]
        except BaseException:
            os.ftruncate(self.descriptor, size)
            raise

    def cards(self) -> list[IssuedCard]:
        size = os.fstat(self.descriptor).st_size
        return decode(os.pread(self.descriptor, size, 0))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self.descriptor)  # after the unlink: nobody can adopt it in between


class IssuedCardRecorder:
    def __init__(self, store: Callable[[], Any], directory: Path, count: Count) -> None:
        self._store = store
        self._directory = directory
        self._count = count
        self._lock = threading.Lock()  # guards _active, _draining, _thread, _pid
        self._writing = threading.Lock()  # one drain at a time
        self._wake = threading.Event()
        self._active: _Spool | None = None
        self._draining: list[_Spool] = []
        self._thread: threading.Thread | None = None
        self._pid = 0

    def record(self, cards: Sequence[IssuedCard]) -> None:
        """On disk when it returns, in the store soon after (see the module's docstring); never
        raises."""
        try:
            lines = encode(cards)
            with self._lock:
                self._forget_parent()
                if self._active is None:
                    self._active = self._new_spool()
                try:
                    self._active.append(lines)
                except BaseException:
                    # Should taking the write back have failed too, part of a line may be left:
                    # later records go to a new file, so none of theirs is joined to it.
                    self._draining.append(self._active)
                    self._active = None
                    raise
        except Exception as exc:
            self._count("lost", len(cards))
            log.error("%d issued-card records lost: %s", len(cards), type(exc).__name__)
            return
        self._start()
        self._wake.set()

    def pending(self) -> bool:
        """Whether records of this process are not in the store yet."""
        with self._lock:
            return self._active is not None or bool(self._draining)

    def adopt_leftovers(self) -> None:
        """Start draining if dead processes left spool files (cheap when there are none)."""
        if self._directory.is_dir() and any(self._directory.glob(SPOOL_GLOB)):
            self._start()
            self._wake.set()

    def settle(self) -> None:
        """Write every record spooled on this host so far to the store. Raises what the store
        raised; the files stay for the writers."""
        if not self._directory.is_dir():
            return
        self.drain()
        # Files of live processes: read, never taken; their writers remove them as usual.
        for path in sorted(self._directory.glob(SPOOL_GLOB)):
            try:
                cards = decode(path.read_bytes())
            except FileNotFoundError:
                continue  # drained and removed meanwhile
            self._store_all(cards)

    def drain(self) -> bool:
        """Write every record this process spooled, and those of dead processes, to the store;
        True when nothing is left. Raises what the store raised (the files stay for the next
        attempt)."""
        with self._writing:
            with self._lock:
                self._forget_parent()
                self._draining += self._orphans()
                taken = list(self._draining)
            # Files taken earlier (the store refused them) go first. While they are refused, the
            # file being appended to is left in place: a store outage fills one file, not one
            # new file (and descriptor) per attempt.
            self._write_all(taken)
            with self._lock:
                if self._active is not None:  # new records go to a new file from now on
                    self._draining.append(self._active)
                    self._active = None
                taken = list(self._draining)
            self._write_all(taken)
            return not self.pending()

    def _write_all(self, spools: list[_Spool]) -> None:
        for index, spool in enumerate(spools):
            try:
                self._write(spool)
            except Exception:
                with self._lock:
                    waiting = [*spools[index:], *([self._active] if self._active else [])]
                self._count_spooled(waiting)
                raise
            with self._lock:
                self._draining.remove(spool)

    def _count_spooled(self, spools: list[_Spool]) -> None:
        """The store refused: each record of this process not yet in it is counted as spooled,
        once (adopted files were counted by the process that wrote them)."""
        for spool in spools:
            if not spool.adopted:
                total = len(spool.cards())
                if total > spool.counted:
                    self._count("spooled", total - spool.counted)
                    spool.counted = total

    def _write(self, spool: _Spool) -> None:
        cards = spool.cards()
        self._store_all(cards)
        spool.remove()
        # Recovered: what was counted as spooled, or a dead process's; stored: the rest.
        recovered = len(cards) if spool.adopted else min(spool.counted, len(cards))
        if recovered:
            self._count("recovered", recovered)
            log.info("%d spooled issued-card records written to the store", recovered)
        if len(cards) > recovered:
            self._count("stored", len(cards) - recovered)

    def _store_all(self, cards: list[IssuedCard]) -> None:
        """Into the store, BATCH rows per transaction."""
        for start in range(0, len(cards), BATCH):
            self._store().record_issued(cards[start : start + BATCH])

    def _new_spool(self) -> _Spool:
        self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = f"issued-{uuid.uuid4().hex}.jsonl"
        # Made and locked under a name no worker adopts, then renamed: under its own name an
        # unlocked new file could be taken (and removed) by another worker before the lock.
        hidden = self._directory / f".{name}.new"
        spool = _Spool.claim(hidden, create=True)
        if spool is None:  # a fresh uuid name, which no other process looks for
            raise OSError("spool file could not be locked")
        try:
            os.rename(hidden, self._directory / name)
        except BaseException:
            spool.remove()
            raise
        spool.path = self._directory / name
        return spool

    def _forget_parent(self) -> None:
        """After a fork the parent's files are not this process's to write or remove."""
        if self._pid not in (0, os.getpid()):
            self._active, self._draining, self._thread = None, [], None
        self._pid = os.getpid()

    def _start(self) -> None:
        """The writer thread of this process (after a fork, a new one)."""
        with self._lock:
            self._forget_parent()
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._run, name="issued-spool", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        delay: float | None = None  # None: no failure, sleep until records are spooled
        while True:
            if delay is None:
                self._wake.wait()
                time.sleep(FLUSH_SECONDS)  # the calls that follow join this write
            else:
                time.sleep(delay)  # the store failed: new records do not hasten the retry
            self._wake.clear()
            try:
                self.drain()
                delay = None
            except StoreClosed:
                # Shutting down: what is left stays on disk for the next process on the host.
                with self._lock:
                    self._thread = None
                return
            except Exception as exc:
                log.warning("issued-card spool not written yet (%s)", type(exc).__name__)
                delay = min((delay or FIRST_RETRY_SECONDS / 2) * 2, MAX_RETRY_SECONDS)

    def _orphans(self) -> list[_Spool]:
        if not self._directory.is_dir():
            return []
        held = {s.path for s in self._draining}
        found = []
        for path in sorted(self._directory.glob(SPOOL_GLOB)):
            if path not in held and (spool := _Spool.claim(path, create=False)) is not None:
                found.append(spool)
        return found
