"""Safe reads of FHIR JSON a client sent: a wrong type anywhere means "absent", never a crash.

Prefetch resources are not schema-validated (that would cost more than the whole assessment),
so every reader goes through these. JSON objects are tested as `dict` (what every JSON parser
here makes), not as the `Mapping` ABC: the ABC's check runs in Python, and these run tens of
thousands of times per call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Resource fields that no rule, card or record reads. A large chart's prefetch resources are
# kept without them, and its entries without UNREAD_ENTRY_FIELDS (service.api.json_codec).
# tests/clinical/test_unread_fields.py fails when a service module names one of either as a
# string literal, and checks that every shipped chart gets the same cards read with and
# without them.
UNREAD_FIELDS = frozenset(
    {
        "basedOn",
        "bodySite",
        "category",
        "derivedFrom",
        "device",
        "encounter",
        "hasMember",
        "identifier",
        "interpretation",
        "meta",
        "note",
        "performer",
        "specimen",
    }
)

# The same for a Bundle entry's own fields: `search` (its mode and score) is never read.
UNREAD_ENTRY_FIELDS = frozenset({"search"})


class UnreadableData(ValueError):
    """Client data that cannot be read (HTTP 400); `location` says where, `error` is the code."""

    error = "invalid_request"
    lead = ""

    def __init__(self, location: str, problem: str) -> None:
        super().__init__(f"{location}: {problem}")
        self.location = location
        self.problem = problem

    @property
    def message(self) -> str:
        return f"{self.lead}{self.problem}" if self.lead else f"{self.location}: {self.problem}"


def field(value: Any, *path: str) -> Any:
    """value[path[0]][path[1]]...; None as soon as a step is not an object or lacks the key."""
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def objects(value: Any) -> list[Mapping[str, Any]]:
    """The objects in a JSON array (anything else in it, or a non-array, is skipped)."""
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, dict)]
