"""The "IgM timeline" link every card carries (CDS Hooks 2.0 "Link").

A `smart` link names the app's launch URL; the EHR adds `iss` and `launch` and hands the
`appContext` back in its token answer. `appContext` holds only the finding and the card's uuid:
the app re-reads the patient's data rather than trusting anything a card carried. For an open
FHIR server (no authorization at all) the link is `absolute`, straight to the page.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

LABEL = "IgM timeline"
# One encoder for every card: json.dumps with separators builds a new one on each call.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


@dataclass(frozen=True)
class TimelineTarget:
    """Where a card's link goes: the SMART launch URL, or the page on an open FHIR server."""

    base_url: str  # the service's public base URL, no trailing slash
    open_server: str | None = None  # the request's fhirServer, when it is a listed open one
    patient_id: str | None = None

    def link(self, finding: str, card_uuid: str) -> dict[str, Any]:
        if self.open_server and self.patient_id:
            # The finding puts the card's own reading first on the page, as appContext does
            # for a SMART launch; it names a rule, nothing about the patient.
            query = urlencode(
                {"iss": self.open_server, "patient": self.patient_id, "finding": finding}
            )
            return {
                "label": LABEL,
                "url": f"{self.base_url}/app/timeline?{query}",
                "type": "absolute",
            }
        context = _COMPACT_JSON.encode({"finding": finding, "card": card_uuid})
        return {
            "label": LABEL,
            "url": f"{self.base_url}/app/launch",
            "type": "smart",
            "appContext": context,
        }


def with_timeline_link(
    card: dict[str, Any], finding: str, target: TimelineTarget
) -> dict[str, Any]:
    """A copy of `card` with the timeline link added after any links it already has."""
    links = [*card.get("links", []), target.link(finding, card["uuid"])]
    return {**card, "links": links}
