"""The actions a card proposes, as real FHIR R4 resources for the patient in context."""

from __future__ import annotations

from typing import Any

CPT = "http://www.ama-assn.org/go/cpt"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"


def _service_request(
    patient_id: str,
    coding: list[dict[str, str]],
    text: str,
    priority: str,
    reason: str,
    evidence: list[str],
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "draft",
        "intent": "order",
        "priority": priority,
        "code": {"coding": coding, "text": text},
        "subject": {"reference": f"Patient/{patient_id}"},
        "reasonCode": [{"text": reason}],
    }
    if evidence:
        resource["reasonReference"] = [{"reference": ref} for ref in evidence]
    return resource


def plasmapheresis_request(
    patient_id: str,
    urgent: bool,
    reason: str,
    evidence: list[str],
    text: str = "Plasmapheresis before anti-CD20 antibody",
) -> dict[str, Any]:
    return _service_request(
        patient_id,
        [
            {
                "system": CPT,
                "code": "36514",
                "display": "Therapeutic apheresis; for plasma pheresis",
            },
            {"system": SNOMED, "code": "127788007", "display": "Apheresis (procedure)"},
        ],
        text,
        "urgent" if urgent else "routine",
        reason,
        evidence,
    )


def lab_requests(patient_id: str, reason: str) -> list[dict[str, Any]]:
    tests = [
        ("2472-9", "IgM [Mass/volume] in Serum or Plasma", "Serum IgM"),
        ("3128-6", "Viscosity of Serum", "Serum viscosity"),
    ]
    return [
        _service_request(
            patient_id,
            [{"system": LOINC, "code": code, "display": display}],
            text,
            "urgent",
            reason,
            [],
        )
        for code, display, text in tests
    ]


def create_action(description: str, resource: dict[str, Any]) -> dict[str, Any]:
    return {"type": "create", "description": description, "resource": resource}


def delete_action(description: str, reference: str) -> dict[str, Any]:
    return {"type": "delete", "description": description, "resourceId": reference}
