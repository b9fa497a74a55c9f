"""The course of treatment (decision 7): anti-CD20 doses and courses, BTK-inhibitor stops and
plasma exchanges, read from MedicationAdministration, MedicationRequest and Procedure.

One model for all three hooks (and for the timeline app): the order hooks ask whether an order
starts or continues a course, patient-view which course a rising IgM follows. Pure: the record,
value sets, rules and "now" in; a TreatmentHistory out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from service.clinical.fhir_values import field, objects, text
from service.clinical.observations import parse_fhir_datetime
from service.clinical.orders import medication_concepts
from service.clinical.record import PatientRecord
from service.clinical.terminology import DrugGroup, Terminology, concept_matches, match_drug
from service.settings import RulesSettings

# A dose was given: the infusion is done or under way.
GIVEN_STATUSES = frozenset({"completed", "in-progress"})
# An order that stands for a course start when no administration is recorded.
COURSE_ORDER_STATUSES = frozenset({"active", "completed"})
# A BTK-inhibitor order that ended or paused the drug.
BTK_STOP_STATUSES = frozenset({"stopped", "on-hold", "completed"})


@dataclass(frozen=True)
class Dose:
    """One anti-CD20 administration; `resource` is "MedicationAdministration/<id>"."""

    when: datetime
    drug: str
    status: str
    resource: str


@dataclass(frozen=True)
class Course:
    """Doses less than `rules.course_gap_days` apart, oldest first.

    With no administration recorded, the start is that of an active or completed order and
    `inferred_from` names it ("MedicationRequest/<id>"); `doses` is then empty.
    """

    start: datetime
    doses: tuple[Dose, ...]
    inferred_from: str | None
    drug: str = ""

    @property
    def last_activity(self) -> datetime:
        return self.doses[-1].when if self.doses else self.start

    @property
    def start_resource(self) -> str:
        return self.inferred_from or self.doses[0].resource


@dataclass(frozen=True)
class BtkStop:
    """A BTK-inhibitor order stopped, held or completed; `when` is the end of its dosing."""

    when: datetime
    drug: str
    status: str
    resource: str


@dataclass(frozen=True)
class PlasmaExchange:
    when: datetime
    status: str
    resource: str


@dataclass(frozen=True)
class TreatmentHistory:
    doses: tuple[Dose, ...]  # counted doses, oldest first
    courses: tuple[Course, ...]  # oldest first
    btk_stops: tuple[BtkStop, ...]  # within the hold window, with no BTK order since; oldest first
    exchanges: tuple[PlasmaExchange, ...]  # completed, oldest first
    # Anti-CD20 administrations on record that are not doses (not-done, entered-in-error, ...).
    not_counted: tuple[Dose, ...] = ()

    @property
    def latest_course(self) -> Course | None:
        return self.courses[-1] if self.courses else None

    def current_course(self, now: datetime, gap_days: int) -> Course | None:
        """The latest course, if it is still running: its last dose is within `gap_days`."""
        course = self.latest_course
        if course is None or now - course.last_activity > timedelta(days=gap_days):
            return None
        return course

    def exchanges_after(self, when: datetime) -> tuple[PlasmaExchange, ...]:
        return tuple(e for e in self.exchanges if e.when > when)


def drug_of(
    resource: Mapping[str, Any], groups: tuple[DrugGroup, ...], meds: Mapping[str, Any]
) -> str | None:
    return _drug_named(medication_concepts(resource, meds), groups)


def _drug_named(concepts: Sequence[Mapping[str, Any]], groups: tuple[DrugGroup, ...]) -> str | None:
    """The drug of the first of a resource's medication concepts that names one in `groups`."""
    for concept in concepts:
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


def request_start(request: Mapping[str, Any]) -> datetime | None:
    """When an order's therapy starts: timing bounds, else the first timing event, else
    `authoredOn`."""
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


def request_end(request: Mapping[str, Any]) -> datetime | None:
    # Only the end of the dosing period; a prescription's validity end is not when it was held.
    return _bounds(request, "end")


def _administered(admin: Mapping[str, Any]) -> bool:
    status = text(admin.get("status"))
    if status in GIVEN_STATUSES:
        return True
    # `stopped` means halted before all was given: a dose only if some of it was recorded.
    dose = field(admin, "dosage", "dose", "value")
    return status == "stopped" and isinstance(dose, int | float) and dose > 0


def _doses(record: PatientRecord, terminology: Terminology, now: datetime):
    counted, not_counted = [], []
    for admin in record.medication_administrations:
        drug = drug_of(admin, terminology.anti_cd20, record.medications)
        when = parse_fhir_datetime(admin.get("effectiveDateTime")) or parse_fhir_datetime(
            field(admin, "effectivePeriod", "start")
        )
        if drug is None or when is None or when > now:
            continue
        dose = Dose(when, drug, text(admin.get("status")) or "unknown", _ref(admin))
        (counted if _administered(admin) else not_counted).append(dose)
    key = lambda d: (d.when, d.resource)  # noqa: E731
    return sorted(counted, key=key), sorted(not_counted, key=key)


def _ref(resource: Mapping[str, Any]) -> str:
    return f"{resource.get('resourceType')}/{resource.get('id') or '(no id)'}"


def _courses(
    doses: Sequence[Dose],
    recorded: Sequence[Dose],
    requests: Sequence[tuple[Mapping[str, Any], list[Mapping[str, Any]]]],
    terminology: Terminology,
    gap: timedelta,
    now: datetime,
) -> list[Course]:
    """Courses from the doses; an order stands for a course start only when no administration
    at all (given or `recorded` as not given) is on record near its start."""
    courses: list[Course] = []
    for dose in doses:
        if courses and dose.when - courses[-1].last_activity <= gap:
            last = courses[-1]
            courses[-1] = Course(last.start, (*last.doses, dose), None, last.drug)
        else:
            courses.append(Course(dose.when, (dose,), None, dose.drug))
    # Orders whose start no recorded dose accounts for stand for a course start of their own.
    inferred = []
    for request, concepts in requests:
        if text(request.get("status")) not in COURSE_ORDER_STATUSES:
            continue
        drug = _drug_named(concepts, terminology.anti_cd20)
        if drug is None:
            continue  # most orders on a chart are for other drugs: no start to read
        start = request_start(request)
        if start is None or start > now:
            continue
        if any(abs(dose.when - start) <= gap for dose in (*doses, *recorded)):
            continue  # the administrations tell what happened to this order
        inferred.append(Course(start, (), _ref(request), drug))
    inferred.sort(key=lambda c: (c.start, c.inferred_from or ""))
    for course in inferred:
        merged = [c for c in courses if c.inferred_from and course.start - c.start <= gap]
        if not merged:  # orders within the gap of an earlier inferred start are the same course
            courses.append(course)
    return sorted(courses, key=lambda c: c.start)


def _btk_stops(
    requests: Sequence[tuple[Mapping[str, Any], list[Mapping[str, Any]]]],
    terminology: Terminology,
    rules: RulesSettings,
    now: datetime,
) -> list[BtkStop]:
    orders = []
    for request, concepts in requests:
        drug = _drug_named(concepts, terminology.btk_inhibitors)
        if drug is not None:
            orders.append((request, drug))
    window = timedelta(days=rules.btk_hold_window_days)
    stops = []
    for request, drug in orders:
        status = text(request.get("status"))
        ended = request_end(request)
        if status not in BTK_STOP_STATUSES or ended is None or ended > now or now - ended > window:
            continue
        resumed = any(
            text(other.get("status")) == "active"
            and (request_start(other) or datetime.min.replace(tzinfo=now.tzinfo)) >= ended
            for other, _ in orders
        )
        if not resumed:
            stops.append(BtkStop(ended, drug, status or "", _ref(request)))
    return sorted(stops, key=lambda s: (s.when, s.resource))


def _exchanges(record: PatientRecord, terminology: Terminology, now: datetime):
    exchanges = []
    for procedure in record.procedures:
        if text(procedure.get("status")) != "completed":
            continue
        if not concept_matches(procedure.get("code"), terminology.plasma_exchange):
            continue
        when = (
            parse_fhir_datetime(procedure.get("performedDateTime"))
            or parse_fhir_datetime(field(procedure, "performedPeriod", "end"))
            or parse_fhir_datetime(field(procedure, "performedPeriod", "start"))
        )
        if when is not None and when <= now:
            exchanges.append(PlasmaExchange(when, "completed", _ref(procedure)))
    return sorted(exchanges, key=lambda e: (e.when, e.resource))


def build_history(
    record: PatientRecord, terminology: Terminology, rules: RulesSettings, now: datetime
) -> TreatmentHistory:
    doses, not_counted = _doses(record, terminology, now)
    # An entered-in-error record says nothing happened; not-done says the dose was not given.
    accounted = [d for d in not_counted if d.status != "entered-in-error"]
    gap = timedelta(days=rules.course_gap_days)
    # Each order's medication concepts, read once for both the anti-CD20 and the BTK check.
    meds = record.medications
    requests = [(r, medication_concepts(r, meds)) for r in record.medication_requests]
    # Most orders on a chart name neither class: one screen for both tells so, where the
    # course and BTK checks would each screen them (an order that names neither counts in none).
    requests = [(r, c) for r, c in requests if _drug_named(c, terminology.drug_groups) is not None]
    return TreatmentHistory(
        doses=tuple(doses),
        courses=tuple(_courses(doses, accounted, requests, terminology, gap, now)),
        btk_stops=tuple(_btk_stops(requests, terminology, rules, now)),
        exchanges=tuple(_exchanges(record, terminology, now)),
        not_counted=tuple(not_counted),
    )


def drafted_exchanges(draft_orders: Mapping[str, Any], terminology: Terminology) -> tuple[str, ...]:
    """Plasma exchange among the draft orders (a ServiceRequest or Procedure with its codes)."""
    found = []
    for entry in objects(draft_orders.get("entry")):
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            continue
        if resource.get("resourceType") not in ("ServiceRequest", "Procedure"):
            continue
        if concept_matches(resource.get("code"), terminology.plasma_exchange):
            found.append(_ref(resource))
    return tuple(found)
