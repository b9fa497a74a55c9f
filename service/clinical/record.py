"""The patient record one hook call is judged on: plain FHIR JSON, grouped by what it is for.

Resources stay as parsed JSON (no model objects): the assessment reads a handful of fields from
each, and building full models for every Observation would dominate the cost of a call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Resource = Mapping[str, Any]


@dataclass(frozen=True)
class PatientRecord:
    patient_id: str
    conditions: tuple[Resource, ...] = ()
    igm: tuple[Resource, ...] = ()
    viscosity: tuple[Resource, ...] = ()
    medication_requests: tuple[Resource, ...] = ()
    medication_administrations: tuple[Resource, ...] = ()
    procedures: tuple[Resource, ...] = ()
    # Medication resources seen anywhere in the record, by "Medication/id".
    medications: Mapping[str, Resource] = field(default_factory=dict)


# Which prefetch key fills which part of the record, and the resource type expected there.
RECORD_KEYS: dict[str, tuple[str, str]] = {
    "conditions": ("conditions", "Condition"),
    "igm": ("igm", "Observation"),
    "viscosity": ("viscosity", "Observation"),
    "medicationRequests": ("medication_requests", "MedicationRequest"),
    "medicationAdministrations": ("medication_administrations", "MedicationAdministration"),
    "procedures": ("procedures", "Procedure"),
}


def bundle_resources(bundle: Resource) -> list[Resource]:
    """The resources of a Bundle's entries (entries that are not objects, or hold none, skipped)."""
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        return []
    resources = []
    for entry in entries:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict):
            resources.append(resource)
    return resources


def references_patient(resource: Resource, patient_id: str) -> bool:
    """False only when the resource clearly belongs to another patient.

    Bundle-local references (urn:uuid:...) and absent subjects cannot be checked and are kept.
    """
    return patient_test(patient_id)(resource)


def patient_test(patient_id: str) -> Callable[[Resource], bool]:
    """references_patient(resource, patient_id) as a test of one resource, for checking many."""
    # Exactly "Patient/<id>", an id with no "/", is the common case: told without taking the
    # reference apart, with the answer the parts below give it; a subject first, with one
    # comparison (most of a chart's resources).
    own = f"Patient/{patient_id}" if patient_id and "/" not in patient_id else None

    def test(resource: Resource) -> bool:
        subject = resource.get("subject")
        if own is not None and type(subject) is dict and subject.get("reference") == own:
            return True
        for key in ("subject", "patient"):
            ref = resource.get(key)
            if not isinstance(ref, dict) or not isinstance(ref.get("reference"), str):
                continue
            if ref["reference"] == own:
                return True
            reference = ref["reference"].split("/_history/")[0].rstrip("/")
            if reference.startswith(("urn:", "#")):
                return True
            parts = reference.split("/")
            if len(parts) >= 2 and parts[-2] == "Patient":
                return parts[-1] == patient_id
        return True

    return test


def build_record(patient_id: str, searches: Mapping[str, Resource | None]) -> PatientRecord:
    """A record from search results keyed by prefetch key (None meaning "no data")."""
    parts: dict[str, list[Resource]] = {name: [] for name, _ in RECORD_KEYS.values()}
    medications: dict[str, Resource] = {}
    for key, bundle in searches.items():
        if key not in RECORD_KEYS or bundle is None:
            continue
        name, resource_type = RECORD_KEYS[key]
        part = parts[name]
        for resource in bundle_resources(bundle):
            kind = resource.get("resourceType")
            if kind == resource_type:
                part.append(resource)
            elif kind == "Medication" and resource.get("id"):
                medications[f"Medication/{resource['id']}"] = resource
    return PatientRecord(
        patient_id=patient_id,
        conditions=tuple(parts["conditions"]),
        igm=tuple(parts["igm"]),
        viscosity=tuple(parts["viscosity"]),
        medication_requests=tuple(parts["medication_requests"]),
        medication_administrations=tuple(parts["medication_administrations"]),
        procedures=tuple(parts["procedures"]),
        medications=medications,
    )
