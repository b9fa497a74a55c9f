"""Decisions 1, 2 and 5 for the order hooks: a pure function of record, orders, rules and now.

No Flask, no I/O, no clock of its own: the same inputs always give the same finding, so every
boundary is tested without HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from service.conditions import ConditionFact, matching_conditions
from service.observations import Reading, Unusable, classify
from service.orders import DrugOrder
from service.record import PatientRecord
from service.settings import RulesSettings
from service.terminology import Terminology

# A result stamped a little ahead of the service's clock (time zones, clock drift) still counts.
FUTURE_TOLERANCE = timedelta(hours=12)

HYPERVISCOSITY = "hyperviscosity"
IGM_HIGH = "igm-high"
IGM_MISSING = "igm-missing"
IGM_BELOW_THRESHOLD = "igm-below-threshold"


@dataclass(frozen=True)
class OrderRiskFinding:
    """What the rules concluded about anti-CD20 orders, with every datum that led there."""

    kind: str
    indicator: str
    orders: tuple[DrugOrder, ...]
    scope_reason: str
    latest_igm: Reading | None  # latest usable IgM within the look-back window
    last_known_igm: Reading | None  # latest usable IgM at any time (may be stale)
    unusable_igm: tuple[Unusable, ...]  # results newer than the latest usable one
    viscosity: Reading | None  # latest usable viscosity within its window
    hyperviscosity_conditions: tuple[ConditionFact, ...]
    wm_conditions: tuple[ConditionFact, ...]
    very_high: bool


@dataclass(frozen=True)
class LabPicture:
    """The usable and unusable IgM and viscosity results, split by the look-back windows."""

    latest_igm: Reading | None
    last_known_igm: Reading | None
    unusable_igm: tuple[Unusable, ...]
    viscosity: Reading | None
    igm_series: tuple[Reading, ...]


def read_labs(record: PatientRecord, rules: RulesSettings, now: datetime) -> LabPicture:
    igm, unusable = classify(record.igm, "igm")
    viscosity, _ = classify(record.viscosity, "viscosity")
    limit = now + FUTURE_TOLERANCE
    future = [r for r in igm if r.effective > limit]
    igm = [r for r in igm if r.effective <= limit]
    unusable = list(unusable) + [
        Unusable(r.observation_id, r.effective, r.reported, "dated in the future") for r in future
    ]
    last_known = igm[-1] if igm else None
    igm_cutoff = now - timedelta(days=rules.igm_lookback_days)
    latest = last_known if last_known and last_known.effective >= igm_cutoff else None
    # Unusable results matter when nothing usable is newer: they are why a card may say "none".
    newest_usable = last_known.effective if last_known else None
    recent_unusable = tuple(
        u
        for u in unusable
        if u.effective is None or newest_usable is None or u.effective > newest_usable
    )
    visc_cutoff = now - timedelta(days=rules.viscosity_lookback_days)
    recent_visc = [r for r in viscosity if visc_cutoff <= r.effective <= limit]
    return LabPicture(
        latest_igm=latest,
        last_known_igm=last_known,
        unusable_igm=recent_unusable,
        viscosity=recent_visc[-1] if recent_visc else None,
        igm_series=tuple(igm),
    )


def hyperviscosity_evidence(
    labs: LabPicture, conditions: tuple[ConditionFact, ...], rules: RulesSettings
) -> bool:
    high_viscosity = labs.viscosity is not None and (
        labs.viscosity.normalised >= rules.viscosity_critical_cp
    )
    return bool(conditions) or high_viscosity


def assess_orders(
    record: PatientRecord,
    orders: list[DrugOrder],
    terminology: Terminology,
    rules: RulesSettings,
    now: datetime,
) -> OrderRiskFinding | None:
    """One finding for the anti-CD20 orders in this call, or None when no card is due."""
    if not orders:
        return None
    wm = matching_conditions(record.conditions, terminology.wm_conditions, now)
    labs = read_labs(record, rules, now)
    paraprotein = (
        labs.last_known_igm is not None and labs.last_known_igm.normalised >= rules.igm_high_mg_dl
    )
    if wm:
        scope = f"diagnosis {wm[0].display} ({wm[0].code}, Condition/{wm[0].condition_id})"
    elif paraprotein and labs.last_known_igm is not None:
        scope = (
            f"serum IgM {labs.last_known_igm.normalised:,.0f} mg/dL "
            f"(Observation/{labs.last_known_igm.observation_id}), an IgM paraprotein level"
        )
    else:
        return None  # e.g. rituximab for rheumatoid arthritis with a normal IgM
    hyperviscous = matching_conditions(
        record.conditions, terminology.hyperviscosity_conditions, now
    )
    latest = labs.latest_igm
    if hyperviscosity_evidence(labs, hyperviscous, rules):
        kind, indicator = HYPERVISCOSITY, "critical"
    elif latest is not None and latest.normalised >= rules.igm_high_mg_dl:
        kind, indicator = IGM_HIGH, "warning"
    elif latest is None:
        kind, indicator = IGM_MISSING, "warning"
    elif rules.info_card_below_threshold:
        kind, indicator = IGM_BELOW_THRESHOLD, "info"
    else:
        return None
    return OrderRiskFinding(
        kind=kind,
        indicator=indicator,
        orders=tuple(orders),
        scope_reason=scope,
        latest_igm=latest,
        last_known_igm=labs.last_known_igm,
        unusable_igm=labs.unusable_igm,
        viscosity=labs.viscosity,
        hyperviscosity_conditions=hyperviscous,
        wm_conditions=wm,
        very_high=latest is not None and latest.normalised >= rules.igm_very_high_mg_dl,
    )
