"""patient-view: a rising IgM after anti-CD20 therapy or a BTK-inhibitor hold."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from service.clinical.followup import (
    BTK_REBOUND,
    FLARE,
    FLARE_NO_BASELINE,
    assess_followup,
)
from service.clinical.history import build_history
from service.clinical.record import PatientRecord
from service.clinical.terminology import build_terminology
from service.settings import RulesSettings, TerminologySettings
from tests.conftest import (
    all_fixture_names,
    check_scenario,
    load_fixture,
    post_hook,
)

# scenario -> (indicator or None, finding, strings the card must show)
EXPECTED: dict[str, tuple[str | None, str, tuple[str, ...]]] = {
    "patient-view/flare-after-rituximab": (
        "info",
        "flare",
        ("3,000", "4,300", "+43%", "not treatment failure", "baseline"),
    ),
    "patient-view/flare-with-hyperviscosity": (
        "critical",
        "flare-hyperviscosity",
        ("5,200", "4.6 cP", "Plasmapheresis"),
    ),
    "patient-view/steady-fall-response": (None, "", ()),
    "patient-view/rise-after-six-months": (None, "", ()),
    "patient-view/btk-hold-rebound": ("info", "btk-rebound", ("ibrutinib", "2026-10-20", "+44%")),
    "patient-view/no-treatment-history": (None, "", ()),
    "patient-view/flare-missing-baseline": (
        "info",
        "flare-baseline-missing",
        ("cannot be judged", "4,100", "no baseline"),
    ),
    "patient-view/flare-mixed-units": ("info", "flare", ("30 g/L", "4.2 g/dL", "4,200", "+40%")),
    # Decision 10: course-aware.
    "patient-view/not-done-infusions": (None, "", ()),
    "patient-view/second-course-from-order": (
        "info",
        "flare",
        (
            "MedicationRequest/rituximab-course-2026-10, inferred from the order",
            "2026-10-19",
            "+40%",
        ),
    ),
    "patient-view/flare-viscosity-since-baseline": (
        "critical",
        "flare-hyperviscosity",
        ("4.5 cP", "2026-08-20", "Observation/viscosity-2026-08-20"),
    ),
    "patient-view/flare-viscosity-then-exchange": (
        "info",
        "flare",
        ("| Plasma exchange | completed | 2026-08-25 | Procedure/plasma-exchange-2026-08-25 |",),
    ),
    "patient-view/progression-after-flare-window": (
        "info",
        "possible-progression",
        ("not read as IgM flare", "nadir 1,800 mg/dL", "| nadir |", "+50%", "+33%"),
    ),
}


def test_every_patient_view_fixture_has_an_expectation() -> None:
    assert sorted(EXPECTED) == all_fixture_names("patient-view")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_scenario_through_http(client: Any, name: str) -> None:
    indicator, finding, shown = EXPECTED[name]
    check_scenario(client, load_fixture(name), indicator, finding, shown)


def test_series_table_shows_every_result_since_the_first_dose(client: Any) -> None:
    card = post_hook(client, load_fixture("patient-view/flare-after-rituximab")).get_json()[
        "cards"
    ][0]
    header = (
        "| Date | As reported | mg/dL | Change from baseline | Weeks since first dose | Record |"
    )
    assert header in card["detail"]
    rows = [line for line in card["detail"].splitlines() if line.startswith("| 2026-")]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == [
        "2026-09-01",
        "2026-09-24",
        "2026-10-08",
        "2026-11-12",
    ]
    assert "| baseline |" in rows[0]


def test_critical_flare_suggests_plasmapheresis(client: Any) -> None:
    body = load_fixture("patient-view/flare-with-hyperviscosity")
    card = post_hook(client, body).get_json()["cards"][0]
    [suggestion] = card["suggestions"]
    resource = suggestion["actions"][0]["resource"]
    assert resource["resourceType"] == "ServiceRequest"
    assert resource["subject"]["reference"] == f"Patient/{body['context']['patientId']}"
    assert {c["code"] for c in resource["code"]["coding"]} == {"36514", "127788007"}


def test_mixed_units_ignore_the_unconvertible_result(client: Any) -> None:
    card = post_hook(client, load_fixture("patient-view/flare-mixed-units")).get_json()["cards"][0]
    assert "umol/L" not in card["detail"]


def test_entered_in_error_administration_does_not_start_a_course(client: Any) -> None:
    body = copy.deepcopy(load_fixture("patient-view/flare-after-rituximab"))
    for entry in body["prefetch"]["medicationAdministrations"]["entry"]:
        entry["resource"]["status"] = "entered-in-error"
    for entry in body["prefetch"].get("medicationRequests", {}).get("entry", []):
        entry["resource"]["status"] = "entered-in-error"
    assert post_hook(client, body).get_json() == {"cards": []}


# --- unit tests of the pure assessment -------------------------------------------------------

NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)
TERMS = build_terminology(TerminologySettings())
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def _igm(obs_id: str, when: datetime, mg_dl: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": obs_id,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2472-9"}]},
        "effectiveDateTime": when.date().isoformat(),
        "valueQuantity": {
            "value": mg_dl,
            "unit": "mg/dL",
            "system": "http://unitsofmeasure.org",
            "code": "mg/dL",
        },
    }


def _dose(admin_id: str, when: datetime, code: str = "121191") -> dict[str, Any]:
    return {
        "resourceType": "MedicationAdministration",
        "id": admin_id,
        "status": "completed",
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": code}]},
        "effectiveDateTime": when.isoformat(),
    }


WM = {
    "resourceType": "Condition",
    "id": "wm",
    "clinicalStatus": {"coding": [{"code": "active"}]},
    "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "C88.0"}]},
}


def _record(doses: list[dict[str, Any]], igm: list[dict[str, Any]], **kw: Any) -> PatientRecord:
    kw.setdefault("conditions", (WM,))
    return PatientRecord("p1", igm=tuple(igm), medication_administrations=tuple(doses), **kw)


START = NOW - timedelta(days=60)


@pytest.mark.parametrize(("latest", "expected"), [(3750, None), (3751, FLARE)])
def test_flare_needs_more_than_25_percent(latest: float, expected: str | None) -> None:
    record = _record(
        [_dose("d1", START)],
        [
            _igm("base", START - timedelta(days=2), 3000),
            _igm("late", NOW - timedelta(days=1), latest),
        ],
    )
    kinds = [f.kind for f in assess_followup(record, TERMS, RulesSettings(), NOW)]
    assert kinds == ([expected] if expected else [])


@pytest.mark.parametrize(("days_after", "called"), [(120, True), (121, False)])
def test_flare_window_is_about_four_months(days_after: int, called: bool) -> None:
    now = START + timedelta(days=days_after, hours=1)
    record = _record(
        [_dose("d1", START)],
        [_igm("base", START, 3000), _igm("late", START + timedelta(days=days_after), 5000)],
    )
    findings = assess_followup(record, TERMS, RulesSettings(), now)
    assert bool(findings) is called


def test_same_day_result_is_the_baseline() -> None:
    record = _record(
        [_dose("d1", START)],
        [_igm("same-day", START, 2000), _igm("late", NOW - timedelta(days=1), 3000)],
    )
    [finding] = assess_followup(record, TERMS, RulesSettings(), NOW)
    assert finding.kind == FLARE and finding.baseline.observation_id == "same-day"


def test_no_result_before_the_first_dose_says_it_cannot_be_judged() -> None:
    record = _record([_dose("d1", START)], [_igm("late", NOW - timedelta(days=1), 3000)])
    [finding] = assess_followup(record, TERMS, RulesSettings(), NOW)
    assert finding.kind == FLARE_NO_BASELINE and finding.rise_percent is None


def test_a_new_course_after_a_long_gap_resets_the_baseline() -> None:
    old = NOW - timedelta(days=700)
    record = _record(
        [
            _dose("a", old),
            _dose("b", old + timedelta(days=21)),
            _dose("c", START),
            _dose("d", START + timedelta(days=7)),
        ],
        [],
    )
    history = build_history(record, TERMS, RulesSettings(), NOW)
    assert history.latest_course.start_resource == "MedicationAdministration/c"
    history = build_history(record, TERMS, RulesSettings(course_gap_days=1000), NOW)
    assert history.latest_course.start_resource == "MedicationAdministration/a"


def test_biosimilar_administration_counts_as_exposure() -> None:
    record = _record(
        [_dose("d1", START, code="2105824")],
        [_igm("base", START, 3000), _igm("late", NOW - timedelta(days=1), 4000)],
    )
    [finding] = assess_followup(record, TERMS, RulesSettings(), NOW)
    assert finding.drug == "rituximab-abbs (Truxima)"


def _btk(status: str, held: datetime, request_id: str = "ibr") -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "id": request_id,
        "status": status,
        "intent": "order",
        "authoredOn": (held - timedelta(days=300)).date().isoformat(),
        "medicationCodeableConcept": {"text": "Ibrutinib 420 mg tablet"},
        "dosageInstruction": [
            {
                "timing": {
                    "repeat": {
                        "boundsPeriod": {
                            "start": (held - timedelta(days=300)).date().isoformat(),
                            "end": held.date().isoformat(),
                        }
                    }
                }
            }
        ],
    }


@pytest.mark.parametrize(
    ("status", "called"),
    # Decision 7: an order `completed` with its end in the window stopped the drug too.
    [("on-hold", True), ("stopped", True), ("active", False), ("completed", True)],
)
def test_btk_rebound_only_after_a_hold(status: str, called: bool) -> None:
    held = NOW - timedelta(days=30)
    record = PatientRecord(
        "p1",
        conditions=(WM,),
        igm=(_igm("b", held - timedelta(days=5), 1800), _igm("l", NOW - timedelta(days=2), 2600)),
        medication_requests=(_btk(status, held),),
    )
    findings = assess_followup(record, TERMS, RulesSettings(), NOW)
    assert [f.kind for f in findings] == ([BTK_REBOUND] if called else [])


@pytest.mark.parametrize(("days_ago", "called"), [(55, True), (57, False)])
def test_btk_hold_window_is_8_weeks(days_ago: int, called: bool) -> None:
    held = NOW - timedelta(days=days_ago)
    record = PatientRecord(
        "p1",
        conditions=(WM,),
        igm=(_igm("b", held - timedelta(days=5), 1800), _igm("l", NOW - timedelta(days=2), 2600)),
        medication_requests=(_btk("on-hold", held),),
    )
    assert bool(assess_followup(record, TERMS, RulesSettings(), NOW)) is called


def test_patients_out_of_scope_get_no_follow_up_card() -> None:
    ra = {
        **WM,
        "id": "ra",
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M06.9"}]},
    }
    record = _record(
        [_dose("d1", START)],
        [_igm("b", START, 100), _igm("l", NOW - timedelta(days=1), 140)],
        conditions=(ra,),
    )
    assert assess_followup(record, TERMS, RulesSettings(), NOW) == []


def test_flare_card_does_not_outlive_its_window() -> None:
    record = _record(
        [_dose("d1", START)], [_igm("b", START, 3000), _igm("l", START + timedelta(days=30), 4000)]
    )
    rules = RulesSettings()
    assert assess_followup(record, TERMS, rules, START + timedelta(days=150))
    assert assess_followup(record, TERMS, rules, START + timedelta(days=151)) == []


@pytest.mark.parametrize(("days_before", "has_baseline"), [(90, True), (91, False)])
def test_baseline_older_than_90_days_is_not_used(days_before: int, has_baseline: bool) -> None:
    record = _record(
        [_dose("d1", START)],
        [
            _igm("b", START - timedelta(days=days_before), 3000),
            _igm("l", NOW - timedelta(days=1), 4000),
        ],
    )
    [finding] = assess_followup(record, TERMS, RulesSettings(), NOW)
    assert (finding.baseline is not None) is has_baseline


def test_hyperviscosity_makes_a_btk_rebound_critical() -> None:
    held = NOW - timedelta(days=30)
    visc = {
        "resourceType": "Observation",
        "id": "v",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "3128-6"}]},
        "effectiveDateTime": (NOW - timedelta(days=2)).date().isoformat(),
        "valueQuantity": {
            "value": 6.5,
            "unit": "cP",
            "system": "http://unitsofmeasure.org",
            "code": "cP",
        },
    }
    record = PatientRecord(
        "p1",
        conditions=(WM,),
        igm=(_igm("b", held - timedelta(days=5), 1800), _igm("l", NOW - timedelta(days=2), 2600)),
        viscosity=(visc,),
        medication_requests=(_btk("on-hold", held),),
    )
    [finding] = assess_followup(record, TERMS, RulesSettings(), NOW)
    assert finding.kind == BTK_REBOUND and finding.indicator == "critical"


def _viscosity(obs_id: str, when: datetime, cp: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": obs_id,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "3128-6"}]},
        "effectiveDateTime": when.date().isoformat(),
        "valueQuantity": {"value": cp, "unit": "cP", "system": "http://unitsofmeasure.org"},
    }


@pytest.mark.parametrize(
    ("viscosities", "critical"),
    [
        ([("high", 85, 4.5)], True),  # since the baseline window opened, nothing after it
        ([("high", 85, 4.5), ("lower", 40, 3.1)], False),  # a lower viscosity came after it
        ([("too-old", 160, 4.5)], False),  # before the baseline window (90 days before dose 1)
    ],
)
def test_viscosity_since_the_baseline_window(viscosities: list[Any], critical: bool) -> None:
    record = _record(
        [_dose("d1", START)],
        [_igm("b", START - timedelta(days=2), 3000), _igm("l", NOW - timedelta(days=1), 4000)],
        viscosity=tuple(_viscosity(i, NOW - timedelta(days=d), cp) for i, d, cp in viscosities),
    )
    [finding] = assess_followup(record, TERMS, RulesSettings(), NOW)
    assert (finding.indicator == "critical") is critical


def test_not_done_infusion_is_no_exposure() -> None:
    not_done = {**_dose("d1", START), "status": "not-done"}
    record = _record(
        [not_done],
        [_igm("b", START - timedelta(days=2), 3000), _igm("l", NOW - timedelta(days=1), 4500)],
    )
    assert assess_followup(record, TERMS, RulesSettings(), NOW) == []
