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
