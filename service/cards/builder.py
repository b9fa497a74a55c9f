"""Findings -> CDS Hooks 2.0 cards, with text from `cards/` and the data shown on the card.

Every card carries a uuid (for feedback), names the data it was computed from (value as
reported, unit, mg/dL, date, resource id), and records the rule version that produced it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.cards.catalog import CardTemplate
from service.cards.markdown import Markdown, inline
from service.settings import CardSettings, RulesSettings
from service.unique_ids import uuid4_str

SUMMARY_LIMIT = 139  # the spec: "<140 characters"
OVERRIDE_SYSTEM = "urn:flare-cds:override-reason"
TOPIC_SYSTEM = "urn:flare-cds:finding"


@dataclass(frozen=True)
class RenderedCard:
    card: dict[str, Any]
    finding: str
    rule_version: str
    indicator: str


@dataclass(frozen=True)
class SuggestionSpec:
    key: str  # which label in the card file
    actions: list[dict[str, Any]]
    recommended: bool = False


def shorten(text: str, limit: int = SUMMARY_LIMIT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def as_markdown(values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` for a Markdown template: plain text escaped, `Markdown` kept as written."""
    return {k: v if isinstance(v, Markdown) else inline(v) for k, v in values.items()}


class CardBuilder:
    """Fills a card template and assembles a card that conforms to openapi.yaml."""

    def __init__(
        self,
        catalog: Mapping[str, CardTemplate],
        cards: CardSettings,
        rules: RulesSettings,
        new_uuid: Callable[[], str] = uuid4_str,
    ) -> None:
        self.catalog = catalog
        self.cards = cards
        self.rules = rules
        self.new_uuid = new_uuid
        # The rules do not change while the app runs: the values every card is filled with are
        # made, and escaped for detail, once rather than on every card.
        self._common = self.common_values()
        self._common_markdown = as_markdown(self._common)

    def common_values(self) -> dict[str, str]:
        rules = self.rules
        return {
            "high_threshold": f"{rules.igm_high_mg_dl:,.0f}",
            "very_high_threshold": f"{rules.igm_very_high_mg_dl:,.0f}",
            "viscosity_threshold": f"{rules.viscosity_critical_cp:g}",
            "lookback_days": str(rules.igm_lookback_days),
            "flare_rise_percent": f"{rules.flare_rise_percent:g}",
            "flare_window_days": str(rules.flare_window_days),
            "btk_hold_window_days": str(rules.btk_hold_window_days),
            "baseline_max_age_days": str(rules.baseline_max_age_days),
            "viscosity_lookback_days": str(rules.viscosity_lookback_days),
            "progression_rise_percent": f"{rules.progression_rise_percent:g}",
        }

    def fragment(self, finding: str, name: str, values: Mapping[str, Any]) -> Markdown:
        """A named fragment of a card's Markdown, filled with `values` escaped as for detail."""
        template = self.catalog[finding]
        return Markdown(template.fill(template.fragments[name], as_markdown(values)))

    def build(
        self,
        finding: str,
        values: Mapping[str, Any],
        suggestions: Sequence[SuggestionSpec] = (),
        selection_behavior: str = "at-most-one",
        indicator: str | None = None,
    ) -> RenderedCard:
        template = self.catalog[finding]
        own = dict(values)
        if isinstance(own.get("drug"), str) and own["drug"]:
            # For sentences that begin with the drug's name.
            own["Drug"] = own["drug"][0].upper() + own["drug"][1:]
        filled = {**self._common, **own}
        # Summary and labels are plain text; detail is Markdown, so plain values are escaped there.
        escaped = {**self._common_markdown, **as_markdown(own)}
        detail = template.fill(template.detail, escaped) + "\n\n" + template.footer
        card: dict[str, Any] = {
            "uuid": self.new_uuid(),
            "summary": shorten(template.fill(template.summary, filled)),
            "detail": detail,
            "indicator": indicator or template.indicator,
            "source": {
                "label": self.cards.source_label,
                "url": self.cards.source_url,
                "topic": {"system": TOPIC_SYSTEM, "code": finding, "display": template.title},
            },
        }
        built = [self._suggestion(template, spec, filled) for spec in suggestions if spec.actions]
        if built:
            card["suggestions"] = built
            card["selectionBehavior"] = selection_behavior
        if template.override_reasons:
            card["overrideReasons"] = [
                {"system": OVERRIDE_SYSTEM, "code": r["code"], "display": r["display"]}
                for r in template.override_reasons
            ]
        return RenderedCard(card, finding, template.version, card["indicator"])

    def _suggestion(
        self, template: CardTemplate, spec: SuggestionSpec, values: Mapping[str, Any]
    ) -> dict[str, Any]:
        suggestion: dict[str, Any] = {
            "label": shorten(template.fill(template.suggestions[spec.key], values), 120),
            "uuid": self.new_uuid(),
            "actions": spec.actions,
        }
        if spec.recommended:
            suggestion["isRecommended"] = True
        return suggestion
