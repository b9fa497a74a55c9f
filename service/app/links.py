"""Where a hook response's "IgM timeline" links point, decided from the request and settings."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from flask import request
from werkzeug.sansio.utils import get_current_url

from service.cards.links import TimelineTarget
from service.record.address_policy import FhirServerPolicy, FhirServerRefused
from service.settings import Settings


def timeline_target(settings: Settings, body: Mapping[str, Any], patient_id: str) -> TimelineTarget:
    """A SMART launch link, or for a listed open FHIR server called without authorization, a
    direct link to the page."""
    base = (settings.auth.public_base_url or _url_root()).rstrip("/")
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


def _url_root() -> str:
    """request.url_root, which Werkzeug rebuilds for every request through its URI-to-IRI
    decoding (about 20 us, on every call that shows a card); it depends on these three only."""
    return _root_of(request.scheme, request.host, request.root_path)


# Hosts come from the request's Host header: a few are kept, never a growing set.
@lru_cache(maxsize=32)
def _root_of(scheme: str, host: str, root_path: str) -> str:
    return get_current_url(scheme, host, root_path)
