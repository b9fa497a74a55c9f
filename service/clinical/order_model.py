"""The FHIR model check of a draft order: which deviations are tolerated and which are not.

Only the fields the rules read (type, id, status, intent, medication, subject) must be readable: a
broken one is a DraftOrderError naming the entry (a 400). A deviation anywhere else (wrong
cardinality, a field from another FHIR version, an unknown extension shape) is returned as a
`Deviation`, path and problem only, so it can be logged without the value. An order that looks
R4 but is valid only as STU3 (the sandbox omits STU3's marker fields) is read as STU3.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from service.clinical.checked_orders import CheckMemo, CheckOutcome
from service.clinical.fhir_values import UnreadableData

# The fields the rules read from a draft order. A flaw in one of these stops the assessment; a
# flaw anywhere else does not. `patient` is DSTU2's name for `subject`.
READ_FIELDS = frozenset(
    {
        "resourceType",
        "id",
        "status",
        "intent",
        "medicationCodeableConcept",
        "medicationReference",
        "medication",
        "subject",
        "patient",
    }
)


# Outcomes of the check for orders this worker has seen (see validate).
CHECKED = CheckMemo()


@dataclass(frozen=True)
class Deviation:
    """A tolerated departure from the FHIR model: where it is and what is wrong, never the value."""

    location: str
    problem: str


class DraftOrderError(UnreadableData):
    """A draft order cannot be read; `location` names the entry (context.draftOrders.entry[2])."""

    error = "invalid_fhir"
    lead = "a draft order cannot be read: "


@dataclass(frozen=True)
class _ModelProblem:
    path: tuple[str | int, ...]
    problem: str


def _problems(resource: Mapping[str, Any], version: str) -> list[_ModelProblem]:
    """Why `resource` is not a valid FHIR `version` MedicationRequest (empty when it is)."""
    model = _model_class("MedicationRequest", version)
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        return [_ModelProblem(tuple(err["loc"]), _describe(err)) for err in exc.errors()]
    except (KeyError, TypeError, ValueError):
        # fhir.resources looks up the model of each contained resource by its resourceType and
        # fails outside pydantic when the type is unknown (KeyError) or not a string (TypeError).
        return [_ModelProblem(("contained",), _contained_type_problem(resource, version))]
    return []


def _describe(error: Mapping[str, Any]) -> str:
    # Pydantic's own messages name the expected shape, not the input; messages from custom
    # validators may quote the value, so they are reduced to their kind.
    kind = str(error.get("type", ""))
    if kind.startswith("value_error") or kind.startswith("assertion_error"):
        return "invalid value"
    return str(error.get("msg", kind))[:120]


def _contained_type_problem(resource: Mapping[str, Any], version: str) -> str:
    contained = resource.get("contained")
    if isinstance(contained, Sequence) and not isinstance(contained, str):
        for index, item in enumerate(contained):
            if not isinstance(item, dict) or "resourceType" not in item:
                continue
            kind = item["resourceType"]
            if not isinstance(kind, str):
                return f"contained.{index}.resourceType: must be a string"
            if _model_class(kind, version) is None:
                return (
                    f"contained.{index}.resourceType: {kind[:60]!r} is not a FHIR {version} "
                    "resource"
                )
    return "contained: a resource has an unknown or non-string resourceType"


def _model_class(resource_type: str, version: str) -> Any:
    """The fhir.resources model for a resource type in `version`, or None if there is none.

    Imported on first use: each version's models cost start-up time and memory only when used.
    """
    package = {"R4": "fhir.resources.R4B", "STU3": "fhir.resources.STU3"}.get(
        version, "fhir.resources"
    )
    try:
        return importlib.import_module(package).get_fhir_model_class(resource_type)
    except (KeyError, TypeError, ValueError):
        return None


def validate(
    resource: Mapping[str, Any], version: str, location: str
) -> tuple[str, tuple[Deviation, ...]]:
    """The FHIR version `resource` is read as, and the deviations tolerated in it.

    STU3 orders need not carry an STU3-only field (the public sandbox's drafts have no
    `context`, `definition` or `requester.agent`), so an order read as R4 that R4 refuses but
    STU3 accepts (e.g. `dosageInstruction[].doseQuantity`) is STU3. Otherwise the problems found
    against `version` are split: one in a field the rules read raises DraftOrderError; the rest
    are returned as deviations. A required field that is absent is a deviation too: the rules
    do without it, and only a value that is present and unreadable is refused.

    An order already checked by this worker is answered from CHECKED (see
    service.clinical.checked_orders): re-sent orders are the rule with order-select.
    """
    if version == "DSTU2":
        return version, ()  # no DSTU2 models ship with fhir.resources; the fields read were checked
    key = CHECKED.key(resource, version)
    outcome = CHECKED.get(key) if key is not None else None
    if outcome is None:
        outcome = _check(resource, version)
        if key is not None:
            CHECKED.put(key, outcome)
    if outcome.fatal:
        raise DraftOrderError(location, outcome.fatal)
    return outcome.read_as, tuple(
        Deviation(f"{location}.resource.{path}", problem) for path, problem in outcome.deviations
    )


def _check(resource: Mapping[str, Any], version: str) -> CheckOutcome:
    problems = _problems(resource, version)
    if not problems:
        return CheckOutcome(version, "")
    if version == "R4" and resource.get("resourceType") == "MedicationRequest":
        if not _problems(resource, "STU3"):
            return CheckOutcome("STU3", "")
    fatal = [
        p for p in problems if (not p.path or p.path[0] in READ_FIELDS) and not _absent(p, resource)
    ]
    if fatal:
        described = "; ".join(f"{_dotted(p.path) or '(resource)'}: {p.problem}" for p in fatal[:3])
        return CheckOutcome(version, f"not a valid FHIR {version} MedicationRequest ({described})")
    return CheckOutcome(version, "", tuple((_dotted(p.path), p.problem) for p in problems))


def _absent(problem: _ModelProblem, resource: Mapping[str, Any]) -> bool:
    # A null is how some clients write "not given"; the rules read it as absent, so it must not
    # refuse an order that the same field left out would not.
    return len(problem.path) == 1 and resource.get(str(problem.path[0])) is None


def _dotted(path: Sequence[str | int]) -> str:
    text = ""
    for step in path:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else str(step))
    return text


# A typical R4 draft order: coded medication, contained Medication, dosage with timing, route
# and dose. fhir.resources imports and builds each element's model on first use.
_WARM_UP_ORDER: dict[str, Any] = {
    "resourceType": "MedicationRequest",
    "id": "warm-up",
    "contained": [{"resourceType": "Medication", "id": "m", "code": {"text": "rituximab"}}],
    "status": "draft",
    "intent": "order",
    "medicationCodeableConcept": {
        "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "121191"}],
        "text": "rituximab",
    },
    "subject": {"reference": "Patient/warm-up"},
    "authoredOn": "2026-11-20T11:50:00Z",
    "requester": {"reference": "Practitioner/warm-up", "display": "warm-up"},
    "dosageInstruction": [
        {
            "sequence": 1,
            "text": "375 mg/m2 IV",
            "timing": {
                "repeat": {
                    "boundsPeriod": {"start": "2026-11-23"},
                    "count": 6,
                    "frequency": 1,
                    "period": 28,
                    "periodUnit": "d",
                }
            },
            "route": {"coding": [{"system": "http://snomed.info/sct", "code": "47625008"}]},
            "doseAndRate": [
                {
                    "type": {"coding": [{"code": "ordered"}]},
                    "doseQuantity": {
                        "value": 375,
                        "unit": "mg/m2",
                        "system": "http://unitsofmeasure.org",
                        "code": "mg/m2",
                    },
                }
            ],
        }
    ],
}


def warm_up_models() -> None:
    """Load the R4 models at start-up: otherwise each worker's first order call pays ~150 ms.

    Only R4, the target version; STU3 and R5 models stay lazy (see _model_class).
    """
    validate(_WARM_UP_ORDER, "R4", "warm-up")
