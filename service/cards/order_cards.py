"""The card for an order-hook finding: values, data table and suggestions."""

from __future__ import annotations

from typing import Any

from service.cards.builder import CardBuilder, RenderedCard, SuggestionSpec
from service.cards.markdown import Markdown, day, inline, one_line, reading_mg_dl, table
from service.cards.suggestions import (
    create_action,
    delete_action,
    lab_requests,
    plasmapheresis_request,
)
from service.cards.treatment import treatment_rows
from service.clinical.order_risk import (
    CONTINUATION,
    CONTINUATION_HYPERVISCOSITY,
    HYPERVISCOSITY,
    HYPERVISCOSITY_SYMPTOMS,
    IGM_HIGH,
    IGM_MISSING,
    POST_EXCHANGE_IGM,
    OrderRiskFinding,
)
from service.settings import RulesSettings

DATA_HEADERS = ("Data", "As reported", "mg/dL", "Date", "Record")
# Cards whose plasmapheresis and other suggestions may be taken together.
ANY_OF_KINDS = frozenset({HYPERVISCOSITY, CONTINUATION_HYPERVISCOSITY, HYPERVISCOSITY_SYMPTOMS})
EXCHANGE_NOTE_KINDS = frozenset(
    {HYPERVISCOSITY, CONTINUATION_HYPERVISCOSITY, HYPERVISCOSITY_SYMPTOMS, IGM_HIGH}
)


def drug_names(finding: OrderRiskFinding) -> str:
    return ", ".join(dict.fromkeys(order.drug for order in finding.orders))


def data_table(finding: OrderRiskFinding, rules: RulesSettings) -> Markdown:
    rows: list[tuple[Any, ...]] = []
    igm = finding.latest_igm
    if igm is not None:
        rows.append(
            (
                "Serum IgM, latest usable",
                igm.reported,
                reading_mg_dl(igm),
                day(igm.effective),
                f"Observation/{igm.observation_id}",
            )
        )
    elif finding.last_known_igm is not None:
        old = finding.last_known_igm
        rows.append(
            (
                f"Serum IgM, last usable (older than {rules.igm_lookback_days} days)",
                old.reported,
                reading_mg_dl(old),
                day(old.effective),
                f"Observation/{old.observation_id}",
            )
        )
    else:
        rows.append(("Serum IgM", "none usable on record", "", "", ""))
    for item in finding.unusable_igm:
        rows.append(
            (
                f"Serum IgM, not used: {item.reason}",
                item.reported,
                "",
                day(item.effective),
                f"Observation/{item.observation_id}",
            )
        )
    for item in finding.unusable_viscosity:
        rows.append(
            (
                f"Serum viscosity, not used: {item.reason}",
                item.reported,
                "",
                day(item.effective),
                f"Observation/{item.observation_id}",
            )
        )
    visc = finding.viscosity
    if visc is not None:
        rows.append(
            (
                "Serum viscosity",
                visc.reported,
                "",
                day(visc.effective),
                f"Observation/{visc.observation_id}",
            )
        )
    else:
        rows.append(
            (f"Serum viscosity (last {rules.viscosity_lookback_days} days)", "none", "", "", "")
        )
    for cond in finding.wm_conditions:
        rows.append(
            ("Diagnosis", f"{cond.display} ({cond.code})", "", "", f"Condition/{cond.condition_id}")
        )
    for cond in finding.hyperviscosity_conditions:
        rows.append(
            (
                "Hyperviscosity diagnosis",
                f"{cond.display} ({cond.code})",
                "",
                "",
                f"Condition/{cond.condition_id}",
            )
        )
    for reading in finding.same_instant_igm:
        rows.append(
            (
                "Serum IgM at the same time, lower risk (not used)",
                reading.reported,
                reading_mg_dl(reading),
                day(reading.effective),
                f"Observation/{reading.observation_id}",
            )
        )
    for reading in finding.same_instant_viscosity:
        rows.append(
            (
                "Serum viscosity at the same time, lower risk (not used)",
                reading.reported,
                "",
                day(reading.effective),
                f"Observation/{reading.observation_id}",
            )
        )
    for cond in finding.symptom_conditions:
        rows.append(
            (
                "Symptom of hyperviscosity",
                f"{cond.display} ({cond.code})",
                "",
                day(cond.recorded),
                f"Condition/{cond.condition_id}",
            )
        )
    treatment = treatment_rows(
        finding.course or finding.inferred_course,
        finding.not_counted,
        finding.exchanges,
        finding.drafted_exchanges,
    )
    rows += [(what, status, "", when, record) for what, status, when, record in treatment]
    for order in finding.orders:
        version = "" if order.fhir_version == "R4" else f" (FHIR {order.fhir_version})"
        rows.append(
            (
                f"Order: {order.drug}",
                f"recognised by {order.matched_by}",
                "",
                "",
                (order.reference or "draft order without id") + version,
            )
        )
    return table(DATA_HEADERS, rows)


def _course_values(finding: OrderRiskFinding, builder: CardBuilder) -> dict[str, Any]:
    course = finding.course
    values: dict[str, Any] = {}
    if course is not None:
        count = len(course.doses)
        values.update(
            start_date=day(course.start),
            dose_count=f"{count} dose{'s' if count != 1 else ''}",
            last_dose_date=day(course.doses[-1].when),
        )
    if finding.kind in EXCHANGE_NOTE_KINDS:
        values["exchange_note"] = (
            builder.fragment(
                finding.kind,
                "exchange_note",
                {"drafted": ", ".join(finding.drafted_exchanges)},
            )
            if finding.drafted_exchanges
            else Markdown("")
        )
    if finding.kind == CONTINUATION:
        igm = finding.latest_igm
        name = "igm_none_sentence"
        if igm is not None:
            high = igm.at_least(builder.rules.igm_high_mg_dl)
            name = "igm_high_sentence" if high else "igm_low_sentence"
        fill = {**builder.common_values(), "igm_mg_dl": "", "igm_date": ""}
        if igm is not None:
            fill.update(igm_mg_dl=reading_mg_dl(igm), igm_date=day(igm.effective))
        values["igm_sentence"] = builder.fragment(CONTINUATION, name, fill)
    if finding.kind == HYPERVISCOSITY_SYMPTOMS:
        values["symptom_short"] = one_line(finding.symptom_conditions[0].display)
    if finding.kind == POST_EXCHANGE_IGM and finding.exchange_after_igm is not None:
        values["exchange_date"] = day(finding.exchange_after_igm.when)
        values["exchange_record"] = finding.exchange_after_igm.resource
    return values


def _evidence_short(finding: OrderRiskFinding) -> str:
    visc = finding.viscosity
    if visc is not None and finding.high_viscosity:
        return f"serum viscosity {visc.reported} on {day(visc.effective)}"
    cond = finding.hyperviscosity_conditions[0]
    if cond.code == "by name":
        return f"active problem {one_line(cond.display)}"
    return f"active diagnosis {cond.code}"


def _last_known_note(finding: OrderRiskFinding) -> Markdown:
    old = finding.last_known_igm
    notes = []
    if old is not None:
        notes.append(
            f"The last usable serum IgM was **{reading_mg_dl(old)} mg/dL** "
            f"({inline(old.reported)}) on {day(old.effective)} "
            f"(Observation/{inline(old.observation_id)})."
        )
    else:
        notes.append("No usable serum IgM is on record.")
    if finding.unusable_igm:
        notes.append(
            "Newer results could not be used; the table says why for each. They were not "
            "guessed at."
        )
    return Markdown(" ".join(notes))


def _igm_note(finding: OrderRiskFinding, rules: RulesSettings) -> Markdown:
    igm = finding.latest_igm
    if igm is None:
        return Markdown(
            f"- There is no usable serum IgM from the last {rules.igm_lookback_days} days: "
            "order serum IgM and viscosity.\n"
        )
    return Markdown(f"- Latest serum IgM: {reading_mg_dl(igm)} mg/dL on {day(igm.effective)}.\n")


def render_order_card(
    finding: OrderRiskFinding, patient_id: str, builder: CardBuilder
) -> RenderedCard:
    rules = builder.rules
    drug = drug_names(finding)
    igm = finding.latest_igm
    if finding.kind in (HYPERVISCOSITY_SYMPTOMS, POST_EXCHANGE_IGM):
        igm = finding.last_known_igm  # the value the card is about, however old
    values: dict[str, Any] = {
        "drug": drug,
        "igm_mg_dl": reading_mg_dl(igm) if igm else "unknown",
        "igm_date": day(igm.effective) if igm else "no date",
        "scope_reason": finding.scope_reason,
        "data_table": data_table(finding, rules),
    }
    values.update(_course_values(finding, builder))
    if finding.kind in (HYPERVISCOSITY, CONTINUATION_HYPERVISCOSITY):
        values["evidence_short"] = _evidence_short(finding)
        values["igm_note"] = _igm_note(finding, rules)
    if finding.kind == IGM_HIGH:
        values["very_high_note"] = (
            builder.fragment(IGM_HIGH, "very_high_note", builder.common_values())
            if finding.very_high
            else Markdown("")
        )
    if finding.kind == IGM_MISSING:
        values["last_known_note"] = _last_known_note(finding)
    return builder.build(
        finding.kind,
        values,
        suggestions=_suggestions(finding, patient_id, drug),
        selection_behavior="any" if finding.kind in ANY_OF_KINDS else "at-most-one",
        indicator=finding.indicator,
    )


def _labs(
    patient_id: str, reason: str, recommended: bool, only: tuple[str, ...] = ()
) -> SuggestionSpec:
    requests = [
        r
        for r in lab_requests(patient_id, reason)
        if not only or r["code"]["coding"][0]["code"] in only
    ]
    return SuggestionSpec(
        "labs",
        [create_action(f"Order {req['code']['text']}", req) for req in requests],
        recommended=recommended,
    )


def _suggestions(finding: OrderRiskFinding, patient_id: str, drug: str) -> list[SuggestionSpec]:
    evidence = []
    if finding.latest_igm is not None:
        evidence.append(f"Observation/{finding.latest_igm.observation_id}")
    if finding.viscosity is not None and finding.high_viscosity:
        evidence.append(f"Observation/{finding.viscosity.observation_id}")
    evidence += [f"Condition/{c.condition_id}" for c in finding.hyperviscosity_conditions]
    evidence += [f"Condition/{c.condition_id}" for c in finding.symptom_conditions]
    # Decision 8: plasmapheresis already among the drafts is not offered again.
    offer_exchange = not finding.drafted_exchanges
    # Decision 6: a continuation card never suggests deleting the dose.
    defer = SuggestionSpec(
        "defer",
        [
            delete_action(f"Remove the draft {order.drug} order", order.reference)
            for order in finding.orders
            if order.reference and not finding.continuation
        ],
    )
    kind = finding.kind

    def apheresis(urgent: bool, reason: str, label: str, recommended: bool) -> SuggestionSpec:
        request = plasmapheresis_request(patient_id, urgent, reason, evidence)
        actions = [create_action(label, request)] if offer_exchange else []
        return SuggestionSpec("plasmapheresis", actions, recommended)

    if kind in (HYPERVISCOSITY, CONTINUATION_HYPERVISCOSITY):
        specs = [
            apheresis(True, f"Hyperviscosity before {drug}", "Order plasmapheresis", True),
            defer,
        ]
        if finding.latest_igm is None or kind == CONTINUATION_HYPERVISCOSITY:
            specs.append(_labs(patient_id, f"Before {drug} (hyperviscosity)", False))
        return specs
    if kind == HYPERVISCOSITY_SYMPTOMS:
        return [
            _labs(patient_id, f"Possible symptomatic hyperviscosity before {drug}", True),
            apheresis(
                True,
                f"Possible symptomatic hyperviscosity before {drug}",
                "Order plasmapheresis",
                False,
            ),
        ]
    if kind == POST_EXCHANGE_IGM:
        return [_labs(patient_id, f"After plasma exchange, before {drug}", True)]
    if kind == CONTINUATION:
        missing = finding.latest_igm is None or finding.viscosity is None
        return [_labs(patient_id, f"Before this dose of {drug} (IgM flare)", missing)]
    if kind == IGM_HIGH:
        specs = [
            apheresis(
                False,
                f"Serum IgM at IgM flare risk level before {drug}",
                "Order prophylactic plasmapheresis",
                False,
            ),
            defer,
        ]
        if finding.viscosity is None:
            specs.append(
                _labs(patient_id, f"High serum IgM before {drug}", False, only=("3128-6",))
            )
        return specs
    if kind == IGM_MISSING:
        return [_labs(patient_id, f"Baseline before {drug} (IgM flare risk)", True)]
    return []
