"""The fixtures' reference instant, and moving their dates to today for servers on the real clock.

Plain Python (no pytest): the benchmark imports it too.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

# Every fixture in fhir_fixtures/ is dated against this instant (see fhir_fixtures/README.md).
FIXTURE_NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def shift_dates(value: Any, delta: timedelta) -> Any:
    """A copy with every FHIR date and dateTime moved by `delta`."""
    if isinstance(value, dict):
        return {k: shift_dates(v, delta) for k, v in value.items()}
    if isinstance(value, list):
        return [shift_dates(v, delta) for v in value]
    if isinstance(value, str) and len(value) >= 10 and value[4:5] == "-" and value[7:8] == "-":
        try:
            if len(value) == 10:
                return (datetime.fromisoformat(value) + delta).date().isoformat()
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return (parsed + delta).isoformat().replace("+00:00", "Z")
        except ValueError:
            return value
    return value


def as_of_today(body: dict[str, Any], now: datetime | None = None) -> dict[str, Any]:
    """Whole days only, so each result keeps its time of day and its distance from "now"."""
    days = ((now or datetime.now(UTC)) - FIXTURE_NOW).days
    return shift_dates(body, timedelta(days=days))
