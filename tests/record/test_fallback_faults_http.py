"""When prefetch is missing and the FHIR server cannot supply it: 412 with a contract `Error`.

Every fault goes through the HTTP endpoint against the real loopback `FhirTestServer`; each
answer is timed, because "never a hang" is part of the contract with an EHR waiting ~500 ms.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from service.record import fhir_client, fhir_http
from service.settings import FhirSettings
from tests.conftest import LiveServer, assert_conforms, load_fixture, post_hook
from tests.fhir_test_server import FhirTestServer
from tests.record.test_fallback_http import (
    RELAXED_FHIR,
    comparable,
    fetching,
    loaded_fhir_server,
    make_app,
    query_for,
    record_keys,
)

ORDER = "order-sign/wm-igm-4500-rituximab"
VIEW = "patient-view/flare-after-rituximab"
DEFAULT_DEADLINE = FhirSettings().deadline_seconds
# Room for the service's own work and a loaded CI machine; far below any hang.
MARGIN = 0.3
ORDER_KEYS = (
    "conditions",
    "igm",
    "viscosity",
    "medicationRequests",
    "medicationAdministrations",
    "procedures",
)


@pytest.fixture
def fhir() -> Iterator[FhirTestServer]:
    server = loaded_fhir_server()
    yield server
    server.stop()  # also wakes handlers still sleeping in an injected delay


@pytest.fixture
def foreign() -> Iterator[FhirTestServer]:
    server = loaded_fhir_server(host="127.0.0.2")
    yield server
    server.stop()


def warm_app(tmp_path: Path, **fhir: Any) -> Any:
    """An app that has answered once per hook kind, so timings exclude one-off lazy imports
    (the first order call loads the FHIR model classes, a few hundred ms)."""
    app = make_app(tmp_path, **fhir)
    client = app.test_client()
    for name in (ORDER, VIEW):
        assert post_hook(client, load_fixture(name)).status_code == 200
    return app


@pytest.fixture
def app(tmp_path: Path) -> Any:
    """The FHIR settings a deployment would run with (0.45 s deadline)."""
    return warm_app(tmp_path, **{k: getattr(FhirSettings(), k) for k in RELAXED_FHIR})


@pytest.fixture
def relaxed_app(tmp_path: Path) -> Any:
    """For a rule that fetches but is not about time: the relaxed deadline of the other HTTP
    tests, so a slow moment of the machine cannot time out a search the rule is not about."""
    return warm_app(tmp_path)


def timed_post(client: Any, body: dict[str, Any]) -> tuple[Any, float]:
    started = time.monotonic()
    response = post_hook(client, body)
    return response, time.monotonic() - started


def assert_412(
    app: Any, response: Any, body: dict[str, Any], reasons: dict[str, str]
) -> list[dict[str, str]]:
    """A contract `Error` naming exactly the `reasons` keys, each reason containing its text."""
    assert response.status_code == 412, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    error = response.get_json()
    assert_conforms(error, "Error")
    assert error["error"] == "prefetch_unavailable"
    missing = error["missing"]
    assert sorted(m["key"] for m in missing) == sorted(reasons)
    for item in missing:
        assert item["query"] == query_for(app, body, item["key"])
        assert reasons[item["key"]] in item["reason"], item
    return missing


# -- the FHIR server misbehaves ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fault", "value", "reasons"),
    [
        pytest.param(
            ORDER,
            "fail_status",
            {"Observation": 500},
            dict.fromkeys(("igm", "viscosity"), "FHIR server answered 500"),
            id="500",
        ),
        pytest.param(
            VIEW,
            "fail_status",
            {"MedicationAdministration": 503},
            {"medicationAdministrations": "FHIR server answered 503"},
            id="503-one-type",
        ),
        pytest.param(
            ORDER,
            "required_token",
            "some-other-token",
            dict.fromkeys(ORDER_KEYS, "FHIR server refused the access token (401)"),
            id="401",
        ),
        pytest.param(
            ORDER,
            "fail_status",
            {"Condition": 403},
            {"conditions": "FHIR server refused the access token (403)"},
            id="403",
        ),
        pytest.param(
            ORDER,
            "malformed",
            {"Condition"},
            {"conditions": "response is not JSON"},
            id="malformed-json",
        ),
        pytest.param(
            VIEW,
            "operation_outcome",
            {"MedicationRequest"},
            {"medicationRequests": "response is not a FHIR Bundle (OperationOutcome)"},
            id="search-answered-with-operation-outcome",
        ),
    ],
)
def test_fhir_server_faults_are_412(
    app: Any, fhir: FhirTestServer, name: str, fault: str, value: Any, reasons: dict[str, str]
) -> None:
    setattr(fhir, fault, value)
    body = fetching(load_fixture(name), fhir.base_url)
    response, elapsed = timed_post(app.test_client(), body)
    assert_412(app, response, body, reasons)
    assert elapsed < DEFAULT_DEADLINE + MARGIN
    assert len(fhir.requests) == len(record_keys(load_fixture(name)))  # every query was tried, once


@pytest.mark.parametrize(
    ("read_timeout", "reason"),
    [
        # The socket times out at 0.4 s, just before the deadline (or just after, on a busy box).
        (FhirSettings().read_timeout_seconds, "timed out "),
        (30.0, f"timed out after {DEFAULT_DEADLINE:g} s"),  # the deadline, not the socket, cuts
    ],
)
def test_slow_fhir_server_is_cut_off_at_the_deadline(
    tmp_path: Path, fhir: FhirTestServer, read_timeout: float, reason: str
) -> None:
    app = warm_app(tmp_path, deadline_seconds=DEFAULT_DEADLINE, read_timeout_seconds=read_timeout)
    fhir.delay_seconds = {"Observation": 3.0}
    body = fetching(load_fixture(ORDER), fhir.base_url)
    response, elapsed = timed_post(app.test_client(), body)
    assert_412(app, response, body, dict.fromkeys(("igm", "viscosity"), reason))
    assert DEFAULT_DEADLINE - 0.1 < elapsed < DEFAULT_DEADLINE + MARGIN


def test_slow_fhir_server_through_a_live_server(app: Any, fhir: FhirTestServer) -> None:
    fhir.delay_seconds = 3.0
    body = fetching(load_fixture(VIEW), fhir.base_url)
    with LiveServer(app) as live:
        started = time.monotonic()
        response = requests.post(
            f"{live.url}/cds-services/igm-flare-patient-view", json=body, timeout=5
        )
        elapsed = time.monotonic() - started
    assert response.status_code == 412
    error = response.json()
    assert_conforms(error, "Error")
    assert {m["key"] for m in error["missing"]} == set(record_keys(load_fixture(VIEW)))
    assert all(m["reason"].startswith("timed out") for m in error["missing"])
    assert elapsed < DEFAULT_DEADLINE + MARGIN


def test_next_link_to_another_origin_is_not_followed(
    relaxed_app: Any, fhir: FhirTestServer, foreign: FhirTestServer
) -> None:
    app = relaxed_app
    fhir.max_page_size = 1
    fhir.next_link_origin = foreign.origin  # same port and path, other address: another origin
    body = fetching(load_fixture(ORDER), fhir.base_url)
    response = post_hook(app.test_client(), body)
    # Only the searches with more than one match have a next page (3 IgM results).
    assert_412(app, response, body, {"igm": "next link to another origin not followed"})
    assert foreign.requests == []


# -- calls that must not reach any FHIR server ---------------------------------------------------


def _closed_port_url() -> str:
    with socket.socket() as probe:  # bound, never listening
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/fhir"


@pytest.mark.parametrize(
    ("allowed", "server", "reason"),
    [
        pytest.param(
            ("https://fhir.example.org/fhir",),
            "{fhir}",
            "fhirServer refused: fhirServer is not an allowed FHIR server",
            id="not-allow-listed",
        ),
        pytest.param(
            (),
            "http://169.254.169.254/fhir",
            "fhirServer refused: fhirServer is a link-local or cloud metadata address",
            id="metadata-no-allow-list",
        ),
        pytest.param(
            ("http://169.254.169.254/fhir",),
            "http://169.254.169.254/fhir",
            "fhirServer refused: fhirServer is a link-local or cloud metadata address",
            id="metadata-allow-listed",
        ),
        pytest.param(
            (),
            "http://[fe80::1]/fhir",
            "link-local or cloud metadata",
            id="ipv6-link-local",
        ),
        pytest.param((), None, "not in prefetch and no fhirServer", id="no-fhir-server"),
        pytest.param((), "closed-port", "could not connect to the FHIR server", id="unreachable"),
    ],
)
def test_refused_or_absent_fhir_server_is_412(
    tmp_path: Path,
    fhir: FhirTestServer,
    allowed: tuple[str, ...],
    server: str | None,
    reason: str,
) -> None:
    app = warm_app(tmp_path, allowed_servers=allowed)
    if server == "closed-port":
        server = _closed_port_url()
    elif server is not None:
        server = server.format(fhir=fhir.base_url)
    body = fetching(load_fixture(ORDER), server)
    response, elapsed = timed_post(app.test_client(), body)
    assert_412(app, response, body, dict.fromkeys(ORDER_KEYS, reason))
    assert elapsed < DEFAULT_DEADLINE + MARGIN
    assert fhir.requests == []


def test_unusable_prefetch_without_fhir_server_says_why(app: Any) -> None:
    body = load_fixture(ORDER)
    del body["prefetch"]["conditions"]
    body["prefetch"]["igm"] = {"resourceType": "OperationOutcome", "issue": []}
    body["prefetch"]["viscosity"]["link"].append(
        {"relation": "next", "url": "https://ehr.example.org/fhir/Observation?page=2"}
    )
    response = post_hook(app.test_client(), body)
    assert_412(
        app,
        response,
        body,
        {
            "conditions": "not in prefetch and no fhirServer to fetch it from",
            "igm": "prefetch query failed (OperationOutcome) and no fhirServer",
            "viscosity": "prefetch holds only one page and no fhirServer",
        },
    )


def test_allow_listed_server_is_used(tmp_path: Path, fhir: FhirTestServer) -> None:
    app = make_app(tmp_path, allowed_servers=(fhir.base_url,))
    client = app.test_client()
    prefetched = post_hook(client, load_fixture(ORDER)).get_json()["cards"]
    response = post_hook(client, fetching(load_fixture(ORDER), fhir.base_url + "/"))
    assert response.status_code == 200
    assert comparable(response.get_json()["cards"]) == comparable(prefetched)
    assert len(fhir.requests) == len(ORDER_KEYS)


def test_name_resolving_to_metadata_is_412(
    app: Any, fhir: FhirTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fhir_client, "_resolves_to_forbidden", lambda host, port: True)
    body = fetching(load_fixture(ORDER), f"http://localhost:{fhir.port}/fhir")
    response = post_hook(app.test_client(), body)
    reason = "fhirServer refused: fhirServer resolves to a link-local or cloud metadata address"
    assert_412(app, response, body, dict.fromkeys(ORDER_KEYS, reason))
    assert fhir.requests == []


def test_address_reached_is_checked_at_connect(
    app: Any, fhir: FhirTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: a name checked as safe but connected to a metadata address."""
    monkeypatch.setattr(fhir_http, "_peer_forbidden", lambda address: address == "127.0.0.1")
    body = fetching(load_fixture(ORDER), fhir.base_url)
    response = post_hook(app.test_client(), body)
    reason = "FHIR server address is link-local or metadata; not contacted"
    assert_412(app, response, body, dict.fromkeys(ORDER_KEYS, reason))
    assert fhir.requests == []


def test_slow_name_lookup_is_cut_off_at_the_deadline(
    app: Any, fhir: FhirTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """getaddrinfo has no timeout: a dead resolver must not hold the EHR past the deadline."""
    resolver_answers = threading.Event()

    def dead_resolver(host: str, port: int | None) -> bool:
        resolver_answers.wait(5.0)
        return False

    monkeypatch.setattr(fhir_client, "_resolves_to_forbidden", dead_resolver)
    body = fetching(load_fixture(ORDER), f"http://localhost:{fhir.port}/fhir")
    try:
        response, elapsed = timed_post(app.test_client(), body)
    finally:
        resolver_answers.set()
    reason = f"timed out after {DEFAULT_DEADLINE:g} s resolving the FHIR server name"
    assert_412(app, response, body, dict.fromkeys(ORDER_KEYS, reason))
    assert elapsed < DEFAULT_DEADLINE + MARGIN
    assert fhir.requests == []


# -- concurrency -------------------------------------------------------------------------------


def test_queries_run_concurrently(tmp_path: Path, fhir: FhirTestServer) -> None:
    app = warm_app(tmp_path, deadline_seconds=2.0, read_timeout_seconds=1.0)
    client = app.test_client()
    expected = comparable(post_hook(client, load_fixture(VIEW)).get_json()["cards"])
    delay = 0.3
    fhir.delay_seconds = delay
    body = fetching(load_fixture(VIEW), fhir.base_url)
    with LiveServer(app) as live:
        started = time.monotonic()
        response = requests.post(
            f"{live.url}/cds-services/igm-flare-patient-view", json=body, timeout=5
        )
        elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert comparable(response.json()["cards"]) == expected
    assert len(fhir.requests) == len(record_keys(load_fixture(VIEW))) == 6
    assert elapsed < delay * 2.5  # near the slowest query, far from the 1.8 s sum


# -- prefetch the service cannot use -----------------------------------------------------------


@pytest.mark.parametrize(
    ("igm", "location", "problem"),
    [
        ({"entry": {"resource": {}}}, "prefetch.igm.entry", "must be an array"),
        ({"entry": 7}, "prefetch.igm.entry", "must be an array"),
        ({"entry": ["x"]}, "prefetch.igm.entry[0]", "must be an object"),
        # Skipped, these would read as "no such result" and cost the card.
        ({"entry": [{"resource": "x"}]}, "prefetch.igm.entry[0].resource", "a FHIR resource"),
        ({"entry": [{"resource": []}]}, "prefetch.igm.entry[0].resource", "a FHIR resource"),
        (
            {"entry": [{"resource": {"id": "igm-1", "status": "final"}}]},
            "prefetch.igm.entry[0].resource.resourceType",
            "must name the resource's type",
        ),
        (
            {"entry": [{"resource": {"resourceType": 5}}]},
            "prefetch.igm.entry[0].resource.resourceType",
            "must name the resource's type",
        ),
        ({"link": 7}, "prefetch.igm.link", "must be an array"),
        ({"resourceType": "Observation"}, "prefetch.igm", "expected a FHIR Bundle"),
    ],
)
def test_malformed_prefetch_bundle_is_400_not_a_guess(
    app: Any, fhir: FhirTestServer, igm: dict[str, Any], location: str, problem: str
) -> None:
    """Read leniently, an `entry` object would be "no IgM on record": a wrong card, not an error."""
    body = fetching(load_fixture(ORDER), fhir.base_url, drop=())
    body["prefetch"]["igm"] = {"resourceType": "Bundle", "type": "searchset", **igm}
    response = post_hook(app.test_client(), body)
    assert response.status_code == 400, response.get_json()
    error = response.get_json()
    assert_conforms(error, "Error")
    assert error["error"] == "invalid_prefetch"
    assert error["details"][0]["location"] == location
    assert problem in error["details"][0]["problem"]
    assert fhir.requests == []


@pytest.mark.parametrize(
    ("patient", "problem"),
    [
        ({"resourceType": "Patient", "id": "someone-else"}, "Patient/someone-else is another"),
        ({"resourceType": "Bundle", "type": "searchset"}, "expected a FHIR Patient"),
    ],
)
def test_a_prefetched_patient_who_is_not_the_context_patient_is_400(
    app: Any, fhir: FhirTestServer, patient: Any, problem: str
) -> None:
    # No rule reads the Patient, but one for another patient means the prefetch was gathered
    # for the wrong chart: its results must not be judged as this patient's.
    body = fetching(load_fixture(ORDER), fhir.base_url, drop=())
    body["prefetch"]["patient"] = patient
    response = post_hook(app.test_client(), body)
    assert response.status_code == 400, response.get_json()
    error = response.get_json()
    assert_conforms(error, "Error")
    assert error["error"] == "invalid_prefetch"
    assert error["details"][0]["location"] == "prefetch.patient"
    assert problem in error["details"][0]["problem"]


@pytest.mark.parametrize(
    "patient",
    [
        None,
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]},
        {"resourceType": "Patient"},  # no id to compare
        {"resourceType": "Patient", "id": "wm-igm-4500", "name": [{"family": "Lindqvist"}]},
    ],
)
def test_a_prefetched_patient_that_is_absent_or_the_context_patient_is_answered(
    app: Any, fhir: FhirTestServer, patient: Any
) -> None:
    body = fetching(load_fixture(ORDER), fhir.base_url, drop=())
    body["prefetch"]["patient"] = patient
    response = post_hook(app.test_client(), body)
    assert response.status_code == 200, response.get_json()
    assert [c["indicator"] for c in response.get_json()["cards"]] == ["warning"]
    assert fhir.requests == []  # the Patient is never fetched: no rule needs it


def test_entries_without_a_resource_or_of_another_type_are_passed_over(
    app: Any, fhir: FhirTestServer
) -> None:
    # A search may include other resources (a Medication) or carry an entry with nothing in it:
    # neither is a result the rules could have read, so the call is answered as before.
    body = fetching(load_fixture(ORDER), fhir.base_url, drop=())
    body["prefetch"]["igm"]["entry"] += [
        {"fullUrl": "urn:uuid:0b5f4a52-3cf5-4d4e-8a3c-0d7e1c1c1c1c"},
        {"resource": {"resourceType": "Medication", "id": "m1"}, "search": {"mode": "include"}},
    ]
    response = post_hook(app.test_client(), body)
    assert response.status_code == 200, response.get_json()
    [card] = response.get_json()["cards"]
    assert card["indicator"] == "warning"
    assert fhir.requests == []


def test_prefetch_with_another_patients_observation_is_400(app: Any, fhir: FhirTestServer) -> None:
    body = fetching(load_fixture(ORDER), fhir.base_url, drop=())
    stray = load_fixture("order-sign/wm-igm-5600-very-high")["prefetch"]["igm"]["entry"][0]
    body["prefetch"]["igm"]["entry"].append(stray)
    response = post_hook(app.test_client(), body)
    assert response.status_code == 400
    error = response.get_json()
    assert_conforms(error, "Error")
    assert error["error"] == "invalid_prefetch"
    stray_id = stray["resource"]["id"]
    assert error["message"] == (
        f"prefetch.igm: Observation/{stray_id} is about another patient, not Patient/wm-igm-4500"
    )
    assert fhir.requests == []


def test_paginated_prefetch_with_another_patients_observation_is_400(
    app: Any, fhir: FhirTestServer
) -> None:
    """Refetching the query would hide the error, but the client sent wrong data: say so."""
    body = fetching(load_fixture(ORDER), fhir.base_url, drop=())
    igm = body["prefetch"]["igm"]
    igm["entry"][0]["resource"]["subject"] = {"reference": "Patient/someone-else"}
    igm["link"].append({"relation": "next", "url": f"{fhir.base_url}/Observation?page=2"})
    response = post_hook(app.test_client(), body)
    assert response.status_code == 400
    assert "about another patient" in response.get_json()["message"]
    assert fhir.requests == []


def test_fetched_bundle_with_another_patients_observation_is_412(
    relaxed_app: Any, fhir: FhirTestServer
) -> None:
    app = relaxed_app
    fhir.ignore_patient = {"Observation"}  # answers with every patient's results
    body = fetching(load_fixture(ORDER), fhir.base_url)
    response = post_hook(app.test_client(), body)
    missing = assert_412(
        app, response, body, dict.fromkeys(("igm", "viscosity"), "is about another patient")
    )
    assert all(m["reason"].endswith("not Patient/wm-igm-4500") for m in missing)
