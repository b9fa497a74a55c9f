"""The public sandbox's own request shapes against the real `flare-cds serve` on loopback."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import requests

from tests.conftest import assert_conforms, load_fixture
from tests.fixture_dates import as_of_today

pytestmark = pytest.mark.server

SIGN = "/cds-services/rituximab-flare-order-sign"
SELECT = "/cds-services/rituximab-flare-order-select"


def _post(server: Any, path: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{server.url}{path}", json=body, timeout=10)


def test_sandbox_orders_get_their_cards_and_deviations_are_logged(serve_process: Any) -> None:
    server = serve_process("")
    r4 = as_of_today(load_fixture("order-sign/sandbox-r4-rituximab"))
    answer = _post(server, SIGN, r4)
    assert answer.status_code == 200
    assert_conforms(answer.json(), "CdsResponse")
    [card] = answer.json()["cards"]
    assert card["indicator"] == "warning" and "4,500 mg/dL" in card["summary"]

    empty = as_of_today(load_fixture("order-select/sandbox-r4-empty-draft"))
    opened = _post(server, SELECT, empty)
    assert (opened.status_code, opened.json()) == (200, {"cards": []})

    for name in ("order-sign/sandbox-stu3-rituximab", "order-sign/sandbox-dstu2-rituximab"):
        [card] = _post(server, SIGN, as_of_today(load_fixture(name))).json()["cards"]
        assert card["indicator"] == "warning", name

    not_a_resource = copy.deepcopy(r4)
    not_a_resource["context"]["draftOrders"]["entry"].append({"resource": "MedicationRequest"})
    refused = _post(server, SIGN, not_a_resource)
    assert refused.status_code == 400
    assert refused.json()["details"][0]["location"] == "context.draftOrders.entry[1].resource"

    server.stop()
    logged = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    deviations = [e for e in logged if e.get("event") == "fhir_deviation"]
    assert sorted(e["path"] for e in deviations) == [
        "context.draftOrders.entry[0].resource.category",
        "context.draftOrders.entry[0].resource.reasonCode",
    ]
    patient = r4["context"]["patientId"]
    assert not [e for e in deviations if patient in json.dumps(e) or "community" in json.dumps(e)]


def _without_uuids(card: dict[str, Any]) -> dict[str, Any]:
    """The card with its and its suggestions' uuids blanked (the timeline link repeats one)."""
    text = json.dumps(card)
    for uuid in [card["uuid"], *(s["uuid"] for s in card.get("suggestions", []))]:
        text = text.replace(uuid, "")
    return json.loads(text)


def test_a_re_sent_order_gets_the_same_card_deviations_and_errors(serve_process: Any) -> None:
    # order-select comes again with every new selection, then order-sign with the same drafts:
    # a worker answers a re-sent order from what it found the first time, and must answer alike.
    server = serve_process("")
    select = as_of_today(load_fixture("order-select/sandbox-r4-rituximab-selected"))
    answers = [_post(server, SELECT, select) for _ in range(6)]
    assert {a.status_code for a in answers} == {200}
    cards = [_without_uuids(card) for a in answers for card in a.json()["cards"]]
    assert len(cards) == 6 and all(card == cards[0] for card in cards)
    assert cards[0]["indicator"] == "warning"

    broken = copy.deepcopy(select)
    broken["context"]["draftOrders"]["entry"][0]["resource"]["status"] = ["draft"]
    refusals = [_post(server, SELECT, broken) for _ in range(4)]
    assert {r.status_code for r in refusals} == {400}
    assert all(r.json()["details"] == refusals[0].json()["details"] for r in refusals)
    assert refusals[0].json()["details"][0]["location"] == "context.draftOrders.entry[0]"

    server.stop()
    logged = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    deviations = [e["path"] for e in logged if e.get("event") == "fhir_deviation"]
    per_call = sorted(set(deviations))
    assert per_call and sorted(deviations) == sorted(per_call * 6)  # each call logs its own


def test_null_fields_in_a_draft_order_never_cost_the_warning(serve_process: Any) -> None:
    # The sandbox shows a 400 as "All clear": a null where a field may be left out must read as
    # left out, in an order with no other flaw as in one with an unrelated deviation.
    server = serve_process("")
    for name in ("order-sign/wm-igm-4500-rituximab", "order-sign/sandbox-r4-rituximab"):
        for field in ("status", "intent", "subject", "medicationReference"):
            body = as_of_today(load_fixture(name))
            body["context"]["draftOrders"]["entry"][0]["resource"][field] = None
            answer = _post(server, SIGN, body)
            assert answer.status_code == 200, (name, field, answer.text)
            [card] = answer.json()["cards"]
            assert card["indicator"] == "warning", (name, field)
