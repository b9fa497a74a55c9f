"""The PostgreSQL store's schema: ordered migrations, recorded in `schema_migrations`.

The tables mirror the SQLite ones column for column (see `schema`), so one set of queries and one
contract suite serve both. Times are fixed-width UTC text, as in SQLite, compared in the "C"
collation: a database created with a language collation would otherwise order "2025-03-01T09"
by its own rules. Several instances start at once; an advisory lock lets one migrate at a time.
"""

from __future__ import annotations

import logging
from typing import Any

from service.storage.errors import FeedbackStoreError

log = logging.getLogger("service.storage.feedback")

# Any fixed number: the key of the advisory lock every migrating instance takes.
_MIGRATION_LOCK = 0x666C617265  # "flare"
_TEXT = 'TEXT COLLATE "C" NOT NULL'
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        f"""CREATE TABLE issued_cards (
            uuid {_TEXT} PRIMARY KEY, service_id {_TEXT}, hook {_TEXT}, hook_instance {_TEXT},
            finding {_TEXT}, rule_version {_TEXT}, indicator {_TEXT}, issued_at {_TEXT},
            patient_hash {_TEXT})""",
        "CREATE INDEX issued_cards_by_time ON issued_cards (issued_at)",
        "CREATE INDEX issued_cards_by_finding ON issued_cards (finding, rule_version)",
        f"""CREATE TABLE feedback (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            service_id {_TEXT}, card_uuid {_TEXT},
            outcome {_TEXT} CHECK (outcome IN ('accepted', 'overridden')),
            outcome_timestamp {_TEXT}, outcome_at {_TEXT},
            accepted_suggestions {_TEXT}, override_reason {_TEXT},
            reason_system TEXT, reason_code TEXT, reason_display TEXT, user_comment TEXT,
            unknown_card INTEGER NOT NULL CHECK (unknown_card IN (0, 1)),
            received_at {_TEXT})""",
        # The natural key, as in SQLite; the JSON columns by digest, because a B-tree entry has
        # a size limit that a long userComment inside override_reason would exceed.
        """CREATE UNIQUE INDEX feedback_natural_key ON feedback (
            service_id, card_uuid, outcome, outcome_at,
            md5(accepted_suggestions), md5(override_reason))""",
        "CREATE INDEX feedback_by_received ON feedback (received_at)",
        "CREATE INDEX feedback_by_card ON feedback (card_uuid, service_id)",
        # The replay cache: "iss|jti" keys; the primary key decides which instance saw one first.
        "CREATE TABLE seen_jti (key TEXT PRIMARY KEY, expires_at DOUBLE PRECISION NOT NULL)",
        "CREATE INDEX seen_jti_by_expiry ON seen_jti (expires_at)",
        # Secrets every instance must share, such as the patient-hash key.
        "CREATE TABLE store_secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


def current_version(connection: Any) -> int:
    """The schema version in the database; 0 when it was never migrated."""
    exists = connection.execute("SELECT to_regclass('schema_migrations')").fetchone()[0]
    if exists is None:
        return 0
    row = connection.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return int(row[0] or 0)


def check_version(connection: Any, where: str) -> int:
    version = current_version(connection)
    if version > SCHEMA_VERSION:
        raise FeedbackStoreError(
            f"{where} has schema version {version}; this code knows up to {SCHEMA_VERSION}"
        )
    return version


def migrate(connection: Any, where: str) -> int:
    """Apply the migrations the database lacks, in one transaction; return the version."""
    if check_version(connection, where) == SCHEMA_VERSION:
        return SCHEMA_VERSION
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        # Read again under the lock: another instance may have migrated meanwhile.
        version = check_version(connection, where)
        for number in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[number - 1]:
                connection.execute(statement)
            connection.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (number,))
            log.info("store %s migrated to schema version %d", where, number)
    return SCHEMA_VERSION
