"""Who is in scope (decisions 1 and 9): a WM-spectrum diagnosis (also in remission, or as the
order's indication), IgM MGUS, or an IgM at a paraprotein level at any time on record.

Returns the reason as text for the card, naming the resource it rests on, or None.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from service.clinical.conditions import ConditionFact, concept_fact, matching_conditions
from service.clinical.observations import Reading
from service.clinical.orders import DrugOrder
from service.clinical.record import PatientRecord
from service.clinical.terminology import Terminology
from service.settings import RulesSettings

# Upper limit of normal serum IgM when the laboratory gives none (normal is about 40-230 mg/dL).
DEFAULT_IGM_UPPER_LIMIT_MG_DL = 230.0


def _condition(fact: ConditionFact, what: str = "diagnosis") -> str:
    code = "" if fact.code == "by name" else f"{fact.code}, "
    status = f", {fact.clinical_status}" if fact.clinical_status == "remission" else ""
    return f"{what} {fact.display} ({code}Condition/{fact.condition_id}{status})"


def order_indication(
    orders: Sequence[DrugOrder], conditions: Iterable[Mapping[str, Any]], terminology: Terminology
) -> str | None:
    """The WM-spectrum indication an order gives in reasonCode or reasonReference, if any."""
    by_id = {f"Condition/{c.get('id')}": c for c in conditions if isinstance(c.get("id"), str)}
    for order in orders:
        where = order.reference or "the draft order"
        for concept in order.reasons:
            fact = concept_fact(concept, terminology.wm_conditions, "")
            if fact is not None:
                return f"the indication on {where}: {fact.display}"
        for reference in order.reason_references:
            target = by_id.get("/".join(reference.split("/")[-2:]))
            fact = concept_fact(
                target.get("code") if target else None, terminology.wm_conditions, ""
            )
            if fact is not None:
                return f"the indication on {where}: {fact.display} ({reference})"
    return None


def _igm_mgus(
    record: PatientRecord, series: Sequence[Reading], terminology: Terminology, now: Any
) -> str | None:
    mgus = matching_conditions(
        record.conditions, terminology.mgus_conditions, now, in_remission=True
    )
    if not mgus:
        return None
    for reading in reversed(series):
        limit = reading.reference_high or DEFAULT_IGM_UPPER_LIMIT_MG_DL
        if reading.at_least(limit) and reading.normalised > limit:
            return (
                f"{_condition(mgus[0])} with serum IgM {reading.normalised:,.0f} mg/dL above the "
                f"upper reference limit {limit:,.0f} mg/dL (Observation/{reading.observation_id})"
            )
    return None


def scope_reason(
    record: PatientRecord,
    orders: Sequence[DrugOrder],
    wm: tuple[ConditionFact, ...],
    series: Sequence[Reading],
    newest_unusable: bool,
    terminology: Terminology,
    rules: RulesSettings,
    now: Any,
) -> str | None:
    """Why the patient is in scope, or None when they are not.

    `series`: every usable IgM, oldest first; `newest_unusable`: the newest IgM could not be
    used, so whether it is a paraprotein level cannot be told.
    """
    if wm:
        return _condition(wm[0])
    indication = order_indication(orders, record.conditions, terminology)
    if indication is not None:
        return indication
    high = [r for r in series if r.at_least(rules.igm_high_mg_dl)]
    if high:
        last = high[-1]
        return (
            f"serum IgM {last.normalised:,.0f} mg/dL on {last.effective:%Y-%m-%d} "
            f"(Observation/{last.observation_id}), an IgM paraprotein level"
        )
    mgus = _igm_mgus(record, series, terminology, now)
    if mgus is not None:
        return mgus
    if newest_unusable:
        # "No card" would claim the newest result is not a paraprotein level.
        return "a serum IgM result that could not be used (see the table)"
    return None
