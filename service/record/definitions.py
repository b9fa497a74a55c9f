"""The three CDS services: their public ids, hooks, descriptions and prefetch templates.

Ids are a public contract with EHR configurations: never rename them. Prefetch templates use
only CDS Hooks 2.0 tokens ({{context.patientId}}); there are no date tokens in 2.0, so the
look-back windows are applied by the service, not in the query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.clinical.terminology import Terminology

ORDER_SELECT = "rituximab-flare-order-select"
ORDER_SIGN = "rituximab-flare-order-sign"
PATIENT_VIEW = "igm-flare-patient-view"


@dataclass(frozen=True)
class ServiceDefinition:
    id: str
    hook: str
    title: str
    description: str
    prefetch: dict[str, str]

    def discovery_entry(self) -> dict[str, Any]:
        return {
            "hook": self.hook,
            "id": self.id,
            "title": self.title,
            "description": self.description,
            "prefetch": dict(self.prefetch),
            "usageRequirements": (
                "Send FHIR R4 data. Without prefetch the service queries fhirServer with "
                "fhirAuthorization; if it still cannot get the data it answers 412."
            ),
        }


def prefetch_templates(terminology: Terminology) -> dict[str, str]:
    """The same record for every hook: the course of treatment matters to all three.

    Large pages (`_count`) so that a long chart fits in one or a few; servers that cap the page
    size are paged through (`fhir.max_pages`).
    """
    patient = "{{context.patientId}}"
    exchange_codes = ",".join(
        f"{system}|{code}" for system, code in sorted(terminology.plasma_exchange)
    )
    return {
        "patient": f"Patient/{patient}",
        "conditions": f"Condition?patient={patient}&_count=500",
        "igm": (
            f"Observation?patient={patient}&code={terminology.igm_search_codes()}"
            "&_sort=-date&_count=100"
        ),
        "viscosity": (
            f"Observation?patient={patient}&code={terminology.viscosity_search_codes()}"
            "&_sort=-date&_count=50"
        ),
        # Medications are often coded on a referenced Medication resource, not inline; asking
        # for them here lets the record read the code without a second query.
        "medicationRequests": (
            f"MedicationRequest?patient={patient}&_include=MedicationRequest:medication&_count=200"
        ),
        "medicationAdministrations": (
            f"MedicationAdministration?patient={patient}"
            "&_include=MedicationAdministration:medication&_count=200"
        ),
        "procedures": f"Procedure?patient={patient}&code={exchange_codes}&_count=100",
    }


def build_definitions(terminology: Terminology) -> dict[str, ServiceDefinition]:
    prefetch = prefetch_templates(terminology)
    definitions = [
        ServiceDefinition(
            id=ORDER_SELECT,
            hook="order-select",
            title="IgM flare risk: anti-CD20 antibody selected",
            description=(
                "When rituximab or another anti-CD20 antibody is selected for a patient with "
                "Waldenström macroglobulinemia or an IgM paraprotein, warns of IgM flare and "
                "hyperviscosity, using the latest serum IgM and viscosity and the course of "
                "treatment (doses given, plasma exchange)."
            ),
            prefetch=prefetch,
        ),
        ServiceDefinition(
            id=ORDER_SIGN,
            hook="order-sign",
            title="IgM flare risk: anti-CD20 antibody about to be signed",
            description=(
                "Before an anti-CD20 antibody order is signed for a patient with Waldenström "
                "macroglobulinemia or an IgM paraprotein, checks the latest serum IgM and "
                "viscosity and the course of treatment, and advises plasmapheresis or deferring "
                "the antibody when high at the start of therapy."
            ),
            prefetch=prefetch,
        ),
        ServiceDefinition(
            id=PATIENT_VIEW,
            hook="patient-view",
            title="Rising IgM after anti-CD20 therapy or a BTK-inhibitor hold",
            description=(
                "Reads a rising IgM after rituximab (or another anti-CD20 antibody) as probable "
                "IgM flare rather than treatment failure, or after a BTK-inhibitor hold as "
                "rebound, and a confirmed rise after the flare window as possible progression; "
                "escalates when there is evidence of hyperviscosity."
            ),
            prefetch=prefetch,
        ),
    ]
    return {d.id: d for d in definitions}


def fill_template(template: str, context: dict[str, Any]) -> str:
    """Replace {{context.X}} tokens with first-level primitive context values (CDS Hooks 2.0)."""
    result = template
    for key, value in context.items():
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            result = result.replace("{{context." + key + "}}", str(value))
    return result
