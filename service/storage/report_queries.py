"""The feedback report's query: each finding's cards issued, accepted and overridden, and why.

Reads only; `service.serving.feedback_report` renders the rows it returns.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Runs one query ("?" placeholders) and returns its rows; the caller holds one snapshot for all.
Fetch = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]

TOP_REASONS = 3
UNKNOWN_CARD = "unknown-card"


@dataclass(frozen=True)
class ReportRow:
    """One finding and rule version. Each card counts once, with its latest outcome; the rate is
    overridden / (accepted + overridden), None without feedback; reasons are (display or code,
    cards), most frequent first; suggestions are distinct ids accepted on accepted cards."""

    finding: str
    rule_version: str
    cards_issued: int
    accepted: int
    overridden: int
    override_rate: float | None
    top_override_reasons: list[tuple[str, int]] = field(default_factory=list)
    suggestions_accepted: int = 0


# Each card's outcome counts once: its latest outcomeTimestamp wins (then the latest received).
# Callers may append a WHERE clause on `f`.
_LATEST = """
    SELECT f.service_id, f.card_uuid, f.outcome,
           COALESCE(f.reason_display, f.reason_code) AS reason,
           ROW_NUMBER() OVER (PARTITION BY f.service_id, f.card_uuid
                              ORDER BY f.outcome_at DESC, f.id DESC) AS position
    FROM feedback AS f"""
_KNOWN_CARDS = f"""
    WITH latest AS ({_LATEST})
    SELECT c.finding, c.rule_version, c.service_id, c.uuid, l.outcome, l.reason
    FROM issued_cards AS c
    LEFT JOIN latest AS l
        ON l.card_uuid = c.uuid AND l.service_id = c.service_id AND l.position = 1
    WHERE c.issued_at >= ?"""  # noqa: S608 - composed from constants only
# Joined rather than read from feedback.unknown_card, so a card recorded late is still attributed.
_UNKNOWN_CARDS = f"""
    WITH latest AS ({_LATEST} WHERE f.received_at >= ? AND NOT EXISTS (
        SELECT 1 FROM issued_cards AS c WHERE c.uuid = f.card_uuid AND c.service_id = f.service_id))
    SELECT NULL, NULL, service_id, card_uuid, outcome, reason FROM latest WHERE position = 1
"""  # noqa: S608 - composed from constants only
_ACCEPTED = "SELECT service_id, card_uuid, accepted_suggestions FROM feedback WHERE outcome = ?"


def read_report(fetch: Fetch, since_text: str) -> list[ReportRow]:
    """The report over cards issued and feedback received at or after `since_text` (UTC text as
    the store writes it; "" for all time). The same SQL runs on SQLite and PostgreSQL."""
    cards = fetch(_KNOWN_CARDS, (since_text,))
    cards += fetch(_UNKNOWN_CARDS, (since_text,))
    accepted = fetch(_ACCEPTED, ("accepted",))
    suggestions: dict[tuple[str, str], set[str]] = {}
    for service_id, card, ids in accepted:
        suggestions.setdefault((service_id, card), set()).update(json.loads(ids))
    return _aggregate(cards, suggestions)


def _aggregate(
    cards: list[tuple[Any, ...]], suggestions: Mapping[tuple[str, str], set[str]]
) -> list[ReportRow]:
    """cards: (finding, or NULL when unknown, rule_version, service_id, uuid, outcome, reason)."""
    issued: Counter[tuple[str, str]] = Counter()
    outcomes: Counter[tuple[str, str, str]] = Counter()
    reasons: defaultdict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    suggestion_counts: Counter[tuple[str, str]] = Counter()
    for finding, rule_version, service_id, card, outcome, reason in cards:
        key = (UNKNOWN_CARD, "") if finding is None else (finding, rule_version)
        issued[key] += finding is not None  # adds the key even for unknown cards (+0)
        outcomes[(*key, outcome)] += 1
        if outcome == "overridden" and reason:
            reasons[key][reason] += 1
        if outcome == "accepted":
            suggestion_counts[key] += len(suggestions.get((service_id, card), ()))
    rows = []
    for key in sorted(issued, key=lambda group: (group[0] == UNKNOWN_CARD, group)):
        accepted, overridden = outcomes[(*key, "accepted")], outcomes[(*key, "overridden")]
        rate = overridden / (accepted + overridden) if accepted + overridden else None
        top = sorted(reasons[key].items(), key=lambda pair: (-pair[1], pair[0]))[:TOP_REASONS]
        rows.append(
            ReportRow(*key, issued[key], accepted, overridden, rate, top, suggestion_counts[key])
        )
    return rows
