"""The HTTP surface: discovery, hook calls and their error paths, health, the contract."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml

from tests.conftest import assert_conforms, load_fixture, post_hook

SERVICE_IDS = {
    "rituximab-flare-order-select": "order-select",
    "rituximab-flare-order-sign": "order-sign",
    "igm-flare-patient-view": "patient-view",
}


def test_discovery_lists_exactly_the_three_services(client: Any) -> None:
    response = client.get("/cds-services")
    assert response.status_code == 200
    body = response.get_json()
    assert_conforms(body, "ServiceDiscoveryResponse")
    assert {s["id"]: s["hook"] for s in body["services"]} == SERVICE_IDS
    for service in body["services"]:
        assert service["title"] and service["description"]


def test_prefetch_templates_use_only_cds_hooks_2_tokens(client: Any) -> None:
    services = client.get("/cds-services").get_json()["services"]
    for service in services:
        prefetch = service["prefetch"]
        assert {"patient", "conditions", "igm", "viscosity"} <= set(prefetch)
        assert "http://loinc.org|2472-9" in prefetch["igm"]
        assert "http://loinc.org|3128-6" in prefetch["viscosity"]
        for template in prefetch.values():
            tokens = {t.split("}}")[0] for t in template.split("{{")[1:]}
            assert tokens == {"context.patientId"}, template  # no date tokens in 2.0
    by_id = {s["id"]: s for s in services}
    patient_view = by_id["igm-flare-patient-view"]["prefetch"]
    # Referenced Medication resources come in the same Bundle, so coded medications are read.
    assert "&_include=MedicationRequest:medication" in patient_view["medicationRequests"]
    assert (
        "&_include=MedicationAdministration:medication" in patient_view["medicationAdministrations"]
    )


def test_configured_local_igm_codes_join_the_prefetch(tmp_path: Any) -> None:
    from service import create_app
    from tests.conftest import test_settings

    settings = test_settings(tmp_path, terminology={"igm_codes": ("http://lab.example.org|IGM",)})
    services = create_app(settings).test_client().get("/cds-services").get_json()["services"]
    assert "http://lab.example.org|IGM" in services[0]["prefetch"]["igm"]


def test_order_sign_high_igm_gives_a_warning(client: Any) -> None:
    response = post_hook(client, load_fixture("order-sign/wm-igm-4500-rituximab"))
    assert response.status_code == 200
    [card] = response.get_json()["cards"]
    assert card["indicator"] == "warning"


def test_no_anti_cd20_drug_gives_no_cards(client: Any) -> None:
    response = post_hook(client, load_fixture("order-sign/wm-no-anti-cd20-ordered"))
    assert response.status_code == 200
    assert response.get_json() == {"cards": []}


def test_unknown_service_is_404_json(client: Any) -> None:
    response = client.post("/cds-services/nope", json=load_fixture("order-sign/wm-no-igm"))
    assert response.status_code == 404
    body = response.get_json()
    assert body["error"] == "unknown_service"
    assert_conforms(body, "Error")
    assert client.post("/cds-services/nope/feedback", json={"feedback": []}).status_code == 404


def test_unknown_path_and_wrong_method_are_json(client: Any) -> None:
    missing = client.get("/nothing-here")
    assert missing.status_code == 404 and missing.get_json()["error"] == "not_found"
    wrong = client.get("/cds-services/rituximab-flare-order-sign")
    assert wrong.status_code == 405 and wrong.get_json()["error"] == "method_not_allowed"


def _error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["error"] == code, body
    assert_conforms(body, "Error")
    return body


def test_wrong_hook_for_the_service(client: Any) -> None:
    body = load_fixture("order-sign/wm-no-igm")
    response = client.post("/cds-services/igm-flare-patient-view", json=body)
    error = _error(response, 400, "wrong_hook")
    assert "patient-view" in error["message"] and "order-sign" in error["message"]


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        (("context", "patientId"), "'patientId' is a required property"),
        (("context", "draftOrders"), "'draftOrders' is a required property"),
        (("hookInstance",), "'hookInstance' is a required property"),
    ],
)
def test_missing_required_fields_are_named(
    client: Any, path: tuple[str, ...], problem: str
) -> None:
    body = copy.deepcopy(load_fixture("order-sign/wm-no-igm"))
    target = body
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    error = _error(post_hook(client, body), 400, "invalid_request")
    assert any(problem in d["problem"] for d in error["details"]), error


def test_order_select_needs_selections(client: Any) -> None:
    body = copy.deepcopy(load_fixture("order-select/wm-rituximab-selected"))
    del body["context"]["selections"]
    error = _error(post_hook(client, body), 400, "invalid_request")
    assert any("selections" in d["problem"] for d in error["details"])


def test_selection_not_among_draft_orders(client: Any) -> None:
    body = copy.deepcopy(load_fixture("order-select/wm-rituximab-selected"))
    body["context"]["selections"] = ["MedicationRequest/not-there"]
    error = _error(post_hook(client, body), 400, "invalid_fhir")
    assert "MedicationRequest/not-there" in error["message"]


def test_double_prefixed_patient_id_is_refused(client: Any) -> None:
    body = copy.deepcopy(load_fixture("order-sign/wm-no-igm"))
    body["context"]["patientId"] = "Patient/" + body["context"]["patientId"]
    error = _error(post_hook(client, body), 400, "invalid_request")
    assert "not 'Patient/123'" in error["message"]


def test_invalid_fhir_draft_order_names_the_entry(client: Any) -> None:
    body = copy.deepcopy(load_fixture("order-sign/wm-igm-4500-rituximab"))
    entries = body["context"]["draftOrders"]["entry"]
    index = next(i for i, e in enumerate(entries) if "rituximab" in json.dumps(e).lower())
    entries[index]["resource"]["subject"] = "Patient/x"  # read by the rules; must be a Reference
    error = _error(post_hook(client, body), 400, "invalid_fhir")
    assert error["details"][0]["location"] == f"context.draftOrders.entry[{index}]"
    assert "subject" in error["message"]


def test_a_flaw_in_a_field_the_rules_do_not_read_still_gets_the_warning(
    client: Any, caplog: Any
) -> None:
    body = copy.deepcopy(load_fixture("order-sign/wm-igm-4500-rituximab"))
    entries = body["context"]["draftOrders"]["entry"]
    index = next(i for i, e in enumerate(entries) if "rituximab" in json.dumps(e).lower())
    entries[index]["resource"]["dosageInstruction"] = "twice"  # must be a list of Dosage
    with caplog.at_level("WARNING", logger="service.api.hooks"):
        answer = post_hook(client, body)
    assert answer.status_code == 200
    assert [c["indicator"] for c in answer.get_json()["cards"]] == ["warning"]
    [logged] = [r for r in caplog.records if getattr(r, "event", "") == "fhir_deviation"]
    assert logged.path == f"context.draftOrders.entry[{index}].resource.dosageInstruction"
    assert "twice" not in logged.getMessage() + logged.problem


def test_a_draft_order_for_another_patient_is_refused(client: Any) -> None:
    body = copy.deepcopy(load_fixture("order-sign/wm-igm-4500-rituximab"))
    entries = body["context"]["draftOrders"]["entry"]
    index = next(i for i, e in enumerate(entries) if "rituximab" in json.dumps(e).lower())
    entries[index]["resource"]["subject"] = {"reference": "Patient/somebody-else"}
    error = _error(post_hook(client, body), 400, "invalid_fhir")
    assert error["details"][0]["location"] == f"context.draftOrders.entry[{index}]"
    assert "another patient" in error["message"]


def test_invalid_json_and_non_object_bodies(client: Any) -> None:
    url = "/cds-services/rituximab-flare-order-sign"
    bad = client.post(url, data='{"hook": ', content_type="application/json")
    assert "not valid JSON" in _error(bad, 400, "invalid_json")["message"]
    not_utf8 = client.post(url, data=b"\xff\xfe{", content_type="application/json")
    _error(not_utf8, 400, "invalid_json")
    array = client.post(url, data="[1, 2]", content_type="application/json")
    _error(array, 400, "invalid_request")


def test_wrong_content_type_is_415(client: Any) -> None:
    response = client.post(
        "/cds-services/rituximab-flare-order-sign", data="{}", content_type="text/plain"
    )
    _error(response, 415, "unsupported_media_type")


def test_over_large_body_is_413(tmp_path: Any) -> None:
    from service import create_app
    from tests.conftest import test_settings

    client = create_app(test_settings(tmp_path, http={"max_body_bytes": 1000})).test_client()
    body = load_fixture("order-sign/wm-igm-4500-rituximab")
    _error(post_hook(client, body), 413, "payload_too_large")


def test_prefetch_with_another_patients_data_is_refused(client: Any) -> None:
    body = copy.deepcopy(load_fixture("order-sign/wm-igm-4500-rituximab"))
    observation = body["prefetch"]["igm"]["entry"][0]["resource"]
    observation["subject"]["reference"] = "Patient/someone-else"
    error = _error(post_hook(client, body), 400, "invalid_prefetch")
    assert "another patient" in error["message"]


def test_missing_prefetch_without_fhir_server_is_412(client: Any) -> None:
    body = copy.deepcopy(load_fixture("order-sign/wm-igm-4500-rituximab"))
    del body["prefetch"]["igm"]
    error = _error(post_hook(client, body), 412, "prefetch_unavailable")
    assert [m["key"] for m in error["missing"]] == ["igm"]
    assert "no fhirServer" in error["missing"][0]["reason"]


def test_null_prefetch_means_no_data_not_no_risk(client: Any) -> None:
    body = copy.deepcopy(load_fixture("order-sign/wm-igm-4500-rituximab"))
    body["prefetch"]["igm"] = None
    [card] = post_hook(client, body).get_json()["cards"]
    assert card["source"]["topic"]["code"] == "igm-missing"


def test_healthz_and_openapi(client: Any) -> None:
    health = client.get("/healthz")
    assert health.status_code == 200
    assert_conforms(health.get_json(), "Health")
    spec = client.get("/openapi.yaml")
    assert spec.status_code == 200
    document = yaml.safe_load(spec.get_data(as_text=True))
    assert document["openapi"].startswith("3.1")
    assert "/cds-services/{id}/feedback" in document["paths"]


def test_every_card_from_every_fixture_conforms(client: Any) -> None:
    from tests.conftest import all_fixture_names

    for name in all_fixture_names():
        response = post_hook(client, load_fixture(name))
        assert response.status_code == 200, name
        answer = response.get_json()
        assert_conforms(answer, "CdsResponse")
        for card in answer["cards"]:
            assert card["uuid"] and len(card["summary"]) < 140
            if "suggestions" in card:
                assert card["selectionBehavior"] in {"at-most-one", "any"}
                for suggestion in card["suggestions"]:
                    for action in suggestion["actions"]:
                        assert not isinstance(action.get("resource"), str)


class _TrackedBody(dict):  # type: ignore[type-arg]
    """A parsed body that a weak reference can follow (a plain dict cannot have one)."""


@pytest.mark.parametrize("fixture", ["order-sign/wm-igm-4500-rituximab", "order-sign/wm-igm-3999"])
def test_the_parsed_body_lives_until_the_server_drops_the_sent_answer(
    client: Any, monkeypatch: pytest.MonkeyPatch, fixture: str
) -> None:
    """Freeing a whole prefetch costs 0.1-0.25 ms: it happens after the answer went out."""
    import gc
    import weakref

    from service.api import routes

    parsed: list[weakref.ref[_TrackedBody]] = []
    real = routes.read_json_body

    def tracked(*args: Any, **kwargs: Any) -> Any:
        body = _TrackedBody(real(*args, **kwargs))
        parsed.append(weakref.ref(body))
        return body

    monkeypatch.setattr(routes, "read_json_body", tracked)
    response = post_hook(client, load_fixture(fixture))
    assert response.status_code == 200
    [body] = parsed
    assert body() is not None  # the answer is not sent and closed yet
    response.close()
    del response
    gc.collect()
    assert body() is None
