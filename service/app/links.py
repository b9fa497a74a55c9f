"""Where a hook response's "IgM timeline" links point, decided from the request and settings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import request

from service.cards.links import TimelineTarget
from service.record.address_policy import FhirServerPolicy, FhirServerRefused
from service.settings import Settings


def timeline_target(settings: Settings, body: Mapping[str, Any], patient_id: str) -> TimelineTarget:
    """A SMART launch link, or for a listed open FHIR server called without authorization, a
    direct link to the page."""
    base = (settings.auth.public_base_url or request.url_root).rstrip("/")
    server = body.get("fhirServer")
    if (
        settings.app.open_fhir_servers
        and not body.get("fhirAuthorization")
        and isinstance(server, str)
    ):
        try:
            listed = FhirServerPolicy(settings.app.open_fhir_servers).checked_base(
                server,
                lambda host, port: False,  # listed by name; the page checks DNS itself
            )
        except FhirServerRefused:
            listed = None
        if listed:
            return TimelineTarget(base, listed, patient_id)
    return TimelineTarget(base)
