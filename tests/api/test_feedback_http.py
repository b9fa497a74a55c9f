"""Feedback end to end: real hook calls issue cards, clinicians' feedback comes back over HTTP to
`flare-cds serve` (gunicorn, several workers), and the SQLite file is read to see what was kept.

The database is opened read-only from the test, as an auditor would: what counts is what is on
disk after the 200, not what the service says it did.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from service.cards.catalog import load_catalog
from tests.conftest import (
    SERVICE_FOR_HOOK,
    ServeProcess,
    as_of_today,
    assert_conforms,
    load_fixture,
    pid_alive,
)

SIGN = SERVICE_FOR_HOOK["order-sign"]
VIEW = SERVICE_FOR_HOOK["patient-view"]
DATABASE = "feedback.sqlite3"
STAMP = "2026-11-21T10:00:00Z"
TIMEOUT = 30
# Fixture -> the finding its card is about (fhir_fixtures/README.md), chosen to cover every hook
# service that issues cards and several findings.
CARD_FIXTURES = {
    "order-sign/wm-igm-4500-rituximab": "igm-high",
    "order-sign/wm-igm-3999": "igm-below-threshold",
    "order-sign/wm-no-igm": "igm-missing",
    "order-sign/wm-hyperviscosity-condition": "hyperviscosity",
    "patient-view/flare-with-hyperviscosity": "flare-hyperviscosity",
}
N_CONCURRENT = 40


# ---------------------------------------------------------------------------- helpers


def config_for(database: Path) -> str:
    # json.dumps gives a TOML basic string: quoted, with backslashes escaped.
    return f"[storage]\ndatabase = {json.dumps(str(database))}\n"


def database_of(server: ServeProcess) -> Path:
    return server.workdir / DATABASE


def start_server(workdir: Path, workers: int = 4) -> ServeProcess:
    return ServeProcess(config_for(workdir / DATABASE), workdir, workers).start()


def issue_card(server: ServeProcess, fixture: str) -> dict[str, Any]:
    """The one card a real hook call returns for `fixture`, its dates moved to today."""
    body = as_of_today(load_fixture(fixture))
    service = SERVICE_FOR_HOOK[body["hook"]]
    response = requests.post(f"{server.url}/cds-services/{service}", json=body, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    [card] = response.json()["cards"]
    return card


def overridden(card: str, stamp: str = STAMP, **reason: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"card": card, "outcome": "overridden", "outcomeTimestamp": stamp}
    if reason:
        item["overrideReason"] = reason
    return item


def accepted(card: str, suggestion_ids: Sequence[str], stamp: str = STAMP) -> dict[str, Any]:
    return {
        "card": card,
        "outcome": "accepted",
        "acceptedSuggestions": [{"id": s} for s in suggestion_ids],
        "outcomeTimestamp": stamp,
    }


def post_feedback(server: ServeProcess, service: str, body: Any) -> requests.Response:
    """POST a feedback body; every answer is checked against the contract on the way back."""
    response = requests.post(
        f"{server.url}/cds-services/{service}/feedback", json=body, timeout=TIMEOUT
    )
    if response.status_code == 200:
        assert_conforms(response.json(), "FeedbackResponse")
    else:
        assert 400 <= response.status_code < 500, response.text
        assert response.headers["Content-Type"].startswith("application/json")
        assert_conforms(response.json(), "Error")
    return response


def send(server: ServeProcess, *items: dict[str, Any], service: str = SIGN) -> dict[str, Any]:
    response = post_feedback(server, service, {"feedback": list(items)})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


@contextmanager
def read_only(database: Path) -> Iterator[sqlite3.Connection]:
    # mode=ro: the test must never be the one that creates, migrates or repairs the file.
    uri = f"file:{quote(str(database))}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True)) as connection:
        yield connection


def feedback_rows(database: Path, card: str) -> list[tuple[Any, ...]]:
    with read_only(database) as connection:
        return connection.execute(
            "SELECT outcome, outcome_timestamp, unknown_card FROM feedback WHERE card_uuid = ?",
            (card,),
        ).fetchall()


def assert_error(response: requests.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["error"] == code, body
    return body


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One 4-worker server for the tests that only add rows of their own cards."""
    started = start_server(tmp_path_factory.mktemp("feedback-server"))
    yield started
    started.stop()


# ---------------------------------------------------------------------------- concurrency


@pytest.mark.server
def test_concurrent_feedback_across_four_workers_is_all_stored_and_joined(
    serve_process: Any, tmp_path: Path
) -> None:
    server = serve_process(config_for(tmp_path / DATABASE), workers=4)
    fixtures = [list(CARD_FIXTURES)[n % len(CARD_FIXTURES)] for n in range(N_CONCURRENT)]
    # The hook calls run concurrently too: the workers record issued cards at the same time.
    with ThreadPoolExecutor(max_workers=16) as pool:
        cards = list(pool.map(lambda fixture: issue_card(server, fixture), fixtures))
    expected = {card["uuid"]: CARD_FIXTURES[f] for card, f in zip(cards, fixtures, strict=True)}
    assert len(expected) == N_CONCURRENT  # one fresh uuid per card

    comment = "Discussed with the patient in clinic 4471"
    items = [
        overridden(card["uuid"], reason=card["overrideReasons"][0], userComment=comment)
        if n % 2
        else accepted(card["uuid"], [s["uuid"] for s in card.get("suggestions", [])] or ["none"])
        for n, card in enumerate(cards)
    ]
    barrier = threading.Barrier(N_CONCURRENT)

    def post(item: dict[str, Any]) -> requests.Response:
        barrier.wait(timeout=TIMEOUT)  # all 40 requests leave together
        service = SIGN if expected[item["card"]] != "flare-hyperviscosity" else VIEW
        return post_feedback(server, service, {"feedback": [item]})

    with ThreadPoolExecutor(max_workers=N_CONCURRENT) as pool:
        responses = list(pool.map(post, items))

    assert [r.status_code for r in responses] == [200] * N_CONCURRENT
    assert [r.json() for r in responses] == [{"received": 1, "duplicates": 0}] * N_CONCURRENT
    catalog = load_catalog()
    with read_only(database_of(server)) as connection:
        assert connection.execute("SELECT COUNT(*) FROM feedback").fetchone() == (N_CONCURRENT,)
        joined = connection.execute(
            """SELECT f.card_uuid, f.service_id, f.unknown_card, c.service_id, c.finding,
                      c.rule_version
               FROM feedback AS f JOIN issued_cards AS c ON c.uuid = f.card_uuid"""
        ).fetchall()
    assert len(joined) == N_CONCURRENT
    for card_uuid, feedback_service, unknown, issued_service, finding, version in joined:
        assert finding == expected[card_uuid]
        assert version == catalog[finding].version
        assert (feedback_service, unknown) == (issued_service, 0)
    log = server.log()
    assert "database is locked" not in log
    assert "could not record issued cards" not in log
    assert "Traceback" not in log
    assert comment not in log  # clinician free text stays out of the logs


# ---------------------------------------------------------------------------- duplicates


@pytest.mark.server
def test_the_same_item_posted_twice_is_stored_once(server: ServeProcess) -> None:
    card = issue_card(server, "order-sign/wm-igm-4500-rituximab")
    first, second = (s["uuid"] for s in card["suggestions"])
    item = accepted(card["uuid"], [first, second])

    assert send(server, item) == {"received": 1, "duplicates": 0}
    assert send(server, item) == {"received": 0, "duplicates": 1}
    # The same decision written differently (suggestion order, offset, fraction) is still one.
    same = accepted(card["uuid"], [second, first], stamp="2026-11-21T11:00:00.000+01:00")
    assert send(server, same) == {"received": 0, "duplicates": 1}
    # Repeated inside one request: the second copy is the duplicate.
    later = accepted(card["uuid"], [first], stamp="2026-11-21T10:05:00Z")
    assert send(server, later, later) == {"received": 1, "duplicates": 1}
    assert sorted(feedback_rows(database_of(server), card["uuid"])) == [
        ("accepted", STAMP, 0),
        ("accepted", "2026-11-21T10:05:00Z", 0),
    ]


@pytest.mark.server
def test_the_same_new_item_posted_at_once_from_several_threads_is_stored_once(
    server: ServeProcess,
) -> None:
    card = issue_card(server, "order-sign/wm-hyperviscosity-condition")
    item = overridden(card["uuid"], reason=card["overrideReasons"][1])
    threads = 8
    barrier = threading.Barrier(threads)

    def post(_: int) -> dict[str, Any]:
        barrier.wait(timeout=TIMEOUT)
        return send(server, item)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        answers = list(pool.map(post, range(threads)))

    # Exactly one request stored it, whichever worker won; every other one was told "duplicate".
    assert sorted(a["received"] for a in answers) == [0] * (threads - 1) + [1]
    assert all(a["received"] + a["duplicates"] == 1 for a in answers)
    assert feedback_rows(database_of(server), card["uuid"]) == [("overridden", STAMP, 0)]


# ---------------------------------------------------------------------------- durability


@pytest.mark.server
def test_acknowledged_feedback_survives_sigkill_and_the_server_comes_back(
    serve_process: Any, tmp_path: Path
) -> None:
    config = config_for(tmp_path / DATABASE)
    server = serve_process(config, workers=4)
    cards = [issue_card(server, "order-sign/wm-igm-4500-rituximab") for _ in range(12)]
    items = [overridden(c["uuid"], reason=c["overrideReasons"][n % 4]) for n, c in enumerate(cards)]
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        answers = list(pool.map(lambda item: send(server, item), items))
    assert all(a == {"received": 1, "duplicates": 0} for a in answers)

    workers = server.worker_pids()
    assert len(workers) == 4
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    assert not [pid for pid in workers if pid_alive(pid)], "a worker outlived the crash"

    # Every acknowledged row is on disk with nothing running...
    database = database_of(server)
    for item in items:
        assert feedback_rows(database, item["card"]) == [("overridden", STAMP, 0)]

    # ...and a new server on the same file starts cleanly, knows the old rows and takes more.
    restarted = serve_process(config, workers=4)
    assert send(restarted, items[0]) == {"received": 0, "duplicates": 1}
    assert send(restarted, accepted(cards[0]["uuid"], ["s"], stamp="2026-11-21T10:01:00Z")) == {
        "received": 1,
        "duplicates": 0,
    }
    fresh = issue_card(restarted, "order-sign/wm-igm-3999")
    assert send(restarted, overridden(fresh["uuid"])) == {"received": 1, "duplicates": 0}
    with read_only(database) as connection:
        assert connection.execute("SELECT COUNT(*) FROM feedback").fetchone() == (14,)
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    after_restart = restarted.log()
    assert "Traceback" not in after_restart and "database is locked" not in after_restart


# ---------------------------------------------------------------------------- unknown cards


@pytest.mark.server
def test_feedback_sent_the_moment_its_card_arrives_finds_the_card(server: ServeProcess) -> None:
    """A card's record reaches the store a moment after the answer; feedback sent at once, to
    whichever of the four workers, still finds it (the workers' spools are written first)."""
    for _ in range(12):
        card = issue_card(server, "order-sign/wm-igm-4500-rituximab")
        assert send(server, overridden(card["uuid"])) == {"received": 1, "duplicates": 0}
        [(outcome, _, unknown)] = feedback_rows(database_of(server), card["uuid"])
        assert (outcome, unknown) == ("overridden", 0)


def test_feedback_on_a_card_never_issued_is_stored_and_flagged(server: ServeProcess) -> None:
    known = issue_card(server, "order-sign/wm-no-igm")
    ghost = str(uuid.uuid4())
    answer = send(server, overridden(known["uuid"]), overridden(ghost, userComment="not mine"))
    assert answer == {"received": 2, "duplicates": 0, "unknownCards": [ghost]}
    database = database_of(server)
    assert feedback_rows(database, ghost) == [("overridden", STAMP, 1)]
    assert feedback_rows(database, known["uuid"]) == [("overridden", STAMP, 0)]
    # Sent again it is a duplicate, and still named as unknown.
    again = send(server, overridden(ghost, userComment="not mine"))
    assert again == {"received": 0, "duplicates": 1, "unknownCards": [ghost]}
    # A card is known only to the service that issued it.
    elsewhere = send(server, overridden(known["uuid"]), service=VIEW)
    assert elsewhere == {"received": 1, "duplicates": 0, "unknownCards": [known["uuid"]]}


# ---------------------------------------------------------------------------- malformed bodies

GOOD_CARD = "0b6f5a52-93c1-4d8e-9a51-3c1f0e0f6d11"


def _item(**changes: Any) -> dict[str, Any]:
    item: dict[str, Any] = overridden(GOOD_CARD)
    item.update(changes)
    return {key: value for key, value in item.items() if value is not None}


@pytest.mark.server
@pytest.mark.parametrize(
    ("body", "location", "problem"),
    [
        pytest.param(
            {"feedback": [_item(card=None)]}, "feedback[0]", "'card' is a required", id="no-card"
        ),
        pytest.param(
            {"feedback": [_item(card="card-7")]}, "feedback[0].card", "uuid", id="card-not-uuid"
        ),
        pytest.param(
            {"feedback": [_item(outcome="maybe")]},
            "feedback[0].outcome",
            "'maybe' is not one of",
            id="outcome-maybe",
        ),
        pytest.param(
            {"feedback": [_item(outcomeTimestamp="yesterday")]},
            "feedback[0].outcomeTimestamp",
            "does not match",
            id="timestamp-words",
        ),
        # Shaped like a date-time, so the contract's pattern lets them through to the store.
        pytest.param(
            {"feedback": [overridden(GOOD_CARD), _item(outcomeTimestamp="2026-02-30T10:00:00Z")]},
            "feedback[1].outcomeTimestamp",
            "not a valid date-time",
            id="timestamp-30-february",
        ),
        pytest.param(
            {"feedback": [_item(outcomeTimestamp="2026-11-21T25:00:00Z")]},
            "feedback[0].outcomeTimestamp",
            "not a valid date-time",
            id="timestamp-hour-25",
        ),
        pytest.param(
            {"feedback": [_item(outcomeTimestamp="0001-01-01T00:00:00+01:00")]},
            "feedback[0].outcomeTimestamp",
            "not a valid date-time",
            id="timestamp-before-year-1-in-utc",
        ),
        pytest.param(
            {"feedback": [_item(outcomeTimestamp=None)]},
            "feedback[0]",
            "'outcomeTimestamp' is a required",
            id="no-timestamp",
        ),
        pytest.param(
            {"feedback": [_item(outcome="accepted")]},
            "feedback[0]",
            "'acceptedSuggestions' is a required",
            id="accepted-without-suggestions",
        ),
        pytest.param(
            {"feedback": _item()}, "feedback", "is not of type 'array'", id="feedback-object"
        ),
        pytest.param({"feedback": []}, "feedback", "should be non-empty", id="feedback-empty"),
        pytest.param({}, "(body)", "'feedback' is a required", id="no-feedback"),
        pytest.param([_item()], "(body)", "is not of type 'object'", id="body-array"),
    ],
)
def test_malformed_feedback_is_a_400_naming_the_problem(
    server: ServeProcess, body: Any, location: str, problem: str
) -> None:
    error = assert_error(post_feedback(server, SIGN, body), 400, "invalid_request")
    assert any(
        detail["location"] == location and problem in detail["problem"]
        for detail in error["details"]
    ), error
    # A request with one bad item stores none of its items.
    assert feedback_rows(database_of(server), GOOD_CARD) == []


@pytest.mark.server
def test_lower_case_t_and_z_are_rfc_3339_and_accepted(server: ServeProcess) -> None:
    card = issue_card(server, "order-sign/wm-igm-3999")
    answer = send(server, overridden(card["uuid"], stamp="2026-11-21t10:00:00z"))
    assert answer == {"received": 1, "duplicates": 0}
    assert send(server, overridden(card["uuid"]))["duplicates"] == 1  # the same instant


@pytest.mark.server
def test_not_json_unknown_service_and_wrong_media_type(server: ServeProcess) -> None:
    url = f"{server.url}/cds-services/{SIGN}/feedback"
    not_json = requests.post(
        url, data="{feedback", headers={"Content-Type": "application/json"}, timeout=TIMEOUT
    )
    assert_conforms(assert_error(not_json, 400, "invalid_json"), "Error")
    plain = requests.post(url, data="{}", headers={"Content-Type": "text/plain"}, timeout=TIMEOUT)
    assert_conforms(assert_error(plain, 415, "unsupported_media_type"), "Error")
    missing = post_feedback(server, "no-such-service", {"feedback": [_item()]})
    assert "no-such-service" in assert_error(missing, 404, "unknown_service")["message"]
    assert feedback_rows(database_of(server), GOOD_CARD) == []


# ---------------------------------------------------------------------------- patient privacy


@pytest.mark.server
@pytest.mark.parametrize(
    ("fixture", "patient_id"),
    [
        ("order-sign/wm-igm-4500-rituximab", "wm-igm-4500"),
        ("patient-view/flare-with-hyperviscosity", "flare-with-hyperviscosity"),
    ],
)
def test_issued_cards_are_recorded_with_a_keyed_hash_not_the_patient_id(
    serve_process: Any, tmp_path: Path, fixture: str, patient_id: str
) -> None:
    server = serve_process(config_for(tmp_path / DATABASE), workers=2)
    # A distinctive id, swapped in everywhere the fixture names the patient, so a stray copy
    # in any stored byte cannot be mistaken for something else.
    raw_id = "mrn-20771-qx"
    body = json.loads(json.dumps(as_of_today(load_fixture(fixture))).replace(patient_id, raw_id))
    assert body["context"]["patientId"] == raw_id
    response = requests.post(
        f"{server.url}/cds-services/{SERVICE_FOR_HOOK[body['hook']]}", json=body, timeout=TIMEOUT
    )
    assert response.status_code == 200, response.text
    [card] = response.json()["cards"]

    database = database_of(server)
    deadline = time.monotonic() + 10  # the record reaches the store a moment after the answer
    while True:
        with read_only(database) as connection:
            connection.row_factory = sqlite3.Row
            rows = connection.execute("SELECT * FROM issued_cards").fetchall()
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    [row] = rows
    finding = card["source"]["topic"]["code"]
    version = re.search(r"_Rule `([^`]+)` v([^_]+)\._", card["detail"])
    assert version is not None and version.group(1) == finding  # the card names its rule
    assert dict(row) | {"issued_at": None, "patient_hash": None} == {
        "uuid": card["uuid"],
        "service_id": SERVICE_FOR_HOOK[body["hook"]],
        "hook": body["hook"],
        "hook_instance": body["hookInstance"],
        "finding": finding,
        "rule_version": version.group(2),
        "indicator": card["indicator"],
        "issued_at": None,
        "patient_hash": None,
    }
    key = bytes.fromhex((tmp_path / f"{DATABASE}.key").read_text("ascii").strip())
    assert row["patient_hash"] == hmac.new(key, raw_id.encode(), hashlib.sha256).hexdigest()
    assert row["patient_hash"] != hashlib.sha256(raw_id.encode()).hexdigest()  # keyed, not plain

    # Neither the database nor its WAL and shared-memory files hold the raw id, in any form.
    stored = [p for p in tmp_path.iterdir() if p.name.startswith(DATABASE)]
    assert database in stored
    for path in stored:
        content = path.read_bytes()
        for form in (raw_id.encode("utf-8"), raw_id.encode("utf-16-le")):
            assert form not in content, path.name
