"""The timeline for one patient: read from the FHIR server, judged by the hooks' own rules.

The data come through the same gathering and FHIR client as a hook call that lacks prefetch
(allow-list, deadline, paging, other-patient checks), and the findings and card summaries come
from the same core and card renderer, so the page and the card cannot disagree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from service.api.runtime import Runtime
from service.app.chart_data import ChartInput
from service.app.drawing import draw_svg
from service.app.series import chart_input
from service.cards.followup_cards import render_followup_card
from service.cards.markdown import day, mg_dl
from service.cards.order_cards import render_order_card
from service.clinical.followup import assess_followup
from service.clinical.history import Dose, TreatmentHistory, build_history
from service.clinical.observations import Reading, Unusable, classify
from service.clinical.order_risk import (
    FUTURE_TOLERANCE,
    HYPERVISCOSITY,
    IGM_BELOW_THRESHOLD,
    IGM_HIGH,
    IGM_MISSING,
    assess_orders,
    read_labs,
)
from service.clinical.orders import find_drug_orders
from service.clinical.record import PatientRecord
from service.record.definitions import PATIENT_VIEW
from service.record.gathering import gather_record
from service.settings import RulesSettings

FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
ORDER_FINDINGS = frozenset({HYPERVISCOSITY, IGM_HIGH, IGM_MISSING, IGM_BELOW_THRESHOLD})
# Orders that may be the one an order-hook card was about, once the EHR has stored it.
PENDING_ORDER_STATUSES = frozenset({"draft", "active", "on-hold"})


@dataclass(frozen=True)
class RuleReading:
    finding: str
    title: str
    indicator: str
    summary: str


@dataclass(frozen=True)
class ValueRow:
    test: str
    date: str
    reported: str
    mg_dl: str
    use: str
    record: str


@dataclass(frozen=True)
class Timeline:
    patient_id: str
    readings: tuple[RuleReading, ...]
    order_note: str
    rows: tuple[ValueRow, ...]
    chart_svg: str
    usable_igm: int
    text_alternative: tuple[str, ...]


def read_timeline(
    runtime: Runtime, iss: str, token: str | None, patient_id: str, linked_finding: str | None
) -> Timeline:
    """Raises DataUnavailable or UnreadableData (from gathering) when the data cannot be had."""
    body: dict[str, Any] = {"context": {"patientId": patient_id}, "fhirServer": iss}
    if token:
        body["fhirAuthorization"] = {"access_token": token, "token_type": "Bearer"}
    definition = runtime.definitions[PATIENT_VIEW]
    record = gather_record(body, definition, runtime.fetcher)
    return judge(runtime, record, linked_finding)


def judge(runtime: Runtime, record: PatientRecord, linked_finding: str | None) -> Timeline:
    rules, terminology, now = runtime.settings.rules, runtime.terminology, runtime.clock()
    labs = read_labs(record, terminology, rules, now)
    findings = assess_followup(record, terminology, rules, now)
    readings = []
    for finding in findings:
        card = render_followup_card(finding, record.patient_id, runtime.builder)
        readings.append(_reading(runtime, card.finding, card.card))
    order_note = ""
    if linked_finding in ORDER_FINDINGS:
        order_reading, order_note = _order_reading(runtime, record, now)
        if order_reading is not None:
            readings.append(order_reading)
    readings.sort(key=lambda r: r.finding != linked_finding)  # the card followed comes first
    igm_readings, igm_unusable = classify(record.igm, "igm", terminology.igm)
    visc_readings, visc_unusable = classify(record.viscosity, "viscosity", terminology.viscosity)
    used = {r.observation_id for r in labs.igm_series}
    # Results the order rules set aside after reading them, for the reason they do.
    set_aside = [
        Unusable(
            r.observation_id,
            r.effective,
            r.reported,
            "dated in the future"
            if r.effective > now + FUTURE_TOLERANCE
            else "a bound, not a value: cannot be placed on the threshold",
        )
        for r in igm_readings
        if r.observation_id not in used
    ]
    all_unusable = sorted(
        [*igm_unusable, *set_aside], key=lambda u: (u.effective is None, day(u.effective))
    )
    history = build_history(record, terminology, rules, now)
    chart = chart_input(
        igm=labs.igm_series,
        igm_unusable=all_unusable,
        viscosity=visc_readings,
        history=history,
        findings=findings,
        rules=rules,
    )
    svg = draw_svg(chart, f"Serum IgM and viscosity, patient {record.patient_id}")
    rows = _rows(labs.igm_series, all_unusable, visc_readings, visc_unusable)
    summary = _text_alternative(labs.igm_series, all_unusable, visc_readings, history, chart, rules)
    return Timeline(
        record.patient_id,
        tuple(readings),
        order_note,
        rows,
        svg,
        len(labs.igm_series),
        summary,
    )


def _reading(runtime: Runtime, finding: str, card: Mapping[str, Any]) -> RuleReading:
    title = runtime.catalog[finding].title
    return RuleReading(finding, title, card["indicator"], card["summary"])


def _order_reading(
    runtime: Runtime, record: PatientRecord, now: datetime
) -> tuple[RuleReading | None, str]:
    """The order hooks' reading, recomputed from the anti-CD20 orders now on record."""
    entries = [
        {"resource": r}
        for r in record.medication_requests
        if r.get("status") in PENDING_ORDER_STATUSES
    ] + [{"resource": m} for m in record.medications.values()]
    orders = find_drug_orders({"entry": entries}, runtime.terminology.anti_cd20)
    if not orders:
        return None, (
            "The card came from an order hook, and the order is not on record yet: the order "
            "card's reading cannot be recomputed here. The values below are the ones it read."
        )
    finding = assess_orders(record, orders, runtime.terminology, runtime.settings.rules, now)
    if finding is None:
        return None, "The order hooks' rules find nothing to warn about on today's data."
    card = render_order_card(finding, record.patient_id, runtime.builder)
    refs = ", ".join(o.reference for o in orders if o.reference) or "an order without id"
    return _reading(runtime, card.finding, card.card), f"Order-hook reading for {refs}."


def _rows(
    igm: tuple[Reading, ...],
    igm_unusable: list[Unusable],
    viscosity: list[Reading],
    visc_unusable: list[Unusable],
) -> tuple[ValueRow, ...]:
    rows = [
        ValueRow(
            "Serum IgM",
            day(r.effective),
            r.reported,
            mg_dl(r.normalised),
            "used",
            f"Observation/{r.observation_id}",
        )
        for r in igm
    ]
    rows += [
        ValueRow(
            "Serum IgM",
            day(u.effective),
            u.reported,
            "",
            f"not used: {u.reason}",
            f"Observation/{u.observation_id}",
        )
        for u in igm_unusable
    ]
    rows += [
        ValueRow(
            "Serum viscosity",
            day(r.effective),
            r.reported,
            "",
            "used",
            f"Observation/{r.observation_id}",
        )
        for r in viscosity
    ]
    rows += [
        ValueRow(
            "Serum viscosity",
            day(u.effective),
            u.reported,
            "",
            f"not used: {u.reason}",
            f"Observation/{u.observation_id}",
        )
        for u in visc_unusable
    ]
    return tuple(sorted(rows, key=lambda row: (row.test, row.date, row.record)))


def _text_alternative(
    igm: tuple[Reading, ...],
    unusable: list[Unusable],
    viscosity: list[Reading],
    history: TreatmentHistory,
    chart: ChartInput,
    rules: RulesSettings,
) -> tuple[str, ...]:
    doses: Sequence[Dose] = history.doses
    lines = []
    if igm:
        low = min(igm, key=lambda r: r.normalised)
        high = max(igm, key=lambda r: r.normalised)
        lines.append(
            f"{len(igm)} usable serum IgM results from {day(igm[0].effective)} to "
            f"{day(igm[-1].effective)}; lowest {mg_dl(low.normalised)} mg/dL on "
            f"{day(low.effective)}, highest {mg_dl(high.normalised)} mg/dL on "
            f"{day(high.effective)}, latest {mg_dl(igm[-1].normalised)} mg/dL."
        )
    else:
        lines.append("No usable serum IgM result is on record.")
    if unusable:
        lines.append(f"{_count(unusable, 'IgM result')} could not be used (listed in the table).")
    lines.append(f"High-risk threshold: {mg_dl(rules.igm_high_mg_dl)} mg/dL.")
    if chart.baseline is not None:
        lines.append(
            f"Baseline {mg_dl(chart.baseline)} mg/dL; baseline +{chart.rise_percent:g}% is "
            f"{mg_dl(chart.baseline * (1 + chart.rise_percent / 100))} mg/dL."
        )
    if doses:
        dates = ", ".join(day(d.when) for d in doses)
        lines.append(f"Anti-CD20 doses ({doses[0].drug}): {dates}.")
    if chart.flare_window is not None:
        w = chart.flare_window
        lines.append(f"Flare window: {day(w.start)} to {day(w.end)}.")
    for stop in history.btk_stops:
        lines.append(f"BTK inhibitor {stop.drug} {stop.status} on {day(stop.when)}.")
    if history.exchanges:
        dates = ", ".join(day(e.when) for e in history.exchanges)
        lines.append(f"Plasma exchanges: {dates}.")
    if viscosity:
        latest = viscosity[-1]
        lines.append(
            f"{_count(viscosity, 'serum viscosity result')}; latest {latest.reported} on "
            f"{day(latest.effective)}."
        )
    return tuple(lines)


def _count(items: Sequence[object], noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"
