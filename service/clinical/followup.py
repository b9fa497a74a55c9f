"""Decisions 3, 4 and 10 (patient-view): is a rising IgM flare, rebound after a BTK-inhibitor
hold, or - after the flare window - possible progression?

Course-aware: doses, courses, holds and exchanges come from the treatment history (decision 7),
so an infusion recorded `not-done` is no dose and a course recorded only as an order counts.
Pure: record, value sets, rules and now in; findings out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from service.clinical.conditions import ConditionFact, ConditionList
from service.clinical.history import (
    BtkStop,
    Course,
    Dose,
    PlasmaExchange,
    TreatmentHistory,
    build_history,
)
from service.clinical.observations import Reading
from service.clinical.order_risk import LabPicture, read_labs
from service.clinical.record import PatientRecord
from service.clinical.terminology import Terminology
from service.settings import RulesSettings

FLARE = "flare"
FLARE_HYPERVISCOSITY = "flare-hyperviscosity"
FLARE_NO_BASELINE = "flare-baseline-missing"
BTK_REBOUND = "btk-rebound"
POSSIBLE_PROGRESSION = "possible-progression"


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
    course: Course | None = None  # the anti-CD20 course (None for a BTK rebound)
    btk_stop: BtkStop | None = None
    exchanges: tuple[PlasmaExchange, ...] = ()  # done since the start of the baseline window
    not_counted: tuple[Dose, ...] = ()  # administrations on record in the course that are no dose
    nadir: Reading | None = None  # possible progression: the lowest result since the start
    symptom_conditions: tuple[ConditionFact, ...] = ()

    @property
    def rise_percent(self) -> float | None:
        if self.kind == POSSIBLE_PROGRESSION:
            return rise_percent(self.latest, self.nadir)
        return rise_percent(self.latest, self.baseline)


def rise_percent(reading: Reading, baseline: Reading | None) -> float | None:
    """Change of `reading` over `baseline` in percent; None when there is nothing to compare."""
    if baseline is None or baseline.normalised <= 0:
        return None
    return (reading.normalised / baseline.normalised - 1) * 100


def _split(series: Iterable[Reading], start: datetime) -> tuple[Reading | None, list[Reading]]:
    """Baseline (last result on or before the start day) and the results after it.

    Compared by calendar day: the IgM drawn on the morning of the first infusion is a baseline.
    """
    before = [r for r in series if r.effective.date() <= start.date()]
    after = [r for r in series if r.effective.date() > start.date()]
    return (before[-1] if before else None), after


def _viscosity_evidence(
    labs: LabPicture, history: TreatmentHistory, since: datetime, threshold: float
) -> tuple[Reading | None, bool]:
    """The latest viscosity since `since` (the start of the baseline window), and whether it is
    evidence: at or above the threshold with no plasma exchange after it (decision 10). A lower
    viscosity measured later is the latest, so it is not evidence either."""
    recent = [r for r in labs.viscosity_series if r.effective >= since]
    if not recent:
        return labs.viscosity, False
    latest = recent[-1]
    return latest, latest.at_least(threshold) and not history.exchanges_after(latest.effective)


def assess_followup(
    record: PatientRecord, terminology: Terminology, rules: RulesSettings, now: datetime
) -> list[FollowupFinding]:
    labs = read_labs(record, terminology, rules, now)
    conditions = ConditionList(record.conditions)  # read once for the value sets below
    wm = conditions.matching(terminology.wm_conditions, now, in_remission=True)
    paraprotein = any(r.at_least(rules.igm_high_mg_dl) for r in labs.igm_series)
    if not wm and not paraprotein:
        return []  # decision 1: e.g. rituximab for rheumatoid arthritis or CLL is not in scope
    history = build_history(record, terminology, rules, now)
    hyper_conditions = conditions.matching(terminology.hyperviscosity_conditions, now)
    symptoms: tuple[ConditionFact, ...] = ()
    if labs.igm_series and labs.igm_series[-1].at_least(rules.igm_high_mg_dl):
        symptoms = conditions.matching(
            terminology.hyperviscosity_symptoms,
            now,
            since=now - timedelta(days=rules.viscosity_lookback_days),
        )
    findings = []
    course = history.latest_course
    if course is not None:
        finding = _flare(course, rules, now, labs.igm_series) or _progression(
            course, rules, now, labs.igm_series
        )
        if finding is not None:
            findings.append(finding)
    if history.btk_stops:
        rebound = _btk_rebound(history.btk_stops[-1], rules, labs.igm_series)
        if rebound is not None:
            findings.append(rebound)
    result = []
    for f in findings:
        since = f.start - timedelta(days=rules.baseline_max_age_days)
        viscosity, high = _viscosity_evidence(labs, history, since, rules.viscosity_critical_cp)
        hyperviscous = bool(hyper_conditions) or high or bool(symptoms)
        f = replace(
            f,
            viscosity=viscosity,
            high_viscosity=high,
            hyperviscosity_conditions=hyper_conditions,
            symptom_conditions=symptoms,
            hyperviscosity=hyperviscous,
            exchanges=tuple(e for e in history.exchanges if e.when >= since),
            not_counted=tuple(d for d in history.not_counted if d.when >= since),
        )
        if hyperviscous:
            # Flare, rebound or progression, a rising IgM with hyperviscosity is dangerous.
            f = replace(
                f, kind=FLARE_HYPERVISCOSITY if f.kind == FLARE else f.kind, indicator="critical"
            )
        result.append(f)
    return result


def _course_finding(kind: str, course: Course, latest: Reading, series, **kw) -> FollowupFinding:
    return FollowupFinding(
        kind,
        "info",
        drug=course.drug,
        start=course.start,
        start_record=course.start_resource,
        latest=latest,
        series=tuple(series),
        viscosity=None,
        hyperviscosity_conditions=(),
        hyperviscosity=False,
        course=course,
        **kw,
    )


def _flare(
    course: Course, rules: RulesSettings, now: datetime, series: tuple[Reading, ...]
) -> FollowupFinding | None:
    if not series:
        return None
    baseline, after = _split(series, course.start)
    latest = series[-1]
    window_end = course.start + timedelta(days=rules.flare_window_days)
    # A card stays while the reading is current: once the window and a look-back period have
    # passed with no new result, "probable flare" would be stale advice.
    stale = now > window_end + timedelta(days=rules.igm_lookback_days)
    if not after or latest is not after[-1] or latest.effective > window_end or stale:
        return None  # nothing measured since the start, or the flare window has passed
    if (
        baseline is not None
        and (course.start.date() - baseline.effective.date()).days > rules.baseline_max_age_days
    ):
        baseline = None  # too old to tell a flare from the disease's own course before treatment
    shown = ([baseline] if baseline else []) + after
    if baseline is None:
        return _course_finding(FLARE_NO_BASELINE, course, latest, shown, baseline=None)
    rise = rise_percent(latest, baseline)
    if rise is not None and rise > rules.flare_rise_percent:
        return _course_finding(FLARE, course, latest, shown, baseline=baseline)
    return None


def _progression(
    course: Course, rules: RulesSettings, now: datetime, series: tuple[Reading, ...]
) -> FollowupFinding | None:
    """After the flare window, a rise of more than the progression percentage over the nadir,
    confirmed by a second result (IWWM-6), is possible progression - never read as flare."""
    baseline, after = _split(series, course.start)
    if len(after) < 3:
        return None  # a nadir and two results above it are needed
    window_end = course.start + timedelta(days=rules.flare_window_days)
    confirming, latest = after[-2], after[-1]
    if confirming.effective <= window_end:
        return None  # inside the flare window a rise is read as flare, not progression
    if now - latest.effective > timedelta(days=rules.igm_lookback_days):
        return None  # not current
    nadir = min(after[:-2], key=lambda r: r.normalised)
    limit = rules.progression_rise_percent
    if not all((rise_percent(r, nadir) or 0) > limit for r in (confirming, latest)):
        return None
    return _course_finding(
        POSSIBLE_PROGRESSION, course, latest, [*after], baseline=baseline, nadir=nadir
    )


def _btk_rebound(
    stop: BtkStop, rules: RulesSettings, series: tuple[Reading, ...]
) -> FollowupFinding | None:
    baseline, after = _split(series, stop.when)
    if not after:
        return None
    latest = after[-1]
    rise = rise_percent(latest, baseline)
    if rise is None or rise <= rules.btk_rebound_rise_percent:
        return None
    return FollowupFinding(
        BTK_REBOUND,
        "info",
        stop.drug,
        stop.when,
        stop.resource,
        baseline,
        latest,
        (baseline, *after),
        None,
        (),
        False,
        btk_stop=stop,
    )
