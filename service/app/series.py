"""What the clinical core read, as the chart's plain series and spans.

Today doses come from `followup.anti_cd20_doses`, courses are those doses grouped by the rules'
course gap, and a BTK-inhibitor hold is drawn where the rebound rule found one. A treatment
history from elsewhere (courses, holds, plasma exchanges) needs only another function here that
returns the same `ChartInput` fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from service.app.chart import ChartInput, Marker, Point, Span
from service.clinical.followup import BTK_REBOUND, Dose, FollowupFinding
from service.clinical.observations import Reading, Unusable
from service.settings import RulesSettings


def courses_of(doses: Sequence[Dose], gap_days: int) -> list[list[Dose]]:
    """Doses (oldest first) split where the gap is longer than `gap_days`, as the rules do."""
    courses: list[list[Dose]] = []
    for dose in doses:
        if courses and dose.when - courses[-1][-1].when <= timedelta(days=gap_days):
            courses[-1].append(dose)
        else:
            courses.append([dose])
    return courses


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
    doses: Sequence[Dose],
    findings: Sequence[FollowupFinding],
    rules: RulesSettings,
) -> ChartInput:
    courses = courses_of(doses, rules.course_gap_days)
    spans = tuple(
        Span(c[0].when, max(c[-1].when, c[0].when + timedelta(days=1)), f"{c[0].drug} course")
        for c in courses
    )
    flare = next((f for f in findings if f.kind != BTK_REBOUND), None)
    rebound = next((f for f in findings if f.kind == BTK_REBOUND), None)
    window = baseline = None
    rise = rules.flare_rise_percent
    start = flare.start if flare else (courses[-1][0].when if courses else None)
    if start is not None:
        end = start + timedelta(days=rules.flare_window_days)
        window = Span(start, end, f"Flare window ({rules.flare_window_days} days)")
        chosen = flare.baseline if flare else baseline_for(igm, start, rules)
        baseline = chosen.normalised if chosen else None
    elif rebound is not None and rebound.baseline is not None:
        # No anti-CD20 course to measure from: the rebound rule's own baseline and rise.
        baseline, rise = rebound.baseline.normalised, rules.btk_rebound_rise_percent
    holds = tuple(Marker(f.start, f"{f.drug} held") for f in findings if f.kind == BTK_REBOUND)
    return ChartInput(
        igm=tuple(Point(r.effective, r.normalised) for r in igm),
        igm_threshold=rules.igm_high_mg_dl,
        viscosity_threshold=rules.viscosity_critical_cp,
        rise_percent=rise,
        igm_unusable=tuple(Marker(u.effective, u.reason) for u in igm_unusable if u.effective),
        viscosity=tuple(Point(r.effective, r.normalised) for r in viscosity),
        doses=tuple(Marker(d.when, d.drug) for d in doses),
        courses=spans,
        holds=holds,
        flare_window=window,
        baseline=baseline,
    )
