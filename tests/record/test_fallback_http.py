"""Prefetch gaps filled from the client's FHIR server, through the HTTP endpoints.

The FHIR server is always the real loopback `FhirTestServer`, loaded with every fixture's
prefetch data, so "fetched" and "prefetched" must give the same cards for every scenario.
Failure paths (412s, deadline, concurrency) are in test_fhir_fallback_faults_http.py.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
import requests

from service import create_app
from service.clinical.record import RECORD_KEYS
from service.record.definitions import fill_template
from tests.conftest import (
    FIXTURE_NOW,
    FIXTURES,
    SERVICE_FOR_HOOK,
    LiveServer,
    all_fixture_names,
    load_fixture,
    post_hook,
    test_settings,
)
from tests.fhir_test_server import FhirTestServer

TOKEN = "fhir-access-token-9d2e61c4b7"
# Generous per-request limits so functional tests do not flake on a busy machine.
RELAXED_FHIR = {
    "connect_timeout_seconds": 1.0,
    "read_timeout_seconds": 2.0,
    "deadline_seconds": 3.0,
}
# Order scenarios with no anti-CD20 order: the service must not need any patient data.
NO_ANTI_CD20 = (
    "order-select/wm-rituximab-not-selected",
    "order-sign/wm-no-anti-cd20-ordered",
    "order-select/sandbox-r4-empty-draft",
)
PARTIAL_SCENARIOS = (
    "order-sign/wm-igm-4500-rituximab",
    "order-sign/wm-hyperviscosity-condition",
    "patient-view/flare-after-rituximab",
    "patient-view/btk-hold-rebound",
    "order-sign/wm-continuation-dose-4",
    "order-sign/wm-plasmapheresis-after-latest-igm",
    "patient-view/second-course-from-order",
)
FAILED_QUERY = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "timeout", "diagnostics": "query timed out"}],
}
EMPTY_SEARCHSET = {"resourceType": "Bundle", "type": "searchset", "total": 0}


# -- shared helpers (also used by test_fhir_fallback_faults_http.py) ---------------------------


def fhir_authorization(token: str = TOKEN) -> dict[str, Any]:
    return {
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/Patient.read patient/Observation.read patient/Condition.read",
        "subject": "flare-cds",
    }


def make_app(tmp_path: Path, **fhir: Any) -> Any:
    settings = test_settings(tmp_path, fhir={**RELAXED_FHIR, **fhir})
    return create_app(settings, clock=lambda: FIXTURE_NOW)


def loaded_fhir_server(host: str = "127.0.0.1") -> FhirTestServer:
    server = FhirTestServer(host=host).start()
    server.load_fixture_requests([FIXTURES])
    return server


def fetching(
    body: dict[str, Any],
    fhir_server: str | None,
    *,
    drop: tuple[str, ...] | None = None,
    token: str | None = TOKEN,
) -> dict[str, Any]:
    """A copy of `body` pointed at `fhir_server`, without the `drop` prefetch keys (all if None)."""
    body = copy.deepcopy(body)
    if drop is None:
        body.pop("prefetch", None)
    else:
        for key in drop:
            body["prefetch"].pop(key)
    if fhir_server is not None:
        body["fhirServer"] = fhir_server
        if token is not None:
            body["fhirAuthorization"] = fhir_authorization(token)
    return body


def comparable(cards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cards without their uuids, which are new on every call, and with the timeline link as its
    label and type: its appContext names the uuid, and its URL the address the call came to."""
    stripped = []
    for card in cards:
        card = {k: v for k, v in card.items() if k != "uuid"}
        if "suggestions" in card:
            card["suggestions"] = [
                {k: v for k, v in s.items() if k != "uuid"} for s in card["suggestions"]
            ]
        if "links" in card:
            card["links"] = [{k: link[k] for k in ("label", "type")} for link in card["links"]]
        stripped.append(card)
    return stripped


def query_for(app: Any, body: dict[str, Any], key: str) -> str:
    """The FHIR query the service's own prefetch template gives for `key` in this call."""
    definition = app.extensions["flare_cds"].definitions[SERVICE_FOR_HOOK[body["hook"]]]
    return fill_template(definition.prefetch[key], body["context"])


def as_sent(fhir: FhirTestServer, query: str) -> tuple[str, list[tuple[str, str]]]:
    path, _, params = query.partition("?")
    return f"{fhir.base_path}/{path}", sorted(parse_qsl(params, keep_blank_values=True))


def received(fhir: FhirTestServer) -> list[tuple[str, list[tuple[str, str]]]]:
    return sorted((r.path, sorted(r.args.items(multi=True))) for r in fhir.requests)


def record_keys(body: dict[str, Any]) -> list[str]:
    """The prefetch keys the service's rules read (the `patient` key is asked for but unused)."""
    return [key for key in body["prefetch"] if key in RECORD_KEYS]


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_app(tmp_path_factory.mktemp("fallback"))


@pytest.fixture(scope="module")
def client(app: Any) -> Any:
    return app.test_client()


@pytest.fixture
def fhir() -> Iterator[FhirTestServer]:
    server = loaded_fhir_server()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def prefetched(client: Any) -> dict[str, list[dict[str, Any]]]:
    """Cards for every fixture with its full prefetch and no FHIR server: the reference answer."""
    cards = {}
    for name in all_fixture_names():
        response = post_hook(client, load_fixture(name))
        assert response.status_code == 200, (name, response.get_json())
        cards[name] = comparable(response.get_json()["cards"])
    return cards


# -- equivalence -------------------------------------------------------------------------------


def test_fixtures_cover_every_hook() -> None:
    assert {name.split("/")[0] for name in all_fixture_names()} == set(SERVICE_FOR_HOOK)
    assert set(NO_ANTI_CD20) < set(all_fixture_names())


@pytest.mark.parametrize("name", all_fixture_names())
def test_no_prefetch_gives_the_same_cards(
    app: Any, client: Any, fhir: FhirTestServer, prefetched: dict[str, Any], name: str
) -> None:
    body = load_fixture(name)
    response = post_hook(client, fetching(body, fhir.base_url))
    assert response.status_code == 200, response.get_json()
    assert comparable(response.get_json()["cards"]) == prefetched[name]
    if name in NO_ANTI_CD20:
        assert fhir.requests == []  # no order to judge, so no patient data is needed
        return
    # One query per key the rules read, each with the client's token; nothing else.
    expected = sorted(as_sent(fhir, query_for(app, body, key)) for key in record_keys(body))
    assert received(fhir) == expected
    assert {r.authorization for r in fhir.requests} == {f"Bearer {TOKEN}"}
    assert {r.accept for r in fhir.requests} == {"application/fhir+json"}


def test_some_fixtures_give_cards(prefetched: dict[str, Any]) -> None:
    """Guards the equivalence test against comparing empty answers only."""
    with_cards = [name for name, cards in prefetched.items() if cards]
    assert len(with_cards) >= 30
    assert {name.split("/")[0] for name in with_cards} == set(SERVICE_FOR_HOOK)


@pytest.mark.parametrize(
    ("name", "key"),
    [(name, key) for name in PARTIAL_SCENARIOS for key in load_fixture(name)["prefetch"]],
)
def test_partial_prefetch_fetches_only_the_missing_key(
    app: Any, client: Any, fhir: FhirTestServer, prefetched: dict[str, Any], name: str, key: str
) -> None:
    body = load_fixture(name)
    response = post_hook(client, fetching(body, fhir.base_url, drop=(key,)))
    assert response.status_code == 200, response.get_json()
    assert comparable(response.get_json()["cards"]) == prefetched[name]
    expected = [as_sent(fhir, query_for(app, body, key))] if key in RECORD_KEYS else []
    assert received(fhir) == expected


@pytest.mark.parametrize(
    ("name", "key"), [(name, key) for name in PARTIAL_SCENARIOS for key in ("igm", "conditions")]
)
def test_operation_outcome_value_is_refetched(
    app: Any, client: Any, fhir: FhirTestServer, prefetched: dict[str, Any], name: str, key: str
) -> None:
    body = fetching(load_fixture(name), fhir.base_url, drop=())
    body["prefetch"][key] = FAILED_QUERY
    response = post_hook(client, body)
    assert response.status_code == 200, response.get_json()
    assert comparable(response.get_json()["cards"]) == prefetched[name]
    assert received(fhir) == [as_sent(fhir, query_for(app, body, key))]


@pytest.mark.parametrize(
    ("name", "null_key", "absent_key"),
    [
        ("order-sign/wm-igm-4500-rituximab", "viscosity", "igm"),
        ("order-sign/wm-igm-4500-rituximab", "igm", "conditions"),
        ("order-sign/wm-hyperviscosity-condition", "conditions", "viscosity"),
        ("patient-view/flare-after-rituximab", "medicationAdministrations", "igm"),
        ("patient-view/btk-hold-rebound", "medicationRequests", "viscosity"),
        ("order-sign/wm-plasmapheresis-after-latest-igm", "procedures", "igm"),
        ("order-sign/wm-continuation-dose-4", "medicationAdministrations", "conditions"),
    ],
)
def test_null_means_no_data_and_is_not_fetched(
    app: Any, client: Any, fhir: FhirTestServer, name: str, null_key: str, absent_key: str
) -> None:
    body = load_fixture(name)
    no_data = copy.deepcopy(body)  # what `null` means: the search found nothing
    no_data["prefetch"][null_key] = EMPTY_SEARCHSET
    expected = post_hook(client, no_data)
    assert expected.status_code == 200
    # A fetch is needed for `absent_key`, so the FHIR server is in play; `null_key` stays unasked.
    call = fetching(body, fhir.base_url, drop=(absent_key,))
    call["prefetch"][null_key] = None
    response = post_hook(client, call)
    assert response.status_code == 200, response.get_json()
    assert comparable(response.get_json()["cards"]) == comparable(expected.get_json()["cards"])
    assert received(fhir) == [as_sent(fhir, query_for(app, body, absent_key))]


def test_null_changes_the_answer(client: Any, prefetched: dict[str, Any]) -> None:
    """Null is taken at its word (no IgM on record), not quietly refetched or ignored."""
    body = load_fixture("order-sign/wm-igm-4500-rituximab")
    body["prefetch"]["igm"] = None
    response = post_hook(client, body)  # no fhirServer: nothing to fetch, nothing needed
    assert response.status_code == 200
    cards = response.get_json()["cards"]
    assert comparable(cards) != prefetched["order-sign/wm-igm-4500-rituximab"]
    assert "No usable serum IgM" in cards[0]["detail"]


# -- paging ------------------------------------------------------------------------------------


def test_paginated_prefetch_is_refetched_whole(
    app: Any, client: Any, fhir: FhirTestServer, prefetched: dict[str, Any]
) -> None:
    name = "order-sign/wm-igm-4500-rituximab"
    body = fetching(load_fixture(name), fhir.base_url, drop=())
    igm = body["prefetch"]["igm"]
    # Page one holds only the stale 3,900 mg/dL result; the recent 4,500 is on a later page.
    igm["entry"] = [e for e in igm["entry"] if e["resource"]["id"] == "igm-2026-08-14"]
    first_page_only = post_hook(client, body)
    assert first_page_only.status_code == 200
    assert comparable(first_page_only.get_json()["cards"]) != prefetched[name]
    fhir.clear_requests()

    query = query_for(app, body, "igm")
    igm["link"].append({"relation": "next", "url": f"{fhir.base_url}/{query}&_getpages=1"})
    response = post_hook(client, body)
    assert response.status_code == 200, response.get_json()
    assert comparable(response.get_json()["cards"]) == prefetched[name]
    # The whole query again, from the start: not the client's next link.
    assert received(fhir) == [as_sent(fhir, query)]


def test_fetched_pages_are_merged(
    app: Any, client: Any, fhir: FhirTestServer, prefetched: dict[str, Any]
) -> None:
    name = "patient-view/flare-after-rituximab"
    fhir.max_page_size = 1  # every search with more than one match is paged
    response = post_hook(client, fetching(load_fixture(name), fhir.base_url))
    assert response.status_code == 200, response.get_json()
    assert comparable(response.get_json()["cards"]) == prefetched[name]
    pages = [r for r in fhir.requests if r.args.get("_getpages")]
    assert len(pages) >= 4  # 4 IgM results and 4 infusions: the later pages were followed
    assert {r.authorization for r in fhir.requests} == {f"Bearer {TOKEN}"}


def test_300_conditions_over_many_pages(
    app: Any, client: Any, fhir: FhirTestServer, prefetched: dict[str, Any]
) -> None:
    """A long chart paged by a server that caps pages at 20 is read whole, not refused."""
    name = "order-sign/wm-300-conditions"
    body = load_fixture(name)
    assert body["prefetch"]["conditions"]["total"] == 300
    fhir.max_page_size = 20
    response = post_hook(client, fetching(body, fhir.base_url, drop=("conditions",)))
    assert response.status_code == 200, response.get_json()
    assert comparable(response.get_json()["cards"]) == prefetched[name]
    pages = [r for r in fhir.requests if r.path.endswith("/Condition")]
    assert len(pages) == 15  # the WM diagnosis is on the last one
    assert {r.args.get("_count") for r in pages} == {"500"}  # asked for one large page


def test_included_medication_is_read_from_the_fhir_server(
    app: Any, client: Any, fhir: FhirTestServer, prefetched: dict[str, Any]
) -> None:
    """A dose coded only on a referenced Medication counts when fetched (`_include`)."""
    name = "order-sign/wm-continuation-hyperviscosity"
    body = load_fixture(name)
    response = post_hook(client, fetching(body, fhir.base_url, drop=("medicationAdministrations",)))
    assert response.status_code == 200, response.get_json()
    assert comparable(response.get_json()["cards"]) == prefetched[name]
    assert "3 doses" in response.get_json()["cards"][0]["detail"]


# -- the access token --------------------------------------------------------------------------


def test_no_fhir_authorization_sends_no_token(
    client: Any, fhir: FhirTestServer, prefetched: dict[str, Any]
) -> None:
    name = "order-sign/wm-hyperviscosity-condition"
    response = post_hook(client, fetching(load_fixture(name), fhir.base_url, token=None))
    assert response.status_code == 200
    assert comparable(response.get_json()["cards"]) == prefetched[name]
    assert fhir.requests and {r.authorization for r in fhir.requests} == {None}


def test_token_reaches_the_fhir_server_and_nowhere_else(
    tmp_path: Path, fhir: FhirTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    settings = test_settings(tmp_path, fhir=RELAXED_FHIR, logging={"level": "DEBUG"})
    client = create_app(settings, clock=lambda: FIXTURE_NOW).test_client()
    caplog.set_level(logging.DEBUG)  # after create_app, which sets the root level itself
    body = load_fixture("patient-view/flare-after-rituximab")
    answers = []
    with FhirTestServer(host="127.0.0.2") as foreign:
        for fault, value in [
            (None, None),
            ("fail_status", {"Condition": 500, "MedicationRequest": 403}),
            ("required_token", "a-different-token"),
            ("malformed", {"MedicationAdministration"}),
            ("operation_outcome", {"Observation"}),
            ("next_link_origin", foreign.origin),
        ]:
            fhir.reset_faults()
            fhir.max_page_size = 1
            if fault:
                setattr(fhir, fault, value)
            answers.append(post_hook(client, fetching(body, fhir.base_url)))
        assert foreign.requests == []
    sent = fhir.requests
    assert sent and {r.authorization for r in sent} == {f"Bearer {TOKEN}"}
    fhir.clear_requests()
    for bad in (TOKEN + "\r\nX-Injected: 1", f"{TOKEN} {TOKEN}"):  # cannot be a header value
        answers.append(post_hook(client, fetching(body, fhir.base_url, token=bad)))
    assert fhir.requests == []
    assert [a.status_code for a in answers] == [200] + [412] * 7
    assert "bearer token" in answers[-1].get_json()["missing"][0]["reason"]
    for answer in answers:
        assert TOKEN not in answer.get_data(as_text=True)
        assert TOKEN not in str(answer.headers)
    assert caplog.records, "the fetch failures should have been logged"
    for record in caplog.records:
        assert TOKEN not in record.getMessage()
        assert TOKEN not in json.dumps(vars(record), default=str)  # structured extras too


# -- a real HTTP server in front -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["order-select/wm-rituximab-selected", "patient-view/flare-with-hyperviscosity"]
)
def test_live_server_without_prefetch(
    app: Any, fhir: FhirTestServer, prefetched: dict[str, Any], name: str
) -> None:
    body = load_fixture(name)
    with LiveServer(app) as live:
        response = requests.post(
            f"{live.url}/cds-services/{SERVICE_FOR_HOOK[body['hook']]}",
            json=fetching(body, fhir.base_url),
            timeout=10,
        )
    assert response.status_code == 200, response.text
    assert comparable(response.json()["cards"]) == prefetched[name]
    assert len(fhir.requests) == len(record_keys(body))
