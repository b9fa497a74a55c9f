"""Reading lab Observations the way the rules require: usable or not, when, and in which unit.

Only final, amended or corrected results count; entered-in-error and dataAbsentReason are
ignored; the time is the effective time (or `issued`), never the position in a Bundle; IgM is
converted to mg/dL only from units with a known factor - anything else is "not usable", never a
guess.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from dataclasses import fields as dataclass_fields
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from service.clinical.fhir_values import field, objects
from service.clinical.terminology import codings_of, concept_matches

USABLE_STATUSES = frozenset({"final", "amended", "corrected"})

# Factor to mg/dL, by UCUM code; unit strings are matched case-insensitively against the same.
IGM_FACTORS_TO_MG_DL = {"mg/dL": 1.0, "g/L": 100.0, "mg/L": 0.1, "g/dL": 1000.0}
_IGM_FACTORS_LOWER = {unit.lower(): factor for unit, factor in IGM_FACTORS_TO_MG_DL.items()}

# Serum viscosity is reported in centipoise or relative to water; labs use both with the same
# reference range (about 1.4-1.8), so both are compared with the cP threshold as reported. A
# relative viscosity is a pure number and often comes with no unit at all.
VISCOSITY_UNITS = {
    "cp": "cP",
    "cps": "cP",
    "centipoise": "cP",
    "mpa.s": "mPa.s",
    "mpa·s": "mPa.s",
    "mpa*s": "mPa.s",
    "1": "relative",
    "{relative}": "relative",
    "relative": "relative",
}

UCUM = "http://unitsofmeasure.org"

# A FHIR date, dateTime or instant is one of these two forms (a time only after a full date).
# Two patterns without named groups cost less to match than one with them, for every date read.
_FHIR_DATE = re.compile(r"\d{4}(-\d{2}(-\d{2})?)?")
_FHIR_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?")


def parse_fhir_datetime(value: Any) -> datetime | None:
    """A FHIR date, dateTime or instant as an aware UTC datetime (partial dates at their start).

    A dateTime without a zone is read as UTC; None for anything that is not a FHIR date.
    """
    # Most dates on a chart are "2023-10-11T09:10:00Z" or "2025-05-15". For those two shapes
    # (ASCII, separators in place) fromisoformat, whose digits are ASCII 0-9 only, does the
    # patterns' check itself and gives the same datetime, "Z" read as the UTC singleton; at
    # about a third of the cost. Anything else is read by the patterns below.
    if isinstance(value, str) and value.isascii():
        if len(value) == 20 and value[19] == "Z" and value[10] == "T":
            if value[4] == value[7] == "-" and value[13] == value[16] == ":":
                try:
                    return _from_iso(value)
                except ValueError:
                    return None
        elif len(value) == 10 and value[4] == value[7] == "-":
            try:
                return _from_iso(value + "T00:00:00Z")
            except ValueError:
                return None
    return _parse_any_form(value)


_from_iso = datetime.fromisoformat
_new_reading = object.__new__


def _parse_any_form(value: Any) -> datetime | None:
    """parse_fhir_datetime for every form, by the patterns."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    try:
        if _FHIR_DATE_TIME.fullmatch(text):
            # The pattern has checked the form; fromisoformat (3.11) reads it, "Z" included.
            parsed = datetime.fromisoformat(text)
            if parsed.tzinfo is None:
                return parsed.replace(tzinfo=UTC)
            return parsed if parsed.tzinfo is UTC else parsed.astimezone(UTC)  # "Z" reads as UTC
        if _FHIR_DATE.fullmatch(text):
            # "YYYY", "YYYY-MM" or "YYYY-MM-DD": each digit one character, so slices find them.
            return datetime(int(text[:4]), int(text[5:7] or 1), int(text[8:10] or 1), tzinfo=UTC)
        return None
    except (ValueError, OverflowError):
        # OverflowError: well formed but outside datetime's range once moved to UTC.
        return None


def effective_time(resource: Mapping[str, Any]) -> datetime | None:
    """When an Observation was taken: effective[x], else `issued`."""
    when = parse_fhir_datetime(resource.get("effectiveDateTime"))
    if when is None:
        when = parse_fhir_datetime(resource.get("effectiveInstant"))
    if when is None:
        period = resource.get("effectivePeriod")
        if isinstance(period, dict):
            when = parse_fhir_datetime(period.get("end")) or parse_fhir_datetime(
                period.get("start")
            )
    if when is None:
        when = parse_fhir_datetime(resource.get("issued"))
    return when


@dataclass(frozen=True, slots=True)
class Reading:
    """One usable numeric result, with what was reported and what the rules compare.

    Slotted: a chart of 6,000 results makes 6,000 of them while its parsed body is still held,
    and each was about 430 bytes with an instance dict, 206 without.
    """

    observation_id: str
    effective: datetime
    value: float
    unit: str
    comparator: str
    status: str
    # IgM in mg/dL; for viscosity, the value as reported (cP or relative).
    normalised: float
    # The result's `referenceRange` and kind ("igm", "viscosity"): few rules need the upper
    # limit (one, for a few results), so it is read from them only when asked for.
    reference_ranges: Any = dataclass_field(default=None, compare=False, repr=False)
    kind: str = dataclass_field(default="igm", compare=False, repr=False)

    @property
    def reference_high(self) -> float | None:
        """The laboratory's upper reference limit, in the same scale as `normalised`, if given."""
        return _reference_high(self.reference_ranges, self.kind)

    @property
    def reported(self) -> str:
        return f"{self.comparator}{_number(self.value)} {self.unit}".strip()

    def at_least(self, threshold: float) -> bool:
        """Whether the result is at or above `threshold`.

        A bound is used only when it falls on one side of the thresholds (see order_risk): "<"
        and "<=" results are below, whatever their number; ">" and ">=" compare by the bound.
        """
        if self.comparator in ("<", "<="):
            return False
        return self.normalised >= threshold


# Each field's slot setter, in the order of the fields (tests/clinical/test_fast_paths.py).
(
    _set_id,
    _set_effective,
    _set_value,
    _set_unit,
    _set_comparator,
    _set_status,
    _set_normalised,
    _set_reference_ranges,
    _set_kind,
) = (getattr(Reading, field.name).__set__ for field in dataclass_fields(Reading))


@dataclass(frozen=True)
class Unusable:
    """A result that exists but cannot be used, and why (shown on the card)."""

    observation_id: str
    effective: datetime | None
    reported: str
    reason: str


def _number(value: float) -> str:
    """The number as the laboratory sent it: 4.0 stays "4.0", 4500 stays "4500"."""
    return str(value) if isinstance(value, int) else repr(value)


class _NotANumber(Exception):
    """valueQuantity is there but its value is not a finite number."""


def _quantity(resource: Mapping[str, Any]) -> tuple[float, str, str, str] | None:
    quantity = resource.get("valueQuantity")
    if not isinstance(quantity, dict):
        return None
    value = quantity.get("value")
    # A tuple, not `int | float`: isinstance reads a tuple faster, and this runs for every result.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _NotANumber
    code = quantity.get("code") if quantity.get("system") in (None, UCUM) else None
    unit = quantity.get("unit")
    comparator = quantity.get("comparator") or ""
    return (
        value,
        code if isinstance(code, str) else "",
        unit if isinstance(unit, str) else "",
        comparator,
    )


# Cached: a chart's results repeat one or two pairs of code and unit.
@lru_cache(maxsize=1024)
def _resolve_unit(code: str, unit: str, kind: str) -> tuple[Any, str]:
    """The known unit's entry (_known_units) for a UCUM code and/or unit string; refuse if they
    disagree.

    The UCUM code, when present, decides; a unit string is used only when there is no code.
    """
    known = _known_units(kind)
    by_code = known.get(code.lower()) if code else None
    by_unit = known.get(unit.strip().lower()) if unit else None
    if code:
        if by_code is None:
            return None, f"unit '{code}' cannot be converted"
        if unit and by_unit is not None and by_unit != by_code:
            return None, f"unit '{unit}' and code '{code}' disagree"
        return by_code, ""
    if by_unit is None:
        return None, f"unit '{unit}' cannot be converted" if unit else "no unit given"
    return by_unit, ""


def classify(
    resources: Iterable[Mapping[str, Any]],
    kind: str,
    codes: frozenset[tuple[str, str]] | None = None,
) -> tuple[list[Reading], list[Unusable]]:
    """Usable readings (oldest first) and unusable ones, for kind "igm" or "viscosity".

    Resources that are not results at all (wrong status, entered-in-error, data absent) are
    dropped silently: they are not data. Results with a value we cannot interpret, or whose code
    is not in `codes` (a server that ignored the code filter, an M-spike), are kept as Unusable
    so the card can say so.
    """
    readings: list[Reading] = []
    unusable: list[Unusable] = []
    for resource in resources:
        status = resource.get("status")
        if not isinstance(status, str) or status not in USABLE_STATUSES:
            continue
        if "dataAbsentReason" in resource:
            continue
        obs_id = str(resource.get("id") or "(no id)")
        when = effective_time(resource)
        if codes is not None and not concept_matches(resource.get("code"), codes):
            what = "serum IgM" if kind == "igm" else "serum viscosity"
            unusable.append(Unusable(obs_id, when, _code_text(resource), f"not a {what} code"))
            continue
        try:
            quantity = _quantity(resource)
        except _NotANumber:
            value = field(resource, "valueQuantity", "value")
            unusable.append(Unusable(obs_id, when, str(value)[:40], "not a number"))
            continue
        if quantity is None:
            shown = _describe_value(resource)
            unusable.append(Unusable(obs_id, when, shown, "no numeric value"))
            continue
        value, code, unit, comparator = quantity
        if when is None:
            unusable.append(Unusable(obs_id, None, _shown(quantity), "no effective date"))
            continue
        if value < 0 or (value == 0 and kind == "igm"):
            # Not a concentration: an instrument or transcription error, never reassurance.
            reason = "negative value" if value < 0 else "zero is not a possible serum IgM"
            unusable.append(Unusable(obs_id, when, _shown(quantity), reason))
            continue
        if kind == "viscosity" and not code and not unit.strip():
            unit = "relative"  # a pure number: viscosity relative to water
        unit_entry, problem = _resolve_unit(code, unit, kind)
        if unit_entry is None:
            unusable.append(Unusable(obs_id, when, _shown(quantity), problem))
            continue
        # Reading(...) made slot by slot: this runs for every result on the chart, and a frozen
        # dataclass's __init__ sets each field through object.__setattr__, about twice the cost.
        reading = _new_reading(Reading)
        _set_id(reading, obs_id)
        _set_effective(reading, when)
        _set_value(reading, value)
        _set_unit(reading, unit or code)
        _set_comparator(reading, comparator)
        _set_status(reading, status)
        _set_normalised(reading, value * unit_entry if kind == "igm" else value)
        _set_reference_ranges(reading, resource.get("referenceRange"))
        _set_kind(reading, kind)
        readings.append(reading)
    # Results at the same instant: the higher-risk one sorts last, so it is the one used as
    # "latest" (decision 5); then by id, so the answer never depends on Bundle order.
    readings.sort(key=_reading_order)
    unusable.sort(key=lambda u: (u.effective or datetime.min.replace(tzinfo=UTC), u.observation_id))
    return readings, unusable


def _shown(quantity: tuple[float, str, str, str]) -> str:
    """A value as the laboratory reported it, with the unit as sent (before any defaulting)."""
    value, code, unit, comparator = quantity
    return f"{comparator}{_number(value)} {unit or code}".strip()


def _reading_order(reading: Reading) -> tuple[datetime, float, str]:
    """classify's order: by time, then risk, then id. An upper bound ("<4000") is lower risk
    than any value it allows."""
    return (
        reading.effective,
        -math.inf if reading.comparator in ("<", "<=") else reading.normalised,
        reading.observation_id,
    )


def _known_units(kind: str) -> Mapping[str, Any]:
    """The units a result of this kind may come in: factors to mg/dL (IgM), names (viscosity)."""
    return _IGM_FACTORS_LOWER if kind == "igm" else VISCOSITY_UNITS


def _reference_high(ranges: Any, kind: str) -> float | None:
    """The first reference range's upper limit, on the scale the rules compare (mg/dL for IgM)."""
    for reference_range in objects(ranges):
        high = reference_range.get("high")
        value = field(high, "value")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            continue
        code = field(high, "code")
        unit = field(high, "unit")
        entry, _ = _resolve_unit(
            code if isinstance(code, str) else "",
            unit if isinstance(unit, str) else "",
            kind,
        )
        if entry is None:
            return None
        return value * entry if kind == "igm" else value
    return None


def _code_text(resource: Mapping[str, Any]) -> str:
    pairs = [
        f"{system.rsplit('/', 1)[-1]} {code}" for system, code in codings_of(resource.get("code"))
    ]
    return ", ".join(pairs) or "no code"


def _describe_value(resource: Mapping[str, Any]) -> str:
    for key in ("valueString", "valueCodeableConcept", "valueInteger"):
        if key in resource:
            value = resource[key]
            if isinstance(value, dict):
                value = value.get("text") or "coded value"
            return str(value)[:40]
    return "no value"
