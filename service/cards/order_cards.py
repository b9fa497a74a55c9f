"""The card for an order-hook finding: values, data table and suggestions."""

from __future__ import annotations

from typing import Any

from service.cards.builder import CardBuilder, RenderedCard, SuggestionSpec
from service.cards.markdown import Markdown, day, inline, mg_dl, table
from service.cards.suggestions import (
    create_action,
    delete_action,
    lab_requests,
    plasmapheresis_request,
)
from service.clinical.order_risk import (
    HYPERVISCOSITY,
    IGM_HIGH,
    IGM_MISSING,
    OrderRiskFinding,
)
from service.settings import RulesSettings

DATA_HEADERS = ("Data", "As reported", "mg/dL", "Date", "Record")


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
                mg_dl(igm.normalised),
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
                mg_dl(old.normalised),
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


def _evidence_short(finding: OrderRiskFinding) -> str:
    visc = finding.viscosity
    if visc is not None and finding.high_viscosity:
        return f"serum viscosity {visc.reported} on {day(visc.effective)}"
    cond = finding.hyperviscosity_conditions[0]
    return f"active diagnosis {cond.code}"


def _last_known_note(finding: OrderRiskFinding) -> Markdown:
    old = finding.last_known_igm
    notes = []
    if old is not None:
        notes.append(
            f"The last usable serum IgM was **{mg_dl(old.normalised)} mg/dL** "
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
    return Markdown(f"- Latest serum IgM: {mg_dl(igm.normalised)} mg/dL on {day(igm.effective)}.\n")


def render_order_card(
    finding: OrderRiskFinding, patient_id: str, builder: CardBuilder
) -> RenderedCard:
    rules = builder.rules
    drug = drug_names(finding)
    igm = finding.latest_igm
    values: dict[str, Any] = {
        "drug": drug,
        "igm_mg_dl": mg_dl(igm.normalised) if igm else "unknown",
        "igm_date": day(igm.effective) if igm else "no date",
        "scope_reason": finding.scope_reason,
        "data_table": data_table(finding, rules),
    }
    if finding.kind == HYPERVISCOSITY:
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
        selection_behavior="any" if finding.kind == HYPERVISCOSITY else "at-most-one",
    )


def _suggestions(finding: OrderRiskFinding, patient_id: str, drug: str) -> list[SuggestionSpec]:
    evidence = []
    if finding.latest_igm is not None:
        evidence.append(f"Observation/{finding.latest_igm.observation_id}")
    if finding.viscosity is not None and finding.high_viscosity:
        evidence.append(f"Observation/{finding.viscosity.observation_id}")
    evidence += [f"Condition/{c.condition_id}" for c in finding.hyperviscosity_conditions]
    defer = SuggestionSpec(
        "defer",
        [
            delete_action(f"Remove the draft {order.drug} order", order.reference)
            for order in finding.orders
            if order.reference
        ],
    )
    labs = SuggestionSpec(
        "labs",
        [
            create_action(f"Order {req['code']['text']}", req)
            for req in lab_requests(patient_id, f"Baseline before {drug} (IgM flare risk)")
        ],
        recommended=finding.kind == IGM_MISSING,
    )
    if finding.kind == HYPERVISCOSITY:
        apheresis = plasmapheresis_request(
            patient_id, True, f"Hyperviscosity before {drug}", evidence
        )
        specs = [
            SuggestionSpec(
                "plasmapheresis", [create_action("Order plasmapheresis", apheresis)], True
            ),
            defer,
        ]
        if finding.latest_igm is None:
            specs.append(labs)
        return specs
    if finding.kind == IGM_HIGH:
        apheresis = plasmapheresis_request(
            patient_id, False, f"Serum IgM at IgM flare risk level before {drug}", evidence
        )
        return [
            SuggestionSpec(
                "plasmapheresis", [create_action("Order prophylactic plasmapheresis", apheresis)]
            ),
            defer,
        ]
    if finding.kind == IGM_MISSING:
        return [labs]
    return []
