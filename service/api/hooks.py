"""One hook call, top to bottom: check the body, find the orders, gather, assess, render.

Draft orders are read before any record is gathered: a call with no anti-CD20 order needs no
patient data at all, so it costs no FHIR query and cannot fail for want of one.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service import metrics
from service.api.contract import REQUEST_SCHEMAS
from service.api.errors import ApiError
from service.api.runtime import Runtime
from service.cards.builder import RenderedCard
from service.cards.followup_cards import render_followup_card
from service.cards.order_cards import render_order_card
from service.clinical.fhir_values import UnreadableData
from service.clinical.followup import assess_followup
from service.clinical.history import drafted_exchanges
from service.clinical.order_risk import assess_orders
from service.clinical.orders import Deviation, DrugOrder, find_drug_orders
from service.record.definitions import ORDER_SELECT, PATIENT_VIEW, ServiceDefinition
from service.record.gathering import DataUnavailable, gather_record

log = logging.getLogger(__name__)
# Elements of MedicationRequest (R4, STU3, R5) and DSTU2 MedicationOrder, for metric labels.
KNOWN_ELEMENTS = frozenset(
    """id meta implicitRules language text contained extension modifierExtension identifier
    instantiatesCanonical instantiatesUri basedOn groupIdentifier status statusReason
    statusChanged intent category priority doNotPerform reported reportedBoolean
    reportedReference medication medicationCodeableConcept medicationReference subject patient
    encounter context supportingInformation authoredOn dateWritten requester performer
    performerType recorder reasonCode reasonReference reason reasonCodeableConcept
    courseOfTherapyType insurance note renderedDosageInstruction effectiveDosePeriod
    dosageInstruction dispenseRequest substitution priorPrescription detectedIssue eventHistory
    definition prescriber dateEnded reasonEnded""".split()
)

# FHIR id syntax; also catches the common "Patient/123" double prefix in patientId.
FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@dataclass(frozen=True)
class HookResult:
    cards: list[RenderedCard]
    patient_id: str
    hook_instance: str


def check_request(runtime: Runtime, definition: ServiceDefinition, body: Any) -> None:
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "the request body must be a JSON object")
    hook = body.get("hook")
    if isinstance(hook, str) and hook != definition.hook:
        raise ApiError(
            400,
            "wrong_hook",
            f"service {definition.id} answers the {definition.hook} hook, not {hook}",
            [{"location": "hook", "problem": f"expected {definition.hook!r}"}],
        )
    problems = runtime.contract.problems(REQUEST_SCHEMAS[definition.hook], body)
    if problems:
        raise ApiError(
            400,
            "invalid_request",
            f"the request does not match the {definition.hook} request schema",
            [p.as_json() for p in problems],
        )
    patient_id = body["context"]["patientId"]
    if not FHIR_ID.match(patient_id):
        raise ApiError(
            400,
            "invalid_request",
            "context.patientId must be a FHIR id (e.g. '123', not 'Patient/123')",
            [{"location": "context.patientId", "problem": "not a FHIR id"}],
        )


def run_hook(
    runtime: Runtime, definition: ServiceDefinition, body: Mapping[str, Any]
) -> HookResult:
    check_request(runtime, definition, body)
    context = body["context"]
    patient_id = context["patientId"]
    now = runtime.clock()
    try:
        if definition.id == PATIENT_VIEW:
            record = gather_record(body, definition, runtime.fetcher)
            findings = assess_followup(record, runtime.terminology, runtime.settings.rules, now)
            cards = [render_followup_card(f, patient_id, runtime.builder) for f in findings]
        else:
            selections = context.get("selections") if definition.id == ORDER_SELECT else None
            orders = find_drug_orders(
                context["draftOrders"], runtime.terminology.anti_cd20, selections, patient_id
            )
            log_deviations(definition.id, orders)
            cards = []
            if orders:
                record = gather_record(body, definition, runtime.fetcher)
                drafted = drafted_exchanges(context["draftOrders"], runtime.terminology)
                finding = assess_orders(
                    record, orders, runtime.terminology, runtime.settings.rules, now, drafted
                )
                if finding is not None:
                    cards.append(render_order_card(finding, patient_id, runtime.builder))
    except UnreadableData as exc:
        details = [{"location": exc.location, "problem": exc.problem}]
        raise ApiError(400, exc.error, exc.message, details) from None
    except DataUnavailable as exc:
        raise ApiError(
            412,
            "prefetch_unavailable",
            "required patient data could not be obtained from prefetch or the FHIR server",
            missing=[m.as_json() for m in exc.missing],
        ) from None
    return HookResult(cards, patient_id, str(body.get("hookInstance", "")))


def deviation_element(deviation: Deviation) -> str:
    """The top-level element of a deviation when it is one FHIR defines for the order, else
    "other": a label must never carry a name the client made up."""
    path = deviation.location.partition(".resource.")[2]
    element = re.split(r"[.\[]", path, maxsplit=1)[0]
    return element if element in KNOWN_ELEMENTS else "other"


def log_deviations(service_id: str, orders: Sequence[DrugOrder]) -> None:
    """One log line per tolerated FHIR deviation: where and what, never the value or patient;
    and a count by element, so an integrator can see which fields a client sends out of shape."""
    for order in orders:
        for deviation in order.deviations:
            metrics.FHIR_DEVIATIONS.labels(service_id, deviation_element(deviation)).inc()
            log.warning(
                "tolerated a FHIR deviation in a draft order",
                extra={
                    "event": "fhir_deviation",
                    "service": service_id,
                    "fhir_version": order.fhir_version,
                    "path": deviation.location,
                    "problem": deviation.problem,
                },
            )
