"""Decisions 1, 2, 5 and 6-9 for the order hooks: a pure function of record, orders, rules and now.

No Flask, no I/O, no clock of its own: the same inputs always give the same finding, so every
boundary is tested without HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from service.clinical.conditions import ConditionFact, ConditionList
from service.clinical.history import Course, Dose, PlasmaExchange, build_history
from service.clinical.observations import Reading, Unusable, classify
from service.clinical.orders import DrugOrder
from service.clinical.record import PatientRecord
from service.clinical.scope import scope_reason
from service.clinical.terminology import Terminology
from service.settings import RulesSettings

# A result stamped a little ahead of the service's clock (time zones, clock drift) still counts.
FUTURE_TOLERANCE = timedelta(hours=12)

HYPERVISCOSITY = "hyperviscosity"
IGM_HIGH = "igm-high"
IGM_MISSING = "igm-missing"
IGM_BELOW_THRESHOLD = "igm-below-threshold"
# Decisions 6-9.
CONTINUATION = "course-continuation"
CONTINUATION_HYPERVISCOSITY = "continuation-hyperviscosity"
HYPERVISCOSITY_SYMPTOMS = "hyperviscosity-symptoms"
POST_EXCHANGE_IGM = "post-exchange-igm"

# A draft that ends or pauses therapy is not an order to give the antibody (decision 7).
ENDING_STATUSES = frozenset(
    {"stopped", "cancelled", "completed", "entered-in-error", "revoked", "on-hold"}
)


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
    high_viscosity: bool  # `viscosity` is at or above the critical threshold (and current)
    hyperviscosity_conditions: tuple[ConditionFact, ...]
    wm_conditions: tuple[ConditionFact, ...]
    very_high: bool
    # Decisions 6-9: the course this order continues (doses given), or the course inferred
    # from an order; plasma exchanges done and drafted; symptoms; results at the same instant.
    course: Course | None = None
    inferred_course: Course | None = None
    not_counted: tuple[Dose, ...] = ()
    exchanges: tuple[PlasmaExchange, ...] = ()
    exchange_after_igm: PlasmaExchange | None = None
    drafted_exchanges: tuple[str, ...] = ()
    symptom_conditions: tuple[ConditionFact, ...] = ()
    same_instant_igm: tuple[Reading, ...] = ()
    same_instant_viscosity: tuple[Reading, ...] = ()

    @property
    def continuation(self) -> bool:
        return self.course is not None


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
    viscosity_series: tuple[Reading, ...] = ()
    same_instant_igm: tuple[Reading, ...] = ()  # other usable IgM at the latest one's instant
    same_instant_viscosity: tuple[Reading, ...] = ()


def _ambiguous(reading: Reading, threshold: float) -> bool:
    """A result given as a bound that cannot be placed on the threshold: the actual value may
    lie on either side of it. "<4000" or "<=4000" is below 4,000; ">4000" or ">=4000" is at or
    above it; "<5000" and ">3000" straddle it."""
    value, comparator = reading.normalised, reading.comparator
    if comparator in (">", ">="):
        return value < threshold
    if comparator in ("<", "<="):
        return value > threshold
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
        high_viscosity=viscosity is not None and viscosity.at_least(rules.viscosity_critical_cp),
        viscosity_series=tuple(visc),
        same_instant_igm=_same_instant(igm, latest),
        same_instant_viscosity=_same_instant(visc, viscosity),
    )


def _same_instant(readings: list[Reading], used: Reading | None) -> tuple[Reading, ...]:
    """The other results taken at the same instant as `used` (the card shows them all)."""
    if used is None:
        return ()
    return tuple(r for r in readings if r.effective == used.effective and r is not used)


def hyperviscosity_evidence(labs: LabPicture, conditions: tuple[ConditionFact, ...]) -> bool:
    return bool(conditions) or labs.high_viscosity


def _giving(orders: list[DrugOrder]) -> tuple[DrugOrder, ...]:
    return tuple(o for o in orders if o.status not in ENDING_STATUSES)


def assess_orders(
    record: PatientRecord,
    orders: list[DrugOrder],
    terminology: Terminology,
    rules: RulesSettings,
    now: datetime,
    drafted_exchanges: tuple[str, ...] = (),
) -> OrderRiskFinding | None:
    """One finding for the anti-CD20 orders in this call, or None when no card is due."""
    giving = _giving(orders)
    if not giving:
        return None  # no order to give the antibody: nothing to warn about (decision 7)
    conditions = ConditionList(record.conditions)  # read once for the three value sets below
    wm = conditions.matching(terminology.wm_conditions, now, in_remission=True)
    labs = read_labs(record, terminology, rules, now)
    scope = scope_reason(
        record, giving, wm, labs.igm_series, bool(labs.unusable_igm), terminology, rules, now
    )
    if scope is None:
        return None  # e.g. rituximab for rheumatoid arthritis with a normal IgM
    history = build_history(record, terminology, rules, now)
    hyperviscous = conditions.matching(terminology.hyperviscosity_conditions, now)
    visc = labs.viscosity
    # An exchange after the high viscosity removed what it measured (decision 8).
    high_viscosity = labs.high_viscosity and not (visc and history.exchanges_after(visc.effective))
    labs = replace(labs, high_viscosity=high_viscosity)
    last_igm, latest = labs.last_known_igm, labs.latest_igm
    symptoms = ()
    if last_igm is not None and last_igm.at_least(rules.igm_high_mg_dl):
        symptoms = conditions.matching(
            terminology.hyperviscosity_symptoms,
            now,
            since=now - timedelta(days=rules.viscosity_lookback_days),
        )
    exchange_after = None
    if last_igm is not None and history.exchanges_after(last_igm.effective):
        exchange_after = history.exchanges_after(last_igm.effective)[-1]
    course = history.current_course(now, rules.course_gap_days)
    continuing = course if course is not None and course.doses else None
    if hyperviscosity_evidence(labs, hyperviscous):
        kind = CONTINUATION_HYPERVISCOSITY if continuing else HYPERVISCOSITY
        indicator = "critical"
    elif symptoms:
        kind, indicator = HYPERVISCOSITY_SYMPTOMS, "critical"
    elif exchange_after is not None:
        kind, indicator = POST_EXCHANGE_IGM, "warning"
    elif continuing is not None:
        kind = CONTINUATION
        concern = latest is None or latest.at_least(rules.igm_high_mg_dl)
        indicator = "warning" if concern else "info"
        if not concern and not rules.info_card_below_threshold:
            return None  # a site that turned info cards off gets none at each dose either
    elif latest is not None and latest.at_least(rules.igm_high_mg_dl):
        kind, indicator = IGM_HIGH, "warning"
    elif latest is None:
        kind, indicator = IGM_MISSING, "warning"
    elif rules.info_card_below_threshold:
        kind, indicator = IGM_BELOW_THRESHOLD, "info"
    else:
        return None
    shown_since = (course.start if course else now) - timedelta(days=rules.igm_lookback_days)
    return OrderRiskFinding(
        kind=kind,
        indicator=indicator,
        orders=giving,
        scope_reason=scope,
        latest_igm=latest,
        last_known_igm=last_igm,
        unusable_igm=labs.unusable_igm,
        viscosity=visc,
        unusable_viscosity=labs.unusable_viscosity,
        high_viscosity=high_viscosity,
        hyperviscosity_conditions=hyperviscous,
        wm_conditions=wm,
        very_high=latest is not None and latest.at_least(rules.igm_very_high_mg_dl),
        course=continuing,
        inferred_course=course if course is not None and course.inferred_from else None,
        not_counted=tuple(d for d in history.not_counted if d.when >= shown_since),
        exchanges=tuple(e for e in history.exchanges if e.when >= shown_since),
        exchange_after_igm=exchange_after,
        drafted_exchanges=drafted_exchanges,
        symptom_conditions=symptoms,
        same_instant_igm=labs.same_instant_igm,
        same_instant_viscosity=labs.same_instant_viscosity,
    )
