"""The HTTP endpoints: discovery, the three hook services, feedback, health and the contract."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from service.api import json_codec
from service.api.errors import ApiError
from service.api.hooks import run_hook
from service.api.runtime import Runtime

log = logging.getLogger("flare_cds.http")
bp = Blueprint("cds", __name__)
JSON_TYPES = ("application/json", "application/fhir+json")


def runtime() -> Runtime:
    return current_app.extensions["flare_cds"]


def read_json_body() -> Any:
    mimetype = (request.mimetype or "").lower()
    if mimetype not in JSON_TYPES:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send the body as application/json, not {mimetype or 'no content type'}",
        )
    raw = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
    try:
        return json_codec.loads(raw)
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "the body is not UTF-8 text") from None
    except json_codec.JSONDecodeError as exc:
        raise ApiError(
            400,
            "invalid_json",
            f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
        ) from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "the body is nested too deeply") from None


def definition_or_404(service_id: str) -> Any:
    definition = runtime().definitions.get(service_id)
    if definition is None:
        raise ApiError(404, "unknown_service", f"no CDS service with id {service_id!r}")
    return definition


@bp.get("/cds-services")
def discovery() -> Response:
    services = [d.discovery_entry() for d in runtime().definitions.values()]
    return jsonify({"services": services})


@bp.post("/cds-services/<service_id>")
def call_service(service_id: str) -> Response:
    rt = runtime()
    definition = definition_or_404(service_id)
    body = read_json_body()
    result = run_hook(rt, definition, body)
    g.log_fields = {"service": service_id, "cards": [c.finding for c in result.cards]}
    if result.cards:
        _record_issued(rt, service_id, definition.hook, result)
    from service.app.links import timeline_target
    from service.cards.links import with_timeline_link

    target = timeline_target(rt.settings, body, result.patient_id)
    return jsonify({"cards": [with_timeline_link(c.card, c.finding, target) for c in result.cards]})


def _record_issued(rt: Runtime, service_id: str, hook: str, result: Any) -> None:
    """Remember what was sent so feedback can be joined to it; never fail the clinical answer."""
    try:
        from service.storage.feedback import IssuedCard, patient_hash

        store = rt.store()
        hashed_patient = patient_hash(rt.patient_hash_key(), result.patient_id)
        issued_at = datetime.now(UTC)
        store.record_issued(
            [
                IssuedCard(
                    uuid=c.card["uuid"],
                    service_id=service_id,
                    hook=hook,
                    hook_instance=result.hook_instance,
                    finding=c.finding,
                    rule_version=c.rule_version,
                    indicator=c.indicator,
                    issued_at=issued_at,
                    patient_hash=hashed_patient,
                )
                for c in result.cards
            ]
        )
    except Exception:
        log.exception("could not record issued cards; the cards were still sent")


@bp.post("/cds-services/<service_id>/feedback")
def feedback(service_id: str) -> Response:
    rt = runtime()
    definition_or_404(service_id)
    body = read_json_body()
    problems = rt.contract.problems("FeedbackRequest", body)
    if problems:
        raise ApiError(
            400,
            "invalid_request",
            "the feedback does not match the CDS Hooks 2.0 schema",
            [p.as_json() for p in problems],
        )
    from service.storage.feedback import InvalidFeedback

    try:
        result = rt.store().record_feedback(service_id, body["feedback"], datetime.now(UTC))
    except InvalidFeedback as exc:
        # Located like a schema problem, so a client fixes the field the same way either way.
        raise ApiError(
            400,
            "invalid_request",
            f"the feedback cannot be stored: {exc}",
            [{"location": exc.location, "problem": exc.problem}],
        ) from None
    answer: dict[str, Any] = {"received": result.received, "duplicates": result.duplicates}
    if result.unknown_cards:
        answer["unknownCards"] = list(result.unknown_cards)
    g.log_fields = {"service": service_id, "feedback": len(body["feedback"])}
    return jsonify(answer)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok", "version": runtime().contract.version})


@bp.get("/openapi.yaml")
def openapi() -> Response:
    return Response(runtime().contract.text, mimetype="application/yaml")
