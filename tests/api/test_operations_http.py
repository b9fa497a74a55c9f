"""/metrics, /readyz and /healthz as an operator and a load balancer meet them, and what the
service does when the store cannot be reached: refuse unverifiable tokens, never cards."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service import create_app as _create_app
from service.settings import IssuerSettings
from tests.api.test_security_http import BASE, HOOK, ISS, auth_header, auth_settings, client_jwt
from tests.auth.test_tokens import EC_A, write_jwks
from tests.conftest import FIXTURE_NOW, free_port, load_fixture, test_settings

SCENARIO = "order-sign/wm-igm-4500-rituximab"
_APPS: list[Any] = []


def create_app(*args: Any, **kwargs: Any) -> Any:
    app = _create_app(*args, **kwargs)
    _APPS.append(app)
    return app


@pytest.fixture(autouse=True)
def _close_stores() -> Iterator[None]:
    # A pool for an unreachable server retries in the background until it is closed.
    yield
    while _APPS:
        store = _APPS.pop().extensions["flare_cds"]._store
        if store is not None:
            store.close()


def counter(client: Any, name: str, **labels: str) -> float:
    text = client.get("/metrics").get_data(as_text=True)
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def unreachable_postgres() -> str:
    # Nothing listens there: connections are refused at once, as with a stopped server.
    return f"postgresql://flare@127.0.0.1:{free_port()}/flare"


@pytest.fixture
def down_auth_client(tmp_path: Path) -> Any:
    issuer = IssuerSettings(ISS, jwks_file=write_jwks(tmp_path, EC_A))
    settings = auth_settings(
        tmp_path, issuer, storage={"url": unreachable_postgres(), "timeout_seconds": 0.3}
    )
    return create_app(settings, clock=lambda: FIXTURE_NOW).test_client()


def test_metrics_are_served_in_the_prometheus_format_to_loopback(client: Any) -> None:
    client.post(HOOK, json=load_fixture(SCENARIO))
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    names = {f.name for f in text_string_to_metric_families(response.get_data(as_text=True))}
    assert {
        "flare_cds_calls",
        "flare_cds_call_duration_seconds",
        "flare_cds_cards",
        "flare_cds_fhir_queries",
        "flare_cds_token_rejections",
        "flare_cds_feedback_items",
        "flare_cds_issued_card_records",
    } <= names


def test_metrics_refuse_other_hosts_by_default(client: Any) -> None:
    response = client.get("/metrics", environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert response.status_code == 403 and response.get_json()["error"] == "forbidden"
    mapped = client.get("/metrics", environ_base={"REMOTE_ADDR": "::ffff:127.0.0.1"})
    assert mapped.status_code == 200


def test_metrics_can_be_switched_off(tmp_path: Path) -> None:
    app = create_app(test_settings(tmp_path, metrics={"access": "off"}))
    response = app.test_client().get("/metrics")
    assert response.status_code == 404 and response.get_json()["error"] == "not_found"


def test_metrics_behind_a_bearer_token(tmp_path: Path) -> None:
    app = create_app(test_settings(tmp_path, metrics={"access": "token", "token": "s3cret-scrape"}))
    client = app.test_client()
    remote = {"REMOTE_ADDR": "10.1.2.3"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-scrape"}):
        refused = client.get("/metrics", headers=headers, environ_base=remote)
        assert refused.status_code == 401 and "WWW-Authenticate" in refused.headers
    good = {"Authorization": "Bearer s3cret-scrape"}
    assert client.get("/metrics", headers=good, environ_base=remote).status_code == 200


@pytest.mark.parametrize("path", ["/metrics", "/readyz", "/healthz"])
def test_operations_need_no_client_jwt_with_auth_required(tmp_path: Path, path: str) -> None:
    issuer = IssuerSettings(ISS, jwks_file=write_jwks(tmp_path, EC_A))
    client = create_app(auth_settings(tmp_path, issuer)).test_client()
    response = client.get(path)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert "WWW-Authenticate" not in response.headers


def test_readyz_is_200_with_the_store_and_catalog(client: Any) -> None:
    assert client.get("/readyz").get_json() == {"status": "ready"}


def test_readyz_is_503_with_a_reason_when_the_store_is_unreachable(down_auth_client: Any) -> None:
    response = down_auth_client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json() == {"status": "unavailable", "reasons": ["store unreachable"]}
    assert down_auth_client.get("/healthz").status_code == 200  # liveness is not readiness


def test_an_unverifiable_jti_is_refused_with_503_and_counted(down_auth_client: Any) -> None:
    before = counter(down_auth_client, "flare_cds_token_rejections_total",
                     reason="replay check unavailable")  # fmt: skip
    token = client_jwt(BASE + HOOK)
    response = down_auth_client.post(HOOK, json=load_fixture(SCENARIO), headers=auth_header(token))
    assert response.status_code == 503
    body = response.get_json()
    assert body["error"] == "store_unavailable" and "replay" in body["message"]
    assert response.headers["Retry-After"] == "5"
    after = counter(down_auth_client, "flare_cds_token_rejections_total",
                    reason="replay check unavailable")  # fmt: skip
    assert after == before + 1


def test_token_rejections_are_counted_by_reason(tmp_path: Path) -> None:
    issuer = IssuerSettings(ISS, jwks_file=write_jwks(tmp_path, EC_A))
    client = create_app(auth_settings(tmp_path, issuer), clock=lambda: FIXTURE_NOW).test_client()
    name = "flare_cds_token_rejections_total"
    before = counter(client, name, reason="token replayed")
    token = client_jwt(BASE + HOOK)
    assert (
        client.post(HOOK, json=load_fixture(SCENARIO), headers=auth_header(token)).status_code
        == 200
    )
    assert (
        client.post(HOOK, json=load_fixture(SCENARIO), headers=auth_header(token)).status_code
        == 401
    )
    assert counter(client, name, reason="token replayed") == before + 1


def test_cards_and_feedback_are_counted(client: Any) -> None:
    cards_before = counter(client, "flare_cds_cards_total", indicator="warning")
    [card] = client.post(HOOK, json=load_fixture(SCENARIO)).get_json()["cards"]
    assert counter(client, "flare_cds_cards_total", indicator="warning") == cards_before + 1
    item = {
        "card": card["uuid"],
        "outcome": "overridden",
        "outcomeTimestamp": "2025-03-01T09:00:00Z",
    }
    before = counter(client, "flare_cds_feedback_items_total", outcome="overridden")
    dup_before = counter(client, "flare_cds_feedback_items_total", outcome="duplicate")
    for _ in range(2):
        assert client.post(HOOK + "/feedback", json={"feedback": [item]}).status_code == 200
    assert counter(client, "flare_cds_feedback_items_total", outcome="overridden") == before + 2
    assert counter(client, "flare_cds_feedback_items_total", outcome="duplicate") == dup_before + 1


def test_a_warning_is_sent_while_the_store_is_down_and_its_record_spooled(tmp_path: Path) -> None:
    settings = test_settings(
        tmp_path,
        storage={
            "url": unreachable_postgres(),
            "timeout_seconds": 0.3,
            "patient_hash_key": "k" * 32,
            "spool_directory": str(tmp_path / "spool"),
        },
    )
    client = create_app(settings, clock=lambda: FIXTURE_NOW).test_client()
    before = counter(client, "flare_cds_issued_card_records_total", result="spooled")
    response = client.post(HOOK, json=load_fixture(SCENARIO))
    assert response.status_code == 200
    [card] = response.get_json()["cards"]
    assert card["indicator"] == "warning"
    [spool] = (tmp_path / "spool").glob("issued-*.jsonl")  # on disk before the answer
    assert card["uuid"] in spool.read_text()
    # The writer tries a moment later; the store refuses, so the record stays on disk.
    deadline = time.monotonic() + 10
    while counter(client, "flare_cds_issued_card_records_total", result="spooled") == before:
        assert time.monotonic() < deadline, "the writer never tried the store"
        time.sleep(0.05)
    assert counter(client, "flare_cds_issued_card_records_total", result="spooled") == before + 1
    assert spool.exists()
    text = spool.read_text()
    assert card["uuid"] in text
    assert load_fixture(SCENARIO)["context"]["patientId"] not in text  # only its keyed hash


def test_feedback_while_the_store_is_down_is_503_to_send_again(tmp_path: Path) -> None:
    settings = test_settings(
        tmp_path, storage={"url": unreachable_postgres(), "timeout_seconds": 0.3}
    )
    client = create_app(settings).test_client()
    item = {
        "card": "6f5d7a7e-6a3b-4a8f-9a55-8f4b1f2a9c11",
        "outcome": "overridden",
        "outcomeTimestamp": "2025-03-01T09:00:00Z",
    }
    response = client.post(HOOK + "/feedback", json={"feedback": [item]})
    assert response.status_code == 503
    assert response.get_json()["error"] == "store_unavailable"
    assert response.headers["Retry-After"] == "5"


def test_fhir_fallback_queries_are_counted_by_outcome(tmp_path: Path) -> None:
    from tests.record.test_fallback_http import RELAXED_FHIR, fetching, loaded_fhir_server

    client = create_app(
        test_settings(tmp_path, fhir=RELAXED_FHIR), clock=lambda: FIXTURE_NOW
    ).test_client()
    name = "flare_cds_fhir_queries_total"
    body = load_fixture(SCENARIO)
    fhir = loaded_fhir_server()
    try:
        ok_before = counter(client, name, outcome="ok")
        fetched = client.post(HOOK, json=fetching(body, fhir.base_url, drop=("igm",)))
        assert fetched.status_code == 200 and fetched.get_json()["cards"]
        assert counter(client, name, outcome="ok") == ok_before + 1
    finally:
        fhir.stop()
    # The same call once the FHIR server is gone: one query, failed, and the call says so.
    error_before = counter(client, name, outcome="error") + counter(client, name, outcome="timeout")
    failed = client.post(HOOK, json=fetching(body, fhir.base_url, drop=("igm",)))
    assert failed.status_code == 412
    after = counter(client, name, outcome="error") + counter(client, name, outcome="timeout")
    assert after == error_before + 1


def test_tolerated_fhir_deviations_are_counted_by_element_never_by_client_names(
    client: Any,
) -> None:
    import copy

    labels = {"service": "rituximab-flare-order-sign"}
    before = {
        e: counter(client, "flare_cds_fhir_deviations_total", element=e, **labels)
        for e in ("category", "reasonCode", "other")
    }
    body = copy.deepcopy(load_fixture("order-sign/sandbox-r4-rituximab"))
    body["context"]["draftOrders"]["entry"][0]["resource"]["madeUpPatientName"] = "Jane"
    assert client.post(HOOK.replace("order-select", "order-sign"), json=body).status_code == 200
    after = {
        e: counter(client, "flare_cds_fhir_deviations_total", element=e, **labels) for e in before
    }
    assert {e: after[e] - before[e] for e in before} == {
        "category": 1,
        "reasonCode": 1,
        "other": 1,
    }
    assert "madeUpPatientName" not in client.get("/metrics").get_data(as_text=True)
