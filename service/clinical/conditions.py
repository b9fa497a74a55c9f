"""Which Conditions count: current (active, recurring, relapsed or unstated), not refuted, not
entered in error; recognised by code, or by name in text when no coding matches."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from service.clinical.fhir_values import objects
from service.clinical.name_screen import folded_for_screen
from service.clinical.observations import parse_fhir_datetime
from service.clinical.terminology import (
    ConditionSet,
    concept_named,
    named_text,
    normalise_code,
)

INACTIVE_CLINICAL = frozenset({"inactive", "remission", "resolved"})
EXCLUDED_VERIFICATION = frozenset({"entered-in-error", "refuted"})


@dataclass(frozen=True)
class ConditionFact:
    condition_id: str
    code: str
    display: str
    clinical_status: str | None = None
    recorded: datetime | None = None  # onset, else recordedDate


def _status_code(value: Any) -> str | None:
    # R4 uses a CodeableConcept; STU3 sends a bare code string.
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        for coding in objects(value.get("coding")):
            if isinstance(coding.get("code"), str):
                return coding["code"]
    return None


def is_current(condition: Mapping[str, Any], now: datetime, in_remission: bool = False) -> bool:
    """Active, recurring or relapsed - or with no clinical status (not taken as resolved).

    `in_remission`: a diagnosis in remission still counts (decision 9: a patient with WM in
    remission who relapses is the one who is given rituximab again).
    """
    return _current(
        _status_code(condition.get("verificationStatus")) in EXCLUDED_VERIFICATION,
        _status_code(condition.get("clinicalStatus")),
        parse_fhir_datetime(condition.get("abatementDateTime")),
        now,
        in_remission,
    )


def _current(
    excluded: bool, status: str | None, abated: datetime | None, now: datetime, in_remission: bool
) -> bool:
    """is_current's rule, on what it reads from a Condition (ConditionList reads it once)."""
    if excluded:
        return False
    if in_remission and status == "remission":
        return True
    if status in INACTIVE_CLINICAL:
        return False
    return not (abated is not None and abated <= now)


def recorded_time(condition: Mapping[str, Any]) -> datetime | None:
    return parse_fhir_datetime(condition.get("onsetDateTime")) or parse_fhir_datetime(
        condition.get("recordedDate")
    )


def concept_fact(concept: Any, wanted: ConditionSet, condition_id: str) -> ConditionFact | None:
    """A fact for a CodeableConcept (a Condition's code, an order's reasonCode) in `wanted`."""
    if not isinstance(concept, dict):
        return None
    for coding in objects(concept.get("coding")):
        system, code = coding.get("system"), coding.get("code")
        if not (isinstance(system, str) and isinstance(code, str)):
            continue  # a malformed coding is skipped, as codings_of does
        if normalise_code(system, code) in wanted.codes:
            display = coding.get("display") or concept.get("text") or code
            return ConditionFact(condition_id, code, display)
    named = concept_named(concept, wanted.name_pattern)
    if named is not None:
        return ConditionFact(condition_id, "by name", named)
    return None


def matching_conditions(
    conditions: Iterable[Mapping[str, Any]],
    wanted: ConditionSet,
    now: datetime,
    *,
    in_remission: bool = False,
    since: datetime | None = None,
) -> tuple[ConditionFact, ...]:
    """Current Conditions in `wanted`; with `since`, only those with onset (or recorded) since."""
    return ConditionList(conditions).matching(wanted, now, in_remission=in_remission, since=since)


class _ReadCondition:
    """What the value set checks read from one Condition, read once."""

    __slots__ = (
        "abated",
        "coded",
        "concept",
        "condition_id",
        "excluded",
        "folded",
        "recorded",
        "status",
        "texts",
    )

    def __init__(self, condition: Mapping[str, Any]) -> None:
        self.excluded = _status_code(condition.get("verificationStatus")) in EXCLUDED_VERIFICATION
        self.status = _status_code(condition.get("clinicalStatus"))
        self.abated = parse_fhir_datetime(condition.get("abatementDateTime"))
        self.recorded = recorded_time(condition)
        self.condition_id = str(condition.get("id") or "(no id)")
        self.concept = condition.get("code")
        # (normalised pair, code, display) of each well-formed coding, as concept_fact reads them.
        self.coded: list[tuple[tuple[str, str], str, str]] = []
        # The texts concept_named looks in for a name: `text`, then each coding's display.
        self.texts: list[str] = []
        if isinstance(self.concept, dict):
            texts = [self.concept.get("text")]
            for coding in objects(self.concept.get("coding")):
                texts.append(coding.get("display"))
                system, code = coding.get("system"), coding.get("code")
                if isinstance(system, str) and isinstance(code, str):
                    display = coding.get("display") or self.concept.get("text") or code
                    self.coded.append((normalise_code(system, code), code, display))
            self.texts = [text for text in texts if isinstance(text, str)]
        # Folded once for the name screens of every value set checked.
        self.folded = folded_for_screen(self.texts)

    def current(self, now: datetime, in_remission: bool) -> bool:
        """is_current, from what was read."""
        return _current(self.excluded, self.status, self.abated, now, in_remission)


class ConditionList:
    """A record's Conditions, each read once (statuses, dates, codes) for every value set a call
    checks them against: the diagnosis, hyperviscosity and symptom sets each read the whole
    problem list. matching() answers as matching_conditions does."""

    def __init__(self, conditions: Iterable[Mapping[str, Any]]) -> None:
        self._read = [_ReadCondition(condition) for condition in conditions]

    def matching(
        self,
        wanted: ConditionSet,
        now: datetime,
        *,
        in_remission: bool = False,
        since: datetime | None = None,
    ) -> tuple[ConditionFact, ...]:
        facts = []
        for read in self._read:
            if not read.current(now, in_remission):
                continue
            recorded = read.recorded
            if since is not None and (recorded is None or recorded < since):
                continue
            found = _coded_in(read, wanted)
            if found is None:
                named = named_text(wanted.name_pattern, read.texts, read.folded)
                found = None if named is None else ("by name", named)
            if found is not None:
                code, display = found
                facts.append(ConditionFact(read.condition_id, code, display, read.status, recorded))
        return tuple(facts)


def _coded_in(read: _ReadCondition, wanted: ConditionSet) -> tuple[str, str] | None:
    for pair, code, display in read.coded:
        if pair in wanted.codes:
            return code, display
    return None
