"""Finding the anti-CD20 antibodies among the draft orders of an order-select/order-sign call.

Orders arrive in several shapes: R4 MedicationRequest (the target), STU3 MedicationRequest and
DSTU2 MedicationOrder (the public sandbox's defaults), and R5's `medication` CodeableReference.
The order a warning is about is checked against its version's FHIR model, so a broken entry is
reported by position rather than half-read; an order that looks R4 but is valid only as STU3 (the
sandbox omits STU3's marker fields) is read as STU3.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from service.clinical.fhir_values import UnreadableData, field, objects
from service.clinical.terminology import DrugGroup, match_drug

MEDICATION_ORDER_TYPES = frozenset({"MedicationRequest", "MedicationOrder"})


class DraftOrderError(UnreadableData):
    """A draft order cannot be read; `location` names the entry (context.draftOrders.entry[2])."""

    error = "invalid_fhir"
    lead = "a draft order cannot be read: "


@dataclass(frozen=True)
class DrugOrder:
    """A draft order for a drug of interest, and how the drug was recognised."""

    reference: (
        str  # "MedicationRequest/abc", used for delete suggestions; "" when the order has no id
    )
    drug: str
    matched_by: str
    fhir_version: str
    status: str = ""
    # The order's indication: reasonCode concepts, and reasonReference targets or displays.
    reasons: tuple[Mapping[str, Any], ...] = ()
    reason_references: tuple[str, ...] = ()


def _version_of(resource: Mapping[str, Any]) -> str:
    if resource.get("resourceType") == "MedicationOrder":
        return "DSTU2"
    if "medication" in resource:
        return "R5"
    requester = resource.get("requester")
    stu3_only = ("context", "definition", "eventHistory")
    if any(key in resource for key in stu3_only) or (
        isinstance(requester, Mapping) and "agent" in requester
    ):
        return "STU3"
    return "R4"


def _problems(resource: Mapping[str, Any], version: str) -> str | None:
    """Why `resource` is not a valid FHIR `version` MedicationRequest, or None when it is."""
    model = _model_class("MedicationRequest", version)
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        return "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(resource)'}: {err['msg']}"
            for err in exc.errors()[:3]
        )
    except (KeyError, TypeError, ValueError):
        # fhir.resources looks up the model of each contained resource by its resourceType and
        # fails outside pydantic when the type is unknown (KeyError) or not a string (TypeError).
        return _contained_type_problem(resource.get("contained"), version)
    return None


def _contained_type_problem(contained: Any, version: str) -> str:
    if isinstance(contained, Sequence) and not isinstance(contained, str):
        for index, item in enumerate(contained):
            if not isinstance(item, Mapping) or "resourceType" not in item:
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


def _validate(resource: Mapping[str, Any], version: str, location: str) -> str:
    """The FHIR version `resource` is valid in (`version`, or STU3 for an unmarked STU3 order).

    STU3 orders need not carry an STU3-only field (the public sandbox's drafts have no
    `context`, `definition` or `requester.agent`), so an order read as R4 that R4 refuses but
    STU3 accepts (e.g. `dosageInstruction[].doseQuantity`) is STU3. Raises DraftOrderError with
    the problems found against `version` when neither accepts it.
    """
    if version == "DSTU2":
        return version  # no DSTU2 models ship with fhir.resources; the fields read were checked
    problems = _problems(resource, version)
    if problems is None:
        return version
    if version == "R4" and resource.get("resourceType") == "MedicationRequest":
        if _problems(resource, "STU3") is None:
            return "STU3"
    raise DraftOrderError(location, f"not a valid FHIR {version} MedicationRequest ({problems})")


_MEDICATION_FIELDS = {
    "R5": ("medication",),
    "R4": ("medicationCodeableConcept", "medicationReference"),
    "STU3": ("medicationCodeableConcept", "medicationReference"),
    "DSTU2": ("medicationCodeableConcept", "medicationReference"),
}


def _check_medication_fields(resource: Mapping[str, Any], version: str, location: str) -> None:
    """The medication of every order must be readable: an unreadable one is a 400, not "none"."""
    present = [name for name in _MEDICATION_FIELDS[version] if name in resource]
    if not present:
        raise DraftOrderError(
            location, f"FHIR {version} {resource.get('resourceType')} has no medication"
        )
    for name in present:
        if not isinstance(resource[name], Mapping):
            raise DraftOrderError(location, f"{name} must be an object")


def medication_concepts(
    resource: Mapping[str, Any], medications: Mapping[str, Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """Every CodeableConcept that may name the drug of a medication resource (coded or by text)."""
    return _medication_concepts(resource, _version_of(resource), medications)


def _medication_concepts(
    resource: Mapping[str, Any], version: str, medications: Mapping[str, Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    concepts: list[Mapping[str, Any]] = []
    if version == "R5":
        concept = field(resource, "medication", "concept")
        if isinstance(concept, Mapping):
            concepts.append(concept)
        reference = field(resource, "medication", "reference")
    else:
        if isinstance(resource.get("medicationCodeableConcept"), Mapping):
            concepts.append(resource["medicationCodeableConcept"])
        reference = resource.get("medicationReference")
    if isinstance(reference, Mapping):
        target = _resolve_medication(reference.get("reference"), resource, medications)
        if target is not None and isinstance(target.get("code"), Mapping):
            concepts.append(target["code"])
        if target is not None:
            concepts += _ingredient_concepts(target)
        if isinstance(reference.get("display"), str):
            concepts.append({"text": reference["display"]})
    return concepts


def _ingredient_concepts(medication: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """What a Medication's ingredients name: R4/STU3 `itemCodeableConcept` (or a reference's
    display), R5 `item.concept`. A compounded or kit product may name its antibody only here."""
    concepts: list[Mapping[str, Any]] = []
    for ingredient in objects(medication.get("ingredient")):
        for concept in (
            ingredient.get("itemCodeableConcept"),
            field(ingredient, "item", "concept"),
        ):
            if isinstance(concept, Mapping):
                concepts.append(concept)
        for reference in (ingredient.get("itemReference"), field(ingredient, "item", "reference")):
            if isinstance(field(reference, "display"), str):
                concepts.append({"text": reference["display"]})
    return concepts


def _resolve_medication(
    reference: Any, resource: Mapping[str, Any], medications: Mapping[str, Mapping[str, Any]]
) -> Mapping[str, Any] | None:
    if not isinstance(reference, str):
        return None
    if reference.startswith("#"):
        for contained in objects(resource.get("contained")):
            if contained.get("id") == reference[1:]:
                return contained
        return None
    if reference in medications:
        return medications[reference]
    # An absolute URL or a relative "Medication/id": match on the last two path segments.
    tail = "/".join(reference.rstrip("/").split("/")[-2:])
    return medications.get(tail)


def find_drug_orders(
    draft_orders: Mapping[str, Any],
    groups: tuple[DrugGroup, ...],
    selections: Sequence[str] | None = None,
) -> list[DrugOrder]:
    """The draft medication orders (all, or only the selected ones) for drugs in `groups`."""
    entries = draft_orders.get("entry") or []
    medications: dict[str, Mapping[str, Any]] = {}
    for entry in entries:
        resource = entry.get("resource") if isinstance(entry, Mapping) else None
        if isinstance(resource, Mapping) and resource.get("resourceType") == "Medication":
            if resource.get("id"):
                medications[f"Medication/{resource['id']}"] = resource
            if isinstance(entry.get("fullUrl"), str):
                medications[entry["fullUrl"]] = resource

    wanted = set(selections) if selections is not None else None
    seen: set[str] = set()
    found: list[DrugOrder] = []
    for index, entry in enumerate(entries):
        location = f"context.draftOrders.entry[{index}]"
        resource = entry.get("resource") if isinstance(entry, Mapping) else None
        if not isinstance(resource, Mapping):
            continue
        resource_type = resource.get("resourceType")
        reference = f"{resource_type}/{resource['id']}" if resource.get("id") else ""
        if reference:
            seen.add(reference)
        if wanted is not None and reference not in wanted:
            continue
        if resource_type not in MEDICATION_ORDER_TYPES:
            continue
        version = _version_of(resource)
        _check_medication_fields(resource, version, location)
        for concept in _medication_concepts(resource, version, medications):
            match = match_drug(concept, groups)
            if match is not None:
                # The order the advice is about is checked whole against its version's model;
                # other orders only for the fields read, so a flaw in an unrelated order can
                # neither hide nor block the warning.
                version = _validate(resource, version, location)
                group, how = match
                found.append(
                    DrugOrder(
                        reference,
                        group.name,
                        how,
                        version,
                        resource.get("status") if isinstance(resource.get("status"), str) else "",
                        *_reasons(resource),
                    )
                )
                break
    if wanted is not None:
        missing = sorted(wanted - seen)
        if missing:
            raise DraftOrderError(
                "context.selections", f"{', '.join(missing)} not found in context.draftOrders"
            )
    return found


def _reasons(resource: Mapping[str, Any]) -> tuple[tuple[Mapping[str, Any], ...], tuple[str, ...]]:
    """reasonCode / reasonReference (R4, STU3) or `reason` CodeableReferences (R5)."""
    concepts = list(objects(resource.get("reasonCode")))
    references = list(objects(resource.get("reasonReference")))
    for reason in objects(resource.get("reason")):
        if isinstance(reason.get("concept"), Mapping):
            concepts.append(reason["concept"])
        if isinstance(reason.get("reference"), Mapping):
            references.append(reason["reference"])
    targets = []
    for reference in references:
        target = reference.get("reference")
        if isinstance(target, str) and target.startswith("#"):
            # A contained Condition: its code is the indication.
            for contained in objects(resource.get("contained")):
                if contained.get("id") == target[1:] and isinstance(contained.get("code"), Mapping):
                    concepts.append(contained["code"])
        elif isinstance(target, str):
            targets.append(target)
        if isinstance(reference.get("display"), str):
            concepts.append({"text": reference["display"]})
    return tuple(concepts), tuple(targets)


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
    _validate(_WARM_UP_ORDER, "R4", "warm-up")
