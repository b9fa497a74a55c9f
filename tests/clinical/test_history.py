"""The treatment-history model (decision 7) and the order-hook rules that read it, without HTTP."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from service.clinical.history import build_history, drafted_exchanges
from service.clinical.observations import classify
from service.clinical.order_risk import (
    CONTINUATION,
    ENDING_STATUSES,
    HYPERVISCOSITY_SYMPTOMS,
    IGM_BELOW_THRESHOLD,
    IGM_HIGH,
    assess_orders,
)
from service.clinical.orders import DrugOrder
from service.clinical.record import PatientRecord
from service.clinical.terminology import build_terminology
from service.settings import RulesSettings, TerminologySettings
from tests.clinical.test_order_risk import WM, condition, igm

NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)
RULES = RulesSettings()
TERMS = build_terminology(TerminologySettings())
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def administration(admin_id: str, days_ago: float, status: str = "completed", **extra: Any):
    return {
        "resourceType": "MedicationAdministration",
        "id": admin_id,
        "status": status,
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "121191"}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": (NOW - timedelta(days=days_ago)).isoformat(),
        **extra,
    }


def request(request_id: str, status: str, start_days_ago: float, text: str = "rituximab"):
    start = (NOW - timedelta(days=start_days_ago)).date().isoformat()
    return {
        "resourceType": "MedicationRequest",
        "id": request_id,
        "status": status,
        "intent": "order",
        "medicationCodeableConcept": {"text": text},
        "subject": {"reference": "Patient/p1"},
        "authoredOn": start,
    }


def history(**parts: Any):
    return build_history(PatientRecord("p1", **parts), TERMS, RULES, NOW)


@pytest.mark.parametrize(
    ("status", "extra", "counted"),
    [
        ("completed", {}, True),
        ("in-progress", {}, True),
        ("not-done", {}, False),
        ("entered-in-error", {}, False),
        ("stopped", {}, False),  # halted before anything was recorded as given
        ("stopped", {"dosage": {"dose": {"value": 200, "unit": "mg"}}}, True),
    ],
)
def test_what_counts_as_a_dose(status: str, extra: dict[str, Any], counted: bool) -> None:
    found = history(medication_administrations=(administration("a", 7, status, **extra),))
    assert bool(found.doses) is counted
    assert bool(found.not_counted) is not counted


def test_a_second_course_recorded_only_as_an_order_is_the_latest_course() -> None:
    found = history(
        medication_administrations=(administration("old-1", 400), administration("old-2", 393)),
        medication_requests=(request("new-course", "active", 30), request("planned", "draft", 5)),
    )
    latest = found.latest_course
    assert latest.inferred_from == "MedicationRequest/new-course" and latest.doses == ()
    assert found.courses[0].start_resource == "MedicationAdministration/old-1"


@pytest.mark.parametrize("status", ["cancelled", "entered-in-error", "draft", "stopped"])
def test_only_active_or_completed_orders_stand_for_a_course(status: str) -> None:
    assert history(medication_requests=(request("r", status, 30),)).courses == ()


def test_an_order_whose_infusions_were_not_done_is_no_course() -> None:
    found = history(
        medication_administrations=(administration("a", 20, "not-done"),),
        medication_requests=(request("r", "active", 25),),
    )
    assert found.courses == ()


def test_plasma_exchange_done_and_drafted() -> None:
    procedure = {
        "resourceType": "Procedure",
        "id": "pe",
        "status": "completed",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "127788007"}]},
        "performedPeriod": {"start": "2026-11-18T09:00:00Z", "end": "2026-11-18T11:00:00Z"},
    }
    not_done = {**procedure, "id": "pe2", "status": "not-done"}
    found = history(procedures=(procedure, not_done))
    assert [(e.resource, e.when.hour) for e in found.exchanges] == [("Procedure/pe", 11)]
    drafts = {"entry": [{"resource": {**procedure, "resourceType": "ServiceRequest", "id": "sr"}}]}
    assert drafted_exchanges(drafts, TERMS) == ("ServiceRequest/sr",)


def order(status: str = "draft", **kw: Any) -> list[DrugOrder]:
    return [DrugOrder("MedicationRequest/rtx", "rituximab", "RxNorm 121191", "R4", status, **kw)]


@pytest.mark.parametrize("status", sorted(ENDING_STATUSES))
def test_a_draft_that_ends_therapy_gets_no_card(status: str) -> None:
    record = PatientRecord("p1", conditions=(WM,), igm=(igm(6000, 1),))
    assert assess_orders(record, order(status), TERMS, RULES, NOW) is None
    assert assess_orders(record, order("active"), TERMS, RULES, NOW).kind == IGM_HIGH


def test_continuation_never_suggests_deleting_and_is_warning_at_high_igm() -> None:
    record = PatientRecord(
        "p1",
        conditions=(WM,),
        igm=(igm(5000, 1),),
        medication_administrations=(administration("d1", 14), administration("d2", 7)),
    )
    finding = assess_orders(record, order(), TERMS, RULES, NOW)
    assert finding.kind == CONTINUATION and finding.indicator == "warning"
    assert [d.resource for d in finding.course.doses] == [
        "MedicationAdministration/d1",
        "MedicationAdministration/d2",
    ]


@pytest.mark.parametrize(("igm_value", "kind"), [(4000, HYPERVISCOSITY_SYMPTOMS), (3999, None)])
def test_symptoms_are_hyperviscosity_evidence_only_beside_a_high_igm(
    igm_value: float, kind: str | None
) -> None:
    headache = {**condition("R51.9", cond_id="headache"), "onsetDateTime": "2026-11-18"}
    record = PatientRecord("p1", conditions=(WM, headache), igm=(igm(igm_value, 1),))
    finding = assess_orders(record, order(), TERMS, RULES, NOW)
    assert finding.kind == (kind or IGM_BELOW_THRESHOLD)


def test_old_symptom_is_not_evidence() -> None:
    headache = {**condition("R51.9", cond_id="headache"), "onsetDateTime": "2026-09-01"}
    record = PatientRecord("p1", conditions=(WM, headache), igm=(igm(4500, 1),))
    assert assess_orders(record, order(), TERMS, RULES, NOW).kind == IGM_HIGH


@pytest.mark.parametrize(
    ("status", "in_scope"), [("remission", True), ("resolved", False), ("inactive", False)]
)
def test_wm_in_remission_is_in_scope(status: str, in_scope: bool) -> None:
    record = PatientRecord("p1", conditions=(condition("C88.0", status),), igm=(igm(1500, 1),))
    assert (assess_orders(record, order(), TERMS, RULES, NOW) is not None) is in_scope


def test_mgus_uses_the_laboratorys_upper_reference_limit() -> None:
    mgus = condition("D47.2", cond_id="mgus")
    result = igm(280, 1)
    result["referenceRange"] = [{"high": {"value": 3.0, "unit": "g/L", "code": "g/L"}}]
    record = PatientRecord("p1", conditions=(mgus,), igm=(result,))
    assert assess_orders(record, order(), TERMS, RULES, NOW) is None  # 280 < 300 mg/dL
    result["valueQuantity"]["value"] = 320
    finding = assess_orders(record, order(), TERMS, RULES, NOW)
    assert "upper reference limit 300 mg/dL" in finding.scope_reason


def test_indication_by_reference_to_a_condition() -> None:
    wm_elsewhere = {**condition("C88.0", "resolved", cond_id="wm-old")}
    record = PatientRecord("p1", conditions=(wm_elsewhere,), igm=(igm(1500, 1),))
    assert assess_orders(record, order(), TERMS, RULES, NOW) is None
    referenced = order(reason_references=("Condition/wm-old",))
    finding = assess_orders(record, referenced, TERMS, RULES, NOW)
    assert "Condition/wm-old" in finding.scope_reason


def test_site_names_for_drugs_and_diagnoses() -> None:
    terms = build_terminology(
        TerminologySettings(anti_cd20_names=("glofituzumab-x",), wm_condition_names=("LPL-IgM",))
    )
    match = [g.name for g in terms.anti_cd20 if g.name_pattern.search("Glofituzumab-X 10 mg")]
    assert match == ["glofituzumab-x"]
    local = {"resourceType": "Condition", "id": "c", "code": {"text": "LPL-IgM, stage 2"}}
    record = PatientRecord("p1", conditions=(local,), igm=(igm(1500, 1),))
    assert assess_orders(record, order(), terms, RULES, NOW) is not None
    assert assess_orders(record, order(), TERMS, RULES, NOW) is None


@pytest.mark.parametrize(
    ("value", "reason"),
    [(0, "zero is not a possible serum IgM"), (-5, "negative value"), ("NaN", "not a number")],
)
def test_impossible_igm_is_not_used(value: Any, reason: str) -> None:
    result = igm(1, 1)
    result["valueQuantity"]["value"] = value
    readings, [unusable] = classify([result], "igm", TERMS.igm)
    assert readings == [] and unusable.reason == reason


@pytest.mark.parametrize(
    ("comparator", "value", "usable_high"),
    [("<", 4000, False), ("<=", 4000, False), (">", 4000, True), (">=", 4000, True)],
)
def test_bounds_on_the_threshold(comparator: str, value: float, usable_high: bool) -> None:
    result = igm(value, 1)
    result["valueQuantity"]["comparator"] = comparator
    record = PatientRecord("p1", conditions=(WM,), igm=(result,))
    finding = assess_orders(record, order(), TERMS, RULES, NOW)
    assert finding.kind == (IGM_HIGH if usable_high else IGM_BELOW_THRESHOLD)


def test_continuation_below_threshold_is_info_and_follows_the_info_switch() -> None:
    record = PatientRecord(
        "p1",
        conditions=(WM,),
        igm=(igm(2500, 1),),
        medication_administrations=(administration("d1", 7),),
    )
    finding = assess_orders(record, order(), TERMS, RULES, NOW)
    assert finding.kind == CONTINUATION and finding.indicator == "info"
    quiet = RulesSettings(info_card_below_threshold=False)
    assert assess_orders(record, order(), TERMS, quiet, NOW) is None
