"""Cards for patient-view findings: the IgM series as a table, and plasmapheresis when critical."""

from __future__ import annotations

from typing import Any

from service.cards.builder import CardBuilder, RenderedCard, SuggestionSpec
from service.cards.markdown import Markdown, day, inline, one_line, reading_mg_dl, table
from service.cards.suggestions import create_action, plasmapheresis_request
from service.cards.treatment import treatment_rows, treatment_table
from service.clinical.followup import (
    BTK_REBOUND,
    FLARE_NO_BASELINE,
    POSSIBLE_PROGRESSION,
    FollowupFinding,
    rise_percent,
)


def _weeks(finding: FollowupFinding, when: Any) -> str:
    return f"{(when - finding.start).days / 7:.1f}"


def series_table(finding: FollowupFinding) -> Markdown:
    since = "Weeks since hold" if finding.kind == BTK_REBOUND else "Weeks since first dose"
    rows = []
    # Possible progression is measured from the nadir (IWWM-6), everything else from baseline.
    progression = finding.kind == POSSIBLE_PROGRESSION
    reference = "nadir" if progression else "baseline"
    compared = finding.nadir if progression else finding.baseline
    for reading in finding.series:
        if compared is None:
            change = f"no {reference}"
        elif reading is compared:
            change = reference
        else:
            pct = rise_percent(reading, compared)
            change = f"{pct:+.0f}%" if pct is not None else f"no {reference}"
        weeks = (
            _weeks(finding, reading.effective) if reading.effective >= finding.start else "before"
        )
        rows.append(
            (
                day(reading.effective),
                reading.reported,
                reading_mg_dl(reading),
                change,
                weeks,
                f"Observation/{reading.observation_id}",
            )
        )
    inferred = (
        ", inferred from the order: no administration is recorded"
        if finding.course is not None and finding.course.inferred_from
        else ""
    )
    caption = (
        f"Start: {day(finding.start)} ({finding.start_record}{inferred}). "
        "Serum IgM, usable results only (final, amended or corrected; converted to mg/dL):"
    )
    headers = ("Date", "As reported", "mg/dL", f"Change from {reference}", since, "Record")
    return Markdown(inline(caption) + "\n\n" + table(headers, rows))


def hyperviscosity_table(finding: FollowupFinding) -> Markdown:
    rows = []
    if finding.viscosity is not None:
        v = finding.viscosity
        rows.append(
            ("Serum viscosity", v.reported, day(v.effective), f"Observation/{v.observation_id}")
        )
    for cond in finding.hyperviscosity_conditions:
        rows.append(
            (
                "Hyperviscosity diagnosis",
                f"{cond.display} ({cond.code})",
                "",
                f"Condition/{cond.condition_id}",
            )
        )
    for cond in finding.symptom_conditions:
        rows.append(
            (
                "Symptom of hyperviscosity, with IgM at or above the high-risk level",
                f"{cond.display} ({cond.code})",
                day(cond.recorded),
                f"Condition/{cond.condition_id}",
            )
        )
    return table(("Data", "As reported", "Date", "Record"), rows)


def _evidence_short(finding: FollowupFinding) -> str:
    """What shows hyperviscosity: a viscosity at or above the threshold, else the diagnosis."""
    visc = finding.viscosity
    if visc is not None and finding.high_viscosity:
        return f"viscosity {visc.reported}"
    if finding.hyperviscosity_conditions:
        cond = finding.hyperviscosity_conditions[0]
        return f"diagnosis {cond.code if cond.code != 'by name' else one_line(cond.display)}"
    if finding.symptom_conditions:
        return f"symptom {one_line(finding.symptom_conditions[0].display)}"
    return "hyperviscosity evidence"


def render_followup_card(
    finding: FollowupFinding, patient_id: str, builder: CardBuilder
) -> RenderedCard:
    rise = finding.rise_percent
    values: dict[str, Any] = {
        "drug": finding.drug,
        "rise": f"{rise:.0f}%" if rise is not None else "unknown",
        "baseline_mg_dl": reading_mg_dl(finding.baseline) if finding.baseline else "unknown",
        "latest_mg_dl": reading_mg_dl(finding.latest),
        "weeks": _weeks(finding, finding.latest.effective),
        "start_date": day(finding.start),
        "series_table": series_table(finding),
        "evidence_short": _evidence_short(finding),
        "hyperviscosity_table": hyperviscosity_table(finding),
        "treatment_table": treatment_table(
            treatment_rows(
                finding.course, finding.not_counted, finding.exchanges, (), finding.btk_stop
            )
        ),
    }
    if finding.nadir is not None:
        values["nadir_mg_dl"] = reading_mg_dl(finding.nadir)
        values["nadir_date"] = day(finding.nadir.effective)
    if finding.kind in (FLARE_NO_BASELINE, BTK_REBOUND, POSSIBLE_PROGRESSION):
        values["hyperviscosity_note"] = (
            builder.fragment(finding.kind, "hyperviscosity_note", values)
            if finding.hyperviscosity
            else Markdown("")
        )
    suggestions = []
    if finding.hyperviscosity:
        evidence = [f"Observation/{finding.latest.observation_id}"]
        visc = finding.viscosity
        if visc is not None and finding.high_viscosity:
            evidence.append(f"Observation/{visc.observation_id}")
        evidence += [f"Condition/{c.condition_id}" for c in finding.hyperviscosity_conditions]
        evidence += [f"Condition/{c.condition_id}" for c in finding.symptom_conditions]
        request = plasmapheresis_request(
            patient_id,
            True,
            f"Hyperviscosity with rising IgM after {finding.drug}",
            evidence,
            text="Plasmapheresis for hyperviscosity",
        )
        suggestions.append(
            SuggestionSpec(
                "plasmapheresis", [create_action("Order plasmapheresis", request)], recommended=True
            )
        )
    return builder.build(finding.kind, values, suggestions, indicator=finding.indicator)
