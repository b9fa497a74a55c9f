"""What the clinical core read, as the chart's plain series and spans.

Doses, courses, BTK-inhibitor stops and plasma exchanges come from the same treatment history
the hooks judge by (`service.clinical.history`); the flare window and baseline from the
patient-view findings, so the picture shows what the card was computed from.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from service.app.chart_data import ChartInput, Marker, Point, Span
from service.clinical.followup import BTK_REBOUND, POSSIBLE_PROGRESSION, FollowupFinding
from service.clinical.history import Course, TreatmentHistory
from service.clinical.observations import Reading, Unusable
from service.settings import RulesSettings


def course_span(course: Course) -> Span:
    label = f"{course.drug} course" + (" (start from the order)" if course.inferred_from else "")
    end = max(course.last_activity, course.start + timedelta(days=1))
    return Span(course.start, end, label)


def baseline_for(
    series: Sequence[Reading], start: datetime, rules: RulesSettings
) -> Reading | None:
    """The flare rule's baseline: the last result on or before the start day, if recent enough."""
    before = [r for r in series if r.effective.date() <= start.date()]
    if not before:
        return None
    age = (start.date() - before[-1].effective.date()).days
    return before[-1] if age <= rules.baseline_max_age_days else None


def chart_input(
    *,
    igm: Sequence[Reading],
    igm_unusable: Sequence[Unusable],
    viscosity: Sequence[Reading],
    history: TreatmentHistory,
    findings: Sequence[FollowupFinding],
    rules: RulesSettings,
) -> ChartInput:
    courses = history.courses
    spans = tuple(course_span(c) for c in courses)
    flare = next((f for f in findings if f.kind not in (BTK_REBOUND, POSSIBLE_PROGRESSION)), None)
    rebound = next((f for f in findings if f.kind == BTK_REBOUND), None)
    window = baseline = None
    rise = rules.flare_rise_percent
    start = flare.start if flare else (courses[-1].start if courses else None)
    if start is not None:
        end = start + timedelta(days=rules.flare_window_days)
        window = Span(start, end, f"Flare window ({rules.flare_window_days} days)")
        chosen = flare.baseline if flare else baseline_for(igm, start, rules)
        baseline = chosen.normalised if chosen else None
    elif rebound is not None and rebound.baseline is not None:
        # No anti-CD20 course to measure from: the rebound rule's own baseline and rise.
        baseline, rise = rebound.baseline.normalised, rules.btk_rebound_rise_percent
    holds = tuple(Marker(s.when, f"{s.drug} {_stopped(s.status)}") for s in history.btk_stops)
    return ChartInput(
        igm=tuple(Point(r.effective, r.normalised) for r in igm),
        igm_threshold=rules.igm_high_mg_dl,
        viscosity_threshold=rules.viscosity_critical_cp,
        rise_percent=rise,
        igm_unusable=tuple(Marker(u.effective, u.reason) for u in igm_unusable if u.effective),
        viscosity=tuple(Point(r.effective, r.normalised) for r in viscosity),
        doses=tuple(Marker(d.when, d.drug) for d in history.doses),
        courses=spans,
        holds=holds,
        exchanges=tuple(Marker(e.when, "plasma exchange") for e in history.exchanges),
        flare_window=window,
        baseline=baseline,
    )


def _stopped(status: str) -> str:
    return {"on-hold": "held", "stopped": "stopped", "completed": "ended"}.get(status, "stopped")
