"""Everything one app instance needs, built once: contract, value sets, cards, and the clients.

Network and database clients are created lazily, inside the worker process that uses them:
thread pools and sockets do not survive gunicorn's fork.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from service.api.blocking import off_loop
from service.api.contract import Contract
from service.cards.builder import CardBuilder
from service.cards.catalog import load_catalog
from service.clinical.terminology import Terminology, build_terminology
from service.record.definitions import ServiceDefinition, build_definitions
from service.settings import Settings

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class Runtime:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock = utc_now,
        fetcher: Any = None,
        store: Any = None,
        verifier: Any = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.contract = Contract()
        self.contract.compile()
        # Like the schemas: built before the first call rather than during it.
        from service.clinical.orders import warm_up_models

        warm_up_models()
        self.terminology: Terminology = build_terminology(settings.terminology)
        self.definitions: dict[str, ServiceDefinition] = build_definitions(self.terminology)
        self.catalog = load_catalog(settings.cards.directory)
        self.builder = CardBuilder(self.catalog, settings.cards, settings.rules)
        # Re-entrant: building one client may need another (the verifier needs the store).
        self._lock = threading.RLock()
        self._fetcher = fetcher
        self._store = store
        self._verifier = verifier
        self._hash_key: bytes | None = None
        self._recorder: Any = None

    def _once(self, name: str, build: Callable[[], Any]) -> Any:
        """The attribute `name`, built on first use in this process (under the lock)."""
        with self._lock:
            if getattr(self, name) is None:
                setattr(self, name, build())
            return getattr(self, name)

    def fetcher(self) -> Any:
        def build() -> Any:
            from service.record.fhir_client import FhirFetcher

            return FhirFetcher(self.settings.fhir)

        return self._once("_fetcher", build)

    def store(self) -> Any:
        def build() -> Any:
            from service.storage.feedback import open_store

            return off_loop(open_store(self.settings.storage))

        return self._once("_store", build)

    def _on_postgresql(self) -> bool:
        from service.storage.location import POSTGRESQL, storage_location

        return storage_location(self.settings.storage).backend == POSTGRESQL

    def patient_hash_key(self) -> bytes:
        """The key for hashing patient ids in the feedback store, read once per process: the
        configured one, else the one kept in PostgreSQL or in the file beside the SQLite one."""

        def build() -> bytes:
            from service.storage.feedback import load_or_create_hash_key

            if not self.settings.storage.patient_hash_key and self._on_postgresql():
                return bytes(self.store().patient_hash_key())
            return load_or_create_hash_key(self.settings.storage)

        return self._once("_hash_key", build)

    def issued_recorder(self) -> Any:
        def build() -> Any:
            from pathlib import Path

            from service.metrics import count_issued
            from service.storage.issued_spool import IssuedCardRecorder

            spool = Path(self.settings.storage.spool_directory).absolute()
            return IssuedCardRecorder(self.store, spool, count_issued)

        return self._once("_recorder", build)

    def verifier(self) -> Any:
        def build() -> Any:
            from service.auth.tokens import TokenVerifier
            from service.storage.replay_cache import SqliteReplayCache

            if self._on_postgresql():  # one table for every instance: a nonce is used once
                return TokenVerifier(self.settings.auth, self.store())
            cache_path = _beside(self.settings.storage.database, "replay-cache.sqlite3")
            return TokenVerifier(self.settings.auth, off_loop(SqliteReplayCache(cache_path)))

        return self._once("_verifier", build)


def _beside(database: str, name: str) -> str:
    from pathlib import Path

    return str(Path(database).with_name(name))
