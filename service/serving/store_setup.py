"""Start-up work on the store: say which one is used, and bring its schema up to date.

`serve` runs this once in the master before any worker starts; `flare-cds migrate` runs it alone,
for operators who migrate before rolling out new instances.
"""

from __future__ import annotations

import logging
import sys
from contextlib import closing
from typing import TextIO

from service.settings import Settings
from service.storage.errors import FeedbackStoreError
from service.storage.location import storage_location

log = logging.getLogger("flare_cds.server")


def prepare_store(settings: Settings) -> bool:
    """Log the store and migrate it. False only when it must not be used (a newer schema); an
    unreachable store is logged and left to the workers, which retry: cards never wait on it."""
    from service.logging_setup import configure_logging

    configure_logging(settings.logging.level)
    location = storage_location(settings.storage)
    # Worker processes share these, whatever folder they run in: relative paths were resolved
    # once, against the base `serve` hands down to them.
    log.info("store: %s", location.describe())
    log.info("issued-card spool: %s", settings.storage.spool_directory)
    try:
        version = migrate_store(settings)
    except FeedbackStoreError as exc:
        log.error("store refused: %s", exc)
        return False
    except Exception as exc:  # the server may be down: start anyway, /readyz tells the balancer
        log.warning("store not reachable at start-up (%s); workers will retry", type(exc).__name__)
        return True
    log.info("store schema version %d", version)
    return True


def migrate_store(settings: Settings) -> int:
    from service.storage.feedback import open_store

    with closing(open_store(settings.storage)) as store:
        return int(store.schema_version())


def run_migrate(settings: Settings, out: TextIO, err: TextIO | None = None) -> int:
    """`flare-cds migrate`: 0 when the schema is current, 1 when the store cannot be migrated."""
    err = sys.stderr if err is None else err
    where = storage_location(settings.storage).describe()
    try:
        version = migrate_store(settings)
    except Exception as exc:
        print(f"migrate: {where}: {type(exc).__name__}: {exc}", file=err)
        return 1
    print(f"{where}: schema version {version}", file=out)
    return 0
