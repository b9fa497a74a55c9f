"""Every order-hook scenario in fhir_fixtures/ through the HTTP endpoint.

Each row says what a clinician should see: the indicator, the finding, the data the card must
show (so it can be checked), and which suggestions it offers.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.conftest import (
    all_fixture_names,
    check_scenario,
    load_fixture,
    post_hook,
)

# scenario -> (indicator or None for no card, finding, strings the detail must show, suggestions)
# A high-IgM card with no serum viscosity in its window also offers the viscosity order ("labs").
EXPECTED: dict[str, tuple[str | None, str, tuple[str, ...], tuple[str, ...]]] = {
    "order-sign/wm-igm-4500-rituximab": (
        "warning",
        "igm-high",
        ("4,500", "2026-11-15", "Observation/"),
        ("plasmapheresis", "delete"),
    ),
    "order-sign/wm-igm-exactly-4000": (
        "warning",
        "igm-high",
        ("4,000",),
        ("plasmapheresis", "delete", "labs"),
    ),
    "order-sign/wm-igm-3999": ("info", "igm-below-threshold", ("3,999",), ()),
    "order-sign/wm-igm-5600-very-high": (
        "warning",
        "igm-high",
        ("5,600", "at or above 5,000"),
        ("plasmapheresis", "delete"),
    ),
    "order-sign/wm-igm-45-g-per-l": (
        "warning",
        "igm-high",
        ("45 g/L", "4,500"),
        ("plasmapheresis", "delete", "labs"),
    ),
    "order-sign/wm-igm-4200-mg-per-l": (
        "warning",
        "igm-high",
        ("42000 mg/L", "4,200"),
        ("plasmapheresis", "delete", "labs"),
    ),
    "order-sign/wm-igm-4-1-g-per-dl": (
        "warning",
        "igm-high",
        ("4.1 g/dL", "4,100"),
        ("plasmapheresis", "delete", "labs"),
    ),
    "order-sign/wm-igm-unusable-unit": (
        "warning",
        "igm-missing",
        ("umol/L", "cannot be converted", "4,300"),
        ("labs",),
    ),
    "order-sign/wm-no-igm": (
        "warning",
        "igm-missing",
        ("No usable serum IgM is on record",),
        ("labs",),
    ),
    "order-sign/wm-igm-stale-45-days": (
        "warning",
        "igm-missing",
        ("3,000", "2026-10-06", "older than 30 days"),
        ("labs",),
    ),
    "order-sign/wm-igm-exactly-30-days": (
        "warning",
        "igm-high",
        ("4,100", "2026-10-21"),
        ("plasmapheresis", "delete", "labs"),
    ),
    "order-sign/wm-hyperviscosity-condition": (
        "critical",
        "hyperviscosity",
        ("R70.1", "Condition/", "6,000"),
        ("plasmapheresis", "delete"),
    ),
    "order-sign/wm-viscosity-4-0-cp": (
        "critical",
        "hyperviscosity",
        ("| Serum viscosity | 4.0 cP |", "3,500"),
        ("plasmapheresis", "delete"),
    ),
    "order-sign/wm-viscosity-3-9-cp": (
        "info",
        "igm-below-threshold",
        ("| Serum viscosity | 3.9 cP |", "3,500"),
        (),
    ),
    "order-sign/wm-entered-in-error-igm": ("info", "igm-below-threshold", ("2,500",), ()),
    "order-sign/wm-out-of-order-bundle": (
        "info",
        "igm-below-threshold",
        ("2,800", "2026-11-13"),
        (),
    ),
    "order-sign/wm-truxima-biosimilar": (
        "warning",
        "igm-high",
        ("rituximab-abbs (Truxima)", "RxNorm 2105824"),
        ("plasmapheresis", "delete", "labs"),
    ),
    "order-sign/wm-rituxan-hycela-sc": (
        "warning",
        "igm-high",
        ("Rituxan Hycela", "RxNorm 1927890"),
        ("plasmapheresis", "delete", "labs"),
    ),
    "order-sign/wm-contained-medication": (
        "warning",
        "igm-high",
        ("RxNorm 226754",),
        ("plasmapheresis", "delete", "labs"),
    ),
    "order-sign/wm-medication-reference-in-bundle": (
        "warning",
        "igm-high",
        ("rituximab-pvvr (Ruxience)",),
        ("plasmapheresis", "delete", "labs"),
    ),
    "order-sign/wm-text-only-order": (
        "warning",
        "igm-high",
        ('name "Rituximab',),
        ("plasmapheresis", "delete", "labs"),
    ),
    "order-sign/wm-obinutuzumab": (
        "warning",
        "igm-high",
        ("obinutuzumab", "4,600"),
        ("plasmapheresis", "delete", "labs"),
    ),
    "order-sign/ra-rituximab-normal-igm": (None, "", (), ()),
    "order-sign/wm-no-anti-cd20-ordered": (None, "", (), ()),
    "order-sign/igm-paraprotein-no-diagnosis": (
        "warning",
        "igm-high",
        ("4,800",),
        ("plasmapheresis", "delete", "labs"),
    ),
    "order-sign/wm-stu3-medicationrequest": (
        "warning",
        "igm-high",
        ("FHIR STU3",),
        ("plasmapheresis", "delete", "labs"),
    ),
    "order-sign/wm-dstu2-medicationorder": (
        "warning",
        "igm-high",
        ("FHIR DSTU2", "MedicationOrder/"),
        ("plasmapheresis", "delete", "labs"),
    ),
    "order-sign/wm-r5-codeablereference": (
        "warning",
        "igm-high",
        ("FHIR R5",),
        ("plasmapheresis", "delete", "labs"),
    ),
    # -- decisions 6-10: the course of treatment ------------------------------------------
    "order-sign/wm-continuation-dose-4": (
        "warning",
        "course-continuation",
        (
            "continues a course of anti-CD20 therapy that began on 2026-10-30",
            "3 doses",
            "MedicationAdministration/rituximab-admin-2026-11-13",
            "4,300",
        ),
        ("labs",),
    ),
    "order-sign/wm-continuation-hyperviscosity": (
        "critical",
        "continuation-hyperviscosity",
        # The last dose names its antibody only in a Medication's ingredient.
        ("4.4 cP", "plasmapheresis before this dose", "3 doses", "rituximab-admin-2026-11-13"),
        ("plasmapheresis", "labs"),
    ),
    "order-sign/wm-last-dose-180-days-ago": (
        "warning",
        "course-continuation",
        ("2026-05-24", "4 doses"),
        ("labs",),
    ),
    "order-sign/wm-last-dose-181-days-ago": (
        "warning",
        "igm-high",
        ("4,500",),
        ("plasmapheresis", "delete"),
    ),
    "order-sign/wm-course-inferred-from-order": (
        "warning",
        "igm-high",
        ("inferred from the order", "MedicationRequest/rituximab-course-2026-10", "2026-10-21"),
        ("plasmapheresis", "delete"),
    ),
    "order-sign/wm-not-done-administrations": (
        "warning",
        "igm-high",
        ("| Not a dose: rituximab | not-done |", "MedicationAdministration/rituximab-admin"),
        ("plasmapheresis", "delete"),
    ),
    "order-sign/wm-entered-in-error-administrations": (
        "warning",
        "igm-high",
        ("| Not a dose: rituximab | entered-in-error |",),
        ("plasmapheresis", "delete"),
    ),
    "order-sign/wm-cancelled-order-history": (
        "warning",
        "igm-high",
        ("4,500",),
        ("plasmapheresis", "delete"),
    ),
    "order-sign/wm-stopping-draft": (None, "", (), ()),
    "order-sign/wm-on-hold-draft": (None, "", (), ()),
    "order-sign/wm-plasmapheresis-drafted": (
        "warning",
        "igm-high",
        ("already among the orders being signed", "ServiceRequest/plasmapheresis-before-c1"),
        ("delete",),
    ),
    "order-sign/wm-plasmapheresis-after-latest-igm": (
        "warning",
        "post-exchange-igm",
        ("Procedure/plasma-exchange-2026-11-18", "2026-11-15", "no\nlonger describes"),
        ("labs",),
    ),
    "order-sign/wm-plasmapheresis-before-latest-igm": (
        "warning",
        "igm-high",
        ("| Plasma exchange | completed |", "2026-11-10", "4,500"),
        ("plasmapheresis", "delete"),
    ),
    "order-sign/wm-in-remission": (
        "info",
        "igm-below-threshold",
        ("3,100", "Condition/wm-in-remission-wm"),
        (),
    ),
    "order-sign/igm-mgus-above-reference": ("info", "igm-below-threshold", ("900",), ()),
    "order-sign/igm-mgus-normal-igm": (None, "", (), ()),
    "order-sign/indication-on-order": ("info", "igm-below-threshold", ("3,100",), ()),
    "order-sign/past-high-igm-no-diagnosis": ("info", "igm-below-threshold", ("3,200",), ()),
    "order-sign/wm-hyperviscosity-text-only": (
        "critical",
        "hyperviscosity",
        ("Hyperviscosity syndrome", "Condition/wm-hyperviscosity-text-only-hvs"),
        ("plasmapheresis", "delete"),
    ),
    "order-sign/wm-headache-very-high-igm": (
        "critical",
        "hyperviscosity-symptoms",
        (
            "Possible symptomatic hyperviscosity: check serum viscosity and the fundi",
            "Headache, unspecified (R51.9)",
            "5,800",
        ),
        ("labs", "plasmapheresis"),
    ),
    "order-sign/wm-igm-below-4000-bound": ("info", "igm-below-threshold", ("<4000 mg/dL",), ()),
    "order-sign/wm-igm-above-4000-bound": (
        "warning",
        "igm-high",
        (">4000 mg/dL",),
        ("plasmapheresis", "delete"),
    ),
    "order-sign/wm-igm-bound-straddles": (
        "warning",
        "igm-missing",
        (">3000 mg/dL", "cannot tell whether it reaches 4,000"),
        ("labs",),
    ),
    "order-sign/wm-igm-negative": (
        "warning",
        "igm-missing",
        ("-5 mg/dL", "negative value"),
        ("labs",),
    ),
    "order-sign/wm-igm-future-dated": (
        "warning",
        "igm-high",
        ("4,400", "2026-11-10"),
        ("plasmapheresis", "delete"),
    ),
    "order-sign/wm-igm-same-instant": (
        "warning",
        "igm-high",
        ("Observation/igm-2026-11-16-b", "same time, lower risk (not used) | 2500 mg/dL"),
        ("plasmapheresis", "delete"),
    ),
    "order-sign/wm-viscosity-below-4-bound": ("info", "igm-below-threshold", ("<4.0 cP",), ()),
    "order-sign/wm-ocrelizumab": (
        "warning",
        "igm-high",
        ('name "Ocrelizumab 600 mg IV infusion"',),
        ("plasmapheresis", "delete"),
    ),
    "order-sign/wm-ublituximab": (
        "warning",
        "igm-high",
        ("Order: ublituximab", 'name "ublituximab-xiiy'),
        ("plasmapheresis", "delete"),
    ),
    "order-sign/wm-ofatumumab": (
        "warning",
        "igm-high",
        ("RxNorm 712566 (code not verified)",),
        ("plasmapheresis", "delete"),
    ),
    "order-sign/wm-riabni-biosimilar": (
        "warning",
        "igm-high",
        ("rituximab-arrx (Riabni)", "RxNorm 2472325"),
        ("plasmapheresis", "delete"),
    ),
    "order-sign/wm-medication-ingredient-only": (
        "warning",
        "igm-high",
        ("recognised by RxNorm 121191",),
        ("plasmapheresis", "delete"),
    ),
    "order-sign/wm-300-conditions": (
        "warning",
        "igm-high",
        ("Condition/wm-300-conditions-wm",),
        ("plasmapheresis", "delete"),
    ),
    "order-select/wm-rituximab-selected": (
        "warning",
        "igm-high",
        ("4,500",),
        ("plasmapheresis", "delete", "labs"),
    ),
    "order-select/wm-rituximab-not-selected": (None, "", (), ()),
    # The public CDS Hooks sandbox's own request shapes (see fhir_fixtures/README.md).
    "order-sign/sandbox-r4-rituximab": (
        "warning",
        "igm-high",
        ("4,500", "RxNorm 121191", "MedicationRequest/request-123"),
        ("plasmapheresis", "delete"),
    ),
    "order-select/sandbox-r4-rituximab-selected": (
        "warning",
        "igm-high",
        ("4,500", "MedicationRequest/request-123"),
        ("plasmapheresis", "delete"),
    ),
    "order-select/sandbox-r4-empty-draft": (None, "", (), ()),
    "order-sign/sandbox-stu3-rituximab": (
        "warning",
        "igm-high",
        ("4,500", "FHIR STU3"),
        ("plasmapheresis", "delete"),
    ),
    "order-sign/sandbox-dstu2-rituximab": (
        "warning",
        "igm-high",
        ("4,500", "FHIR DSTU2", "MedicationOrder/order-123"),
        ("plasmapheresis", "delete"),
    ),
}


def test_every_order_fixture_has_an_expectation() -> None:
    names = all_fixture_names("order-sign") + all_fixture_names("order-select")
    assert sorted(EXPECTED) == sorted(names)
    assert len(names) >= 20


def _suggestion_kinds(card: dict[str, Any]) -> tuple[str, ...]:
    kinds = []
    for suggestion in card.get("suggestions", []):
        actions = suggestion["actions"]
        if actions[0]["type"] == "delete":
            kinds.append("delete")
        elif actions[0]["resource"]["code"]["coding"][0]["code"] == "36514":
            kinds.append("plasmapheresis")
        else:
            kinds.append("labs")
    return tuple(kinds)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_scenario(client: Any, name: str) -> None:
    indicator, finding, shown, suggestions = EXPECTED[name]
    body = load_fixture(name)
    card = check_scenario(client, body, indicator, finding, shown)
    if card is None:
        return
    assert _suggestion_kinds(card) == suggestions
    patient = body["context"]["patientId"]
    for suggestion in card.get("suggestions", []):
        for action in suggestion["actions"]:
            if action["type"] == "create":
                assert action["resource"]["subject"] == {"reference": f"Patient/{patient}"}
            else:
                order_ids = {
                    f"{e['resource']['resourceType']}/{e['resource']['id']}"
                    for e in body["context"]["draftOrders"]["entry"]
                }
                assert action["resourceId"] in order_ids


def test_summary_names_drug_and_value(client: Any) -> None:
    card = post_hook(client, load_fixture("order-sign/wm-igm-4500-rituximab")).get_json()["cards"][
        0
    ]
    assert "rituximab" in card["summary"] and "4,500 mg/dL" in card["summary"]


def test_critical_card_recommends_plasmapheresis(client: Any) -> None:
    card = post_hook(client, load_fixture("order-sign/wm-viscosity-4-0-cp")).get_json()["cards"][0]
    apheresis = card["suggestions"][0]
    assert apheresis["isRecommended"] is True
    resource = apheresis["actions"][0]["resource"]
    codes = {(c["system"], c["code"]) for c in resource["code"]["coding"]}
    assert ("http://www.ama-assn.org/go/cpt", "36514") in codes
    assert ("http://snomed.info/sct", "127788007") in codes
    assert resource["priority"] == "urgent"


def test_missing_igm_suggests_igm_and_viscosity(client: Any) -> None:
    card = post_hook(client, load_fixture("order-sign/wm-no-igm")).get_json()["cards"][0]
    [labs] = card["suggestions"]
    loinc = [a["resource"]["code"]["coding"][0]["code"] for a in labs["actions"]]
    assert loinc == ["2472-9", "3128-6"]
    assert labs["isRecommended"] is True


def test_high_igm_offers_a_choice_not_a_default(client: Any) -> None:
    card = post_hook(client, load_fixture("order-sign/wm-igm-4500-rituximab")).get_json()["cards"][
        0
    ]
    assert card["selectionBehavior"] == "at-most-one"
    assert not any(s.get("isRecommended") for s in card["suggestions"])


def test_info_card_can_be_turned_off(tmp_path: Any) -> None:
    from service import create_app
    from tests.conftest import FIXTURE_NOW, test_settings

    settings = test_settings(tmp_path, rules={"info_card_below_threshold": False})
    client = create_app(settings, clock=lambda: FIXTURE_NOW).test_client()
    answer = post_hook(client, load_fixture("order-sign/wm-igm-3999")).get_json()
    assert answer == {"cards": []}
    # ...but warnings are never switched off with it.
    answer = post_hook(client, load_fixture("order-sign/wm-igm-exactly-4000")).get_json()
    assert answer["cards"][0]["indicator"] == "warning"


def test_thresholds_come_from_configuration(tmp_path: Any) -> None:
    from service import create_app
    from tests.conftest import FIXTURE_NOW, test_settings

    settings = test_settings(tmp_path, rules={"igm_high_mg_dl": 3000.0})
    client = create_app(settings, clock=lambda: FIXTURE_NOW).test_client()
    card = post_hook(client, load_fixture("order-sign/wm-igm-3999")).get_json()["cards"][0]
    assert card["indicator"] == "warning"
    assert "at or above 3,000 mg/dL" in card["detail"]


def test_untrusted_text_cannot_form_links_in_the_card(client: Any) -> None:
    import copy

    body = copy.deepcopy(load_fixture("order-sign/wm-no-igm"))
    for entry in body["prefetch"]["conditions"]["entry"]:
        for coding in entry["resource"]["code"].get("coding", []):
            coding["display"] = "![x](https://evil.example/p.png) <img src=x>"
    card = post_hook(client, body).get_json()["cards"][0]
    # Escaped markup renders as text; only an unescaped "[", "]" or "<" could form a link or tag.
    assert re.search(r"(?<!\\)\[x(?<!\\)\]\(", card["detail"]) is None
    assert re.search(r"(?<!\\)<img", card["detail"]) is None
    assert "\\[x\\]" in card["detail"]  # the text itself is still shown


def test_sandbox_r4_draft_logs_each_tolerated_deviation_without_values(
    client: Any, caplog: Any
) -> None:
    body = load_fixture("order-sign/sandbox-r4-rituximab")
    with caplog.at_level("WARNING", logger="service.api.hooks"):
        answer = post_hook(client, body)
    assert answer.status_code == 200 and answer.get_json()["cards"][0]["indicator"] == "warning"
    logged = [r for r in caplog.records if getattr(r, "event", "") == "fhir_deviation"]
    paths = sorted(r.path for r in logged)
    # STU3's single category and reason inside an otherwise-R4 draft.
    assert paths == [
        "context.draftOrders.entry[0].resource.category",
        "context.draftOrders.entry[0].resource.reasonCode",
    ]
    patient = body["context"]["patientId"]
    for record in logged:
        line = caplog.handler.format(record) + " ".join(str(v) for v in vars(record).values())
        assert patient not in line
        assert "community" not in line and "C88.0" not in line  # no value from the order
