"""One contract for both stores: SQLite (one host) and PostgreSQL (many), so they cannot drift.

Every test runs against each back end, PostgreSQL being a real server started for the run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from service.settings import StorageSettings
from service.storage.feedback import (
    SCHEMA_VERSION,
    FeedbackStoreError,
    InvalidFeedback,
    load_or_create_hash_key,
    open_store,
)
from service.storage.replay_cache import SqliteReplayCache
from tests.storage.test_feedback import (
    ISSUED_AT,
    RECEIVED_AT,
    SERVICE,
    accepted,
    issued,
    overridden,
)


@dataclass
class Backend:
    name: str
    settings: StorageSettings

    def open(self, *, read_only: bool = False) -> Any:
        return open_store(self.settings, read_only=read_only)

    def replay_cache(self) -> Any:
        if self.name == "sqlite":
            return SqliteReplayCache(Path(self.settings.database).with_name("replay.sqlite3"))
        return self.open()

    def hash_key(self) -> bytes:
        if self.name == "sqlite":
            return load_or_create_hash_key(self.settings)
        with closing(self.open()) as store:
            return store.patient_hash_key()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
        settings = StorageSettings(url=url, database=str(tmp_path / "store.sqlite3"))
    else:
        settings = StorageSettings(url=request.getfixturevalue("postgres_url"))
    return Backend(request.param, settings)


@pytest.fixture
def store(backend: Backend) -> Iterator[Any]:
    with closing(backend.open()) as opened:
        yield opened


def test_a_new_store_is_migrated_to_the_current_schema_and_answers(store: Any) -> None:
    store.ping()
    assert store.schema_version() == SCHEMA_VERSION


def test_issued_cards_are_recorded_once_and_feedback_is_joined(store: Any) -> None:
    store.record_issued([issued("card-1"), issued("card-2", finding="viscosity-high")])
    store.record_issued([issued("card-1")])  # a retried record (the spool) changes nothing
    first = store.record_feedback(SERVICE, [overridden("card-1")], RECEIVED_AT)
    again = store.record_feedback(SERVICE, [overridden("card-1")], RECEIVED_AT)
    assert (first.received, first.duplicates, first.unknown_cards) == (1, 0, ())
    assert (again.received, again.duplicates) == (0, 1)
    rows = {row.finding: row for row in store.report()}
    assert rows["igm-high"].cards_issued == 1 and rows["igm-high"].overridden == 1
    assert rows["igm-high"].override_rate == 1.0
    assert rows["viscosity-high"].cards_issued == 1 and rows["viscosity-high"].override_rate is None


def test_the_same_feedback_spelt_otherwise_is_a_duplicate(store: Any) -> None:
    store.record_issued([issued("card-1")])
    store.record_feedback(
        SERVICE, [accepted("card-1", "a", "b", stamp="2025-03-01T10:40:00Z")], RECEIVED_AT
    )
    result = store.record_feedback(
        SERVICE, [accepted("card-1", "b", "a", stamp="2025-03-01T11:40:00+01:00")], RECEIVED_AT
    )
    assert (result.received, result.duplicates) == (0, 1)
    [row] = store.report()
    assert (row.accepted, row.suggestions_accepted) == (1, 2)


def test_unknown_cards_and_cards_of_another_service_are_kept_flagged(store: Any) -> None:
    store.record_issued([issued("card-1", service_id="another-service")])
    result = store.record_feedback(
        SERVICE, [overridden("card-1"), overridden("ghost")], RECEIVED_AT
    )
    assert result.received == 2 and result.unknown_cards == ("card-1", "ghost")
    rows = {row.finding: row for row in store.report()}
    assert rows["unknown-card"].overridden == 2


def test_latest_outcome_counts_and_reasons_rank_by_frequency(store: Any) -> None:
    store.record_issued([issued(f"card-{n}") for n in range(4)])
    reason = {"reason": {"code": "benefit", "display": "Benefit outweighs risk"}}
    other = {"reason": {"code": "plasma", "display": "Plasmapheresis planned"}}
    store.record_feedback(SERVICE, [overridden("card-0", **reason)], RECEIVED_AT)
    store.record_feedback(SERVICE, [overridden("card-1", **reason)], RECEIVED_AT)
    store.record_feedback(SERVICE, [overridden("card-2", **other)], RECEIVED_AT)
    # card-3 was overridden, then accepted later: its latest outcome counts.
    store.record_feedback(
        SERVICE, [overridden("card-3", stamp="2025-03-01T09:40:00Z")], RECEIVED_AT
    )
    store.record_feedback(SERVICE, [accepted("card-3", stamp="2025-03-01T09:50:00Z")], RECEIVED_AT)
    [row] = store.report()
    assert (row.cards_issued, row.accepted, row.overridden) == (4, 1, 3)
    assert row.top_override_reasons == [
        ("Benefit outweighs risk", 2),
        ("Plasmapheresis planned", 1),
    ]


def test_since_bounds_the_report_by_issue_time(store: Any) -> None:
    store.record_issued([issued("old")])
    later = issued("new")
    store.record_issued(
        [
            type(later)(
                **{**later.__dict__, "uuid": "new", "issued_at": ISSUED_AT + timedelta(days=2)}
            )
        ]
    )
    rows = store.report(ISSUED_AT + timedelta(days=1))
    assert [(row.finding, row.cards_issued) for row in rows] == [("igm-high", 1)]


def test_a_long_clinician_comment_is_stored(store: Any) -> None:
    # PostgreSQL indexes have an entry size limit; the natural key must not trip over it.
    comment = "Discussed with the patient at length. " * 400
    store.record_issued([issued("card-1")])
    item = overridden("card-1", userComment=comment, reason={"code": "other"})
    assert store.record_feedback(SERVICE, [item], RECEIVED_AT).received == 1
    assert store.record_feedback(SERVICE, [item], RECEIVED_AT).duplicates == 1


def test_a_malformed_item_stores_nothing_from_its_request(store: Any) -> None:
    store.record_issued([issued("card-1")])
    with pytest.raises(InvalidFeedback):
        store.record_feedback(
            SERVICE, [overridden("card-1"), {"card": "card-1", "outcome": "maybe"}], RECEIVED_AT
        )
    [row] = store.report()
    assert row.overridden == 0


def test_naive_times_and_raw_patient_ids_are_refused(store: Any) -> None:
    with pytest.raises(ValueError):
        store.record_issued(
            [type(issued("x"))(**{**issued("x").__dict__, "patient_hash": "mrn-1"})]
        )
    with pytest.raises(ValueError):
        store.record_feedback(SERVICE, [overridden("x")], datetime(2025, 3, 1, 9, 45))


def test_read_only_reads_but_never_writes(backend: Backend, store: Any) -> None:
    store.record_issued([issued("card-1")])
    with closing(backend.open(read_only=True)) as reader:
        assert [row.cards_issued for row in reader.report()] == [1]
        with pytest.raises(FeedbackStoreError):
            reader.record_issued([issued("card-2")])


def test_everything_survives_closing_and_reopening(backend: Backend, store: Any) -> None:
    store.record_issued([issued("card-1")])
    store.record_feedback(SERVICE, [overridden("card-1")], RECEIVED_AT)
    store.close()
    with closing(backend.open()) as reopened:
        [row] = reopened.report()
        assert (row.cards_issued, row.overridden) == (1, 1)


def test_threads_racing_on_one_item_store_it_once(store: Any) -> None:
    store.record_issued([issued("card-1")])
    barrier = threading.Barrier(8)
    results: list[int] = []

    def post() -> None:
        barrier.wait()
        results.append(store.record_feedback(SERVICE, [overridden("card-1")], RECEIVED_AT).received)

    threads = [threading.Thread(target=post) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [0] * 7 + [1]


def test_replay_cache_accepts_a_nonce_once_until_it_expires(backend: Backend) -> None:
    cache = backend.replay_cache()
    now = time.time()
    assert cache.remember("https://ehr.example|jti-1", now + 300) is True
    assert cache.remember("https://ehr.example|jti-1", now + 300) is False
    assert cache.remember("https://other.example|jti-1", now + 300) is True  # per issuer
    assert cache.remember("https://ehr.example|jti-old", now - 1) is True
    assert cache.remember("https://ehr.example|jti-old", now + 300) is True  # it had expired


def test_racing_threads_accept_a_nonce_exactly_once(backend: Backend) -> None:
    caches = [backend.replay_cache() for _ in range(2)]  # two "instances"
    barrier = threading.Barrier(16)
    fresh: list[bool] = []

    def check(index: int) -> None:
        barrier.wait()
        fresh.append(caches[index % 2].remember("iss|raced", time.time() + 300))

    threads = [threading.Thread(target=check, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fresh.count(True) == 1


def test_the_patient_hash_key_is_made_once_and_shared(backend: Backend) -> None:
    first, second = backend.hash_key(), backend.hash_key()
    assert first == second and len(first) == 32


def test_a_store_from_newer_code_is_refused(backend: Backend, store: Any) -> None:
    store.record_issued([issued("card-1")])
    store.close()
    if backend.name == "sqlite":
        import sqlite3

        with closing(sqlite3.connect(backend.settings.database)) as connection:
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    else:
        import psycopg

        with psycopg.connect(backend.settings.url or "", autocommit=True) as connection:
            connection.execute(
                "INSERT INTO schema_migrations (version) VALUES (%s)", (SCHEMA_VERSION + 1,)
            )
    with (
        closing(backend.open()) as newer,
        pytest.raises(FeedbackStoreError, match="schema version"),
    ):
        newer.report()


def test_received_and_issued_times_compare_as_instants(store: Any) -> None:
    # Offsets differ in the input; the store keeps UTC, so the bound compares instants.
    store.record_issued([issued("card-1")])
    since = datetime(2025, 3, 1, 10, 30, tzinfo=UTC) - timedelta(hours=1, minutes=1)
    assert [row.cards_issued for row in store.report(since)] == [1]
    assert store.report(datetime(2025, 3, 1, 9, 31, tzinfo=UTC)) == []


def _app_state(backend: Backend, clock: Any) -> Any:
    from service.app.views import _state_store
    from service.storage.app_state import SqliteAppStateStore

    store = _state_store(backend.settings)
    if isinstance(store, SqliteAppStateStore):
        return SqliteAppStateStore(
            Path(backend.settings.database).with_name("app.sqlite3"), clock=clock
        )
    store._clock = clock
    return store


def test_timeline_state_is_shared_taken_once_and_expires(backend: Backend) -> None:
    now = [1_000_000.0]
    first, second = _app_state(backend, lambda: now[0]), _app_state(backend, lambda: now[0])
    first.put("launch-1", b"\x00sealed", now[0] + 60)
    assert second.get("launch-1") == b"\x00sealed"  # another worker or instance sees it
    first.put("launch-1", b"newer", now[0] + 60)
    assert second.take("launch-1") == b"newer"
    assert first.take("launch-1") is None  # a launch state is used once
    first.put("session", b"s", now[0] + 10)
    now[0] += 11
    assert second.get("session") is None and second.take("session") is None
    first.put("gone", b"g", now[0] + 10)
    second.delete("gone")
    assert first.get("gone") is None
