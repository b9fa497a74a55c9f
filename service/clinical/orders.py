"""Finding the anti-CD20 antibodies among the draft orders of an order-select/order-sign call.

Orders arrive in several shapes: R4 MedicationRequest (the target), STU3 MedicationRequest and
DSTU2 MedicationOrder (the public sandbox's defaults), and R5's `medication` CodeableReference.
The order a warning is about is checked against its version's FHIR model (order_model.py), which
tolerates deviations in fields the rules do not read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.clinical.fhir_values import field, objects
from service.clinical.order_model import Deviation, DraftOrderError, validate, warm_up_models
from service.clinical.terminology import DrugGroup, match_drug

__all__ = ["Deviation", "DraftOrderError", "DrugOrder", "find_drug_orders", "warm_up_models"]

MEDICATION_ORDER_TYPES = frozenset({"MedicationRequest", "MedicationOrder"})


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
    deviations: tuple[Deviation, ...] = ()


# Fields only an STU3 MedicationRequest has.
_STU3_ONLY = ("context", "definition", "eventHistory")


def _version_of(resource: Mapping[str, Any]) -> str:
    if resource.get("resourceType") == "MedicationOrder":
        return "DSTU2"
    if "medication" in resource:
        return "R5"
    requester = resource.get("requester")
    if not resource.keys().isdisjoint(_STU3_ONLY) or (
        isinstance(requester, dict) and "agent" in requester
    ):
        return "STU3"
    return "R4"


_MEDICATION_FIELDS = {
    "R5": ("medication",),
    "R4": ("medicationCodeableConcept", "medicationReference"),
    "STU3": ("medicationCodeableConcept", "medicationReference"),
    "DSTU2": ("medicationCodeableConcept", "medicationReference"),
}


def _check_medication_fields(resource: Mapping[str, Any], version: str, location: str) -> None:
    """A medication that is present must be readable: an unreadable one is a 400, not "none".

    No medication at all is an order still being written (the sandbox sends one as soon as its
    order screen opens): it names no anti-CD20 antibody, so it simply gets no card. A null is
    read as no medication in that field (the other may still name the drug).
    """
    for name in _MEDICATION_FIELDS[version]:
        if resource.get(name) is not None and not isinstance(resource[name], dict):
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
        if isinstance(concept, dict):
            concepts.append(concept)
        reference = field(resource, "medication", "reference")
    else:
        if isinstance(resource.get("medicationCodeableConcept"), dict):
            concepts.append(resource["medicationCodeableConcept"])
        reference = resource.get("medicationReference")
    if isinstance(reference, dict):
        target = _resolve_medication(reference.get("reference"), resource, medications)
        if target is not None and isinstance(target.get("code"), dict):
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
            if isinstance(concept, dict):
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
    patient_id: str | None = None,
) -> list[DrugOrder]:
    """The draft medication orders (all, or only the selected ones) for drugs in `groups`.

    With `patient_id`, an order for a drug in `groups` whose subject is another patient is
    refused: advice about one patient must never be computed from another's order.
    """
    entries = draft_orders.get("entry") or []
    medications: dict[str, Mapping[str, Any]] = {}
    for entry in entries:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") == "Medication":
            if resource.get("id"):
                medications[f"Medication/{resource['id']}"] = resource
            if isinstance(entry.get("fullUrl"), str):
                medications[entry["fullUrl"]] = resource

    wanted = set(selections) if selections is not None else None
    seen: set[str] = set()
    found: list[DrugOrder] = []
    for index, entry in enumerate(entries):
        location = f"context.draftOrders.entry[{index}]"
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
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
                version, deviations = validate(resource, version, location)
                _check_patient(resource, patient_id, location)
                group, how = match
                status = resource.get("status")
                reasons, reason_references = _reasons(resource)
                found.append(
                    DrugOrder(
                        reference,
                        group.name,
                        how,
                        version,
                        status=status if isinstance(status, str) else "",
                        reasons=reasons,
                        reason_references=reason_references,
                        deviations=deviations,
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


def _check_patient(resource: Mapping[str, Any], patient_id: str | None, location: str) -> None:
    subject = resource.get("subject", resource.get("patient"))
    reference = subject.get("reference") if isinstance(subject, dict) else None
    if patient_id is None or not isinstance(reference, str):
        return
    parts = reference.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1] != patient_id:
        raise DraftOrderError(
            location, "the order's subject is another patient, not context.patientId"
        )


def _reasons(resource: Mapping[str, Any]) -> tuple[tuple[Mapping[str, Any], ...], tuple[str, ...]]:
    """reasonCode / reasonReference (R4, STU3) or `reason` CodeableReferences (R5)."""
    concepts = list(objects(resource.get("reasonCode")))
    references = list(objects(resource.get("reasonReference")))
    for reason in objects(resource.get("reason")):
        if isinstance(reason.get("concept"), dict):
            concepts.append(reason["concept"])
        if isinstance(reason.get("reference"), dict):
            references.append(reason["reference"])
    targets = []
    for reference in references:
        target = reference.get("reference")
        if isinstance(target, str) and target.startswith("#"):
            # A contained Condition: its code is the indication.
            for contained in objects(resource.get("contained")):
                if contained.get("id") == target[1:] and isinstance(contained.get("code"), dict):
                    concepts.append(contained["code"])
        elif isinstance(target, str):
            targets.append(target)
        if isinstance(reference.get("display"), str):
            concepts.append({"text": reference["display"]})
    return tuple(concepts), tuple(targets)
