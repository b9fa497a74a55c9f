"""The feedback store: idempotent, durable, shared by threads and processes, no raw patient ids."""

from __future__ import annotations

import hashlib
import hmac
import logging
import multiprocessing
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from service.settings import StorageSettings
from service.storage.feedback import (
    SCHEMA_VERSION,
    FeedbackResult,
    FeedbackStoreError,
    InvalidFeedback,
    IssuedCard,
    SqliteFeedbackStore,
    load_or_create_hash_key,
    open_store,
    patient_hash,
)

REPO = Path(__file__).resolve().parents[2]
SERVICE = "igm-flare-order-sign"
KEY = b"k" * 32
RAW_PATIENT_ID = "patient-mrn-7731045"
ISSUED_AT = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)
RECEIVED_AT = datetime(2025, 3, 1, 9, 45, tzinfo=UTC)


def issued(uuid: str, *, service_id: str = SERVICE, finding: str = "igm-high") -> IssuedCard:
    return IssuedCard(
        uuid=uuid,
        service_id=service_id,
        hook="order-select",
        hook_instance="d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        finding=finding,
        rule_version="1.0.0",
        indicator="warning",
        issued_at=ISSUED_AT,
        patient_hash=patient_hash(KEY, RAW_PATIENT_ID),
    )


def overridden(card: str, stamp: str = "2025-03-01T09:40:00Z", **reason: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"card": card, "outcome": "overridden", "outcomeTimestamp": stamp}
    if reason:
        item["overrideReason"] = reason
    return item


def accepted(card: str, *ids: str, stamp: str = "2025-03-01T09:40:00Z") -> dict[str, Any]:
    return {
        "card": card,
        "outcome": "accepted",
        "acceptedSuggestions": [{"id": i} for i in ids],
        "outcomeTimestamp": stamp,
    }


def feedback_rows(path: Path) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(path)) as connection:
        return connection.execute(
            "SELECT card_uuid, outcome, unknown_card FROM feedback ORDER BY id"
        ).fetchall()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "nested" / "feedback.sqlite3"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteFeedbackStore]:
    with closing(SqliteFeedbackStore(db_path)) as opened:
        yield opened


def test_file_parent_dirs_wal_and_schema_version_on_first_use(db_path: Path) -> None:
    with closing(open_store(StorageSettings(database=str(db_path)))) as opened:
        assert not db_path.exists()  # nothing touches the disk until the store is used
        opened.record_issued([issued("card-1")])
        assert opened.schema_version() == SCHEMA_VERSION == 1
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    with closing(sqlite3.connect(db_path)) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert connection.execute("PRAGMA user_version").fetchone() == (1,)
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master")}
    assert {"issued_cards", "feedback", "issued_cards_by_time", "feedback_by_received"} <= tables


def test_feedback_for_issued_card_is_stored_once(store: SqliteFeedbackStore, db_path: Path) -> None:
    store.record_issued([issued("card-1"), issued("card-2")])
    items = [overridden("card-1"), accepted("card-2", "s-1")]
    assert store.record_feedback(SERVICE, items, RECEIVED_AT) == FeedbackResult(2, 0, ())
    # The client re-sends everything, once more inside one request too.
    again = store.record_feedback(SERVICE, [*items, items[0]], RECEIVED_AT)
    assert again == FeedbackResult(0, 3, ())
    assert feedback_rows(db_path) == [("card-1", "overridden", 0), ("card-2", "accepted", 0)]


def test_same_feedback_in_another_spelling_is_a_duplicate(store: SqliteFeedbackStore) -> None:
    store.record_issued([issued("card-1")])
    first = accepted("card-1", "s-1", "s-2", stamp="2025-03-01T09:40:00Z")
    reordered = accepted("card-1", "s-2", "s-1", stamp="2025-03-01T10:40:00.000+01:00")
    assert store.record_feedback(SERVICE, [first], RECEIVED_AT).received == 1
    assert store.record_feedback(SERVICE, [reordered], RECEIVED_AT).duplicates == 1
    # A later action on the same card is new feedback, not a duplicate.
    later = overridden("card-1", stamp="2025-03-01T09:41:00Z")
    assert store.record_feedback(SERVICE, [later], RECEIVED_AT).received == 1


def test_unknown_card_and_card_of_another_service_are_stored_flagged(
    store: SqliteFeedbackStore, db_path: Path
) -> None:
    store.record_issued([issued("card-1", service_id="other-service")])
    result = store.record_feedback(
        SERVICE, [overridden("card-1"), overridden("never-issued"), accepted("card-1")], RECEIVED_AT
    )
    assert result == FeedbackResult(3, 0, ("card-1", "never-issued"))
    assert [flag for *_, flag in feedback_rows(db_path)] == [1, 1, 1]
    known = store.record_feedback("other-service", [overridden("card-1")], RECEIVED_AT)
    assert known == FeedbackResult(1, 0, ())


def test_override_reason_is_stored_and_the_comment_never_logged(
    store: SqliteFeedbackStore, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store.record_issued([issued("card-1")])
    comment = "Spoke with haematology, plasmapheresis booked"
    reason = {"system": "https://example.org/override", "code": "pex", "display": "Already on PEX"}
    with caplog.at_level(logging.DEBUG):
        store.record_feedback(
            SERVICE, [overridden("card-1", reason=reason, userComment=comment)], RECEIVED_AT
        )
    assert "1 new" in caplog.text
    assert comment not in caplog.text
    with closing(sqlite3.connect(db_path)) as connection:
        row = connection.execute(
            "SELECT reason_system, reason_code, reason_display, user_comment, outcome_timestamp,"
            " received_at FROM feedback"
        ).fetchone()
    assert row == (
        "https://example.org/override",
        "pex",
        "Already on PEX",
        comment,
        "2025-03-01T09:40:00Z",
        "2025-03-01T09:45:00.000000+00:00",
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"outcome": "overridden", "outcomeTimestamp": "2025-03-01T09:40:00Z"},
        {"card": "card-1", "outcome": "ignored", "outcomeTimestamp": "2025-03-01T09:40:00Z"},
        {"card": "card-1", "outcome": "overridden", "outcomeTimestamp": "yesterday"},
        {
            "card": "card-1",
            "outcome": "accepted",
            "outcomeTimestamp": "2025-03-01T09:40:00Z",
            "acceptedSuggestions": ["s-1"],
        },
        {
            "card": "card-1",
            "outcome": "overridden",
            "outcomeTimestamp": "2025-03-01T09:40:00Z",
            "overrideReason": "busy",
        },
    ],
)
def test_a_malformed_item_stores_nothing_from_its_request(
    store: SqliteFeedbackStore, db_path: Path, bad: dict[str, Any]
) -> None:
    store.record_issued([issued("card-1")])
    with pytest.raises(InvalidFeedback, match=r"feedback\[1\]"):
        store.record_feedback(SERVICE, [overridden("card-1"), bad], RECEIVED_AT)
    assert feedback_rows(db_path) == []


def test_naive_times_and_raw_patient_ids_are_refused(store: SqliteFeedbackStore) -> None:
    with pytest.raises(ValueError, match="time zone"):
        store.record_feedback(SERVICE, [overridden("card-1")], datetime(2025, 3, 1))
    with pytest.raises(ValueError, match="patient_hash"):
        store.record_issued([replace(issued("c"), patient_hash="Patient/1")])


def test_reopen_after_close_keeps_everything(db_path: Path) -> None:
    with closing(SqliteFeedbackStore(db_path)) as first:
        first.record_issued([issued("card-1")])
        first.record_feedback(SERVICE, [overridden("card-1")], RECEIVED_AT)
    with pytest.raises(FeedbackStoreError, match="closed"):
        first.record_feedback(SERVICE, [overridden("card-1")], RECEIVED_AT)
    with closing(SqliteFeedbackStore(db_path)) as second:
        assert second.record_feedback(SERVICE, [overridden("card-1")], RECEIVED_AT).duplicates == 1
        [row] = second.report()
    assert (row.cards_issued, row.overridden) == (1, 1)


def test_a_database_from_newer_code_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    with closing(sqlite3.connect(db_path)) as connection:
        connection.execute("PRAGMA user_version = 99")
    with closing(SqliteFeedbackStore(db_path)) as opened, pytest.raises(FeedbackStoreError):
        opened.record_issued([issued("card-1")])


def test_read_only_store_reads_but_never_writes(db_path: Path) -> None:
    with closing(SqliteFeedbackStore(db_path)) as writer:
        writer.record_issued([issued("card-1")])
    with closing(SqliteFeedbackStore(db_path, read_only=True)) as reader:
        assert [row.cards_issued for row in reader.report()] == [1]
        with pytest.raises(FeedbackStoreError, match="read-only"):
            reader.record_feedback(SERVICE, [overridden("card-1")], RECEIVED_AT)


def _items_for(worker: int, distinct: int) -> list[dict[str, Any]]:
    # Every worker sends the shared items and `distinct` items only it sends.
    shared = [overridden(f"card-{n}") for n in range(5)]
    own = [accepted(f"card-{n % 5}", f"w{worker}-s{n}") for n in range(distinct)]
    return shared + own


def _post_one_by_one(path: str, worker: int, distinct: int) -> tuple[int, int]:
    received = duplicates = 0
    with closing(SqliteFeedbackStore(path)) as opened:
        # Every worker records the same cards, so all of them race to create the file too.
        opened.record_issued([issued(f"card-{n}") for n in range(5)])
        for item in _items_for(worker, distinct):
            result = opened.record_feedback(SERVICE, [item], RECEIVED_AT)
            received, duplicates = received + result.received, duplicates + result.duplicates
    return received, duplicates


def _process_worker(path: str, worker: int, distinct: int, start: Any, results: Any) -> None:
    start.wait(timeout=60)
    try:
        # All workers also race to create the patient hash key, as gunicorn workers would.
        key = load_or_create_hash_key(StorageSettings(database=path)).hex()
        results.put((worker, _post_one_by_one(path, worker, distinct), key))
    except BaseException as exc:  # the parent asserts on it instead of waiting forever
        results.put((worker, repr(exc), None))


def test_threads_posting_at_once_store_each_item_once(db_path: Path) -> None:
    with closing(SqliteFeedbackStore(db_path)) as shared_store:
        shared_store.record_issued([issued(f"card-{n}") for n in range(5)])
        workers, distinct, totals, errors = 8, 10, [], []
        start = threading.Barrier(workers)

        def work(worker: int) -> None:
            start.wait()
            try:
                for item in _items_for(worker, distinct):
                    totals.append(shared_store.record_feedback(SERVICE, [item], RECEIVED_AT))
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert errors == []
    expected = 5 + workers * distinct
    assert sum(result.received for result in totals) == expected
    assert sum(result.duplicates for result in totals) == (workers - 1) * 5
    assert len(feedback_rows(db_path)) == expected


def test_processes_posting_at_once_store_each_item_once_and_share_one_key(
    db_path: Path,
) -> None:
    context = multiprocessing.get_context("spawn")
    workers, distinct = 6, 25
    start, results = context.Barrier(workers), context.Queue()
    processes = [
        context.Process(target=_process_worker, args=(str(db_path), n, distinct, start, results))
        for n in range(workers)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    failures = [outcome for outcome in outcomes if not isinstance(outcome[1], tuple)]
    assert failures == []  # no "database is locked", nothing else either
    expected = 5 + workers * distinct
    assert sum(received for _, (received, _), _ in outcomes) == expected
    assert sum(duplicates for _, (_, duplicates), _ in outcomes) == (workers - 1) * 5
    assert len(feedback_rows(db_path)) == expected
    assert len({key for *_, key in outcomes}) == 1  # every worker hashes with the same key


WRITE_THEN_DIE = """
    import os, signal
    from datetime import UTC, datetime
    from service.storage.feedback import SqliteFeedbackStore
    store = SqliteFeedbackStore({path!r})
    result = store.record_feedback(
        "svc", [{{"card": "c-%d" % n, "outcome": "overridden",
                  "outcomeTimestamp": "2025-03-01T09:40:00Z"}} for n in range(3)],
        datetime.now(UTC),
    )
    print("ok", result.received, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_feedback_survives_sigkill_right_after_it_was_recorded(db_path: Path) -> None:
    script = textwrap.dedent(WRITE_THEN_DIE).format(path=str(db_path))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == -9, done.stderr
    assert done.stdout.split() == ["ok", "3"]
    assert Path(f"{db_path}-wal").exists()  # the rows live in the WAL the dead process left
    assert [card for card, *_ in feedback_rows(db_path)] == ["c-0", "c-1", "c-2"]


def test_raw_patient_ids_never_reach_the_database_file(db_path: Path) -> None:
    with closing(SqliteFeedbackStore(db_path)) as opened:
        opened.record_issued([issued(f"card-{n}") for n in range(3)])
        opened.record_feedback(SERVICE, [overridden("card-1")], RECEIVED_AT)
        written = db_path.read_bytes() + Path(f"{db_path}-wal").read_bytes()
    written += db_path.read_bytes()  # closing moved the WAL into the main file
    assert patient_hash(KEY, RAW_PATIENT_ID).encode() in written
    assert RAW_PATIENT_ID.encode() not in written


def test_patient_hash_is_hmac_sha256_and_depends_on_the_key() -> None:
    digest = patient_hash(KEY, "Patient/123")
    assert digest == hmac.new(KEY, b"Patient/123", hashlib.sha256).hexdigest()
    assert digest != patient_hash(b"x" * 32, "Patient/123")
    # The keyed HMAC set up once is copied for each id: no id leaves anything in it.
    assert patient_hash(KEY, "456") == hmac.new(KEY, b"456", hashlib.sha256).hexdigest()
    assert patient_hash(KEY, "Patient/123") == digest
    with pytest.raises(ValueError):
        patient_hash(b"", "Patient/123")


def test_hash_key_from_settings_or_from_a_private_file(tmp_path: Path) -> None:
    database = str(tmp_path / "var" / "flare.sqlite3")
    configured = StorageSettings(database=database, patient_hash_key="from-the-vault")
    assert load_or_create_hash_key(configured) == b"from-the-vault"
    assert not Path(database + ".key").exists()

    generated = load_or_create_hash_key(StorageSettings(database=database))
    key_file = Path(database + ".key")
    assert len(generated) == 32
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert load_or_create_hash_key(StorageSettings(database=database)) == generated
    assert [p.name for p in key_file.parent.iterdir()] == [key_file.name]  # no temp file left

    key_file.write_text("not a key\n")
    with pytest.raises(FeedbackStoreError, match="damaged"):
        load_or_create_hash_key(StorageSettings(database=database))


def test_received_at_is_stored_in_utc(store: SqliteFeedbackStore, db_path: Path) -> None:
    paris_winter = datetime(2025, 3, 1, 11, 45, tzinfo=timezone(timedelta(hours=1)))
    store.record_feedback(SERVICE, [overridden("x")], paris_winter)
    with closing(sqlite3.connect(db_path)) as connection:
        assert connection.execute("SELECT received_at FROM feedback").fetchone() == (
            "2025-03-01T10:45:00.000000+00:00",
        )


def test_a_commit_that_fails_leaves_no_transaction_open(tmp_path: Path) -> None:
    from service.storage.feedback import _transaction

    # A deferred foreign key is checked at COMMIT, and SQLite keeps the transaction open when it
    # fails there: the same state a disk error at COMMIT leaves behind.
    with closing(sqlite3.connect(tmp_path / "t.sqlite3", isolation_level=None)) as connection:
        connection.executescript(
            """PRAGMA foreign_keys = ON;
               CREATE TABLE parent (id INTEGER PRIMARY KEY);
               CREATE TABLE child (
                   parent INTEGER REFERENCES parent DEFERRABLE INITIALLY DEFERRED);"""
        )
        with pytest.raises(sqlite3.IntegrityError), _transaction(connection, write=True):
            connection.execute("INSERT INTO child VALUES (1)")
        assert not connection.in_transaction
        with _transaction(connection, write=True):  # the thread's next request still works
            connection.execute("INSERT INTO parent VALUES (1)")
        assert connection.execute("SELECT COUNT(*) FROM child").fetchone() == (0,)
