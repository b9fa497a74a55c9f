"""The order-hook rules at their boundaries, without HTTP: record + orders + now -> finding."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from service.clinical.order_risk import (
    HYPERVISCOSITY,
    IGM_BELOW_THRESHOLD,
    IGM_HIGH,
    IGM_MISSING,
    assess_orders,
)
from service.clinical.orders import DrugOrder
from service.clinical.record import PatientRecord
from service.clinical.terminology import build_terminology
from service.settings import RulesSettings, TerminologySettings

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
RULES = RulesSettings()
TERMS = build_terminology(TerminologySettings())
ORDER = [DrugOrder("MedicationRequest/rtx", "rituximab", "RxNorm 121191", "R4")]
LOINC = "http://loinc.org"


def observation(
    obs_id: str, code: str, value: float, unit: str, when: datetime, status: str = "final"
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": obs_id,
        "status": status,
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": when.isoformat().replace("+00:00", "Z"),
        "valueQuantity": {
            "value": value,
            "unit": unit,
            "system": "http://unitsofmeasure.org",
            "code": unit,
        },
    }


def igm(value: float, days_ago: float, unit: str = "mg/dL", **kw: Any) -> dict[str, Any]:
    when = NOW - timedelta(days=days_ago)
    return observation(f"igm-{value}-{days_ago}", "2472-9", value, unit, when, **kw)


def viscosity(value: float, days_ago: float) -> dict[str, Any]:
    return observation(f"visc-{value}", "3128-6", value, "cP", NOW - timedelta(days=days_ago))


def condition(code: str, status: str = "active", cond_id: str = "c1") -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": cond_id,
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": status,
                }
            ]
        },
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": code}]},
        "subject": {"reference": "Patient/p1"},
    }


WM = condition("C88.0")


def assess(
    *,
    conditions: tuple[Any, ...] = (WM,),
    igm_obs: tuple[Any, ...] = (),
    visc_obs: tuple[Any, ...] = (),
    rules: RulesSettings = RULES,
) -> Any:
    record = PatientRecord("p1", conditions=conditions, igm=igm_obs, viscosity=visc_obs)
    return assess_orders(record, ORDER, TERMS, rules, NOW)


@pytest.mark.parametrize(
    ("value", "kind"),
    [(3999.9, IGM_BELOW_THRESHOLD), (4000, IGM_HIGH), (4000.1, IGM_HIGH)],
)
def test_igm_threshold_is_inclusive_at_4000(value: float, kind: str) -> None:
    assert assess(igm_obs=(igm(value, 1),)).kind == kind


def test_very_high_note_from_5000() -> None:
    assert not assess(igm_obs=(igm(4999, 1),)).very_high
    assert assess(igm_obs=(igm(5000, 1),)).very_high


@pytest.mark.parametrize(
    ("days_ago", "kind"),
    [(29.99, IGM_HIGH), (30, IGM_HIGH), (30.01, IGM_MISSING)],
)
def test_look_back_window_includes_exactly_30_days(days_ago: float, kind: str) -> None:
    finding = assess(igm_obs=(igm(4500, days_ago),))
    assert finding.kind == kind
    if kind == IGM_MISSING:
        assert finding.last_known_igm.normalised == 4500  # the stale value is still shown


@pytest.mark.parametrize(("cp", "kind"), [(3.99, IGM_BELOW_THRESHOLD), (4.0, HYPERVISCOSITY)])
def test_viscosity_threshold_is_inclusive_at_4_cp(cp: float, kind: str) -> None:
    finding = assess(igm_obs=(igm(3000, 2),), visc_obs=(viscosity(cp, 2),))
    assert finding.kind == kind
    assert finding.indicator == ("critical" if kind == HYPERVISCOSITY else "info")


def test_old_high_viscosity_is_not_current_evidence() -> None:
    finding = assess(igm_obs=(igm(3000, 2),), visc_obs=(viscosity(6.0, 31),))
    assert finding.kind == IGM_BELOW_THRESHOLD


def test_resolved_hyperviscosity_condition_does_not_count() -> None:
    resolved = condition("R70.1", status="resolved", cond_id="hv")
    assert assess(conditions=(WM, resolved), igm_obs=(igm(3000, 2),)).kind == IGM_BELOW_THRESHOLD
    active = condition("R70.1", cond_id="hv")
    assert assess(conditions=(WM, active), igm_obs=(igm(3000, 2),)).kind == HYPERVISCOSITY


def test_icd10_code_without_dot_matches() -> None:
    assert (
        assess(conditions=(condition("C880"),), igm_obs=(igm(100, 2),)).kind == IGM_BELOW_THRESHOLD
    )


def test_out_of_scope_patient_gets_nothing() -> None:
    ra = condition("M06.9")
    assert assess(conditions=(ra,), igm_obs=(igm(120, 2),)) is None
    assert assess(conditions=(), igm_obs=()) is None


def test_paraprotein_level_brings_a_patient_into_scope_without_diagnosis() -> None:
    finding = assess(conditions=(), igm_obs=(igm(4000, 3),))
    assert finding.kind == IGM_HIGH and "paraprotein" in finding.scope_reason
    # an old high IgM still means a paraprotein: the card asks for a fresh value
    assert assess(conditions=(), igm_obs=(igm(4800, 60),)).kind == IGM_MISSING


def test_latest_by_effective_time_not_position() -> None:
    newer, older = igm(2800, 7), igm(4800, 21)
    for order in ((newer, older), (older, newer)):
        finding = assess(igm_obs=order)
        assert finding.latest_igm.normalised == 2800


@pytest.mark.parametrize("status", ["preliminary", "registered", "entered-in-error", "cancelled"])
def test_only_final_amended_corrected_count(status: str) -> None:
    finding = assess(igm_obs=(igm(9000, 1, status=status), igm(2000, 5)))
    assert finding.latest_igm.normalised == 2000


@pytest.mark.parametrize("status", ["final", "amended", "corrected"])
def test_usable_statuses(status: str) -> None:
    assert assess(igm_obs=(igm(4100, 1, status=status),)).kind == IGM_HIGH


def test_data_absent_reason_is_ignored() -> None:
    absent = igm(9000, 1)
    absent["dataAbsentReason"] = {"text": "specimen haemolysed"}
    assert assess(igm_obs=(absent, igm(2000, 5))).latest_igm.normalised == 2000


def test_unconvertible_newest_result_is_reported_not_guessed() -> None:
    finding = assess(igm_obs=(igm(46, 1, unit="umol/L"), igm(4100, 40)))
    assert finding.kind == IGM_MISSING
    assert [u.reason for u in finding.unusable_igm] == ["unit 'umol/L' cannot be converted"]


def test_future_dated_result_is_not_used() -> None:
    finding = assess(igm_obs=(igm(9000, -3), igm(2000, 5)))
    assert finding.latest_igm.normalised == 2000
    assert finding.unusable_igm[0].reason == "dated in the future"


def test_no_orders_no_finding() -> None:
    record = PatientRecord("p1", conditions=(WM,), igm=(igm(6000, 1),))
    assert assess_orders(record, [], TERMS, RULES, NOW) is None


def test_window_and_thresholds_are_configurable() -> None:
    rules = RulesSettings(igm_lookback_days=60, igm_high_mg_dl=3000.0)
    assert assess(igm_obs=(igm(3500, 45),), rules=rules).kind == IGM_HIGH


# --- review fixes: nothing silently dropped, nothing misread ----------------------------------


def test_an_observation_with_another_code_is_not_read_as_igm() -> None:
    haemoglobin = observation("hb", "718-7", 10.9, "g/dL", NOW - timedelta(days=1))
    finding = assess(igm_obs=(haemoglobin, igm(2000, 5)))
    assert finding.latest_igm.normalised == 2000
    assert [u.reason for u in finding.unusable_igm] == ["not a serum IgM code"]


def test_local_igm_code_is_read_when_configured() -> None:
    terms = build_terminology(TerminologySettings(igm_codes=("http://lab.example|IGM",)))
    local = observation("local", "IGM", 4200, "mg/dL", NOW - timedelta(days=1))
    local["code"]["coding"][0]["system"] = "http://lab.example"
    record = PatientRecord("p1", conditions=(WM,), igm=(local,))
    assert assess_orders(record, ORDER, terms, RULES, NOW).kind == IGM_HIGH


@pytest.mark.parametrize("unit", [None, "centipoise", "cps", "CP"])
def test_viscosity_without_unit_or_with_a_cp_spelling_is_read(unit: str | None) -> None:
    visc = viscosity(6.0, 1)
    if unit is None:
        del visc["valueQuantity"]["unit"], visc["valueQuantity"]["code"]
    else:
        visc["valueQuantity"] = {"value": 6.0, "unit": unit}
    assert assess(igm_obs=(igm(4500, 1),), visc_obs=(visc,)).kind == HYPERVISCOSITY


def test_unreadable_viscosity_is_shown_not_dropped() -> None:
    visc = viscosity(6.0, 1)
    visc["valueQuantity"] = {
        "value": 6.0,
        "unit": "Pa",
        "system": "http://unitsofmeasure.org",
        "code": "Pa",
    }
    finding = assess(igm_obs=(igm(4500, 1),), visc_obs=(visc,))
    assert finding.kind == IGM_HIGH
    assert [u.reported for u in finding.unusable_viscosity] == ["6.0 Pa"]


@pytest.mark.parametrize(
    ("comparator", "value", "kind"),
    [
        (">", 3999, IGM_MISSING),
        (">", 4500, IGM_HIGH),
        ("<", 50, IGM_BELOW_THRESHOLD),
        ("<", 6000, IGM_MISSING),
        (">=", 4000, IGM_HIGH),
    ],
)
def test_bounds_are_used_only_when_they_decide(comparator: str, value: float, kind: str) -> None:
    result = igm(value, 1)
    result["valueQuantity"]["comparator"] = comparator
    finding = assess(igm_obs=(result,))
    assert finding.kind == kind
    if kind == IGM_MISSING:
        assert "a bound, not a value" in finding.unusable_igm[0].reason


def test_unreadable_igm_without_diagnosis_is_not_silently_out_of_scope() -> None:
    finding = assess(conditions=(), igm_obs=(igm(65, 2, unit="gm/L"),))
    assert finding is not None and finding.kind == IGM_MISSING
    assert "could not be used" in finding.scope_reason


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
def test_dates_outside_the_utc_range_are_not_dates(text: str) -> None:
    from service.clinical.observations import parse_fhir_datetime

    assert parse_fhir_datetime(text) is None
