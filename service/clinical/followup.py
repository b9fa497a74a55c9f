"""Decisions 3 and 4 (patient-view): is a rising IgM flare or rebound rather than failure?

Pure: record, value sets, rules and now in; findings out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from service.clinical.conditions import ConditionFact, matching_conditions
from service.clinical.fhir_values import field, objects, text
from service.clinical.observations import Reading, parse_fhir_datetime
from service.clinical.order_risk import hyperviscosity_evidence, read_labs
from service.clinical.orders import medication_concepts
from service.clinical.record import PatientRecord
from service.clinical.terminology import DrugGroup, Terminology, match_drug
from service.settings import RulesSettings

FLARE = "flare"
FLARE_HYPERVISCOSITY = "flare-hyperviscosity"
FLARE_NO_BASELINE = "flare-baseline-missing"
BTK_REBOUND = "btk-rebound"

GIVEN_STATUSES = frozenset({"completed", "in-progress"})
ORDERED_STATUSES = frozenset({"active", "completed", "on-hold", "stopped"})
HOLD_STATUSES = frozenset({"on-hold", "stopped"})


@dataclass(frozen=True)
class Dose:
    when: datetime
    drug: str
    record: str  # "MedicationAdministration/x" or "MedicationRequest/y"


@dataclass(frozen=True)
class FollowupFinding:
    kind: str
    indicator: str
    drug: str
    start: datetime  # first dose of the course, or the date the BTK inhibitor was held
    start_record: str
    baseline: Reading | None
    latest: Reading
    series: tuple[Reading, ...]  # baseline (if any) and every usable IgM since, oldest first
    viscosity: Reading | None
    hyperviscosity_conditions: tuple[ConditionFact, ...]
    hyperviscosity: bool
    high_viscosity: bool = False  # `viscosity` is at or above the critical threshold

    @property
    def rise_percent(self) -> float | None:
        return rise_percent(self.latest, self.baseline)


def rise_percent(reading: Reading, baseline: Reading | None) -> float | None:
    """Change of `reading` over `baseline` in percent; None when there is nothing to compare."""
    if baseline is None or baseline.normalised <= 0:
        return None
    return (reading.normalised / baseline.normalised - 1) * 100


def _drug_of(
    resource: Mapping[str, Any], groups: tuple[DrugGroup, ...], meds: Mapping[str, Any]
) -> str | None:
    for concept in medication_concepts(resource, meds):
        match = match_drug(concept, groups)
        if match is not None:
            return match[0].name
    return None


def _bounds(request: Mapping[str, Any], edge: str) -> datetime | None:
    """The start or end of the first dosage's timing bounds."""
    for dosage in objects(request.get("dosageInstruction")):
        when = parse_fhir_datetime(field(dosage, "timing", "repeat", "boundsPeriod", edge))
        if when is not None:
            return when
    return None


def _request_start(request: Mapping[str, Any]) -> datetime | None:
    start = _bounds(request, "start")
    if start is not None:
        return start
    for dosage in objects(request.get("dosageInstruction")):
        events = field(dosage, "timing", "event")
        if isinstance(events, list) and events:
            first = parse_fhir_datetime(events[0])
            if first is not None:
                return first
    return parse_fhir_datetime(request.get("authoredOn"))


def _request_end(request: Mapping[str, Any]) -> datetime | None:
    # Only the end of the dosing period; a prescription's validity end is not when it was held.
    return _bounds(request, "end")


def anti_cd20_doses(record: PatientRecord, terminology: Terminology, now: datetime) -> list[Dose]:
    """Doses given (administrations); failing those, doses ordered (requests). Oldest first."""
    groups, meds = terminology.anti_cd20, record.medications
    given = []
    for admin in record.medication_administrations:
        if text(admin.get("status")) not in GIVEN_STATUSES:
            continue
        drug = _drug_of(admin, groups, meds)
        when = parse_fhir_datetime(admin.get("effectiveDateTime")) or parse_fhir_datetime(
            field(admin, "effectivePeriod", "start")
        )
        if drug and when is not None and when <= now:
            given.append(Dose(when, drug, f"MedicationAdministration/{admin.get('id')}"))
    if given:
        return sorted(given, key=lambda d: d.when)
    ordered = []
    for request in record.medication_requests:
        if text(request.get("status")) not in ORDERED_STATUSES:
            continue
        drug = _drug_of(request, groups, meds)
        when = _request_start(request)
        if drug and when is not None and when <= now:
            ordered.append(Dose(when, drug, f"MedicationRequest/{request.get('id')}"))
    return sorted(ordered, key=lambda d: d.when)


def course_start(doses: list[Dose], gap_days: int) -> Dose | None:
    """First dose of the latest course: a gap longer than `gap_days` starts a new course."""
    if not doses:
        return None
    start = doses[-1]
    for earlier in reversed(doses[:-1]):
        if start.when - earlier.when > timedelta(days=gap_days):
            break
        start = earlier
    return start


def _split(series: Iterable[Reading], start: datetime) -> tuple[Reading | None, list[Reading]]:
    """Baseline (last result on or before the start day) and the results after it.

    Compared by calendar day: the IgM drawn on the morning of the first infusion is a baseline.
    """
    before = [r for r in series if r.effective.date() <= start.date()]
    after = [r for r in series if r.effective.date() > start.date()]
    return (before[-1] if before else None), after


def assess_followup(
    record: PatientRecord, terminology: Terminology, rules: RulesSettings, now: datetime
) -> list[FollowupFinding]:
    labs = read_labs(record, terminology, rules, now)
    wm = matching_conditions(record.conditions, terminology.wm_conditions, now)
    paraprotein = any(r.normalised >= rules.igm_high_mg_dl for r in labs.igm_series)
    if not wm and not paraprotein:
        return []  # decision 1: e.g. rituximab for rheumatoid arthritis or CLL is not in scope
    hyper_conditions = matching_conditions(
        record.conditions, terminology.hyperviscosity_conditions, now
    )
    hyperviscous = hyperviscosity_evidence(labs, hyper_conditions)
    findings = []
    flare = _flare(record, terminology, rules, now, labs.igm_series)
    if flare is not None:
        findings.append(flare)
    rebound = _btk_rebound(record, terminology, rules, now, labs.igm_series)
    if rebound is not None:
        findings.append(rebound)
    evidence = {
        "viscosity": labs.viscosity,
        "hyperviscosity_conditions": hyper_conditions,
        "hyperviscosity": hyperviscous,
        "high_viscosity": labs.high_viscosity,
    }
    if hyperviscous:
        # Flare or rebound, a rising IgM with hyperviscosity is dangerous whatever its cause.
        return [
            replace(
                f,
                kind=FLARE_HYPERVISCOSITY if f.kind == FLARE else f.kind,
                indicator="critical",
                **evidence,
            )
            for f in findings
        ]
    return [replace(f, **evidence) for f in findings]


def _flare(
    record: PatientRecord,
    terminology: Terminology,
    rules: RulesSettings,
    now: datetime,
    series: tuple[Reading, ...],
) -> FollowupFinding | None:
    first = course_start(anti_cd20_doses(record, terminology, now), rules.course_gap_days)
    if first is None or not series:
        return None
    baseline, after = _split(series, first.when)
    latest = series[-1]
    window_end = first.when + timedelta(days=rules.flare_window_days)
    # A card stays while the reading is current: once the window and a look-back period have
    # passed with no new result, "probable flare" would be stale advice.
    stale = now > window_end + timedelta(days=rules.igm_lookback_days)
    if not after or latest is not after[-1] or latest.effective > window_end or stale:
        return None  # nothing measured since the start, or the flare window has passed
    if (
        baseline is not None
        and (first.when.date() - baseline.effective.date()).days > rules.baseline_max_age_days
    ):
        baseline = None  # too old to tell a flare from the disease's own course before treatment
    shown = tuple(([baseline] if baseline else []) + after)
    common = dict(
        drug=first.drug,
        start=first.when,
        start_record=first.record,
        baseline=baseline,
        latest=latest,
        series=shown,
        viscosity=None,
        hyperviscosity_conditions=(),
        hyperviscosity=False,
    )
    if baseline is None:
        return FollowupFinding(FLARE_NO_BASELINE, "info", **common)
    rise = rise_percent(latest, baseline)
    if rise is not None and rise > rules.flare_rise_percent:
        return FollowupFinding(FLARE, "info", **common)
    return None


def _btk_rebound(
    record: PatientRecord,
    terminology: Terminology,
    rules: RulesSettings,
    now: datetime,
    series: tuple[Reading, ...],
) -> FollowupFinding | None:
    groups, meds = terminology.btk_inhibitors, record.medications
    btk = []
    for request in record.medication_requests:
        drug = _drug_of(request, groups, meds)
        if drug and text(request.get("status")) in ORDERED_STATUSES:
            btk.append(
                (_request_start(request) or datetime.min.replace(tzinfo=now.tzinfo), drug, request)
            )
    if not btk:
        return None
    _, drug, latest_request = max(btk, key=lambda item: item[0])
    if text(latest_request.get("status")) not in HOLD_STATUSES:
        return None  # still on the drug, or resumed after a hold
    held = _request_end(latest_request)
    if held is None or held > now or now - held > timedelta(days=rules.btk_hold_window_days):
        return None
    baseline, after = _split(series, held)
    if not after:
        return None
    latest = after[-1]
    rise = rise_percent(latest, baseline)
    if rise is None or rise <= rules.btk_rebound_rise_percent:
        return None
    return FollowupFinding(
        BTK_REBOUND,
        "info",
        drug,
        held,
        f"MedicationRequest/{latest_request.get('id')}",
        baseline,
        latest,
        (baseline, *after),
        None,
        (),
        False,
    )
