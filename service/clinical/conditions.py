"""Which Conditions count: active (or unstated), not refuted, not entered in error."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from service.clinical.fhir_values import objects
from service.clinical.observations import parse_fhir_datetime
from service.clinical.terminology import codings_of

INACTIVE_CLINICAL = frozenset({"inactive", "remission", "resolved"})
EXCLUDED_VERIFICATION = frozenset({"entered-in-error", "refuted"})


@dataclass(frozen=True)
class ConditionFact:
    condition_id: str
    code: str
    display: str


def _status_code(value: Any) -> str | None:
    # R4 uses a CodeableConcept; STU3 sends a bare code string.
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        for coding in objects(value.get("coding")):
            if isinstance(coding.get("code"), str):
                return coding["code"]
    return None


def is_current(condition: Mapping[str, Any], now: datetime) -> bool:
    """Active, recurring or relapsed - or with no clinical status (not taken as resolved)."""
    if _status_code(condition.get("verificationStatus")) in EXCLUDED_VERIFICATION:
        return False
    if _status_code(condition.get("clinicalStatus")) in INACTIVE_CLINICAL:
        return False
    abated = parse_fhir_datetime(condition.get("abatementDateTime"))
    return not (abated is not None and abated <= now)


def matching_conditions(
    conditions: Iterable[Mapping[str, Any]], codes: frozenset[tuple[str, str]], now: datetime
) -> tuple[ConditionFact, ...]:
    facts = []
    for condition in conditions:
        if not is_current(condition, now):
            continue
        concept = condition.get("code")
        if not isinstance(concept, Mapping):
            continue
        for coding in objects(concept.get("coding")):
            pair = next(iter(codings_of({"coding": [coding]})), None)
            if pair in codes:
                display = coding.get("display") or concept.get("text") or coding["code"]
                facts.append(
                    ConditionFact(str(condition.get("id") or "(no id)"), coding["code"], display)
                )
                break
    return tuple(facts)
