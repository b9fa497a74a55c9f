"""Prometheus metrics, counted in every worker process and read at /metrics summed over them.

`flare-cds serve` makes a fresh folder for prometheus-client's multi-process mode and names it
in PROMETHEUS_MULTIPROC_DIR before its workers start (`service.serving.server`): the client
reads the variable when first imported, so the master must not import this module before.
Without it (tests, `evaluate`) the counters are those of this one process.

Labels are fixed vocabularies from the code (service ids the service defines, finding ids,
outcomes, reasons): never a patient id, a request value, or anything else a client chooses.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

CALLS = Counter(
    "flare_cds_calls",
    "HTTP calls answered, by route, CDS service and status",
    ["route", "service", "status"],
)
ERRORS = Counter(
    "flare_cds_call_errors",
    "Calls answered with an error (status 400 and above), by route, service, status and error code",
    ["route", "service", "status", "error"],
)
LATENCY = Histogram(
    "flare_cds_call_duration_seconds",
    "Time from reading the request to the answer, by route and CDS service",
    ["route", "service"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0),
)
CARDS = Counter(
    "flare_cds_cards", "Cards returned, by finding and indicator", ["finding", "indicator"]
)
FHIR_QUERIES = Counter(
    "flare_cds_fhir_queries", "FHIR fallback queries (prefetch missing), by outcome", ["outcome"]
)
FHIR_DEVIATIONS = Counter(
    "flare_cds_fhir_deviations",
    "Departures from the FHIR model tolerated in draft orders, by service and element",
    ["service", "element"],
)
TOKEN_REJECTIONS = Counter(
    "flare_cds_token_rejections", "Client JWTs refused, by reason", ["reason"]
)
FEEDBACK = Counter(
    "flare_cds_feedback_items",
    "Feedback items stored, by outcome (duplicate: sent again)",
    ["outcome"],
)
ISSUED_RECORDS = Counter(
    "flare_cds_issued_card_records",
    "Issued-card records: stored from the spool, spooled (the store refused them; kept on "
    "local disk for retry), recovered (stored after a retry, or from a dead process's spool), "
    "or lost (the spool could not take them)",
    ["result"],
)
STORE_ERRORS = Counter(
    "flare_cds_store_errors", "Operations the store failed, by operation", ["operation"]
)

# Reasons are short literals from service.auth; anything else is folded, never echoed.
_REASON = re.compile(r"[a-z][a-z ]{0,47}")
_FHIR_OUTCOMES = {"not found": "not_found"}


def reason_label(reason: str) -> str:
    return reason if _REASON.fullmatch(reason) else "other"


def count_fhir_outcomes(errors: Iterable[str | None]) -> None:
    """One count per query: ok, timeout, not_found or error (from each outcome's error text)."""
    for error in errors:
        if error is None:
            outcome = "ok"
        elif error.startswith("timed out"):
            outcome = "timeout"
        else:
            outcome = _FHIR_OUTCOMES.get(error, "error")
        FHIR_QUERIES.labels(outcome).inc()


def count_issued(result: str, cards: int) -> None:
    ISSUED_RECORDS.labels(result).inc(cards)
    if result == "lost":
        STORE_ERRORS.labels("record_issued").inc()


def exposition() -> bytes:
    """The Prometheus text format: summed over every worker when serving multi-process."""
    if os.environ.get(MULTIPROC_ENV):
        registry: Any = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def worker_exited(pid: int) -> None:
    """gunicorn's child_exit: the dead worker's counts stay in the sum; its live gauges go."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)
