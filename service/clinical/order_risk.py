"""Decisions 1, 2 and 5 for the order hooks: a pure function of record, orders, rules and now.

No Flask, no I/O, no clock of its own: the same inputs always give the same finding, so every
boundary is tested without HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from service.clinical.conditions import ConditionFact, matching_conditions
from service.clinical.observations import Reading, Unusable, classify
from service.clinical.orders import DrugOrder
from service.clinical.record import PatientRecord
from service.clinical.terminology import Terminology
from service.settings import RulesSettings

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
    unusable_viscosity: tuple[Unusable, ...]  # in the window and newer than `viscosity`
    high_viscosity: bool  # `viscosity` is at or above the critical threshold
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
    unusable_viscosity: tuple[Unusable, ...]
    igm_series: tuple[Reading, ...]
    high_viscosity: bool  # `viscosity` is at or above the critical threshold


def _ambiguous(reading: Reading, threshold: float) -> bool:
    """A result given as a bound ("> 3000", above the assay range) that cannot be placed on the
    threshold: the actual value may lie on either side of it."""
    value, comparator = reading.normalised, reading.comparator
    if comparator in (">", ">="):
        return value < threshold
    if comparator == "<":
        return value > threshold
    if comparator == "<=":
        return value >= threshold
    return False


def _split_usable(
    readings: list[Reading], unusable: list[Unusable], threshold: float, unit: str, now: datetime
) -> tuple[list[Reading], list[Unusable]]:
    limit = now + FUTURE_TOLERANCE
    usable = []
    for reading in readings:
        if reading.effective > limit:
            reason = "dated in the future"
        elif _ambiguous(reading, threshold):
            reason = f"a bound, not a value: cannot tell whether it reaches {threshold:,g} {unit}"
        else:
            usable.append(reading)
            continue
        unusable.append(
            Unusable(reading.observation_id, reading.effective, reading.reported, reason)
        )
    return usable, unusable


def _newer_than(unusable: list[Unusable], newest: datetime | None, since: datetime | None):
    """Unusable results that matter: those newer than the newest usable one (and in the window)."""
    return tuple(
        u
        for u in unusable
        if (u.effective is None or newest is None or u.effective > newest)
        and (since is None or u.effective is None or u.effective >= since)
    )


def read_labs(
    record: PatientRecord, terminology: Terminology, rules: RulesSettings, now: datetime
) -> LabPicture:
    igm, igm_unusable = _split_usable(
        *classify(record.igm, "igm", terminology.igm), rules.igm_high_mg_dl, "mg/dL", now
    )
    visc, visc_unusable = _split_usable(
        *classify(record.viscosity, "viscosity", terminology.viscosity),
        rules.viscosity_critical_cp,
        "cP",
        now,
    )
    last_known = igm[-1] if igm else None
    igm_cutoff = now - timedelta(days=rules.igm_lookback_days)
    latest = last_known if last_known and last_known.effective >= igm_cutoff else None
    visc_cutoff = now - timedelta(days=rules.viscosity_lookback_days)
    recent_visc = [r for r in visc if r.effective >= visc_cutoff]
    viscosity = recent_visc[-1] if recent_visc else None
    return LabPicture(
        latest_igm=latest,
        last_known_igm=last_known,
        # Unusable results matter when nothing usable is newer: they are why a card says "none".
        unusable_igm=_newer_than(igm_unusable, last_known.effective if last_known else None, None),
        viscosity=viscosity,
        unusable_viscosity=_newer_than(
            visc_unusable, viscosity.effective if viscosity else None, visc_cutoff
        ),
        igm_series=tuple(igm),
        high_viscosity=viscosity is not None
        and viscosity.normalised >= rules.viscosity_critical_cp,
    )


def hyperviscosity_evidence(labs: LabPicture, conditions: tuple[ConditionFact, ...]) -> bool:
    return bool(conditions) or labs.high_viscosity


def scope_reason(
    wm: tuple[ConditionFact, ...], labs: LabPicture, rules: RulesSettings
) -> str | None:
    """Why the patient is in scope (decision 1), or None when they are not."""
    if wm:
        return f"diagnosis {wm[0].display} ({wm[0].code}, Condition/{wm[0].condition_id})"
    last = labs.last_known_igm
    if last is not None and last.normalised >= rules.igm_high_mg_dl:
        return (
            f"serum IgM {last.normalised:,.0f} mg/dL (Observation/{last.observation_id}), "
            "an IgM paraprotein level"
        )
    if labs.unusable_igm:
        # The newest IgM could not be read: whether it is a paraprotein level cannot be told,
        # and "no card" would claim it is not.
        return "a serum IgM result that could not be used (see the table)"
    return None


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
    labs = read_labs(record, terminology, rules, now)
    scope = scope_reason(wm, labs, rules)
    if scope is None:
        return None  # e.g. rituximab for rheumatoid arthritis with a normal IgM
    hyperviscous = matching_conditions(
        record.conditions, terminology.hyperviscosity_conditions, now
    )
    latest = labs.latest_igm
    if hyperviscosity_evidence(labs, hyperviscous):
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
        unusable_viscosity=labs.unusable_viscosity,
        high_viscosity=labs.high_viscosity,
        hyperviscosity_conditions=hyperviscous,
        wm_conditions=wm,
        very_high=latest is not None and latest.normalised >= rules.igm_very_high_mg_dl,
    )
